//! Flywheel's data model and storage backends (DESIGN.md §4–§5).
//!
//! - [`types`]: prompts, trajectories, segments, groups, step batches.

pub mod types;

pub use types::*;
