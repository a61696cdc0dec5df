//! The `flywheel` library: the pieces of the `flywheel` binary that examples and tests reuse.
//!
//! - [`config`]: the run's config file and its environment overrides;
//! - [`warm_start`]: the built-in task's warm start and its publication as version 0;
//! - [`demo`]: `flywheel demo`, the whole loop in one process.

pub mod config;
pub mod demo;
pub mod warm_start;
