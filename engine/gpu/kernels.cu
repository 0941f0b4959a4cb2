// CUDA kernels of the fused GPU path (engine/gpu/forward.py), loaded by engine/gpu/kernels.py with
// cupy.RawModule. Each kernel has a NumPy twin in engine/gpu/kernels.py (same name + "_reference")
// that states exactly what it computes; tests/test_gpu_kernels.py compares the two.
//
// Self-contained on purpose (no #include): it compiles the same way under NVRTC (CuPy) and nvcc
// (tests/test_gpu_kernels.py::test_cuda_source_compiles). Compile with --fmad=false: the float32
// arithmetic then rounds after every operation, in the order written, as NumPy does.
//
// Storage types. Every kernel computes in float32. Arrays that feed a matrix product are stored in
// the product's input type, the "compute dtype": float32, float16 or bfloat16. A kernel with a
// suffix _f32/_f16/_bf16 writes that type (the float32 residual stream is always float32).
// float16 and bfloat16 values travel as their 16-bit patterns (unsigned short): CuPy has no
// bfloat16 dtype, and this keeps the source free of cuda_fp16.h / cuda_bf16.h.
//
// Letters as in engine/core/kernels.py: B batch, S query positions, T key positions (= S), H hidden,
// N heads, D head size (H = N*D), I intermediate.

#define MAX_HEADS 16   // talking-heads mixing keeps one column of N logits in registers

typedef unsigned short u16;

// ------------------------------------------------------------------------------ storage types

struct StoreF32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};

struct StoreF16 {   // IEEE half, round to nearest even (as numpy's astype(float16))
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    static __device__ __forceinline__ u16 store(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct StoreBF16 {  // bfloat16 = the top 16 bits of a float32, round to nearest even
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((unsigned int)v) << 16); }
    static __device__ __forceinline__ u16 store(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
        u += 0x7fffu + ((u >> 16) & 1u);                                         // ties to even
        return (u16)(u >> 16);
    }
};

// ------------------------------------------------------------------------------ reductions

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). scratch: 32 floats of
// shared memory. Every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < nwarps ? scratch[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    const float total = scratch[0];
    __syncthreads();   // scratch may be reused right away
    return total;
}

// ------------------------------------------------------------------------------ layer norm

// Normalizes the H floats in `row` (shared memory) like engine.kernels.layer_norm: two passes,
// mean then mean of squared deviations, y = (x-mean) * (1/sqrt(var+eps)) * gamma + beta.
// Writes y as float32 to out (always) and, when out_c is not null, in the compute type to out_c.
template <class Store>
__device__ void layer_norm_row(const float* row, int H, const float* gamma, const float* beta, float eps,
                               float* out, typename Store::T* out_c, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) s += row[i];
    const float mean = block_sum(s, scratch) / (float)H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float c = row[i] - mean;
        ss += c * c;
    }
    const float var = block_sum(ss, scratch) / (float)H;
    const float inv = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float y = (row[i] - mean) * inv * gamma[i] + beta[i];
        out[i] = y;
        if (out_c) out_c[i] = Store::store(y);
    }
}

// y = LN((x + bias) + residual), one block per row of H. x: [rows,H] float32 (a matrix product
// without its bias), bias: [H] or null, residual: [rows,H] or null. out may alias x or residual.
// Dynamic shared memory: (32 + H) floats.
template <class Store>
__device__ void layer_norm_residual(const float* x, const float* bias, const float* residual,
                                    const float* gamma, const float* beta, float* out,
                                    typename Store::T* out_c, int H, float eps) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* row = smem + 32;
    const long base = (long)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = x[base + i];
        if (bias) v = v + bias[i];
        if (residual) v = v + residual[base + i];
        row[i] = v;
    }
    __syncthreads();
    layer_norm_row<Store>(row, H, gamma, beta, eps, out + base, out_c ? out_c + base : out_c, scratch);
}

// Embeddings and their layer norm, one block per (b, s) row:
// y = LN((word[ids[b,s]] + position[s]) + type[type_ids[b,s]]). Dynamic shared memory: (32 + H) floats.
template <class Store>
__device__ void embed_layer_norm(const int* ids, const int* type_ids, const float* word, const float* position,
                                 const float* type, const float* gamma, const float* beta, float* out,
                                 typename Store::T* out_c, int S, int H, float eps) {
    extern __shared__ float smem[];
    float* scratch = smem;
    float* row = smem + 32;
    const long r = blockIdx.x;
    const int s = (int)(r % S);
    const float* w = word + (long)ids[r] * H;
    const float* p = position + (long)s * H;
    const float* t = type + (long)type_ids[r] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) row[i] = (w[i] + p[i]) + t[i];
    __syncthreads();
    layer_norm_row<Store>(row, H, gamma, beta, eps, out + r * H, out_c ? out_c + r * H : out_c, scratch);
}

// ------------------------------------------------------------------------------ attention

// q, k, v from the merged projection: qkv [B*S, 3H] float32 (columns: query heads, key heads,
// value heads, each N*D), bias [3H]. Writes q, k, v [B,N,S,D] (head-major, for batched products)
// in the compute type: out[which][b,n,s,d] = qkv[b*S+s, which*H + n*D + d] + bias[which*H + n*D + d].
template <class Store>
__device__ void bias_split_heads(const float* qkv, const float* bias, typename Store::T* q,
                                 typename Store::T* k, typename Store::T* v, int B, int S, int N, int D) {
    const int H = N * D;
    const long total = (long)B * S * 3 * H;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        const long r = idx / (3 * H);
        const int c = (int)(idx % (3 * H));
        const int which = c / H, n = (c % H) / D, d = c % D;
        const long b = r / S, s = r % S;
        const long dst = ((b * N + n) * S + s) * D + d;
        const typename Store::T y = Store::store(qkv[idx] + bias[c]);
        if (which == 0) q[dst] = y;
        else if (which == 1) k[dst] = y;
        else v[dst] = y;
    }
}

// The talking-heads softmax of one query row (b, s), all N heads at once. One block per (b, s).
//   scores [B,N,S,T] float32: q·k, NOT yet scaled     mask [B,T] int32 (1 real, 0 padding)
//   w_pre, w_post [N,N] float32 (axis 0 = input head)  probs [B,N,S,T] in the compute type
// For each key t:  l[m,t] = sum_n (scores[b,n,s,t]*scale) * w_pre[n,m] + (1-mask[b,t])*mask_constant
// for each head m: p[m,t] = exp(l[m,t] - max_t l[m,:]) / sum_t exp(...)
// for each key t:  probs[b,m',s,t] = sum_m p[m,t] * w_post[m,m']
// Dynamic shared memory: (2*N*N + N*T) floats. N <= MAX_HEADS.
template <class Store>
__device__ void talking_heads_softmax(const float* scores, const int* mask, const float* w_pre,
                                      const float* w_post, typename Store::T* probs, int N, int S, int T,
                                      float scale, float mask_constant) {
    extern __shared__ float smem[];
    float* wpre = smem;                 // [N,N]
    float* wpost = smem + N * N;        // [N,N]
    float* logits = smem + 2 * N * N;   // [N,T], one row per head
    const long b = blockIdx.x / S;
    const long s = blockIdx.x % S;
    for (int i = threadIdx.x; i < N * N; i += blockDim.x) {
        wpre[i] = w_pre[i];
        wpost[i] = w_post[i];
    }
    __syncthreads();

    // 1. scale, pre-softmax mix, additive mask: one key column t per thread
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        float col[MAX_HEADS];
#pragma unroll
        for (int n = 0; n < MAX_HEADS; ++n)
            if (n < N) col[n] = scores[((b * N + n) * S + s) * T + t] * scale;
        const float adder = (1.0f - (float)mask[b * T + t]) * mask_constant;
        for (int m = 0; m < N; ++m) {
            float acc = 0.0f;
#pragma unroll
            for (int n = 0; n < MAX_HEADS; ++n)
                if (n < N) acc += col[n] * wpre[n * N + m];
            logits[m * T + t] = acc + adder;
        }
    }
    __syncthreads();

    // 2. softmax over t of each head's row: one warp per head, warp-shuffle max and sum
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int m = warp; m < N; m += nwarps) {
        float* row = logits + m * T;
        float mx = __int_as_float(0xff800000);   // -inf
        for (int t = lane; t < T; t += 32) mx = fmaxf(mx, row[t]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int t = lane; t < T; t += 32) {
            const float e = expf(row[t] - mx);
            row[t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        for (int t = lane; t < T; t += 32) row[t] = row[t] / sum;
    }
    __syncthreads();

    // 3. post-softmax mix: one key column t per thread, written to probs[b, m', s, t]
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        float col[MAX_HEADS];
#pragma unroll
        for (int m = 0; m < MAX_HEADS; ++m)
            if (m < N) col[m] = logits[m * T + t];
        for (int m2 = 0; m2 < N; ++m2) {
            float acc = 0.0f;
#pragma unroll
            for (int m = 0; m < MAX_HEADS; ++m)
                if (m < N) acc += col[m] * wpost[m * N + m2];
            probs[((b * N + m2) * S + s) * T + t] = Store::store(acc);
        }
    }
}

// [B,N,S,D] -> [B,S,N*D], a pure copy of 32- or 16-bit elements (no rounding).
template <class T>
__device__ void merge_heads(const T* ctx, T* out, int B, int S, int N, int D) {
    const long total = (long)B * S * N * D;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        const int d = (int)(idx % D);
        const long rest = idx / D;           // ((b*S + s)*N + n)
        const int n = (int)(rest % N);
        const long bs = rest / N;            // b*S + s
        const long b = bs / S, s = bs % S;
        out[idx] = ctx[((b * N + n) * S + s) * D + d];
    }
}

// ------------------------------------------------------------------------------ feed-forward

// GEGLU on the merged product y [rows, 2I] float32 (columns: GELU branch "intermediate", then
// linear branch "gate"), bias [2I] (bi then bg):
//   h[r,j] = gelu_tanh(y[r,j] + bias[j]) * (y[r,I+j] + bias[I+j])          h: [rows, I], compute type
// gelu_tanh(a) = (0.5*a) * (1 + tanh(0.7978845608028654 * (a + 0.044715*((a*a)*a)))), as engine.kernels.
template <class Store>
__device__ void geglu(const float* y, const float* bias, typename Store::T* h, long rows, int I) {
    const long total = rows * I;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        const long r = idx / I;
        const int j = (int)(idx % I);
        const float a = y[r * 2 * I + j] + bias[j];
        const float g = y[r * 2 * I + I + j] + bias[I + j];
        const float gelu = 0.5f * a * (1.0f + tanhf(0.7978845608028654f * (a + 0.044715f * (a * a * a))));
        h[idx] = Store::store(gelu * g);
    }
}

// ------------------------------------------------------------------------------ small ones

// Pooler epilogue: out[r,j] = tanh(y[r,j] + bias[j]), float32. y, out: [rows, H].
__device__ void bias_tanh(const float* y, const float* bias, float* out, long rows, int H) {
    const long total = rows * H;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x)
        out[idx] = tanhf(y[idx] + bias[idx % H]);
}

// float32 -> compute type, elementwise (weights at load time; tests of the roundings).
template <class Store>
__device__ void cast_from_f32(const float* x, typename Store::T* out, long n) {
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x)
        out[idx] = Store::store(x[idx]);
}

// ------------------------------------------------------------------------------ entry points
// extern "C" names, one per storage type: <kernel>_f32, <kernel>_f16, <kernel>_bf16.

#define ENTRY_POINTS(SUFFIX, STORE)                                                                            \
extern "C" __global__ void layer_norm_residual_##SUFFIX(                                                       \
        const float* x, const float* bias, const float* residual, const float* gamma, const float* beta,      \
        float* out, STORE::T* out_c, int H, float eps, int has_bias, int has_residual, int has_out_c) {        \
    layer_norm_residual<STORE>(x, has_bias ? bias : 0, has_residual ? residual : 0, gamma, beta, out,         \
                               has_out_c ? out_c : 0, H, eps);                                                 \
}                                                                                                              \
extern "C" __global__ void embed_layer_norm_##SUFFIX(                                                          \
        const int* ids, const int* type_ids, const float* word, const float* position, const float* type,     \
        const float* gamma, const float* beta, float* out, STORE::T* out_c, int S, int H, float eps,          \
        int has_out_c) {                                                                                       \
    embed_layer_norm<STORE>(ids, type_ids, word, position, type, gamma, beta, out, has_out_c ? out_c : 0,     \
                            S, H, eps);                                                                        \
}                                                                                                              \
extern "C" __global__ void bias_split_heads_##SUFFIX(                                                          \
        const float* qkv, const float* bias, STORE::T* q, STORE::T* k, STORE::T* v, int B, int S, int N,      \
        int D) {                                                                                               \
    bias_split_heads<STORE>(qkv, bias, q, k, v, B, S, N, D);                                                   \
}                                                                                                              \
extern "C" __global__ void talking_heads_softmax_##SUFFIX(                                                     \
        const float* scores, const int* mask, const float* w_pre, const float* w_post, STORE::T* probs,       \
        int N, int S, int T, float scale, float mask_constant) {                                               \
    talking_heads_softmax<STORE>(scores, mask, w_pre, w_post, probs, N, S, T, scale, mask_constant);         \
}                                                                                                              \
extern "C" __global__ void geglu_##SUFFIX(const float* y, const float* bias, STORE::T* h, long long rows,     \
                                          int I) {                                                             \
    geglu<STORE>(y, bias, h, (long)rows, I);                                                                   \
}                                                                                                              \
extern "C" __global__ void cast_from_f32_##SUFFIX(const float* x, STORE::T* out, long long n) {                \
    cast_from_f32<STORE>(x, out, (long)n);                                                                     \
}

ENTRY_POINTS(f32, StoreF32)
ENTRY_POINTS(f16, StoreF16)
ENTRY_POINTS(bf16, StoreBF16)

extern "C" __global__ void merge_heads_b32(const float* ctx, float* out, int B, int S, int N, int D) {
    merge_heads<float>(ctx, out, B, S, N, D);
}

extern "C" __global__ void merge_heads_b16(const u16* ctx, u16* out, int B, int S, int N, int D) {
    merge_heads<u16>(ctx, out, B, S, N, D);
}

extern "C" __global__ void bias_tanh_f32(const float* y, const float* bias, float* out, long long rows, int H) {
    bias_tanh(y, bias, out, (long)rows, H);
}
