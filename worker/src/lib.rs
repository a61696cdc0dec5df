//! flywheel-worker (see DESIGN.md §3).
