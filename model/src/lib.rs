//! flywheel-model: the policy, a decoder-only transformer of the Llama / Qwen2 / Qwen3 family
//! (DESIGN.md §3).
//!
//! - [`ModelConfig`] describes one model of the family (the built-in one is a tiny Qwen2);
//!   [`Params`] holds its weights as named tensors in a stable order, under their Hugging Face
//!   names (deterministic init from a seed, serialisation to name → little-endian `f32` bytes).
//! - [`Model`] runs on a [`Backend`] (the CPU now via [`CpuBackend`]; CUDA is another
//!   implementation of the same trait): [`Model::forward`] scores the response tokens of a
//!   batch of sequences (log-prob and entropy per token), [`Model::backward`] accumulates
//!   parameter gradients from dL/d(log-prob) and dL/d(entropy).
//! - [`Sampler`] generates with a KV cache (temperature, top-k, top-p, stop tokens), reporting each sampled
//!   token's log-prob, and can continue a partial response after a prefill.
//! - [`Tokenizer`] is the character-level tokenizer of the built-in arithmetic task.
//!
//! ```
//! use flywheel_model::{Model, ModelConfig, Params, SampleConfig, Sampler, Sequence, Tokenizer};
//! use rand::SeedableRng;
//!
//! let tok = Tokenizer::arithmetic();
//! let params = Params::init(&ModelConfig::tiny(tok.vocab_size()), 0)?;
//! let mut model = Model::cpu(&params)?;
//!
//! // A worker: sample a response, with the log-prob of each sampled token.
//! let prompt = tok.encode_prompt("3+14+7=").unwrap();
//! let mut sampler = Sampler::new(&model)?;
//! sampler.prefill(&model, &prompt)?;
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
//! let (mut response, mut infer_logprobs) = (Vec::new(), Vec::new());
//! sampler.generate(&model, &SampleConfig::default(), 16, &[Tokenizer::EOS], &mut rng,
//!                  &mut response, &mut infer_logprobs)?;
//!
//! // A trainer: recompute the log-probs and push them up by gradient ascent.
//! let tokens = [prompt.clone(), response].concat();
//! let seqs = [Sequence { tokens: &tokens, response_start: prompt.len() }];
//! let cache = model.forward(&seqs)?;
//! for (a, b) in cache.logprobs().iter().zip(&infer_logprobs) {
//!     assert!((a - b).abs() < 1e-4); // π_train = π_infer at temperature 1
//! }
//! let mut grads = model.new_gradients()?;
//! let d_logprob = vec![-1.0; cache.logprobs().len()]; // dL/dlogπ for L = −Σ logπ
//! model.backward(&cache, &d_logprob, None, &mut grads)?;
//! let grads = model.gradients_to_params(&grads)?;
//! let mut params = params;
//! for (p, g) in params.tensors_mut().iter_mut().zip(grads.tensors()) {
//!     p.data.iter_mut().zip(&g.data).for_each(|(x, dx)| *x -= 0.01 * dx);
//! }
//! model.load_params(&params)?;
//!
//! // Publishing and loading: name → little-endian f32 bytes.
//! let published = params.to_bytes_map();
//! let loaded = Params::from_bytes_map(params.config(), &published)?;
//! assert_eq!(loaded, params);
//! # Ok::<(), flywheel_model::ModelError>(())
//! ```

#![warn(missing_docs)]

pub mod adamw;
mod backend;
mod checks;
mod config;
mod cpu;
pub mod cuda;
mod device;
mod device_backend;
mod error;
pub mod hf;
mod model;
mod params;
mod pool;
mod sample;
mod text;
mod tokenizer;

pub use adamw::AdamWStep;
pub use backend::{Backend, Gemm, IGNORE_TARGET, MatLayout, Products};
pub use config::{Architecture, Llama3Rope, ModelConfig, WeightDtype};
pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
pub use device::Device;
pub use device_backend::{DeviceBackend, DeviceBuf};
pub use error::{ModelError, Result};
pub use hf::Checkpoint;
pub use model::{ForwardCache, Gradients, Model, Sequence};
pub use params::{Params, Tensor};
pub use sample::{SampleConfig, Sampler, StopReason};
pub use text::{ChatMessage, HfTokenizer, TextCodec};
pub use tokenizer::{Tokenizer, TokenizerError};
