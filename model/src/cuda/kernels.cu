// The model's row-wise operations on the GPU: the CUDA side of `CudaBackend` (cuda/mod.rs).
// Compiled at run time by NVRTC, without headers. Each kernel computes what the CPU backend's
// method of the same name computes (cpu.rs), so the two are compared value for value.
//
// Launch shapes: element-wise kernels use grid-stride loops; row kernels (`*_rows`) take one
// block of ROW_THREADS threads per row; column reductions (`*_cols`) take one thread per column
// and add the rows in order, so every gradient sum is deterministic (no atomics): a step
// redone on the GPU gives the same bits.

#define ROW_THREADS 256
#define IGNORE_TARGET 0xffffffffu

typedef long long i64;

// −∞ without math headers.
#define NEG_INF __int_as_float(0xff800000)

// Sum of `v` over the block (every thread gets it). `shared` holds one value per warp.
template <typename T>
__device__ T block_sum(T v, T* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? shared[lane] : (T)0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

// Maximum of `v` over the block (every thread gets it).
__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? shared[lane] : NEG_INF;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

#define GRID_STRIDE(i, n) \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

extern "C" __global__ void copy_2d(const float* src, i64 src_offset, i64 src_row, i64 src_col,
                                   float* dst, i64 dst_offset, i64 dst_row, i64 dst_col,
                                   i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) {
        const i64 r = i / cols, c = i % cols;
        dst[dst_offset + r * dst_row + c * dst_col] = src[src_offset + r * src_row + c * src_col];
    }
}

extern "C" __global__ void add_assign(float* dst, const float* src, i64 len) {
    GRID_STRIDE(i, len) { dst[i] += src[i]; }
}

// The bf16 bits of `x`, rounded to nearest even (NaN stays NaN), as half::bf16::from_f32.
__device__ unsigned short bf16_bits(float x) {
    const unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A product's operand in bf16.
extern "C" __global__ void to_bf16(const float* x, unsigned short* y, i64 n) {
    GRID_STRIDE(i, n) { y[i] = bf16_bits(x[i]); }
}

// The optimizer's arithmetic (adamw.rs), bit for bit: f64 operations each rounded once
// (explicit _rn intrinsics, so nothing is fused into a multiply-add), sums in a fixed order.

// One block of 256 lanes per 256·64 values: lane l adds the squares of values l, l + 256, …
// in turn, then the lanes are added pairwise (l takes l + h, h = 128, 64, …, 1).
extern "C" __global__ void sum_squares_blocks(const float* x, i64 n, double* out) {
    __shared__ double lanes[256];
    const i64 base = (i64)blockIdx.x * 256 * 64;
    const int l = threadIdx.x;
    double acc = 0.0;
    for (int j = 0; j < 64; j++) {
        const i64 i = base + l + (i64)j * 256;
        if (i < n) {
            const double v = (double)x[i];
            acc = __dadd_rn(acc, __dmul_rn(v, v));
        }
    }
    lanes[l] = acc;
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {
        if (l < h) lanes[l] = __dadd_rn(lanes[l], lanes[l + h]);
        __syncthreads();
    }
    if (l == 0) out[blockIdx.x] = lanes[0];
}

// AdamWStep::apply on element i; returns the new weight.
__device__ float adamw_element(float* w, const float* g, float* m, float* v, i64 i, double lr,
                               double beta1, double beta2, double eps, double bias1,
                               double bias2, double decay, double clip_scale) {
    const double gi = __dmul_rn((double)g[i], clip_scale);
    const double m_new =
        __dadd_rn(__dmul_rn(beta1, (double)m[i]), __dmul_rn(__dsub_rn(1.0, beta1), gi));
    const double v_new = __dadd_rn(__dmul_rn(beta2, (double)v[i]),
                                   __dmul_rn(__dmul_rn(__dsub_rn(1.0, beta2), gi), gi));
    m[i] = __double2float_rn(m_new);
    v[i] = __double2float_rn(v_new);
    const double update = __ddiv_rn(__ddiv_rn(m_new, bias1),
                                    __dadd_rn(__dsqrt_rn(__ddiv_rn(v_new, bias2)), eps));
    const float w_new =
        __double2float_rn(__dsub_rn(__dmul_rn((double)w[i], decay), __dmul_rn(lr, update)));
    w[i] = w_new;
    return w_new;
}

extern "C" __global__ void adamw(float* w, const float* g, float* m, float* v, i64 n, double lr,
                                 double beta1, double beta2, double eps, double bias1,
                                 double bias2, double decay, double clip_scale) {
    GRID_STRIDE(i, n) {
        adamw_element(w, g, m, v, i, lr, beta1, beta2, eps, bias1, bias2, decay, clip_scale);
    }
}

// `w` holds the f32 masters; `rounded` gets them rounded to bf16.
extern "C" __global__ void adamw_masters(float* w, const float* g, float* m, float* v,
                                         float* rounded, i64 n, double lr, double beta1,
                                         double beta2, double eps, double bias1, double bias2,
                                         double decay, double clip_scale) {
    GRID_STRIDE(i, n) {
        const float w_new = adamw_element(w, g, m, v, i, lr, beta1, beta2, eps, bias1, bias2,
                                          decay, clip_scale);
        rounded[i] = __uint_as_float((unsigned)bf16_bits(w_new) << 16);
    }
}

extern "C" __global__ void embed(const float* tok_emb, const unsigned* tokens, float* out,
                                 i64 rows, i64 d) {
    GRID_STRIDE(i, rows * d) { out[i] = tok_emb[(i64)tokens[i / d] * d + i % d]; }
}

// One thread per column; rows in order.
extern "C" __global__ void embed_backward_cols(const float* d_out, const unsigned* tokens,
                                               float* d_tok, i64 rows, i64 d) {
    GRID_STRIDE(j, d) {
        for (i64 r = 0; r < rows; r++) d_tok[(i64)tokens[r] * d + j] += d_out[r * d + j];
    }
}

extern "C" __global__ void rms_norm_rows(float eps, const float* x, const float* gamma,
                                         float* out, float* rstd, i64 cols) {
    __shared__ double shared[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * cols;
    double sum = 0.0;
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) sum += (double)xr[j] * xr[j];
    sum = block_sum(sum, shared);
    const float rs = (float)(1.0 / sqrt(sum / (double)cols + (double)eps));
    if (threadIdx.x == 0) rstd[r] = rs;
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) out[r * cols + j] = xr[j] * rs * gamma[j];
}

// Adds the input gradient: dx = rstd·(d_out·gamma − xhat·mean(d_out·gamma·xhat)).
extern "C" __global__ void rms_norm_backward_rows(const float* x, const float* gamma,
                                                  const float* rstd, const float* d_out,
                                                  float* dx, i64 cols) {
    __shared__ double shared[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * cols;
    const float* gr = d_out + r * cols;
    const float rs = rstd[r];
    double sum = 0.0;
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) sum += (double)(gr[j] * gamma[j] * xr[j] * rs);
    const float m2 = (float)(block_sum(sum, shared) / (double)cols);
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) {
        const float xhat = xr[j] * rs;
        dx[r * cols + j] += rs * (gr[j] * gamma[j] - xhat * m2);
    }
}

// d_gamma[j] += Σ_r d_out[r][j]·x[r][j]·rstd[r], one thread per column.
extern "C" __global__ void rms_norm_gamma_cols(const float* x, const float* rstd,
                                               const float* d_out, float* d_gamma, i64 rows,
                                               i64 cols) {
    GRID_STRIDE(j, cols) {
        float acc = d_gamma[j];
        for (i64 r = 0; r < rows; r++) acc += d_out[r * cols + j] * x[r * cols + j] * rstd[r];
        d_gamma[j] = acc;
    }
}

extern "C" __global__ void add_bias(float* x, const float* bias, i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) { x[i] += bias[i % cols]; }
}

extern "C" __global__ void bias_backward_cols(const float* d_out, float* d_bias, i64 rows,
                                              i64 cols) {
    GRID_STRIDE(j, cols) {
        float acc = d_bias[j];
        for (i64 r = 0; r < rows; r++) acc += d_out[r * cols + j];
        d_bias[j] = acc;
    }
}

__device__ float sigmoid(float y) { return 1.0f / (1.0f + expf(-y)); }

extern "C" __global__ void swiglu(const float* gate, const float* up, float* out, i64 len) {
    GRID_STRIDE(i, len) {
        const float g = gate[i];
        out[i] = g * sigmoid(g) * up[i];
    }
}

extern "C" __global__ void swiglu_backward(const float* gate, const float* up, const float* d_out,
                                           float* d_gate, float* d_up, i64 len) {
    GRID_STRIDE(i, len) {
        const float g = gate[i], u = up[i], d = d_out[i], s = sigmoid(g);
        d_up[i] = d * g * s;
        // d silu(g)/dg = s·(1 + g·(1 − s)).
        d_gate[i] = d * u * s * (1.0f + g * (1.0f - s));
    }
}

// Half-split rotary embedding in place; `sign` is −1 for the inverse rotation.
extern "C" __global__ void rope(float* x, const unsigned* positions, const float* cos_table,
                                const float* sin_table, i64 rows, i64 heads, i64 hd, float sign) {
    const i64 half = hd / 2;
    GRID_STRIDE(i, rows * heads * half) {
        const i64 r = i / (heads * half), h = (i / half) % heads, k = i % half;
        const i64 at = (i64)positions[r] * half + k;
        const float c = cos_table[at], s = sign * sin_table[at];
        float* head = x + r * heads * hd + h * hd;
        const float a = head[k], b = head[k + half];
        head[k] = a * c - b * s;
        head[k + half] = b * c + a * s;
    }
}

// Block b is row b of the block at `offset`: query b % rows, at position past + b % rows.
extern "C" __global__ void causal_softmax_rows(float* scores, i64 offset, i64 rows, i64 cols,
                                               i64 past) {
    __shared__ float shared[32];
    float* row = scores + offset + (i64)blockIdx.x * cols;
    const i64 i = blockIdx.x % rows;
    const i64 valid = past + i + 1 < cols ? past + i + 1 : cols;
    float m = NEG_INF;
    for (i64 j = threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (i64 j = threadIdx.x; j < valid; j += blockDim.x) {
        const float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum(sum, shared);
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) row[j] = j < valid ? row[j] * inv : 0.0f;
}

extern "C" __global__ void softmax_backward_rows(const float* p, i64 p_offset, float* dp,
                                                 i64 dp_offset, i64 cols) {
    __shared__ float shared[32];
    const float* pr = p + p_offset + (i64)blockIdx.x * cols;
    float* dr = dp + dp_offset + (i64)blockIdx.x * cols;
    float dot = 0.0f;
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) dot += pr[j] * dr[j];
    dot = block_sum(dot, shared);
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) dr[j] = pr[j] * (dr[j] - dot);
}

// Log-sum-exp and entropy of one row's softmax, in double (as the CPU computes them).
__device__ void lse_entropy(const float* z, i64 vocab, double* shared, double* lse, double* ent) {
    __shared__ float shared_max[32];
    float m = NEG_INF;
    for (i64 j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, z[j]);
    const double max = (double)block_max(m, shared_max);
    double sum = 0.0;
    for (i64 j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp((double)z[j] - max);
    *lse = max + log(block_sum(sum, shared));
    double plogp = 0.0;
    for (i64 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double logp = (double)z[j] - *lse;
        plogp += exp(logp) * logp;
    }
    *ent = -block_sum(plogp, shared);
}

extern "C" __global__ void token_logprobs_rows(const float* logits, const unsigned* targets,
                                               i64 vocab, float* logprob, float* entropy) {
    __shared__ double shared[32];
    const i64 r = blockIdx.x;
    const unsigned t = targets[r];
    if (t == IGNORE_TARGET) {
        if (threadIdx.x == 0) logprob[r] = entropy[r] = 0.0f;
        return;
    }
    const float* z = logits + r * vocab;
    double lse, ent;
    lse_entropy(z, vocab, shared, &lse, &ent);
    if (threadIdx.x == 0) {
        logprob[r] = (float)((double)z[t] - lse);
        entropy[r] = (float)ent;
    }
}

// d logp_t / dz_j = 1[j=t] − p_j;  dH/dz_j = −p_j (log p_j + H).
extern "C" __global__ void token_logprobs_backward_rows(const float* logits,
                                                        const unsigned* targets, i64 vocab,
                                                        const float* d_logprob,
                                                        const float* d_entropy, float* d_logits) {
    __shared__ double shared[32];
    const i64 r = blockIdx.x;
    const unsigned t = targets[r];
    float* dz = d_logits + r * vocab;
    if (t == IGNORE_TARGET || (d_logprob[r] == 0.0f && d_entropy[r] == 0.0f)) {
        for (i64 j = threadIdx.x; j < vocab; j += blockDim.x) dz[j] = 0.0f;
        return;
    }
    const float* z = logits + r * vocab;
    double lse, ent;
    lse_entropy(z, vocab, shared, &lse, &ent);
    const double glp = d_logprob[r], gent = d_entropy[r];
    for (i64 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const double logp = (double)z[j] - lse;
        const double p = exp(logp);
        const double onehot = j == (i64)t ? 1.0 : 0.0;
        dz[j] = (float)(glp * (onehot - p) - gent * p * (logp + ent));
    }
}
