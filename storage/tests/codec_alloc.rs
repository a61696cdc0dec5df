//! The decoder does not allocate what a forged length field asks for.
//!
//! A separate test binary, because it installs a counting global allocator: it records the
//! largest single allocation made on the measuring thread while measurement is on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use flywheel_storage::codec::{self, CodecError, FORMAT_VERSION, MAGIC};

struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers every operation to `System`; the bookkeeping touches only const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    // `try_with`: the thread-locals may already be gone while a thread shuts down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (out, LARGEST.with(|l| l.get()))
}

#[test]
fn forged_lengths_allocate_nothing_large() {
    // Prompt-id length u32::MAX.
    let mut prompt = MAGIC.to_vec();
    prompt.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    prompt.extend_from_slice(&u32::MAX.to_le_bytes());
    prompt.extend_from_slice(&[b'a'; 64]);

    // Token count u32::MAX behind a valid prompt id.
    let mut tokens = MAGIC.to_vec();
    tokens.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    tokens.extend_from_slice(&1u32.to_le_bytes());
    tokens.push(b'p');
    tokens.extend_from_slice(&[0u8; 4 + 4 + 8 + 8 + 1]);
    tokens.extend_from_slice(&u32::MAX.to_le_bytes());
    tokens.extend_from_slice(&[0u8; 64]);

    // Token count at the limit (legal), input far shorter than it claims.
    let mut short = tokens.clone();
    let n_at = short.len() - 64 - 4;
    short[n_at..n_at + 4].copy_from_slice(&(codec::MAX_TOKENS_PER_SEGMENT as u32).to_le_bytes());

    for (name, input) in [
        ("prompt length", &prompt),
        ("token count", &tokens),
        ("short", &short),
    ] {
        let (result, largest) = largest_allocation(|| codec::decode(input));
        assert!(
            matches!(
                result,
                Err(CodecError::Oversized { .. } | CodecError::Truncated { .. })
            ),
            "{name}: {result:?}"
        );
        // Error values carry at most a short message; nothing sized by the forged length.
        assert!(
            largest < 4096,
            "{name}: decoder allocated {largest} bytes for a forged length"
        );
    }
}

#[test]
fn decoding_a_valid_segment_allocates_only_its_size() {
    let segment = flywheel_storage::Segment {
        trajectory: flywheel_storage::TrajectoryId {
            prompt: "p".into(),
            sample: 0,
        },
        seq: 0,
        version: 0,
        lease_epoch: 1,
        tokens: vec![1; 1000],
        logprobs: vec![-1.0; 1000],
        finish: flywheel_storage::FinishReason::None,
    };
    let bytes = codec::encode(&segment).unwrap();
    let (result, largest) = largest_allocation(|| codec::decode(&bytes));
    assert_eq!(result.unwrap().tokens.len(), 1000);
    // The largest buffer is one of the two 4000-byte vectors: the measurement is live.
    assert_eq!(largest, 4000);
}
