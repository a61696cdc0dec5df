//! AdamW with decoupled weight decay and global gradient-norm clipping, over named f32
//! tensors, with a state that serialises to bytes and restores bit-identically (checkpoints,
//! DESIGN.md §6.5).
//!
//! The optimizer knows nothing about the model: each step it is handed a list of
//! [`Param`]s (name, values, gradient). The first step fixes the list; every later step, and
//! every restored state, must present the same names and sizes in the same order, so a
//! checkpoint can never silently be applied to the wrong tensors.
//!
//! # Weights stored in bf16 or f16
//!
//! A small learning rate moves a weight by far less than one bf16 step, so stepping rounded
//! weights would lose most updates. [`AdamW::with_weight_dtype`] keeps an `f32` *master* copy of
//! every tensor in the optimizer state (initialised from the values of the first step): each
//! step updates the masters and hands back the masters rounded to the dtype, which is what
//! the model computes with and what is published. The masters travel in
//! [`AdamW::state_bytes`], so a restored optimizer continues bit for bit.
//!
//! # On the model's device
//!
//! [`DeviceAdamW`] runs the same steps where the model holds its weights (a GPU, or the CPU
//! backend): the moments and the masters stay there between steps, and the gradient norm
//! and every element are computed by the backend with the arithmetic of
//! [`flywheel_model::adamw`], which is also what [`AdamW::step`] uses. The two give the same
//! bits, so a checkpoint written by one continues on the other and a step replayed on the
//! host reaches the weights the device published.

use flywheel_model::adamw::{AdamWStep, sum_squares_blocks};
use flywheel_model::{Backend, Gradients, MatLayout, Model, ModelError, Params, WeightDtype};
use flywheel_storage::codec::{ByteReader, Truncated};
use serde::{Deserialize, Serialize};

/// Configuration of AdamW (a table of the trainer's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first-moment (mean) estimate.
    pub beta1: f64,
    /// Decay rate of the second-moment (uncentred variance) estimate.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by `1 − lr·weight_decay`.
    pub weight_decay: f64,
    /// Gradients whose global L2 norm exceeds this are scaled down to it; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Steps over which the learning rate falls linearly from `lr` to
    /// `lr · final_lr_fraction` (and then stays); 0 keeps `lr` constant. Annealing steadies
    /// the last weights of a run whose length is known.
    pub decay_steps: u64,
    /// The fraction of `lr` reached after `decay_steps`.
    pub final_lr_fraction: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // The usual values for RL post-training of language models (as in verl / OpenRLHF).
        Self {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            decay_steps: 0,
            final_lr_fraction: 0.1,
        }
    }
}

impl AdamWConfig {
    /// Checks that the values make sense; the error names the field and the valid range.
    pub fn validate(&self) -> Result<(), OptimError> {
        let invalid = |msg: String| Err(OptimError::InvalidConfig(msg));
        if !self.lr.is_finite() || self.lr < 0.0 {
            return invalid(format!("lr = {} must be a finite number ≥ 0", self.lr));
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return invalid(format!("{name} = {beta} must lie in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return invalid(format!("eps = {} must be a finite number > 0", self.eps));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return invalid(format!(
                "weight_decay = {} must be a finite number ≥ 0",
                self.weight_decay
            ));
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm < 0.0 {
            return invalid(format!(
                "max_grad_norm = {} must be a finite number ≥ 0 (0 turns clipping off)",
                self.max_grad_norm
            ));
        }
        if !(0.0..=1.0).contains(&self.final_lr_fraction) {
            return invalid(format!(
                "final_lr_fraction = {} must lie in [0, 1]",
                self.final_lr_fraction
            ));
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (1 for the first).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.decay_steps == 0 {
            return self.lr;
        }
        let progress = step.min(self.decay_steps) as f64 / self.decay_steps as f64;
        self.lr * (1.0 - (1.0 - self.final_lr_fraction) * progress)
    }
}

/// What can go wrong stepping, saving or restoring the optimizer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    /// The configuration is unusable; the message names the field and the fix.
    #[error("invalid optimizer config: {0}")]
    InvalidConfig(String),
    /// A step presented a different number of tensors than the optimizer state holds.
    #[error(
        "optimizer holds state for {expected} tensors but the step passed {actual}: pass the \
         model's full parameter list, in the same order, every step"
    )]
    ParamCount {
        /// Tensors in the optimizer state.
        expected: usize,
        /// Tensors passed.
        actual: usize,
    },
    /// A tensor's name or size differs from the one in the optimizer state at that position.
    #[error(
        "tensor #{index} is `{actual_name}` with {actual_len} values but the optimizer state \
         has `{expected_name}` with {expected_len}: the model and the optimizer state (or \
         checkpoint) do not belong together"
    )]
    ParamMismatch {
        /// Position in the list.
        index: usize,
        /// Name in the optimizer state.
        expected_name: String,
        /// Number of values in the optimizer state.
        expected_len: usize,
        /// Name passed.
        actual_name: String,
        /// Number of values passed.
        actual_len: usize,
    },
    /// Two tensors share a name.
    #[error("tensor name `{0}` appears twice: parameter names must be unique")]
    DuplicateName(String),
    /// A gradient does not have as many values as its tensor.
    #[error("gradient of `{name}` has {grad_len} values but the tensor has {param_len}")]
    GradLength {
        /// The tensor.
        name: String,
        /// Values in the tensor.
        param_len: usize,
        /// Values in the gradient.
        grad_len: usize,
    },
    /// A gradient holds NaN or an infinity; nothing was updated.
    #[error(
        "gradient of `{name}` is not finite at index {index}: the step was skipped and no \
         weight or optimizer state changed (lower the learning rate or check the loss inputs)"
    )]
    NonFiniteGradient {
        /// The tensor.
        name: String,
        /// The first bad index.
        index: usize,
    },
    /// Serialised optimizer state could not be decoded.
    #[error("optimizer state is corrupt or truncated: {0}; restore from another checkpoint")]
    CorruptState(&'static str),
    /// The device the optimizer steps on failed.
    #[error("optimizer on the device: {0}")]
    Device(String),
    /// Serialised optimizer state was written by an unknown format version.
    #[error(
        "optimizer state has format version {0}, this build reads versions \
         {FORMAT_F32_WEIGHTS} and {FORMAT_WITH_MASTERS}"
    )]
    UnsupportedVersion(u32),
}

/// One tensor handed to [`AdamW::step`]: its name, its values (updated in place; rounded to
/// the optimizer's weight dtype) and its gradient.
#[derive(Debug)]
pub struct Param<'a> {
    /// A name unique within the model, stable across runs (it keys the optimizer state).
    pub name: &'a str,
    /// The tensor's values, updated in place.
    pub value: &'a mut [f32],
    /// dL/d value, same length as `value`.
    pub grad: &'a [f32],
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    /// The optimizer's step count after this step (1 after the first).
    pub step: u64,
}

/// Per-tensor AdamW moments.
#[derive(Debug, Clone, PartialEq, Default)]
struct Moments {
    name: String,
    /// First-moment (mean) estimate.
    m: Vec<f32>,
    /// Second-moment (uncentred variance) estimate.
    v: Vec<f32>,
    /// The `f32` weights the steps move when the stepped values are stored in a narrower
    /// dtype (their rounding is what the caller holds); empty for `f32` weights.
    master: Vec<f32>,
}

/// AdamW (Loshchilov & Hutter) with bias correction, decoupled weight decay and global
/// gradient-norm clipping.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    /// Steps taken so far (the t of the bias correction).
    step: u64,
    /// One entry per tensor, in the order the steps pass them; empty before the first step.
    moments: Vec<Moments>,
    /// The dtype the stepped values are stored in; anything but `f32` keeps masters.
    weight_dtype: WeightDtype,
}

/// Magic bytes opening serialised optimizer state.
const MAGIC: &[u8; 8] = b"FWADAMW\0";
/// The format of states of `f32` weights (no masters).
const FORMAT_F32_WEIGHTS: u32 = 1;
/// The format of states that keep masters: the weight dtype after the step count, and each
/// tensor's masters after its moments.
const FORMAT_WITH_MASTERS: u32 = 2;

impl AdamW {
    /// A fresh optimizer of `f32` weights; its state is created by the first step.
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        Self::with_weight_dtype(config, WeightDtype::F32)
    }

    /// A fresh optimizer of weights stored in `weight_dtype`, keeping `f32` masters unless that
    /// is `f32` (module docs).
    pub fn with_weight_dtype(
        config: AdamWConfig,
        weight_dtype: WeightDtype,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            moments: Vec::new(),
            weight_dtype,
        })
    }

    /// The dtype the stepped values are stored in.
    pub fn weight_dtype(&self) -> WeightDtype {
        self.weight_dtype
    }

    /// The configuration in use.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Changes the learning rate (for schedules); the rest of the state is untouched.
    pub fn set_lr(&mut self, lr: f64) -> Result<(), OptimError> {
        let config = AdamWConfig {
            lr,
            ..self.config.clone()
        };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// The number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The first and second moments of the named tensor, if the optimizer has state for it.
    pub fn moments(&self, name: &str) -> Option<(&[f32], &[f32])> {
        self.moments
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.m.as_slice(), s.v.as_slice()))
    }

    /// Applies one AdamW step to `params` and returns the pre-clip gradient norm.
    ///
    /// Everything is checked before anything changes: on error no weight and no state moved.
    pub fn step(&mut self, params: &mut [Param<'_>]) -> Result<StepReport, OptimError> {
        self.check_params(params)?;
        let mut blocks = Vec::new();
        let mut sum = 0.0f64;
        for p in params.iter() {
            blocks.clear();
            sum_squares_blocks(p.grad, &mut blocks);
            sum += add_block_sums(p.name, &blocks, |_| Ok(p.grad.to_vec()))?;
        }
        let keeps_masters = self.keeps_masters();
        if self.moments.is_empty() {
            self.moments = params
                .iter()
                .map(|p| Moments {
                    name: p.name.to_string(),
                    m: vec![0.0; p.value.len()],
                    v: vec![0.0; p.value.len()],
                    master: if keeps_masters {
                        p.value.to_vec()
                    } else {
                        Vec::new()
                    },
                })
                .collect();
        }
        let (step, report) = self.advance(sum.sqrt());
        let dtype = self.weight_dtype;
        for (param, state) in params.iter_mut().zip(&mut self.moments) {
            let Moments { m, v, master, .. } = state;
            // The weights stepped: the masters (then rounded into the values), or the values.
            if keeps_masters {
                step.apply_tensor(master, param.grad, m, v, Some((param.value, dtype)));
            } else {
                step.apply_tensor(param.value, param.grad, m, v, None);
            }
        }
        Ok(report)
    }

    /// [`AdamW::step`] over a model's named tensors, `grads` holding a gradient of the same
    /// name and size for each.
    pub fn step_params(
        &mut self,
        params: &mut Params,
        grads: &Params,
    ) -> Result<StepReport, OptimError> {
        let mut list: Vec<Param<'_>> = params
            .tensors_mut()
            .iter_mut()
            .zip(grads.tensors())
            .map(|(p, g)| Param {
                name: &p.name,
                value: &mut p.data,
                grad: &g.data,
            })
            .collect();
        self.step(&mut list)
    }

    /// Whether the state holds f32 masters (weights stored in a narrower dtype).
    fn keeps_masters(&self) -> bool {
        self.weight_dtype != WeightDtype::F32
    }

    /// Counts a step taken with gradients of global norm `grad_norm`: what every element of
    /// it applies, and its report.
    fn advance(&mut self, grad_norm: f64) -> (AdamWStep, StepReport) {
        let max = self.config.max_grad_norm;
        let clip_scale = if max > 0.0 && grad_norm > max {
            max / grad_norm
        } else {
            1.0
        };
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let lr = self.config.lr_at(self.step);
        // powf on the exact step count: deterministic, and no i32 overflow for long runs.
        let t = self.step as f64;
        let step = AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            bias1: 1.0 - beta1.powf(t),
            bias2: 1.0 - beta2.powf(t),
            decay: 1.0 - lr * weight_decay,
            clip_scale,
        };
        let report = StepReport {
            grad_norm,
            clip_scale,
            step: self.step,
        };
        (step, report)
    }

    /// Checks names, sizes and gradient lengths against the state (or, before the first step,
    /// for uniqueness).
    fn check_params(&self, params: &[Param<'_>]) -> Result<(), OptimError> {
        for p in params {
            if p.grad.len() != p.value.len() {
                return Err(OptimError::GradLength {
                    name: p.name.to_string(),
                    param_len: p.value.len(),
                    grad_len: p.grad.len(),
                });
            }
        }
        if self.moments.is_empty() {
            let mut names: Vec<&str> = params.iter().map(|p| p.name).collect();
            names.sort_unstable();
            if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(OptimError::DuplicateName(pair[0].to_string()));
            }
            return Ok(());
        }
        if params.len() != self.moments.len() {
            return Err(OptimError::ParamCount {
                expected: self.moments.len(),
                actual: params.len(),
            });
        }
        for (index, (p, s)) in params.iter().zip(&self.moments).enumerate() {
            if p.name != s.name || p.value.len() != s.m.len() {
                return Err(OptimError::ParamMismatch {
                    index,
                    expected_name: s.name.clone(),
                    expected_len: s.m.len(),
                    actual_name: p.name.to_string(),
                    actual_len: p.value.len(),
                });
            }
        }
        Ok(())
    }

    /// Serialises the state (step count, the weight dtype unless `f32`, and each tensor's
    /// name, moments and masters) to bytes: magic, format version, little-endian fields, and a
    /// trailing crc32c of everything before it. The configuration is not included: it comes
    /// from the config file.
    pub fn state_bytes(&self) -> Vec<u8> {
        let floats: usize = self
            .moments
            .iter()
            .map(|s| s.m.len() * 2 + s.master.len())
            .sum();
        let mut out = Vec::with_capacity(32 + floats * 4);
        out.extend_from_slice(MAGIC);
        if self.weight_dtype == WeightDtype::F32 {
            out.extend_from_slice(&FORMAT_F32_WEIGHTS.to_le_bytes());
            out.extend_from_slice(&self.step.to_le_bytes());
        } else {
            out.extend_from_slice(&FORMAT_WITH_MASTERS.to_le_bytes());
            out.extend_from_slice(&self.step.to_le_bytes());
            let (_, code) = DTYPE_CODES
                .iter()
                .find(|(dtype, _)| *dtype == self.weight_dtype)
                .expect("every dtype has a code");
            out.push(*code);
        }
        out.extend_from_slice(&(self.moments.len() as u64).to_le_bytes());
        for s in &self.moments {
            out.extend_from_slice(&(s.name.len() as u64).to_le_bytes());
            out.extend_from_slice(s.name.as_bytes());
            out.extend_from_slice(&(s.m.len() as u64).to_le_bytes());
            for x in s.m.iter().chain(&s.v).chain(&s.master) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Rebuilds an optimizer from [`state_bytes`](AdamW::state_bytes) output; stepping it
    /// continues exactly (bit for bit) where the saved one stood. Truncated, corrupt or
    /// foreign bytes are rejected with an error, never a panic.
    pub fn from_state_bytes(config: AdamWConfig, bytes: &[u8]) -> Result<Self, OptimError> {
        config.validate()?;
        let body_len = bytes
            .len()
            .checked_sub(4)
            .ok_or(OptimError::CorruptState("shorter than its checksum"))?;
        let (body, crc) = bytes.split_at(body_len);
        let mut r = ByteReader::new(body);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(OptimError::CorruptState(
                "not AdamW optimizer state (bad magic)",
            ));
        }
        let version = r.u32()?;
        if version != FORMAT_F32_WEIGHTS && version != FORMAT_WITH_MASTERS {
            return Err(OptimError::UnsupportedVersion(version));
        }
        let stored_crc = u32::from_le_bytes(crc.try_into().expect("split_at left 4 bytes"));
        if crc32c::crc32c(body) != stored_crc {
            return Err(OptimError::CorruptState("checksum mismatch"));
        }
        let step = r.u64()?;
        let weight_dtype = if version == FORMAT_WITH_MASTERS {
            let byte = r.take(1)?[0];
            match DTYPE_CODES.iter().find(|(_, code)| *code == byte) {
                Some((dtype, _)) if *dtype != WeightDtype::F32 => *dtype,
                _ => return Err(OptimError::CorruptState("unknown weight dtype")),
            }
        } else {
            WeightDtype::F32
        };
        let per_value = if weight_dtype == WeightDtype::F32 {
            2
        } else {
            3
        };
        let count = r.u64()?;
        let mut moments: Vec<Moments> = Vec::new();
        for _ in 0..count {
            let name_len = read_len(&mut r)?;
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| OptimError::CorruptState("tensor name is not UTF-8"))?
                .to_string();
            if moments.iter().any(|s| s.name == name) {
                return Err(OptimError::DuplicateName(name));
            }
            let n = read_len(&mut r)?;
            // Check the size against what is left before allocating anything.
            let floats = r.take(
                n.checked_mul(4 * per_value)
                    .ok_or(OptimError::CorruptState("tensor size overflows"))?,
            )?;
            let mut values = floats
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")));
            let m: Vec<f32> = values.by_ref().take(n).collect();
            let v: Vec<f32> = values.by_ref().take(n).collect();
            let master: Vec<f32> = values.collect();
            moments.push(Moments { name, m, v, master });
        }
        if r.remaining() > 0 {
            return Err(OptimError::CorruptState(
                "trailing bytes after the last tensor",
            ));
        }
        if step == 0 && !moments.is_empty() {
            return Err(OptimError::CorruptState("moments present at step 0"));
        }
        Ok(Self {
            config,
            step,
            moments,
            weight_dtype,
        })
    }
}

/// The byte naming each weight dtype in [`FORMAT_WITH_MASTERS`] (which holds only narrow ones).
const DTYPE_CODES: [(WeightDtype, u8); 3] = [
    (WeightDtype::F32, 0),
    (WeightDtype::Bf16, 1),
    (WeightDtype::F16, 2),
];

/// [`AdamW`] stepping the weights where the model holds them (module docs): the moments, and
/// the f32 masters of bf16 weights, live on the model's backend between steps. The wrapped
/// [`AdamW`] keeps the configuration and the step count; its host moments are brought up to
/// date by [`DeviceAdamW::to_host`] (for a checkpoint) and are stale in between.
pub struct DeviceAdamW<B: Backend> {
    host: AdamW,
    /// Per tensor, in the model's order; empty before the first step.
    state: Vec<DeviceMoments<B>>,
}

/// One tensor's state on the device.
struct DeviceMoments<B: Backend> {
    m: B::Buf,
    v: B::Buf,
    /// The f32 masters (bf16 weights only).
    master: Option<B::Buf>,
}

fn device_err(e: ModelError) -> OptimError {
    OptimError::Device(e.to_string())
}

impl<B: Backend> DeviceAdamW<B> {
    /// Whether weights of `dtype` can be stepped on the device: f32, and bf16 (whose masters'
    /// rounding the backends implement); f16 weights step on the host.
    pub fn supports(dtype: WeightDtype) -> bool {
        matches!(dtype, WeightDtype::F32 | WeightDtype::Bf16)
    }

    /// Moves `host`'s state onto `model`'s backend (its moments and masters, if it has taken a
    /// step), checking that it belongs to the model.
    pub fn new(host: AdamW, model: &Model<B>) -> Result<Self, OptimError> {
        if !Self::supports(host.weight_dtype) {
            return Err(OptimError::Device(format!(
                "{:?} weights step on the host",
                host.weight_dtype
            )));
        }
        let (be, layout) = (model.backend(), model.layout());
        let mut state = Vec::with_capacity(host.moments.len());
        if !host.moments.is_empty() {
            check_layout(&host.moments, layout)?;
            let upload = |values: &[f32]| -> Result<B::Buf, OptimError> {
                let mut buf = be.alloc(values.len()).map_err(device_err)?;
                be.upload(values, &mut buf).map_err(device_err)?;
                Ok(buf)
            };
            for s in &host.moments {
                state.push(DeviceMoments {
                    m: upload(&s.m)?,
                    v: upload(&s.v)?,
                    master: match host.keeps_masters() {
                        true => Some(upload(&s.master)?),
                        false => None,
                    },
                });
            }
        }
        Ok(DeviceAdamW { host, state })
    }

    /// The number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.host.step
    }

    /// The host optimizer: its configuration, dtype and step count are current, its moments
    /// as of the last [`DeviceAdamW::to_host`].
    pub fn host(&self) -> &AdamW {
        &self.host
    }

    /// One AdamW step of `model`'s weights with `grads` (on the same backend), the same bits
    /// as [`AdamW::step`] on the host. On error nothing moved.
    pub fn step(
        &mut self,
        model: &mut Model<B>,
        grads: &Gradients<B>,
    ) -> Result<StepReport, OptimError> {
        let (be, layout, weights) = model.weights_mut();
        let tensors = layout.tensors();
        if grads.bufs().len() != tensors.len() {
            return Err(OptimError::ParamCount {
                expected: tensors.len(),
                actual: grads.bufs().len(),
            });
        }
        if !self.host.moments.is_empty() {
            check_layout(&self.host.moments, layout)?;
        }
        let mut blocks = Vec::new();
        let mut sum = 0.0f64;
        for (t, g) in tensors.iter().zip(grads.bufs()) {
            blocks.clear();
            let len = t.data.len();
            be.sum_squares(g, len, &mut blocks).map_err(device_err)?;
            sum += add_block_sums(&t.name, &blocks, |_| {
                let mut values = vec![0.0; len];
                be.download(g, 0, &mut values).map_err(device_err)?;
                Ok(values)
            })?;
        }
        if self.state.is_empty() {
            let keeps_masters = self.host.keeps_masters();
            for (t, w) in tensors.iter().zip(weights.iter()) {
                let len = t.data.len();
                let master = if keeps_masters {
                    let mut master = be.alloc(len).map_err(device_err)?;
                    let row = MatLayout::row_major(len);
                    be.copy(w, row, &mut master, row, 1, len)
                        .map_err(device_err)?;
                    Some(master)
                } else {
                    None
                };
                self.state.push(DeviceMoments {
                    m: be.alloc(len).map_err(device_err)?,
                    v: be.alloc(len).map_err(device_err)?,
                    master,
                });
            }
            self.host.moments = tensors
                .iter()
                .map(|t| Moments {
                    name: t.name.clone(),
                    ..Moments::default()
                })
                .collect();
        }
        let (step, report) = self.host.advance(sum.sqrt());
        for ((t, (w, g)), s) in tensors
            .iter()
            .zip(weights.iter_mut().zip(grads.bufs()))
            .zip(&mut self.state)
        {
            let len = t.data.len();
            match &mut s.master {
                None => be.adamw(&step, w, g, &mut s.m, &mut s.v, None, len),
                Some(master) => be.adamw(&step, master, g, &mut s.m, &mut s.v, Some(w), len),
            }
            .map_err(device_err)?;
        }
        Ok(report)
    }

    /// The host optimizer with the device's moments and masters downloaded into it (what
    /// [`AdamW::state_bytes`] then saves).
    pub fn to_host(&mut self, model: &Model<B>) -> Result<&AdamW, OptimError> {
        let be = model.backend();
        for (host, dev) in self.host.moments.iter_mut().zip(&self.state) {
            let len = be.len(&dev.m);
            let download = |buf: &B::Buf, out: &mut Vec<f32>| {
                out.resize(len, 0.0);
                be.download(buf, 0, out).map_err(device_err)
            };
            download(&dev.m, &mut host.m)?;
            download(&dev.v, &mut host.v)?;
            if let Some(master) = &dev.master {
                download(master, &mut host.master)?;
            }
        }
        Ok(&self.host)
    }
}

/// Fails unless `moments` are the state of a model of `layout` (names and sizes, in order).
fn check_layout(moments: &[Moments], layout: &Params) -> Result<(), OptimError> {
    let tensors = layout.tensors();
    if moments.len() != tensors.len() {
        return Err(OptimError::ParamCount {
            expected: moments.len(),
            actual: tensors.len(),
        });
    }
    for (index, (s, t)) in moments.iter().zip(tensors).enumerate() {
        if s.name != t.name || s.m.len() != t.data.len() && !s.m.is_empty() {
            return Err(OptimError::ParamMismatch {
                index,
                expected_name: s.name.clone(),
                expected_len: s.m.len(),
                actual_name: t.name.clone(),
                actual_len: t.data.len(),
            });
        }
    }
    Ok(())
}

/// The sum of a tensor's block sums of squares (in order: part of the global norm, which adds
/// every tensor's, in order). A non-finite block is a [`OptimError::NonFiniteGradient`] at
/// its first bad value, found in the gradient `values` returns.
fn add_block_sums(
    name: &str,
    blocks: &[f64],
    values: impl FnOnce(usize) -> Result<Vec<f32>, OptimError>,
) -> Result<f64, OptimError> {
    let mut sum = 0.0f64;
    for (k, &b) in blocks.iter().enumerate() {
        if !b.is_finite() {
            let grad = values(k)?;
            let start = k * flywheel_model::adamw::SQUARES_BLOCK;
            let index = start
                + grad[start..]
                    .iter()
                    .position(|g| !g.is_finite())
                    .unwrap_or_default();
            return Err(OptimError::NonFiniteGradient {
                name: name.to_string(),
                index,
            });
        }
        sum += b;
    }
    Ok(sum)
}

impl From<Truncated> for OptimError {
    fn from(_: Truncated) -> Self {
        OptimError::CorruptState("truncated")
    }
}

/// A u64 length that must fit in memory.
fn read_len(r: &mut ByteReader<'_>) -> Result<usize, OptimError> {
    usize::try_from(r.u64()?).map_err(|_| OptimError::CorruptState("length overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A model stand-in: named tensors as a trainer would hold them.
    type Tensors = Vec<(String, Vec<f32>)>;

    fn step(opt: &mut AdamW, tensors: &mut Tensors, grads: &[Vec<f32>]) -> StepReport {
        try_step(opt, tensors, grads).unwrap()
    }

    fn try_step(
        opt: &mut AdamW,
        tensors: &mut Tensors,
        grads: &[Vec<f32>],
    ) -> Result<StepReport, OptimError> {
        let mut params: Vec<Param<'_>> = tensors
            .iter_mut()
            .zip(grads)
            .map(|((name, value), grad)| Param { name, value, grad })
            .collect();
        opt.step(&mut params)
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
            "{actual} != {expected}"
        );
    }

    fn config(lr: f64, weight_decay: f64, max_grad_norm: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            max_grad_norm,
            ..AdamWConfig::default()
        }
    }

    #[test]
    fn first_and_second_steps_match_hand_computation() {
        let mut opt = AdamW::new(config(0.1, 0.1, 0.0)).unwrap();
        let mut w: Tensors = vec![("w".into(), vec![1.0, -2.0])];

        // Step 1, g = (0.5, −0.1): m = 0.1·g, v = 0.001·g², bias corrections 0.1 and 0.001
        // give m̂ = g, v̂ = g², so the update is g/(|g| + 1e-8) ≈ ±1. Decay: ×(1 − 0.1·0.1).
        //   w0 = 1·0.99 − 0.1·0.5/0.50000001      = 0.890000002
        //   w1 = −2·0.99 − 0.1·(−0.1)/0.10000001  = −1.88000001
        let r = step(&mut opt, &mut w, &[vec![0.5, -0.1]]);
        assert_eq!(r.step, 1);
        assert_close(r.grad_norm, (0.25f64 + 0.01).sqrt());
        assert_close(f64::from(w[0].1[0]), 0.890000002);
        assert_close(f64::from(w[0].1[1]), -1.88000001);
        let (m, v) = opt.moments("w").unwrap();
        assert_close(f64::from(m[0]), 0.05);
        assert_close(f64::from(v[1]), 1e-5);

        // Step 2, g = (0.2, 0.3):
        //   m = 0.9·(0.05, −0.01) + 0.1·(0.2, 0.3)           = (0.065, 0.021)
        //   v = 0.999·(2.5e-4, 1e-5) + 0.001·(0.04, 0.09)    = (2.8975e-4, 9.999e-5)
        //   bias corrections 1 − 0.9² = 0.19, 1 − 0.999² = 0.001999
        //   m̂ = (0.342105263, 0.110526316), v̂ = (0.144947474, 0.050020010)
        //   w0 = 0.890000002·0.99 − 0.1·0.342105263/(0.380719... + 1e-8) = 0.791242484
        //   w1 = −1.88000001·0.99 − 0.1·0.110526316/(0.223651... + 1e-8) = −1.910618991
        step(&mut opt, &mut w, &[vec![0.2, 0.3]]);
        assert_close(f64::from(w[0].1[0]), 0.791242484);
        assert_close(f64::from(w[0].1[1]), -1.910618991);
        let (m, v) = opt.moments("w").unwrap();
        assert_close(f64::from(m[1]), 0.021);
        assert_close(f64::from(v[0]), 2.8975e-4);
    }

    #[test]
    fn clipping_scales_gradients_to_the_max_norm() {
        // Two tensors whose gradients have global norm 5 (3-4-5), clipped to 1: the moments
        // see g/5, so m = 0.1·(0.6, 0.8) and v = 0.001·(0.36, 0.64).
        let mut opt = AdamW::new(config(0.01, 0.0, 1.0)).unwrap();
        let mut w: Tensors = vec![("a".into(), vec![0.0]), ("b".into(), vec![0.0])];
        let r = step(&mut opt, &mut w, &[vec![3.0], vec![-4.0]]);
        assert_close(r.grad_norm, 5.0);
        assert_close(r.clip_scale, 0.2);
        assert_close(f64::from(opt.moments("a").unwrap().0[0]), 0.06);
        assert_close(f64::from(opt.moments("b").unwrap().0[0]), -0.08);
        assert_close(f64::from(opt.moments("b").unwrap().1[0]), 0.00064);

        // Below the threshold nothing is scaled.
        let r = step(&mut opt, &mut w, &[vec![0.3], vec![0.4]]);
        assert_close(r.grad_norm, 0.5);
        assert_eq!(r.clip_scale, 1.0);
        assert_close(
            f64::from(opt.moments("a").unwrap().0[0]),
            0.9 * 0.06 + 0.1 * 0.3,
        );
    }

    #[test]
    fn clipping_equals_stepping_on_prescaled_gradients() {
        let mut clipped = AdamW::new(config(0.05, 0.01, 2.0)).unwrap();
        let mut plain = AdamW::new(config(0.05, 0.01, 0.0)).unwrap();
        let mut a: Tensors = vec![("x".into(), vec![0.5, -0.25, 2.0])];
        let mut b = a.clone();
        for g in [[6.0f32, -8.0, 0.0], [0.1, 0.2, -0.3], [30.0, 0.0, 40.0]] {
            let norm = g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            let scale = if norm > 2.0 { 2.0 / norm } else { 1.0 };
            let r = step(&mut clipped, &mut a, &[g.to_vec()]);
            assert_close(r.grad_norm, norm);
            let pre: Vec<f32> = g.iter().map(|x| (f64::from(*x) * scale) as f32).collect();
            step(&mut plain, &mut b, &[pre]);
        }
        for (x, y) in a[0].1.iter().zip(&b[0].1) {
            assert_close(f64::from(*x), f64::from(*y));
        }
    }

    /// Deterministic pseudo-random gradients for the resume test.
    fn grads_at(step: u64, sizes: &[usize]) -> Vec<Vec<f32>> {
        sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n)
                    .map(|i| {
                        let x = (step * 131 + t as u64 * 17 + i as u64 * 7) % 97;
                        (x as f32 - 48.0) / 10.0
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn save_restore_step_equals_uninterrupted_stepping_bit_for_bit() {
        let cfg = config(1e-2, 0.05, 3.0);
        let sizes = [5, 3, 8];
        let mut w: Tensors = sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                let values = (0..n).map(|i| (i as f32 - 2.0) * 0.3 + t as f32).collect();
                (format!("layer{t}.weight"), values)
            })
            .collect();
        let mut opt = AdamW::new(cfg.clone()).unwrap();
        for s in 0..4 {
            step(&mut opt, &mut w, &grads_at(s, &sizes));
        }
        // Checkpoint: weights and optimizer state.
        let saved_state = opt.state_bytes();
        let mut w_restored = w.clone();
        // Uninterrupted.
        for s in 4..9 {
            step(&mut opt, &mut w, &grads_at(s, &sizes));
        }
        // Restored.
        let mut restored = AdamW::from_state_bytes(cfg, &saved_state).unwrap();
        assert_eq!(restored.step_count(), 4);
        for s in 4..9 {
            step(&mut restored, &mut w_restored, &grads_at(s, &sizes));
        }
        for ((_, a), (_, b)) in w.iter().zip(&w_restored) {
            let a: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b);
        }
        assert_eq!(opt.state_bytes(), restored.state_bytes());
    }

    #[test]
    fn bf16_weights_accumulate_updates_smaller_than_one_bf16_step() {
        // Just below 1.0 a bf16 step is 2⁻⁸ ≈ 0.0039; each update here is ≈ 1e-4.
        let cfg = config(1e-4, 0.0, 0.0);
        let mut opt = AdamW::with_weight_dtype(cfg.clone(), WeightDtype::Bf16).unwrap();
        let mut w: Tensors = vec![("w".into(), vec![1.0, -1.0])];
        for _ in 0..100 {
            step(&mut opt, &mut w, &[vec![1.0, -1.0]]);
            for x in &w[0].1 {
                assert_eq!(*x, WeightDtype::Bf16.round(*x), "handed back unrounded");
            }
        }
        // 100 updates of 1e-4 move the masters to ±0.99, which rounds to ±(1 − 3·2⁻⁸).
        assert_eq!(w[0].1, vec![0.98828125, -0.98828125]);
        // Stepping the rounded weights themselves loses every update.
        let mut plain = AdamW::new(cfg).unwrap();
        let mut rounded: Tensors = vec![("w".into(), vec![1.0, -1.0])];
        for _ in 0..100 {
            step(&mut plain, &mut rounded, &[vec![1.0, -1.0]]);
            for x in &mut rounded[0].1 {
                *x = WeightDtype::Bf16.round(*x);
            }
        }
        assert_eq!(rounded[0].1, vec![1.0, -1.0]);
    }

    #[test]
    fn restored_masters_continue_bit_for_bit() {
        let cfg = config(1e-3, 0.01, 1.0);
        let sizes = [7, 3];
        let start = |dtype: WeightDtype| {
            let w: Tensors = sizes
                .iter()
                .enumerate()
                .map(|(t, &n)| {
                    let values = (0..n).map(|i| dtype.round(i as f32 * 0.37 - t as f32));
                    (format!("t{t}"), values.collect())
                })
                .collect();
            (AdamW::with_weight_dtype(cfg.clone(), dtype).unwrap(), w)
        };
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            let (mut opt, mut w) = start(dtype);
            for s in 0..3 {
                step(&mut opt, &mut w, &grads_at(s, &sizes));
            }
            let saved = opt.state_bytes();
            let mut restored = AdamW::from_state_bytes(cfg.clone(), &saved).unwrap();
            assert_eq!(restored.weight_dtype(), dtype);
            let mut w_restored = w.clone();
            for s in 3..8 {
                step(&mut opt, &mut w, &grads_at(s, &sizes));
                step(&mut restored, &mut w_restored, &grads_at(s, &sizes));
            }
            assert_eq!(w, w_restored);
            assert_eq!(opt.state_bytes(), restored.state_bytes());
        }
    }

    #[test]
    fn a_large_tensor_updated_in_parallel_matches_the_same_values_updated_serially() {
        use flywheel_model::adamw::PAR_CHUNK;
        let n = 3 * PAR_CHUNK + 5;
        let values: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let values: Vec<f32> = values.iter().map(|&x| dtype.round(x)).collect();
            let cfg = config(1e-3, 0.01, 1.0);
            // One tensor (the parallel path) against the same values as pieces small enough
            // for the serial path.
            let mut whole = AdamW::with_weight_dtype(cfg.clone(), dtype).unwrap();
            let mut pieces = AdamW::with_weight_dtype(cfg, dtype).unwrap();
            let mut w: Tensors = vec![("w".into(), values.clone())];
            let mut p: Tensors = values
                .chunks(PAR_CHUNK / 2)
                .enumerate()
                .map(|(i, c)| (format!("w{i}"), c.to_vec()))
                .collect();
            for s in 0..3u64 {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i as u64 * 7 + s) % 13) as f32 - 6.0)
                    .collect();
                step(&mut whole, &mut w, std::slice::from_ref(&g));
                let gs: Vec<Vec<f32>> = g.chunks(PAR_CHUNK / 2).map(<[f32]>::to_vec).collect();
                step(&mut pieces, &mut p, &gs);
            }
            let joined: Vec<u32> = p
                .iter()
                .flat_map(|(_, v)| v.iter().map(|x| x.to_bits()))
                .collect();
            let whole_bits: Vec<u32> = w[0].1.iter().map(|x| x.to_bits()).collect();
            assert!(
                joined == whole_bits,
                "{dtype:?}: parallel and serial updates differ"
            );
        }
    }

    #[test]
    fn minimises_a_quadratic() {
        // f(x) = ½ Σ c_i (x_i − t_i)², minimum at t.
        let c = [1.0f32, 10.0, 0.1, 3.0];
        let target = [2.0f32, -1.0, 0.5, 4.0];
        let mut opt = AdamW::new(config(0.05, 0.0, 0.0)).unwrap();
        let mut x: Tensors = vec![("x".into(), vec![0.0; 4])];
        let f = |x: &[f32]| -> f64 {
            (0..4)
                .map(|i| 0.5 * f64::from(c[i]) * f64::from(x[i] - target[i]).powi(2))
                .sum()
        };
        let start = f(&x[0].1);
        for _ in 0..2000 {
            let g: Vec<f32> = (0..4).map(|i| c[i] * (x[0].1[i] - target[i])).collect();
            step(&mut opt, &mut x, &[g]);
        }
        let end = f(&x[0].1);
        assert!(end < 1e-6 * start, "f went from {start} to {end}");
        for (xi, ti) in x[0].1.iter().zip(target) {
            assert!((xi - ti).abs() < 1e-2, "{xi} vs {ti}");
        }
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        // A zero gradient leaves the moments at zero: only the decay moves the weight.
        let mut opt = AdamW::new(config(0.1, 0.5, 1.0)).unwrap();
        let mut w: Tensors = vec![("w".into(), vec![2.0])];
        step(&mut opt, &mut w, &[vec![0.0]]);
        assert_close(f64::from(w[0].1[0]), 2.0 * (1.0 - 0.1 * 0.5));
    }

    #[test]
    fn mismatched_params_are_rejected_without_changing_anything() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut w: Tensors = vec![("a".into(), vec![1.0, 2.0]), ("b".into(), vec![3.0])];
        step(&mut opt, &mut w, &[vec![0.1, 0.1], vec![0.1]]);
        let before = (w.clone(), opt.state_bytes());

        let err = try_step(&mut opt, &mut w, &[vec![0.1], vec![0.1]]).unwrap_err();
        assert!(matches!(err, OptimError::GradLength { .. }), "{err}");

        let err = try_step(&mut opt, &mut w, &[vec![0.1, f32::NAN], vec![0.1]]).unwrap_err();
        assert_eq!(
            err,
            OptimError::NonFiniteGradient {
                name: "a".into(),
                index: 1
            }
        );

        let mut renamed: Tensors = vec![("a".into(), vec![1.0, 2.0]), ("c".into(), vec![3.0])];
        let err = try_step(&mut opt, &mut renamed, &[vec![0.1, 0.1], vec![0.1]]).unwrap_err();
        assert!(
            matches!(err, OptimError::ParamMismatch { index: 1, .. }),
            "{err}"
        );

        let mut fewer: Tensors = vec![("a".into(), vec![1.0, 2.0])];
        let err = try_step(&mut opt, &mut fewer, &[vec![0.1, 0.1]]).unwrap_err();
        assert_eq!(
            err,
            OptimError::ParamCount {
                expected: 2,
                actual: 1
            }
        );
        assert_eq!((w, opt.state_bytes()), before);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut w: Tensors = vec![("a".into(), vec![1.0]), ("a".into(), vec![2.0])];
        let err = try_step(&mut opt, &mut w, &[vec![0.1], vec![0.1]]).unwrap_err();
        assert_eq!(err, OptimError::DuplicateName("a".into()));
        assert_eq!(opt.step_count(), 0);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = [
            (
                AdamWConfig {
                    lr: -1.0,
                    ..Default::default()
                },
                "lr",
            ),
            (
                AdamWConfig {
                    beta1: 1.0,
                    ..Default::default()
                },
                "beta1",
            ),
            (
                AdamWConfig {
                    beta2: f64::NAN,
                    ..Default::default()
                },
                "beta2",
            ),
            (
                AdamWConfig {
                    eps: 0.0,
                    ..Default::default()
                },
                "eps",
            ),
            (
                AdamWConfig {
                    weight_decay: -0.1,
                    ..Default::default()
                },
                "weight_decay",
            ),
            (
                AdamWConfig {
                    max_grad_norm: f64::INFINITY,
                    ..Default::default()
                },
                "max_grad_norm",
            ),
            (
                AdamWConfig {
                    final_lr_fraction: 1.5,
                    ..Default::default()
                },
                "final_lr_fraction",
            ),
        ];
        for (cfg, field) in bad {
            let err = AdamW::new(cfg).unwrap_err();
            assert!(
                err.to_string().contains(field),
                "`{err}` should name {field}"
            );
        }
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        assert!(opt.set_lr(f64::NAN).is_err());
        opt.set_lr(3e-4).unwrap();
        assert_eq!(opt.config().lr, 3e-4);
    }

    #[test]
    fn the_learning_rate_decays_linearly_then_holds() {
        let c = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.0,
            decay_steps: 10,
            final_lr_fraction: 0.1,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), 1e-3);
        assert!((c.lr_at(5) - 0.55e-3).abs() < 1e-12);
        assert!((c.lr_at(10) - 1e-4).abs() < 1e-12);
        assert_eq!(c.lr_at(11), c.lr_at(10));
        let constant = AdamWConfig::default();
        assert_eq!(constant.lr_at(1_000_000), constant.lr);
        // Adam's first update moves a weight by the step's learning rate (m̂/√v̂ = 1).
        let mut opt = AdamW::new(c.clone()).unwrap();
        let mut w: Tensors = vec![("w".into(), vec![0.0])];
        step(&mut opt, &mut w, &[vec![1.0]]);
        assert!(
            (f64::from(w[0].1[0]) + c.lr_at(1)).abs() < 1e-9,
            "{}",
            w[0].1[0]
        );
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let c: AdamWConfig = toml::from_str("lr = 1e-3\nmax_grad_norm = 0.0").unwrap();
        assert_eq!(c.lr, 1e-3);
        assert_eq!(c.max_grad_norm, 0.0);
        assert_eq!(c.beta2, 0.999);
        assert!(toml::from_str::<AdamWConfig>("momentum = 0.9").is_err());
    }

    fn trained_state() -> Vec<u8> {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut w: Tensors = vec![("emb".into(), vec![1.0; 4]), ("head".into(), vec![0.5; 2])];
        step(&mut opt, &mut w, &grads_at(0, &[4, 2]));
        opt.state_bytes()
    }

    #[test]
    fn corrupt_state_is_rejected() {
        let good = trained_state();
        let restore = |b: &[u8]| AdamW::from_state_bytes(AdamWConfig::default(), b);
        restore(&good).unwrap();
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(restore(&good[..n]).is_err(), "truncated to {n} bytes");
        }
        // Every single bit flip fails.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(restore(&bad).is_err(), "flip in byte {i}");
        }
        // A future format version is named as such.
        let mut future = good.clone();
        future[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            restore(&future).unwrap_err(),
            OptimError::UnsupportedVersion(3)
        );
    }

    #[test]
    fn oversized_lengths_with_a_valid_checksum_are_rejected_without_allocating() {
        // Forge a state claiming one tensor of 2^60 values, with a correct checksum.
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&FORMAT_F32_WEIGHTS.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.push(b'x');
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let err = AdamW::from_state_bytes(AdamWConfig::default(), &body).unwrap_err();
        assert!(matches!(err, OptimError::CorruptState(_)), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = AdamW::from_state_bytes(AdamWConfig::default(), &bytes);
        }

        #[test]
        fn state_round_trips(
            steps in 0u64..4,
            sizes in proptest::collection::vec(0usize..6, 0..4),
            masters in any::<bool>(),
        ) {
            let dtype = if masters { WeightDtype::Bf16 } else { WeightDtype::F32 };
            let mut opt = AdamW::with_weight_dtype(AdamWConfig::default(), dtype).unwrap();
            let mut w: Tensors = sizes
                .iter()
                .enumerate()
                .map(|(t, &n)| (format!("t{t}"), vec![0.25; n]))
                .collect();
            for s in 0..steps {
                step(&mut opt, &mut w, &grads_at(s, &sizes));
            }
            let bytes = opt.state_bytes();
            let back = AdamW::from_state_bytes(AdamWConfig::default(), &bytes).unwrap();
            prop_assert_eq!(back.step_count(), opt.step_count());
            prop_assert_eq!(back.weight_dtype(), dtype);
            prop_assert_eq!(back.state_bytes(), bytes);
        }
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use flywheel_model::{CpuBackend, ModelConfig, Tokenizer};

    fn model_config(dtype: WeightDtype) -> ModelConfig {
        let mut cfg = ModelConfig::tiny(Tokenizer::arithmetic().vocab_size());
        cfg.d_model = 64;
        cfg.n_heads = 2;
        // The MLP's matrices (64 × 2100 values) span several blocks of the norm and take the
        // backend's parallel path.
        cfg.d_ff = 2100;
        cfg.n_layers = 1;
        cfg.max_seq_len = 8;
        cfg.dtype = dtype;
        cfg
    }

    /// Gradients for step `t`, large enough to be clipped.
    fn grads(params: &Params, t: u64) -> Params {
        let mut g = params.clone();
        for (k, tensor) in g.tensors_mut().iter_mut().enumerate() {
            for (i, v) in tensor.data.iter_mut().enumerate() {
                let x = (i as u64 * 2654435761 + k as u64 * 97 + t * 31) % 1000;
                *v = (x as f32 - 500.0) * 1e-3 * (1 + t) as f32;
            }
        }
        g
    }

    fn host_step(opt: &mut AdamW, params: &mut Params, grads: &Params) -> StepReport {
        opt.step_params(params, grads).unwrap()
    }

    /// Steps on the backend give the host's bits: weights, reports and the saved state, for
    /// f32 weights and for bf16 weights with masters; a state saved by either continues on
    /// the other.
    #[test]
    fn device_steps_match_host_steps_bit_for_bit() {
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let cfg = AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                max_grad_norm: 5.0,
                ..AdamWConfig::default()
            };
            let mut params = Params::init(&model_config(dtype), 3).unwrap();
            // bf16 weights hold bf16 values, as loaded from a bf16 checkpoint.
            for t in params.tensors_mut() {
                t.data.iter_mut().for_each(|v| *v = dtype.round(*v));
            }
            let mut host = AdamW::with_weight_dtype(cfg.clone(), dtype).unwrap();
            let backend = CpuBackend::default();
            let mut model = Model::new(backend, &params).unwrap();
            let mut device = DeviceAdamW::new(
                AdamW::with_weight_dtype(cfg.clone(), dtype).unwrap(),
                &model,
            )
            .unwrap();
            let mut device_grads = model.new_gradients().unwrap();
            for t in 0..3 {
                let g = grads(&params, t);
                let want = host_step(&mut host, &mut params, &g);
                model.upload_gradients(&g, &mut device_grads).unwrap();
                let got = device.step(&mut model, &device_grads).unwrap();
                assert_eq!(got, want, "{dtype:?} step {t}");
                assert_eq!(
                    model.to_params().unwrap().to_bytes_map(),
                    params.to_bytes_map(),
                    "{dtype:?} weights after step {t}"
                );
            }
            assert!(host.step_count() == 3 && device.step_count() == 3);
            let saved = device.to_host(&model).unwrap().state_bytes();
            assert_eq!(saved, host.state_bytes(), "{dtype:?} saved state");

            // The host's state continues on the device, and the device's on the host.
            let mut resumed = DeviceAdamW::new(
                AdamW::from_state_bytes(cfg.clone(), &saved).unwrap(),
                &model,
            )
            .unwrap();
            let g = grads(&params, 3);
            let want = host_step(&mut host, &mut params, &g);
            model.upload_gradients(&g, &mut device_grads).unwrap();
            assert_eq!(resumed.step(&mut model, &device_grads).unwrap(), want);
            assert_eq!(
                model.to_params().unwrap().to_bytes_map(),
                params.to_bytes_map()
            );
        }
    }

    #[test]
    fn a_non_finite_gradient_on_the_device_moves_nothing() {
        let dtype = WeightDtype::F32;
        let params = Params::init(&model_config(dtype), 3).unwrap();
        let mut model = Model::new(CpuBackend::default(), &params).unwrap();
        let mut device =
            DeviceAdamW::new(AdamW::new(AdamWConfig::default()).unwrap(), &model).unwrap();
        let mut g = grads(&params, 0);
        let bad = g.tensors().len() - 1;
        g.tensors_mut()[bad].data[5] = f32::INFINITY;
        let mut device_grads = model.new_gradients().unwrap();
        model.upload_gradients(&g, &mut device_grads).unwrap();
        let e = device.step(&mut model, &device_grads).unwrap_err();
        let name = params.tensors()[bad].name.clone();
        assert_eq!(e, OptimError::NonFiniteGradient { name, index: 5 });
        assert_eq!(device.step_count(), 0);
        assert_eq!(
            model.to_params().unwrap().to_bytes_map(),
            params.to_bytes_map()
        );
    }
}
