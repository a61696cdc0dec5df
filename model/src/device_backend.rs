//! [`DeviceBackend`]: the CPU or a GPU, chosen at run time (`--device`), behind one type, so
//! the trainer and the engine hold a `Model<DeviceBackend>` whatever they run on.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::adamw::AdamWStep;
use crate::backend::{Backend, Gemm, MatLayout, Products};
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::device::Device;
use crate::error::{ModelError, Result};

/// The CPU or one GPU. Cloning shares the GPU (its context, cuBLAS handle and kernels).
#[derive(Clone)]
pub enum DeviceBackend {
    /// [`CpuBackend`].
    Cpu(CpuBackend),
    /// [`CudaBackend`].
    Cuda(Arc<CudaBackend>),
}

/// A buffer of a [`DeviceBackend`]: host or device memory.
pub enum DeviceBuf {
    /// On the CPU.
    Cpu(Vec<f32>),
    /// On the GPU.
    Cuda(CudaSlice<f32>),
}

impl DeviceBackend {
    /// Resolves `device` ([`Device::resolve`]) and opens it with `products` operands; also
    /// returns what was chosen and why, for the caller's log.
    pub fn open(device: Device, products: Products) -> Result<(Self, String)> {
        let (chosen, why) = device.resolve()?;
        let (backend, name, why) = match chosen {
            Device::Cuda(n) => {
                let gpu = CudaBackend::new(n, products)?;
                let why = format!("{why}; {}", gpu.device_name());
                (DeviceBackend::Cuda(Arc::new(gpu)), format!("cuda:{n}"), why)
            }
            _ => (
                DeviceBackend::Cpu(CpuBackend::new(products)),
                "cpu".to_owned(),
                why,
            ),
        };
        Ok((backend, format!("{name} ({why}; {products} products)")))
    }

    /// The GPU's number, or `None` on the CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            DeviceBackend::Cpu(_) => None,
            DeviceBackend::Cuda(gpu) => Some(gpu.ordinal()),
        }
    }
}

fn mismatch() -> ModelError {
    ModelError::Backend("a buffer of another device was passed to this backend".into())
}

fn cpu(b: &DeviceBuf) -> Result<&Vec<f32>> {
    match b {
        DeviceBuf::Cpu(v) => Ok(v),
        DeviceBuf::Cuda(_) => Err(mismatch()),
    }
}

fn cpu_mut(b: &mut DeviceBuf) -> Result<&mut Vec<f32>> {
    match b {
        DeviceBuf::Cpu(v) => Ok(v),
        DeviceBuf::Cuda(_) => Err(mismatch()),
    }
}

fn gpu(b: &DeviceBuf) -> Result<&CudaSlice<f32>> {
    match b {
        DeviceBuf::Cuda(v) => Ok(v),
        DeviceBuf::Cpu(_) => Err(mismatch()),
    }
}

fn gpu_mut(b: &mut DeviceBuf) -> Result<&mut CudaSlice<f32>> {
    match b {
        DeviceBuf::Cuda(v) => Ok(v),
        DeviceBuf::Cpu(_) => Err(mismatch()),
    }
}

/// Calls `$method` on the chosen backend, each `buf`/`mut` argument unwrapped to its buffer.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($kind:ident $arg:expr),* $(,)? )) => {
        match $self {
            DeviceBackend::Cpu(be) => be.$method($(dispatch!(@cpu $kind $arg)),*),
            DeviceBackend::Cuda(be) => be.$method($(dispatch!(@gpu $kind $arg)),*),
        }
    };
    (@cpu buf $arg:expr) => { cpu($arg)? };
    (@cpu mut $arg:expr) => { cpu_mut($arg)? };
    (@cpu val $arg:expr) => { $arg };
    (@gpu buf $arg:expr) => { gpu($arg)? };
    (@gpu mut $arg:expr) => { gpu_mut($arg)? };
    (@gpu val $arg:expr) => { $arg };
}

impl Backend for DeviceBackend {
    type Buf = DeviceBuf;

    fn name(&self) -> String {
        match self {
            DeviceBackend::Cpu(be) => be.name(),
            DeviceBackend::Cuda(be) => be.name(),
        }
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuf> {
        Ok(match self {
            DeviceBackend::Cpu(be) => DeviceBuf::Cpu(be.alloc(len)?),
            DeviceBackend::Cuda(be) => DeviceBuf::Cuda(be.alloc(len)?),
        })
    }

    fn len(&self, buf: &DeviceBuf) -> usize {
        match buf {
            DeviceBuf::Cpu(v) => v.len(),
            DeviceBuf::Cuda(v) => v.len(),
        }
    }

    fn capacity(&self, buf: &DeviceBuf) -> usize {
        match (self, buf) {
            (DeviceBackend::Cpu(be), DeviceBuf::Cpu(v)) => be.capacity(v),
            _ => self.len(buf),
        }
    }

    fn reuse(&self, buf: DeviceBuf, len: usize) -> Result<DeviceBuf> {
        match (self, buf) {
            (DeviceBackend::Cpu(be), DeviceBuf::Cpu(v)) => Ok(DeviceBuf::Cpu(be.reuse(v, len)?)),
            (DeviceBackend::Cuda(be), DeviceBuf::Cuda(v)) => Ok(DeviceBuf::Cuda(be.reuse(v, len)?)),
            _ => Err(mismatch()),
        }
    }

    fn upload(&self, src: &[f32], buf: &mut DeviceBuf) -> Result<()> {
        dispatch!(self.upload(val src, mut buf))
    }

    fn download(&self, buf: &DeviceBuf, offset: usize, out: &mut [f32]) -> Result<()> {
        dispatch!(self.download(buf buf, val offset, val out))
    }

    fn fill_zero(&self, buf: &mut DeviceBuf) -> Result<()> {
        dispatch!(self.fill_zero(mut buf))
    }

    fn copy(
        &self,
        src: &DeviceBuf,
        src_at: MatLayout,
        dst: &mut DeviceBuf,
        dst_at: MatLayout,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.copy(buf src, val src_at, mut dst, val dst_at, val rows, val cols))
    }

    fn add_assign(&self, dst: &mut DeviceBuf, src: &DeviceBuf, len: usize) -> Result<()> {
        dispatch!(self.add_assign(mut dst, buf src, val len))
    }

    fn gemm(&self, g: &Gemm, a: &DeviceBuf, b: &DeviceBuf, c: &mut DeviceBuf) -> Result<()> {
        dispatch!(self.gemm(val g, buf a, buf b, mut c))
    }

    fn embed(
        &self,
        tok_emb: &DeviceBuf,
        tokens: &[u32],
        out: &mut DeviceBuf,
        d: usize,
    ) -> Result<()> {
        dispatch!(self.embed(buf tok_emb, val tokens, mut out, val d))
    }

    fn embed_backward(
        &self,
        d_out: &DeviceBuf,
        tokens: &[u32],
        d_tok: &mut DeviceBuf,
        d: usize,
    ) -> Result<()> {
        dispatch!(self.embed_backward(buf d_out, val tokens, mut d_tok, val d))
    }

    fn rms_norm(
        &self,
        eps: f32,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        out: &mut DeviceBuf,
        rstd: &mut DeviceBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.rms_norm(val eps, buf x, buf gamma, mut out, mut rstd, val rows, val cols))
    }

    fn rms_norm_backward(
        &self,
        x: &DeviceBuf,
        gamma: &DeviceBuf,
        rstd: &DeviceBuf,
        d_out: &DeviceBuf,
        dx: &mut DeviceBuf,
        d_gamma: &mut DeviceBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.rms_norm_backward(
            buf x, buf gamma, buf rstd, buf d_out, mut dx, mut d_gamma, val rows, val cols
        ))
    }

    fn add_bias(
        &self,
        x: &mut DeviceBuf,
        bias: &DeviceBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.add_bias(mut x, buf bias, val rows, val cols))
    }

    fn bias_backward(
        &self,
        d_out: &DeviceBuf,
        d_bias: &mut DeviceBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.bias_backward(buf d_out, mut d_bias, val rows, val cols))
    }

    fn swiglu(
        &self,
        gate: &DeviceBuf,
        up: &DeviceBuf,
        out: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        dispatch!(self.swiglu(buf gate, buf up, mut out, val len))
    }

    fn swiglu_backward(
        &self,
        gate: &DeviceBuf,
        up: &DeviceBuf,
        d_out: &DeviceBuf,
        d_gate: &mut DeviceBuf,
        d_up: &mut DeviceBuf,
        len: usize,
    ) -> Result<()> {
        dispatch!(self.swiglu_backward(buf gate, buf up, buf d_out, mut d_gate, mut d_up, val len))
    }

    fn rope(
        &self,
        x: &mut DeviceBuf,
        positions: &[u32],
        cos: &DeviceBuf,
        sin: &DeviceBuf,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        dispatch!(self.rope(mut x, val positions, buf cos, buf sin, val heads, val hd, val inverse))
    }

    fn causal_softmax(
        &self,
        scores: &mut DeviceBuf,
        offset: usize,
        batch: usize,
        rows: usize,
        cols: usize,
        past: usize,
    ) -> Result<()> {
        dispatch!(self.causal_softmax(mut scores, val offset, val batch, val rows, val cols, val past))
    }

    fn softmax_backward(
        &self,
        p: &DeviceBuf,
        p_offset: usize,
        dp: &mut DeviceBuf,
        dp_offset: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dispatch!(self.softmax_backward(buf p, val p_offset, mut dp, val dp_offset, val rows, val cols))
    }

    fn token_logprobs(
        &self,
        logits: &DeviceBuf,
        targets: &[u32],
        vocab: usize,
        logprob: &mut [f32],
        entropy: &mut [f32],
    ) -> Result<()> {
        dispatch!(self.token_logprobs(buf logits, val targets, val vocab, val logprob, val entropy))
    }

    fn token_logprobs_backward(
        &self,
        logits: &DeviceBuf,
        targets: &[u32],
        vocab: usize,
        d_logprob: &[f32],
        d_entropy: &[f32],
        d_logits: &mut DeviceBuf,
    ) -> Result<()> {
        dispatch!(self.token_logprobs_backward(
            buf logits, val targets, val vocab, val d_logprob, val d_entropy, mut d_logits
        ))
    }

    fn sum_squares(&self, buf: &DeviceBuf, len: usize, out: &mut Vec<f64>) -> Result<()> {
        dispatch!(self.sum_squares(buf buf, val len, val out))
    }

    fn adamw(
        &self,
        step: &AdamWStep,
        w: &mut DeviceBuf,
        g: &DeviceBuf,
        m: &mut DeviceBuf,
        v: &mut DeviceBuf,
        rounded: Option<&mut DeviceBuf>,
        len: usize,
    ) -> Result<()> {
        match self {
            DeviceBackend::Cpu(be) => {
                let rounded = rounded.map(cpu_mut).transpose()?;
                be.adamw(
                    step,
                    cpu_mut(w)?,
                    cpu(g)?,
                    cpu_mut(m)?,
                    cpu_mut(v)?,
                    rounded,
                    len,
                )
            }
            DeviceBackend::Cuda(be) => {
                let rounded = rounded.map(gpu_mut).transpose()?;
                be.adamw(
                    step,
                    gpu_mut(w)?,
                    gpu(g)?,
                    gpu_mut(m)?,
                    gpu_mut(v)?,
                    rounded,
                    len,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_device_runs_the_cpu_backend() {
        let (be, why) = DeviceBackend::open(Device::Cpu, Products::Bf16).unwrap();
        assert!(why.ends_with("bf16 products)"), "{why}");
        assert!(why.starts_with("cpu"), "{why}");
        assert_eq!(be.name(), "cpu");
        let mut buf = be.alloc(3).unwrap();
        be.upload(&[1.0, 2.0, 3.0], &mut buf).unwrap();
        let other = be.alloc(3).unwrap();
        be.add_assign(&mut buf, &other, 3).unwrap();
        let mut out = [0.0; 2];
        be.download(&buf, 1, &mut out).unwrap();
        assert_eq!(out, [2.0, 3.0]);
    }
}
