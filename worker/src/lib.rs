//! flywheel-worker: the rollout worker (DESIGN.md §3, §6.1, §6.2).
//!
//! - [`engine`]: the [`engine::Engine`] trait that generates one segment of one trajectory,
//!   and its implementations (`sim`, `openai`);
//! - [`verify`]: rewards for finished trajectories ([`verify::Verifier`]);
//! - [`http`]: JSON over HTTP with bounded timeouts and retries, shared by both.

#![warn(missing_docs)]

pub mod engine;
pub mod http;
pub mod verify;
