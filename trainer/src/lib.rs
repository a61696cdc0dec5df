//! flywheel-trainer (see DESIGN.md §3).
