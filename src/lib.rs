//! The `flywheel` library: the pieces of the `flywheel` binary that examples and tests reuse.

pub mod config;
pub mod demo;
