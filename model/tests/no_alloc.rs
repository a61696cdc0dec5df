//! The sampling loop allocates nothing per token (a counting global allocator, alone in this
//! test binary).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use flywheel_model::{Model, ModelConfig, Params, SampleConfig, Sampler, StopReason};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
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
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let stop = sampler
            .generate(&model, &sc, 150, &[], &mut rng, &mut toks, &mut lps)
            .unwrap();
        let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(stop, StopReason::MaxNewTokens);
        assert_eq!(toks.len(), 150);
        assert_eq!(
            allocated, 0,
            "top_p {top_p} top_k {top_k}: {allocated} allocations in 150 tokens"
        );
    }
}
