//! The CUDA implementation of [`Backend`], through cudarc: cuBLAS for the matrix products, the
//! CUDA C kernels of `kernels.cu` (compiled at run time by NVRTC, no CUDA headers needed) for
//! everything else. Every library is loaded when a backend is created, never at build time,
//! so this module builds (and the CPU runs) where no CUDA is installed; a missing library is
//! a [`ModelError::Backend`] naming it, not a panic.
//!
//! All work goes to the context's default stream, in order; copies to the host wait for it.
//! Buffers are `CudaSlice<f32>`; the small per-row vectors of the trait (token ids, targets,
//! log-probs) go through scratch buffers the backend keeps, so a call allocates nothing.

mod gemm;
mod nccl;

pub use nccl::{NCCL_ID_BYTES, NcclComm, nccl_unique_id, require_nccl};

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm as _};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::adamw::{AdamWStep, SQUARES_BLOCK, SQUARES_LANES};
use crate::backend::{Backend, Gemm, MatLayout, Products};
use crate::checks::{self, check};
use crate::error::{ModelError, Result};

use gemm::{ColMajorGemm, Operand};

/// The CUDA C source of the kernels.
pub const KERNELS: &str = include_str!("kernels.cu");

/// The kernels `KERNELS` defines, loaded by name.
const KERNEL_NAMES: [&str; 20] = [
    "copy_2d",
    "add_assign",
    "to_bf16",
    "sum_squares_blocks",
    "adamw",
    "adamw_masters",
    "embed",
    "embed_backward_cols",
    "rms_norm_rows",
    "rms_norm_backward_rows",
    "rms_norm_gamma_cols",
    "add_bias",
    "bias_backward_cols",
    "swiglu",
    "swiglu_backward",
    "rope",
    "causal_softmax_rows",
    "softmax_backward_rows",
    "token_logprobs_rows",
    "token_logprobs_backward_rows",
];

/// Threads per block of the row kernels (`ROW_THREADS` in `kernels.cu`).
const ROW_THREADS: u32 = 256;

/// Blocks of a grid-stride launch at most (each thread then loops).
const MAX_BLOCKS: usize = 4096;

/// Fails (the message opening with `context`), naming each CUDA library this backend loads
/// that is not found and what to do, unless all of them load.
pub fn require_libraries(context: &str) -> Result<()> {
    let missing = missing_libraries();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ModelError::Backend(format!(
        "{context}: {} not found (put the CUDA 13 libraries on LD_LIBRARY_PATH, or use \
         --device cpu)",
        missing.join(", ")
    )))
}

/// The CUDA libraries this backend loads, each with what provides it, that are not found.
pub fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // Safety: these only try to dlopen the library (no symbol is called).
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("libcuda.so (the NVIDIA driver)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("libnvrtc.so.13 (CUDA 13 NVRTC)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("libcublas.so.13 (CUDA 13 cuBLAS)");
        }
    }
    missing
}

/// Runs `f`, turning a panic of cudarc (a library or symbol it cannot load) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(ModelError::Backend(format!("{what}: {reason}")))
    })
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> ModelError + '_ {
    move |e| ModelError::Backend(format!("CUDA {what}: {e}"))
}

/// Compiles [`KERNELS`] to PTX for `arch` (`compute_90` for an H100/H200) with NVRTC.
pub fn compile_kernels(arch: &str) -> Result<Ptx> {
    if unsafe { !cudarc::nvrtc::sys::is_culib_present() } {
        return Err(ModelError::Backend(
            "libnvrtc.so.13 (CUDA 13 NVRTC) is not found: install the CUDA 13 toolkit or the \
             nvidia-cuda-nvrtc wheel and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    guarded("NVRTC", || {
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture={arch}")],
            ..CompileOptions::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, options)
            .map_err(|e| ModelError::Backend(format!("NVRTC could not compile the kernels: {e:?}")))
    })
}

/// Runs the model on one NVIDIA GPU (module docs).
pub struct CudaBackend {
    ordinal: usize,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// The precision of the products' operands.
    products: Products,
    /// The bf16 copies of a product's operands (`products = bf16`), grown to the largest
    /// product. Locked from the copy until the product is queued: work on the stream runs in
    /// order, so the next copy cannot overwrite operands a queued product still reads.
    bf16_operands: Mutex<Option<CudaSlice<u16>>>,
    /// The device side of the small per-row vectors of a call (token ids, targets, positions,
    /// log-probs and their gradients), grown to the largest call and locked like
    /// `bf16_operands`, so a call allocates nothing.
    rows: Mutex<RowScratch>,
}

/// [`CudaBackend::rows`].
#[derive(Default)]
struct RowScratch {
    ids: Option<CudaSlice<u32>>,
    values: Option<CudaSlice<f32>>,
    /// The block sums of [`Backend::sum_squares`].
    sums: Option<CudaSlice<f64>>,
}

/// `buf`, allocated (or grown) on `stream` to hold at least `n` values. A grown buffer is
/// zero-filled; a kept one holds what it held.
pub(crate) fn grown<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if buf.as_ref().is_none_or(|b| b.len() < n) {
        // Dropped first, so the old and the new buffer are not held together.
        *buf = None;
        *buf = Some(
            stream
                .alloc_zeros::<T>(n.max(1))
                .map_err(cuda_err("allocation"))?,
        );
    }
    Ok(buf.as_mut().expect("just allocated"))
}

/// `values` copied to the start of `buf` (grown to hold them).
fn staged<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<T>>,
    values: &[T],
) -> Result<cudarc::driver::CudaView<'a, T>> {
    let buf = grown(stream, buf, values.len())?;
    stream
        .memcpy_htod(values, &mut buf.slice_mut(..values.len()))
        .map_err(cuda_err("upload"))?;
    Ok(buf.slice(..values.len()))
}

impl CudaBackend {
    /// The number of GPUs the driver sees (0 when there is no driver).
    pub fn device_count() -> usize {
        if unsafe { !cudarc::driver::sys::is_culib_present() } {
            return 0;
        }
        guarded("CUDA driver", || {
            CudaContext::device_count().map_err(cuda_err("device count"))
        })
        .map_or(0, |n| n.max(0) as usize)
    }

    /// A backend on GPU `ordinal` computing its products with `products` operands: loads the
    /// libraries, creates the context and the cuBLAS handle, and compiles the kernels for the
    /// GPU's architecture.
    pub fn new(ordinal: usize, products: Products) -> Result<Self> {
        require_libraries("CUDA is not usable")?;
        guarded("CUDA", || {
            let ctx = CudaContext::new(ordinal).map_err(cuda_err("context"))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(cuda_err("compute capability"))?;
            let ptx = compile_kernels(&format!("compute_{major}{minor}"))?;
            let module = ctx.load_module(ptx).map_err(cuda_err("module load"))?;
            let mut kernels = HashMap::new();
            for name in KERNEL_NAMES {
                let f = module.load_function(name).map_err(cuda_err(name))?;
                kernels.insert(name, f);
            }
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone())
                .map_err(|e| ModelError::Backend(format!("cuBLAS: {e}")))?;
            Ok(CudaBackend {
                ordinal,
                stream,
                blas,
                kernels,
                products,
                bf16_operands: Mutex::new(None),
                rows: Mutex::new(RowScratch::default()),
            })
        })
    }

    /// The GPU's number.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> String {
        self.stream
            .context()
            .name()
            .unwrap_or_else(|_| "unknown".into())
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        &self.kernels[name]
    }

    /// A launch of enough blocks for `n` grid-stride items.
    fn items(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, MAX_BLOCKS);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A launch of one block per row.
    fn rows(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The scratch of the per-row vectors, locked for one call.
    fn row_scratch(&self) -> std::sync::MutexGuard<'_, RowScratch> {
        self.rows.lock().expect("row scratch lock")
    }
}

/// Runs one launch: `$args` are pushed in order (one statement, so temporaries live through
/// the launch).
macro_rules! launch {
    ($self:ident, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {
        // Safety: the arguments match the kernel's parameters in `kernels.cu`, and the caller
        // checked every index the kernel reaches against its buffer's length.
        unsafe {
            $self
                .stream
                .launch_builder($self.kernel($name))
                $(.arg($arg))+
                .launch($cfg)
        }
        .map_err(cuda_err($name))?
    };
}

impl CudaBackend {
    /// [`Backend::gemm`] with bf16 operands and f32 accumulation and output
    /// (`cublasGemmStridedBatchedEx`): the values each operand's view reads are rounded to
    /// bf16 into `bf16_operands` first. Operands checked by the caller.
    fn gemm_bf16(
        &self,
        g: &Gemm,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let a_range = g.a.offset..g.a.end(g.batch, g.m, g.k).max(g.a.offset);
        let b_range = g.b.offset..g.b.end(g.batch, g.k, g.n).max(g.b.offset);
        let (na, nb) = (a_range.len(), b_range.len());
        // The same product on the copies, which start at 0.
        let on_copies = Gemm {
            a: MatLayout { offset: 0, ..g.a },
            b: MatLayout { offset: 0, ..g.b },
            ..*g
        };
        let plan = ColMajorGemm::plan(&on_copies)?;
        let mut scratch = self.bf16_operands.lock().expect("bf16 operands lock");
        let scratch = grown(&self.stream, &mut scratch, na + nb)?;
        for (src, at, n, dst_at) in [(a, a_range.start, na, 0), (b, b_range.start, nb, na)] {
            if n == 0 {
                continue;
            }
            let (src, mut dst) = (src.slice(at..at + n), scratch.slice_mut(dst_at..dst_at + n));
            launch!(self, "to_bf16", Self::items(n), &src, &mut dst, &(n as i64));
        }
        let (a16, b16) = (scratch.slice(0..na), scratch.slice(na..na + nb));
        let (first, second) = match plan.first {
            Operand::A => (&a16, &b16),
            Operand::B => (&b16, &a16),
        };
        let cfg = plan.config(g);
        let mut out = c.slice_mut(plan.c_offset..);
        let stream = &self.stream;
        let (first, _first_done) = first.device_ptr(stream);
        let (second, _second_done) = second.device_ptr(stream);
        let (out, _out_done) = out.device_ptr_mut(stream);
        let (alpha, beta) = (cfg.gemm.alpha, cfg.gemm.beta);
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        // Safety: `plan` describes views inside the copies and C (checked by the caller and
        // sized above); alpha and beta are f32, as CUBLAS_COMPUTE_32F reads them.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                cfg.gemm.transa,
                cfg.gemm.transb,
                cfg.gemm.m,
                cfg.gemm.n,
                cfg.gemm.k,
                (&alpha) as *const f32 as *const _,
                first as *const _,
                cudaDataType::CUDA_R_16BF,
                cfg.gemm.lda,
                cfg.stride_a,
                second as *const _,
                cudaDataType::CUDA_R_16BF,
                cfg.gemm.ldb,
                cfg.stride_b,
                (&beta) as *const f32 as *const _,
                out as *mut _,
                cudaDataType::CUDA_R_32F,
                cfg.gemm.ldc,
                cfg.stride_c,
                cfg.batch_size,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| ModelError::Backend(format!("cuBLAS bf16 gemm: {e}")))
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return self.stream.null().map_err(cuda_err("alloc"));
        }
        self.stream
            .alloc_zeros::<f32>(len)
            .map_err(cuda_err("alloc"))
    }

    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn upload(&self, src: &[f32], buf: &mut CudaSlice<f32>) -> Result<()> {
        check("upload", src.len(), buf.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(src, &mut buf.slice_mut(..src.len()))
            .map_err(cuda_err("upload"))
    }

    fn download(&self, buf: &CudaSlice<f32>, offset: usize, out: &mut [f32]) -> Result<()> {
        check("download", offset + out.len(), buf.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&buf.slice(offset..offset + out.len()), out)
            .map_err(cuda_err("download"))
    }

    fn fill_zero(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.stream.memset_zeros(buf).map_err(cuda_err("memset"))
    }

    fn copy(
        &self,
        src: &CudaSlice<f32>,
        src_at: MatLayout,
        dst: &mut CudaSlice<f32>,
        dst_at: MatLayout,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::copy(src.len(), &src_at, dst.len(), &dst_at, rows, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let v = |x: usize| x as i64;
        launch!(
            self,
            "copy_2d",
            Self::items(rows * cols),
            src,
            &v(src_at.offset),
            &v(src_at.row_stride),
            &v(src_at.col_stride),
            dst,
            &v(dst_at.offset),
            &v(dst_at.row_stride),
            &v(dst_at.col_stride),
            &v(rows),
            &v(cols),
        );
        Ok(())
    }

    fn add_assign(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
        checks::add_assign(dst.len(), src.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        launch!(
            self,
            "add_assign",
            Self::items(len),
            dst,
            src,
            &(len as i64)
        );
        Ok(())
    }

    fn gemm(
        &self,
        g: &Gemm,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        checks::gemm(g, a.len(), b.len(), c.len())?;
        // cuBLAS runs in the calling thread's current context (kernel launches and copies
        // bind it themselves); the model is driven from several threads.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(cuda_err("context"))?;
        if self.products == Products::Bf16 {
            return self.gemm_bf16(g, a, b, c);
        }
        let plan = ColMajorGemm::plan(g)?;
        let (first, second) = match plan.first {
            Operand::A => (a, b),
            Operand::B => (b, a),
        };
        let first = first.slice(plan.first_offset..);
        let second = second.slice(plan.second_offset..);
        let mut out = c.slice_mut(plan.c_offset..);
        // Safety: `plan` describes views inside the three buffers (checked above).
        unsafe {
            self.blas
                .gemm_strided_batched(plan.config(g), &first, &second, &mut out)
        }
        .map_err(|e| ModelError::Backend(format!("cuBLAS sgemm: {e}")))
    }

    fn embed(
        &self,
        tok_emb: &CudaSlice<f32>,
        tokens: &[u32],
        out: &mut CudaSlice<f32>,
        d: usize,
    ) -> Result<()> {
        checks::embed("embed", tok_emb.len(), tokens, out.len(), d)?;
        if tokens.is_empty() || d == 0 {
            return Ok(());
        }
        let mut scratch = self.row_scratch();
        let ids = staged(&self.stream, &mut scratch.ids, tokens)?;
        let (rows, d) = (tokens.len() as i64, d as i64);
        launch!(
            self,
            "embed",
            Self::items(tokens.len() * d as usize),
            tok_emb,
            &ids,
            out,
            &rows,
            &d
        );
        Ok(())
    }

    fn embed_backward(
        &self,
        d_out: &CudaSlice<f32>,
        tokens: &[u32],
        d_tok: &mut CudaSlice<f32>,
        d: usize,
    ) -> Result<()> {
        checks::embed("embed_backward", d_tok.len(), tokens, d_out.len(), d)?;
        if tokens.is_empty() || d == 0 {
            return Ok(());
        }
        let mut scratch = self.row_scratch();
        let ids = staged(&self.stream, &mut scratch.ids, tokens)?;
        let (rows, cols) = (tokens.len() as i64, d as i64);
        launch!(
            self,
            "embed_backward_cols",
            Self::items(d),
            d_out,
            &ids,
            d_tok,
            &rows,
            &cols
        );
        Ok(())
    }

    fn rms_norm(
        &self,
        eps: f32,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::rms_norm(x.len(), gamma.len(), out.len(), rstd.len(), rows, cols)?;
        if rows == 0 {
            return Ok(());
        }
        launch!(
            self,
            "rms_norm_rows",
            Self::rows(rows),
            &eps,
            x,
            gamma,
            out,
            rstd,
            &(cols as i64)
        );
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        x: &CudaSlice<f32>,
        gamma: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        d_out: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        d_gamma: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::rms_norm_backward(
            x.len(),
            gamma.len(),
            rstd.len(),
            d_out.len(),
            dx.len(),
            d_gamma.len(),
            rows,
            cols,
        )?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i64, cols as i64);
        launch!(
            self,
            "rms_norm_gamma_cols",
            Self::items(cols),
            x,
            rstd,
            d_out,
            d_gamma,
            &r,
            &c
        );
        launch!(
            self,
            "rms_norm_backward_rows",
            Self::rows(rows),
            x,
            gamma,
            rstd,
            d_out,
            dx,
            &c
        );
        Ok(())
    }

    fn add_bias(
        &self,
        x: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::bias("add_bias", x.len(), bias.len(), rows, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i64, cols as i64);
        launch!(self, "add_bias", Self::items(rows * cols), x, bias, &r, &c);
        Ok(())
    }

    fn bias_backward(
        &self,
        d_out: &CudaSlice<f32>,
        d_bias: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::bias("bias_backward", d_out.len(), d_bias.len(), rows, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (r, c) = (rows as i64, cols as i64);
        launch!(
            self,
            "bias_backward_cols",
            Self::items(cols),
            d_out,
            d_bias,
            &r,
            &c
        );
        Ok(())
    }

    fn swiglu(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        checks::elementwise("swiglu", &[gate.len(), up.len(), out.len()], len)?;
        if len == 0 {
            return Ok(());
        }
        launch!(
            self,
            "swiglu",
            Self::items(len),
            gate,
            up,
            out,
            &(len as i64)
        );
        Ok(())
    }

    fn swiglu_backward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        d_out: &CudaSlice<f32>,
        d_gate: &mut CudaSlice<f32>,
        d_up: &mut CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        let lens = [gate.len(), up.len(), d_out.len(), d_gate.len(), d_up.len()];
        checks::elementwise("swiglu_backward", &lens, len)?;
        if len == 0 {
            return Ok(());
        }
        launch!(
            self,
            "swiglu_backward",
            Self::items(len),
            gate,
            up,
            d_out,
            d_gate,
            d_up,
            &(len as i64)
        );
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &[u32],
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        let (rows, half) = (positions.len(), hd / 2);
        checks::rope(x.len(), positions, cos.len(), sin.len(), heads, hd)?;
        if rows * heads * half == 0 {
            return Ok(());
        }
        let mut scratch = self.row_scratch();
        let at = staged(&self.stream, &mut scratch.ids, positions)?;
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let (r, h, d) = (rows as i64, heads as i64, hd as i64);
        launch!(
            self,
            "rope",
            Self::items(rows * heads * half),
            x,
            &at,
            cos,
            sin,
            &r,
            &h,
            &d,
            &sign
        );
        Ok(())
    }

    fn causal_softmax(
        &self,
        scores: &mut CudaSlice<f32>,
        offset: usize,
        batch: usize,
        rows: usize,
        cols: usize,
        past: usize,
    ) -> Result<()> {
        check("causal_softmax", offset + batch * rows * cols, scores.len())?;
        if batch * rows * cols == 0 {
            return Ok(());
        }
        let (o, r, c, p) = (offset as i64, rows as i64, cols as i64, past as i64);
        launch!(
            self,
            "causal_softmax_rows",
            Self::rows(batch * rows),
            scores,
            &o,
            &r,
            &c,
            &p
        );
        Ok(())
    }

    fn softmax_backward(
        &self,
        p: &CudaSlice<f32>,
        p_offset: usize,
        dp: &mut CudaSlice<f32>,
        dp_offset: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        checks::softmax_backward(p.len(), p_offset, dp.len(), dp_offset, rows, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (po, dpo, c) = (p_offset as i64, dp_offset as i64, cols as i64);
        launch!(
            self,
            "softmax_backward_rows",
            Self::rows(rows),
            p,
            &po,
            dp,
            &dpo,
            &c
        );
        Ok(())
    }

    fn token_logprobs(
        &self,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        vocab: usize,
        logprob: &mut [f32],
        entropy: &mut [f32],
    ) -> Result<()> {
        let rows = targets.len();
        let per_row = [logprob.len(), entropy.len()];
        checks::token_logprobs("token_logprobs", &[logits.len()], &per_row, targets, vocab)?;
        if rows == 0 {
            return Ok(());
        }
        let mut scratch = self.row_scratch();
        let RowScratch { ids, values, .. } = &mut *scratch;
        let t = staged(&self.stream, ids, targets)?;
        let out = grown(&self.stream, values, 2 * rows)?;
        let (mut lp, mut ent) = out.split_at_mut(rows);
        launch!(
            self,
            "token_logprobs_rows",
            Self::rows(rows),
            logits,
            &t,
            &(vocab as i64),
            &mut lp,
            &mut ent
        );
        self.stream
            .memcpy_dtoh(&lp, &mut logprob[..rows])
            .map_err(cuda_err("download"))?;
        self.stream
            .memcpy_dtoh(&ent, &mut entropy[..rows])
            .map_err(cuda_err("download"))
    }

    fn token_logprobs_backward(
        &self,
        logits: &CudaSlice<f32>,
        targets: &[u32],
        vocab: usize,
        d_logprob: &[f32],
        d_entropy: &[f32],
        d_logits: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = targets.len();
        checks::token_logprobs(
            "token_logprobs_backward",
            &[logits.len(), d_logits.len()],
            &[d_logprob.len(), d_entropy.len()],
            targets,
            vocab,
        )?;
        if rows == 0 {
            return Ok(());
        }
        let mut scratch = self.row_scratch();
        let RowScratch { ids, values, .. } = &mut *scratch;
        let t = staged(&self.stream, ids, targets)?;
        let grads = grown(&self.stream, values, 2 * rows)?;
        let (mut glp, mut gent) = grads.split_at_mut(rows);
        self.stream
            .memcpy_htod(&d_logprob[..rows], &mut glp)
            .map_err(cuda_err("upload"))?;
        self.stream
            .memcpy_htod(&d_entropy[..rows], &mut gent)
            .map_err(cuda_err("upload"))?;
        launch!(
            self,
            "token_logprobs_backward_rows",
            Self::rows(rows),
            logits,
            &t,
            &(vocab as i64),
            &mut glp,
            &mut gent,
            d_logits
        );
        Ok(())
    }

    fn sum_squares(&self, buf: &CudaSlice<f32>, len: usize, out: &mut Vec<f64>) -> Result<()> {
        checks::check("sum_squares", len, buf.len())?;
        if len == 0 {
            return Ok(());
        }
        let blocks = len.div_ceil(SQUARES_BLOCK);
        let mut scratch = self.row_scratch();
        let sums = grown(&self.stream, &mut scratch.sums, blocks)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (SQUARES_LANES as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "sum_squares_blocks",
            cfg,
            buf,
            &(len as i64),
            &mut *sums
        );
        let start = out.len();
        out.resize(start + blocks, 0.0);
        self.stream
            .memcpy_dtoh(&sums.slice(..blocks), &mut out[start..])
            .map_err(cuda_err("download"))
    }

    fn adamw(
        &self,
        step: &AdamWStep,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        rounded: Option<&mut CudaSlice<f32>>,
        len: usize,
    ) -> Result<()> {
        let rounded_len = rounded.as_ref().map_or(len, |r| r.len());
        checks::adamw(len, &[w.len(), g.len(), m.len(), v.len(), rounded_len])?;
        if len == 0 {
            return Ok(());
        }
        let AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            bias1,
            bias2,
            decay,
            clip_scale,
        } = *step;
        let n = len as i64;
        match rounded {
            None => launch!(
                self,
                "adamw",
                Self::items(len),
                w,
                g,
                m,
                v,
                &n,
                &lr,
                &beta1,
                &beta2,
                &eps,
                &bias1,
                &bias2,
                &decay,
                &clip_scale
            ),
            Some(rounded) => launch!(
                self,
                "adamw_masters",
                Self::items(len),
                w,
                g,
                m,
                v,
                rounded,
                &n,
                &lr,
                &beta1,
                &beta2,
                &eps,
                &bias1,
                &bias2,
                &decay,
                &clip_scale
            ),
        };
        Ok(())
    }
}
