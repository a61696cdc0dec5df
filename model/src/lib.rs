//! flywheel-model (see DESIGN.md §3).
