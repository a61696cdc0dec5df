//! flywheel-service: what every Flywheel service has, written once (DESIGN.md §3).
//!
//! - [`admin`]: the admin HTTP server, `/metrics`, `/healthz` (the process is up) and
//!   `/readyz` (started, not draining, and every dependency answers), with room for a
//!   service's own routes;
//! - [`metrics`]: registering Prometheus metrics in a service's registry;
//! - [`shutdown`]: the future that resolves on SIGINT or SIGTERM (only the binary awaits it:
//!   services take a shutdown future, as mini-redis' `server::run` does);
//! - [`member_id`]: the default member id of a process;
//! - [`ConfigError`]: a configuration value that cannot work, naming the field;
//! - [`redact_url`]: a URL fit for a log line;
//! - [`Backoff`]: bounded exponential backoff with jitter.

#![warn(missing_docs)]

pub mod admin;
mod backoff;
mod config;
mod member;
pub mod metrics;
mod redact;
pub mod shutdown;

pub use admin::{AdminServer, Readiness};
pub use backoff::Backoff;
pub use config::ConfigError;
pub use member::member_id;
pub use redact::redact_url;
