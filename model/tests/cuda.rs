//! The CUDA backend against the CPU backend.
//!
//! `the_kernels_compile_with_nvrtc` needs only libnvrtc (scripts/test.sh installs NVIDIA's
//! wheel of it and puts it on `LD_LIBRARY_PATH`). The others need a GPU: they are ignored by
//! default, so a machine without one counts them as skipped, and scripts/gpu_check.sh runs
//! them with `--ignored` on the GPU machine, where a missing GPU or library fails them.
//! `a_one_rank_nccl_communicator_gathers_and_times_out` also needs libnccl: one GPU is
//! enough for a one-rank communicator, not for an exchange between GPUs.
//!
//! Tolerances (f32 on both sides; the GPU sums in another order and cuBLAS may use FMA):
//! 1e-4 absolute on log-probs and entropies, 1e-3 relative (to the tensor's largest entry) on
//! gradients and on every op's output. The bf16 products are compared with the CPU's exact
//! emulation of them, with the tolerances stated at their test.

use flywheel_model::cuda::{NcclComm, compile_kernels, nccl_unique_id};
use flywheel_model::{
    Backend, Checkpoint, CpuBackend, CudaBackend, Gemm, MatLayout, Model, Params, Products,
    Sequence,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn the_kernels_compile_with_nvrtc() {
    // compute_80 (A100) and compute_90 (H100, H200): the architectures of the trainers.
    for arch in ["compute_80", "compute_90"] {
        if let Err(e) = compile_kernels(arch) {
            panic!(
                "{e}\nscripts/test.sh installs NVRTC (scripts/nvrtc.sh) and sets LD_LIBRARY_PATH"
            );
        }
    }
}

fn gpu() -> CudaBackend {
    gpu_with(Products::F32)
}

fn gpu_with(products: Products) -> CudaBackend {
    CudaBackend::new(0, products).unwrap_or_else(|e| panic!("no usable GPU: {e}"))
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

/// Uploads `values` to `be`.
fn put<B: Backend>(be: &B, values: &[f32]) -> B::Buf {
    let mut buf = be.alloc(values.len()).unwrap();
    be.upload(values, &mut buf).unwrap();
    buf
}

fn get<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    let mut out = vec![0.0; be.len(buf)];
    be.download(buf, 0, &mut out).unwrap();
    out
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= rel * scale,
            "{what}[{i}]: gpu {g} cpu {c} (scale {scale})"
        );
    }
}

/// Runs `$body` on both backends, `$b` the backend and `$buf…` the buffers made from
/// `$input…`, then compares every buffer.
macro_rules! same_on_both {
    ($what:expr, $gpu:expr, [$($input:expr),+ $(,)?], |$b:ident, [$($buf:ident),+]| $body:block) => {{
        let inputs: Vec<Vec<f32>> = vec![$($input),+];
        let mut on_cpu = inputs.clone();
        {
            let $b = &CpuBackend::default();
            let [$($buf),+] = &mut on_cpu[..] else { unreachable!() };
            $body
        }
        let mut on_gpu: Vec<_> = inputs.iter().map(|v| put($gpu, v)).collect();
        {
            let $b = $gpu;
            let [$($buf),+] = &mut on_gpu[..] else { unreachable!() };
            $body
        }
        for (i, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            assert_close(&format!("{} buffer {i}", $what), &get($gpu, g), c, 1e-3);
        }
    }};
}

#[test]
#[ignore = "needs an NVIDIA GPU and the CUDA 13 libraries: scripts/gpu_check.sh runs it"]
fn every_op_matches_the_cpu() {
    let be = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, cols) = (7, 300);
    let x = random(&mut rng, rows * cols);
    let gamma = random(&mut rng, cols);
    let d_out = random(&mut rng, rows * cols);

    same_on_both!(
        "rms_norm",
        &be,
        [
            x.clone(),
            gamma.clone(),
            vec![0.0; rows * cols],
            vec![0.0; rows],
        ],
        |b, [x, g, out, rstd]| {
            b.rms_norm(1e-6, x, g, out, rstd, rows, cols).unwrap();
        }
    );
    let rstd: Vec<f32> = (0..rows).map(|_| rng.random_range(0.5..2.0)).collect();
    same_on_both!(
        "rms_norm_backward",
        &be,
        [
            x.clone(),
            gamma.clone(),
            rstd,
            d_out.clone(),
            random(&mut rng, rows * cols),
            random(&mut rng, cols)
        ],
        |b, [x, g, r, d, dx, dg]| {
            b.rms_norm_backward(x, g, r, d, dx, dg, rows, cols).unwrap();
        }
    );
    same_on_both!(
        "bias",
        &be,
        [
            x.clone(),
            gamma.clone(),
            d_out.clone(),
            random(&mut rng, cols),
        ],
        |b, [x, bias, d, db]| {
            b.add_bias(x, bias, rows, cols).unwrap();
            b.bias_backward(d, db, rows, cols).unwrap();
        }
    );
    let n = rows * cols;
    same_on_both!(
        "swiglu",
        &be,
        [
            x.clone(),
            d_out.clone(),
            gamma.repeat(rows),
            vec![0.0; n],
            vec![0.0; n],
            vec![0.0; n],
        ],
        |b, [g, u, d, out, dg, du]| {
            b.swiglu(g, u, out, n).unwrap();
            b.swiglu_backward(g, u, d, dg, du, n).unwrap();
        }
    );
    let (heads, hd) = (3, 10);
    let positions = [0u32, 3, 1, 7, 2, 2, 5];
    let table = random(&mut rng, 8 * hd / 2);
    same_on_both!(
        "rope",
        &be,
        [
            random(&mut rng, rows * heads * hd),
            table.clone(),
            table.iter().map(|v| v * 0.5).collect(),
        ],
        |b, [x, c, s]| {
            b.rope(x, &positions, c, s, heads, hd, false).unwrap();
        }
    );
    let (batch, q, k, past) = (2, 3, 9, 4);
    same_on_both!(
        "softmax",
        &be,
        [
            random(&mut rng, 5 + batch * q * k),
            random(&mut rng, 5 + batch * q * k),
        ],
        |b, [s, dp]| {
            b.causal_softmax(s, 5, batch, q, k, past).unwrap();
            b.softmax_backward(s, 5, dp, 5, batch * q, k).unwrap();
        }
    );
    let (vocab, d) = (50, 12);
    let tokens = [3u32, 49, 3, 0, 17];
    same_on_both!(
        "embed",
        &be,
        [
            random(&mut rng, vocab * d),
            vec![0.0; tokens.len() * d],
            random(&mut rng, tokens.len() * d),
            random(&mut rng, vocab * d),
        ],
        |b, [emb, out, d_out, d_emb]| {
            b.embed(emb, &tokens, out, d).unwrap();
            b.embed_backward(d_out, &tokens, d_emb, d).unwrap();
        }
    );
    // Strided copies, accumulation and products of every layout the model uses.
    same_on_both!(
        "copy, add, gemm",
        &be,
        [
            random(&mut rng, 6 * 10),
            vec![0.0; 6 * 10],
            random(&mut rng, 6 * 10),
            vec![0.0; 2 * 5 * 7],
        ],
        |b, [src, dst, other, c]| {
            b.copy(
                src,
                MatLayout::at(2, 10),
                dst,
                MatLayout::row_major(6).t(),
                5,
                6,
            )
            .unwrap();
            b.add_assign(dst, other, 60).unwrap();
            let g = Gemm {
                m: 5,
                k: 3,
                n: 7,
                batch: 2,
                alpha: 0.7,
                beta: 0.0,
                a: MatLayout::at(1, 10).batched(3),
                b: MatLayout::row_major(3).t().batched(21),
                c: MatLayout::row_major(7).batched(35),
            };
            b.gemm(&g, src, other, c).unwrap();
        }
    );

    // Log-probs and their backward (host outputs).
    let targets = [4u32, u32::MAX, 0, 49, 7];
    let logits = random(&mut rng, targets.len() * vocab);
    let (mut lp_c, mut ent_c) = (vec![0.0; 5], vec![0.0; 5]);
    CpuBackend::default()
        .token_logprobs(&logits, &targets, vocab, &mut lp_c, &mut ent_c)
        .unwrap();
    let (mut lp_g, mut ent_g) = (vec![0.0; 5], vec![0.0; 5]);
    let on_gpu = put(&be, &logits);
    be.token_logprobs(&on_gpu, &targets, vocab, &mut lp_g, &mut ent_g)
        .unwrap();
    assert_close("logprob", &lp_g, &lp_c, 1e-4);
    assert_close("entropy", &ent_g, &ent_c, 1e-4);
    let (d_lp, d_ent) = (random(&mut rng, 5), random(&mut rng, 5));
    let mut dz_c = vec![0.0; logits.len()];
    CpuBackend::default()
        .token_logprobs_backward(&logits, &targets, vocab, &d_lp, &d_ent, &mut dz_c)
        .unwrap();
    let mut dz_g = be.alloc(logits.len()).unwrap();
    be.token_logprobs_backward(&on_gpu, &targets, vocab, &d_lp, &d_ent, &mut dz_g)
        .unwrap();
    assert_close("d_logits", &get(&be, &dz_g), &dz_c, 1e-3);
}

/// Relative to the model crate, where cargo runs its tests and scripts/gpu_check.sh runs the
/// prebuilt binary (on a machine where the build's absolute paths do not exist).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new("tests/fixtures/hf").join(name)
}

/// A whole forward and backward pass of each architecture's fixture on both backends.
#[test]
#[ignore = "needs an NVIDIA GPU and the CUDA 13 libraries: scripts/gpu_check.sh runs it"]
fn forward_and_backward_match_the_cpu_on_every_architecture() {
    passes_match(Products::F32, 1e-4, 1e-3);
}

/// bf16 products on the GPU against the CPU's emulation of them (the same operands rounded
/// the same way; an accumulation-order difference can flip a later operand's rounding by one
/// bf16 step, 2⁻⁸ relative): 2e-3 absolute on log-probs and entropies, 1e-2 relative on
/// gradients.
#[test]
#[ignore = "needs an NVIDIA GPU and the CUDA 13 libraries: scripts/gpu_check.sh runs it"]
fn bf16_products_match_the_cpu_emulation_on_every_architecture() {
    passes_match(Products::Bf16, 2e-3, 1e-2);
}

/// A forward and a backward pass of each architecture's fixture on the GPU and on the CPU,
/// both with `products`, within `lp_tol` (log-probs, entropies) and `grad_rel` (gradients).
fn passes_match(products: Products, lp_tol: f32, grad_rel: f32) {
    for name in ["qwen2", "llama", "qwen3", "qwen2-bf16"] {
        let params: Params = Checkpoint::open(&fixture(name), None).unwrap().params;
        let cpu = Model::new(CpuBackend::new(products), &params).unwrap();
        let gpu_model = Model::new(gpu_with(products), &params).unwrap();
        let s1: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 300).collect();
        let s2: Vec<u32> = (0..17).map(|i| (i * 11 + 1) % 300).collect();
        let seqs = [
            Sequence {
                tokens: &s1,
                response_start: 5,
            },
            Sequence {
                tokens: &s2,
                response_start: 1,
            },
        ];
        let (c, g) = (
            cpu.forward(&seqs).unwrap(),
            gpu_model.forward(&seqs).unwrap(),
        );
        assert_close(
            &format!("{name} logprobs"),
            g.logprobs(),
            c.logprobs(),
            lp_tol,
        );
        assert_close(
            &format!("{name} entropies"),
            g.entropies(),
            c.entropies(),
            lp_tol,
        );
        let n = c.logprobs().len();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (a, b) = (random(&mut rng, n), random(&mut rng, n));
        let mut gc = cpu.new_gradients().unwrap();
        cpu.backward(&c, &a, Some(&b), &mut gc).unwrap();
        let mut gg = gpu_model.new_gradients().unwrap();
        gpu_model.backward(&g, &a, Some(&b), &mut gg).unwrap();
        let (gc, gg) = (
            cpu.gradients_to_params(&gc).unwrap(),
            gpu_model.gradients_to_params(&gg).unwrap(),
        );
        for (x, y) in gg.tensors().iter().zip(gc.tensors()) {
            assert_close(&format!("{name} d{}", x.name), &x.data, &y.data, grad_rel);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU, the CUDA 13 libraries and libnccl: scripts/gpu_check.sh runs it"]
fn a_one_rank_nccl_communicator_gathers_and_times_out() {
    use std::time::{Duration, Instant};
    let soon = || Instant::now() + Duration::from_secs(30);
    let id = nccl_unique_id().unwrap_or_else(|e| panic!("{e}"));
    let mut comm = NcclComm::connect(0, &id, 1, 0, soon()).unwrap_or_else(|e| panic!("{e}"));
    // Two sizes: the staging buffers grow, then are reused.
    for n in [5usize, 1 << 20, 3] {
        let send: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut recv = vec![f32::NAN; n];
        comm.all_gather(&send, &mut recv, soon()).unwrap();
        assert_eq!(recv, send);
    }
    // A two-member communicator whose other member never comes: the init is aborted at the
    // deadline instead of waiting for ever.
    let id = nccl_unique_id().unwrap();
    let lonely = NcclComm::connect(0, &id, 2, 0, Instant::now() + Duration::from_secs(2));
    let e = lonely.err().expect("a member is missing");
    assert!(e.to_string().contains("deadline"), "{e}");
}

/// The bf16 products on the GPU see exactly the operands the CPU's emulation rounds (offset,
/// transposed and batched views, both output orientations): only the f32 accumulation order
/// differs, 1e-5 relative.
#[test]
#[ignore = "needs an NVIDIA GPU and the CUDA 13 libraries: scripts/gpu_check.sh runs it"]
fn bf16_products_round_their_operands_as_the_cpu_emulates() {
    let (gpu, cpu) = (gpu_with(Products::Bf16), CpuBackend::new(Products::Bf16));
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (a, b) = (random(&mut rng, 200), random(&mut rng, 200));
    let layouts = [
        // A offset and strided, B transposed, batched.
        (
            2,
            MatLayout::at(1, 10).batched(3),
            MatLayout::row_major(3).t().batched(21),
            MatLayout::row_major(7).batched(35),
        ),
        // A transposed, C written transposed (unit-stride rows).
        (
            1,
            MatLayout::row_major(5).t(),
            MatLayout::at(4, 7),
            MatLayout::row_major(5).t(),
        ),
    ];
    for (i, (batch, a_at, b_at, c_at)) in layouts.into_iter().enumerate() {
        let g = Gemm {
            m: 5,
            k: 3,
            n: 7,
            batch,
            alpha: 0.7,
            beta: 0.0,
            a: a_at,
            b: b_at,
            c: c_at,
        };
        let mut want = vec![0.0; 70];
        cpu.gemm(&g, &a, &b, &mut want).unwrap();
        let mut c = gpu.alloc(70).unwrap();
        gpu.gemm(&g, &put(&gpu, &a), &put(&gpu, &b), &mut c)
            .unwrap();
        assert_close(&format!("bf16 gemm {i}"), &get(&gpu, &c), &want, 1e-5);
    }
}

/// The optimizer's ops give the CPU's bits: the gradient norm's block sums and AdamW's
/// elements (f64 arithmetic, each operation rounded once on both), with and without bf16
/// masters.
#[test]
#[ignore = "needs an NVIDIA GPU and the CUDA 13 libraries: scripts/gpu_check.sh runs it"]
fn the_optimizer_ops_match_the_cpu_bit_for_bit() {
    use flywheel_model::AdamWStep;
    let (gpu, cpu) = (gpu(), CpuBackend::default());
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    // Several blocks of the norm and a short last one.
    let n = 3 * flywheel_model::adamw::SQUARES_BLOCK + 1234;
    let g = random(&mut rng, n);
    let (mut sums_c, mut sums_g) = (Vec::new(), Vec::new());
    cpu.sum_squares(&g, n, &mut sums_c).unwrap();
    gpu.sum_squares(&put(&gpu, &g), n, &mut sums_g).unwrap();
    assert_eq!(sums_g, sums_c, "block sums of squares");
    let step = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bias1: 1.0 - 0.9f64.powf(7.0),
        bias2: 1.0 - 0.999f64.powf(7.0),
        decay: 1.0 - 3e-4 * 0.01,
        clip_scale: 0.37,
    };
    for masters in [false, true] {
        let (w, m) = (random(&mut rng, n), random(&mut rng, n));
        let v: Vec<f32> = random(&mut rng, n).iter().map(|x| x.abs()).collect();
        let (mut wc, mut mc, mut vc, mut rc) = (w.clone(), m.clone(), v.clone(), vec![0.0; n]);
        cpu.adamw(
            &step,
            &mut wc,
            &g,
            &mut mc,
            &mut vc,
            masters.then_some(&mut rc),
            n,
        )
        .unwrap();
        let (mut wg, gg, mut mg, mut vg, mut rg) = (
            put(&gpu, &w),
            put(&gpu, &g),
            put(&gpu, &m),
            put(&gpu, &v),
            gpu.alloc(n).unwrap(),
        );
        gpu.adamw(
            &step,
            &mut wg,
            &gg,
            &mut mg,
            &mut vg,
            masters.then_some(&mut rg),
            n,
        )
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&get(&gpu, &wg)),
            bits(&wc),
            "weights (masters: {masters})"
        );
        assert_eq!(bits(&get(&gpu, &mg)), bits(&mc), "first moments");
        assert_eq!(bits(&get(&gpu, &vg)), bits(&vc), "second moments");
        if masters {
            assert_eq!(bits(&get(&gpu, &rg)), bits(&rc), "bf16-rounded weights");
        }
    }
}
