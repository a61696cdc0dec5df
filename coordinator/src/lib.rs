//! flywheel-coordinator (see DESIGN.md §3).
