//! `flywheel demo`: the built-in task the demo trains on (see [`task`]).
//!
//! The demo warm-starts the built-in model on the task's reference responses for a
//! deliberately short while, then improves it with RL; `examples/demo_recipe.rs` runs the
//! same recipe in one process without the infrastructure, to calibrate its settings.

pub mod distributed;
pub mod progress;
pub mod report;
pub mod rewards;
pub mod run;
pub mod task;

pub use task::{Problem, ProblemStream, Split, TaskConfig, TaskError, held_out_set};
