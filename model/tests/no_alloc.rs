//! The sampling loop allocates nothing per token, and a training pass of a shape seen before
//! allocates no large buffer (a counting global allocator, alone in this test binary; each
//! thread counts its own allocations so that the tests may run side by side).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use flywheel_model::{Model, ModelConfig, Params, SampleConfig, Sampler, Sequence, StopReason};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Counting;

/// Allocations of at least this many bytes are "large".
const LARGE: usize = 2 << 20;

thread_local! {
    /// Allocations (and reallocations) made by this thread: all of them, and the large ones.
    static ALLOCATIONS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn count(size: usize) {
    // `try_with`: a thread being torn down has no counter any more.
    let _ = ALLOCATIONS.try_with(|c| {
        let (all, large) = c.get();
        c.set((all + 1, large + usize::from(size >= LARGE)));
    });
}

/// This thread's (all, large) allocation counts so far.
fn allocations() -> (usize, usize) {
    ALLOCATIONS.with(Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn generate_allocates_nothing_per_token() {
    let mut cfg = ModelConfig::tiny(20);
    cfg.max_seq_len = 200;
    let model = Model::cpu(&Params::init_scaled(&cfg, 0, 10.0).unwrap()).unwrap();
    let mut sampler = Sampler::new(&model).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mut toks, mut lps) = (Vec::with_capacity(200), Vec::with_capacity(200));
    for (top_p, top_k) in [(1.0, 0), (0.9, 0), (0.9, 5)] {
        let sc = SampleConfig {
            temperature: 0.8,
            top_p,
            top_k,
        };
        sampler.prefill(&model, &[1, 2, 3]).unwrap();
        toks.clear();
        lps.clear();
        let before = allocations().0;
        let stop = sampler
            .generate(&model, &sc, 150, &[], &mut rng, &mut toks, &mut lps)
            .unwrap();
        let allocated = allocations().0 - before;
        assert_eq!(stop, StopReason::MaxNewTokens);
        assert_eq!(toks.len(), 150);
        assert_eq!(
            allocated, 0,
            "top_p {top_p} top_k {top_k}: {allocated} allocations in 150 tokens"
        );
    }
}

/// Activations and backward scratch come from the model's pool: once a pass of some shape has
/// run, the next pass of that shape (or a smaller one) maps no new memory for them.
#[test]
fn a_training_pass_of_a_known_shape_allocates_no_large_buffer() {
    let cfg = ModelConfig::tiny(20);
    let model = Model::cpu(&Params::init(&cfg, 0).unwrap()).unwrap();
    let mut grads = model.new_gradients().unwrap();
    // 48 sequences of 64 tokens: each MLP activation (rows × d_ff) is over 2 MiB.
    let tokens: Vec<Vec<u32>> = (0..48u32)
        .map(|s| (0..64u32).map(|i| (s * 7 + i * 3) % 20).collect())
        .collect();
    assert!(48 * 64 * cfg.d_ff * 4 >= LARGE);
    let mut pass = |n: usize| {
        let seqs: Vec<Sequence<'_>> = tokens[..n]
            .iter()
            .map(|t| Sequence {
                tokens: t,
                response_start: 8,
            })
            .collect();
        let before = allocations().1;
        let cache = model.forward(&seqs).unwrap();
        let d_logprob = vec![0.1; cache.logprobs().len()];
        model
            .backward(&cache, &d_logprob, None, &mut grads)
            .unwrap();
        drop(cache);
        allocations().1 - before
    };
    assert!(pass(48) > 0, "the first pass allocates its buffers");
    assert_eq!(pass(48), 0, "a second pass of the same shape");
    assert_eq!(pass(40), 0, "a smaller pass");
}
