//! Flywheel's data model and storage backends (DESIGN.md §4–§5).
//!
//! - [`types`]: prompts, trajectories, segments, groups, step batches.
//! - [`queue`]: the Kafka prompt queue (consumer group, ack-gated offsets, dead letters).
//! - [`state`]: run state (trajectory index, leases, budgets, finished stream, membership,
//!   leader lock) in Redis or memory.
//! - [`blob`]: object storage by URL (`s3://`, `file://`, `memory://`) with retries and
//!   create-if-absent.
//! - [`config`]: storage locations and the rollout/batch protocol parameters.
//! - [`keys`]: every object-store key of a run, built in one place.
//! - [`weights`]: versioned, content-addressed policy weights (incremental publish and fetch).
//! - [`codec`]: the binary segment codec (versioned, checksummed, panic-free decoder).
//! - [`ledger`]: the durable record of runs, prompts, steps and checkpoints (PostgreSQL or
//!   SQLite).
//! - [`stores`]: [`RunStores`], all of a run's stores opened from its configuration.
//! - `testkit` (feature `testsuite`): where the tests' real services are, bounded waits,
//!   builders; the backends' conformance suites are behind the same feature.

pub mod blob;
pub mod codec;
pub mod config;
pub mod keys;
pub mod ledger;
pub mod queue;
pub mod state;
pub mod stores;
#[cfg(any(test, feature = "testsuite"))]
pub mod testkit;
pub mod types;
pub mod weights;

pub use stores::RunStores;
pub use types::*;
