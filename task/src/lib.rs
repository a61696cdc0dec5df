//! flywheel-task: the built-in task Flywheel trains on out of the box, apart from any runner
//! (the demo, `flywheel ingest --demo-task`, `flywheel trainer --warm-start-steps` and
//! `flywheel rewards` all use it).
//!
//! - [`problems`]: add a list of digits, writing the running totals, then the answer; a
//!   seeded long-tailed stream of problems and a held-out split;
//! - [`rewards`]: the task's exact reward as an HTTP reward service;
//! - [`section`]: the `[task]` section of a run's config and the prompts it makes;
//! - [`eval`]: held-out accuracy of a model.

pub mod eval;
pub mod problems;
pub mod rewards;
pub mod section;

pub use eval::accuracy;
pub use problems::{Problem, ProblemStream, Split, TaskConfig, TaskError, held_out_set};
pub use section::TaskSection;

/// A deterministic 64-bit mix of several numbers (SplitMix64 finaliser): seeds of the streams
/// a run derives from one seed.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}
