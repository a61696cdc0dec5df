//! flywheel-trainer: the learning side of Flywheel (DESIGN.md §3, §6.4, §6.5).
//!
//! A trainer rank takes its part of a step batch, recomputes log-probs under θ_old, and turns
//! them into a weight update. This crate holds the pieces of that update that do not depend
//! on any particular model:
//!
//! - [`loss`]: the training objectives over token-level inputs. [`loss::PolicyLoss`] is the
//!   IcePop-masked PPO-clip loss with C3PO's constant normalizer 1/Φ (and an optional k3 KL
//!   penalty toward θ_old); [`loss::supervised_loss`] is the cross-entropy loss used to
//!   warm-start a policy from reference solutions. Each returns the loss, its gradient with
//!   respect to every token's new log-prob (what the model's backward pass consumes), and
//!   additive per-step statistics (masked-token fraction, mean |log k|, clip fraction,
//!   tokens trained).
//! - [`optim`]: [`optim::AdamW`] with bias correction, decoupled weight decay and global
//!   gradient-norm clipping over named f32 tensors; its state serialises to checksummed bytes
//!   and restores bit-identically, for checkpoints.
//!
//! - [`step`]: one rank's share of a step: concurrent, checksum-verified segment fetch,
//!   trajectory stitching, forward under θ_old, IcePop loss on the trained range, backward into
//!   summed gradients; the AdamW update; and [`step::supervised_step`] for warm starts.
//! - [`service`]: the trainer service (`flywheel trainer`): the step-board loop, the finisher
//!   (rank-ordered gradient sum, AdamW, incremental weight publication, optimizer state,
//!   checkpoints and their retention) and `--resume` ([`service::Trainer::restore`]).
//! - [`warm_start`]: the supervised warm start and the publication of version 0.
//! - [`exchange`]: the collective gradient exchange of a step's ranks (NCCL between GPUs),
//!   with the object store as its fallback.
//! - [`config`]: the `[trainer]` section and [`ServiceConfig`]; [`grads`]: the per-rank
//!   gradient object; [`metrics`]: the trainer's Prometheus metrics.
//!
//! Because the loss is divided by the constant Φ rather than the batch's token count, the
//! gradients of micro-batches and ranks are summed (not averaged) before [`optim::AdamW::step`].

#![warn(missing_docs)]

pub mod config;
pub mod exchange;
pub mod grads;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod service;
pub mod step;
pub mod warm_start;

pub use config::{ServiceConfig, TrainerConfig};
pub use exchange::ExchangeKind;
pub use loss::{
    LossConfig, LossError, LossMode, LossOutput, LossStats, PolicyLoss, PolicyTokens,
    SupervisedTokens, supervised_loss,
};
pub use optim::{AdamW, AdamWConfig, DeviceAdamW, OptimError, Param, StepReport};
pub use service::{
    Exchanged, FinishPoint, StepBytes, StepObserver, StepOutcome, Trainer, TrainerError,
    publish_params, run_observed, run_until,
};
