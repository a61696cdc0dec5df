//! `flywheel demo`: the whole loop in one process on the built-in task
//! (`flywheel_task`). It warm-starts the built-in model on the task's reference responses for
//! a deliberately short while, then improves it with RL; `examples/demo_recipe.rs` runs the
//! same recipe in one process without the infrastructure, to calibrate its settings.
//!
//! - [`args`]: the settings and the run's configuration on the embedded stores;
//! - [`run`]: the phases (warm start, evaluation, RL, evaluation, report);
//! - [`rl`]: the RL phase on the services;
//! - [`progress`], [`report`]: what the person running it sees.

pub mod args;
pub mod progress;
pub mod report;
pub mod rl;
pub mod run;
