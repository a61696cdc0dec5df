//! flywheel-model: the built-in policy, a small decoder-only transformer (DESIGN.md §3).
//!
//! - [`ModelConfig`] sizes it; [`Params`] holds its weights as named tensors in a stable order
//!   (deterministic init from a seed, serialisation to name → little-endian `f32` bytes).
//! - [`Model`] runs on a [`Backend`] (the CPU now via [`CpuBackend`]; CUDA is another
//!   implementation of the same trait): [`Model::forward`] scores the response tokens of a
//!   batch of sequences (log-prob and entropy per token), [`Model::backward`] accumulates
//!   parameter gradients from dL/d(log-prob) and dL/d(entropy).
//! - [`Sampler`] generates with a KV cache (temperature, top-p), reporting each sampled
//!   token's log-prob, and can continue a partial response after a prefill.
//! - [`Tokenizer`] is the character-level tokenizer of the built-in arithmetic task.

mod backend;
mod config;
mod cpu;
mod error;
mod model;
mod params;
mod sample;
mod tokenizer;

pub use backend::{Backend, Gemm, IGNORE_TARGET, MatLayout};
pub use config::{ModelConfig, NormKind};
pub use cpu::CpuBackend;
pub use error::{ModelError, Result};
pub use model::{ForwardCache, Gradients, Model, Sequence};
pub use params::{Params, Tensor};
pub use sample::{SampleConfig, Sampler, StopReason};
pub use tokenizer::{Tokenizer, TokenizerError};
