//! flywheel-coordinator (see DESIGN.md §3).

pub mod batch;
pub mod partition;
