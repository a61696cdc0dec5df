//! flywheel-coordinator (see DESIGN.md §3, §6.1, §6.3, §7).
//!
//! - [`batch`], [`partition`]: GRPO groups, the C3PO cut, rank partition and micro-batches
//!   (pure functions).
//! - [`service`]: the coordinator loop: leader election, versions and budgets, the finished
//!   stream, step cuts and the crash-safe commit protocol.
//! - [`rebuild`]: the state store rebuilt from the ledger and the object store after it was
//!   lost.
//! - [`http`]: the HTTP API (status, admin).
//! - [`status`]: the run's status report, for `/v1/status` and `flywheel status`.
//! - [`config`]: the `[coordinator]` section and [`ServiceConfig`].
//! - [`run_until`]: the coordinator service; [`run_status`]: `flywheel status`.

pub mod batch;
pub mod config;
pub mod http;
pub mod metrics;
pub mod partition;
pub mod rebuild;
mod run;
pub mod service;
pub mod status;

pub use config::{CoordinatorConfig, ServiceConfig};
pub use run::run_until;
pub use service::{Coordinator, CoordinatorError, CrashPoint, TickOutcome};
pub use status::run_status;
