//! The `flywheel` library: the pieces of the `flywheel` binary that examples and tests reuse.
//!
//! - [`bench`]: `flywheel bench trainer` (throughput beside PyTorch eager) and `bench weights`
//!   (publishing and loading a version, incremental against whole);
//! - [`checkpoint_source`]: a checkpoint directory or object-store URL, as a local folder;
//! - [`config`]: the run's config file and its environment overrides;
//! - [`warm_start`]: the built-in task's warm start and its publication as version 0;
//! - [`demo`]: `flywheel demo`, the whole loop in one process;
//! - [`model_cli`]: `flywheel model logprobs|generate` on a checkpoint directory;
//! - [`weights_cli`]: `flywheel weights export`, a published version as a checkpoint directory.

pub mod audit;
pub mod bench;
pub mod checkpoint_source;
pub mod config;
pub mod demo;
pub mod model_cli;
pub mod warm_start;
pub mod weights_cli;
