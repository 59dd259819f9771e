// final_norm_pool.cu — h = LayerNorm_f(x + y); e = Σ_j j·h_j / Σ_j j, per sequence
//
// Math: per sequence s of n tokens (positions j = 1..n inside the sequence, docs/semantics.md):
//   h_j = LN_f(x_j + y_j) (biased variance), e = Σ_j j·h_j / (n(n+1)/2). Since LN_f's affine
//   part is the same for every token, e = w ⊙ (Σ_j j·ĥ_j / Σ_j j) + b with ĥ_j the standardized
//   row. Weights never depend on the batch. Unit-length scaling, when asked for, is done on the
//   host after the download (cpu::pooling::l2_normalize, shared with the CPU path).
// Layout: x [T, H] f32 (the residual stream, read only); y [T, H] T or null (the last block's
//   MLP output with bias); w, b [H] f32; cu_seqlens [S+1] i32; stats [T, 2] f32 scratch;
//   out [S, H] f32.
// Two stages, one launcher (src/backend/cuda/ops.rs `final_norm_pool`), both deterministic:
//   final_norm_stats_<T>: grid (T), block 256, dynamic shared memory H·4 bytes — one token's
//     mean and 1/σ into stats (the same two-pass row_stats as the other layernorms);
//   final_pool_<T>: grid (S, ⌈H/256⌉), block 256 — each thread owns one column of one sequence
//     and walks its tokens in order (coalesced rows; no atomics, so the sum order is fixed).
//   The first version ran one block per sequence over all its tokens: 16 blocks for a batch of
//   16 sequences, 3.4 ms at bloom-7b1 shape on an H200 (docs/device-runs/).
// Numerics: f32 throughout; the weighted sum accumulates in f32 (≤ 300 rows of O(1) values).
//
// The `vec` pair (`--row-kernels vec`, on trial: never run on a GPU), H % 8 == 0, y required
// (the forward always has the last block's output), 16-byte loads:
//   final_norm_stats_vec<C>_<T>: the row in registers (common.cuh "Register-resident rows"),
//     grid (T), block NT = 32·⌈H/(8·C·32)⌉ ≤ 256, no dynamic shared memory;
//   final_pool_vec_<T>: grid (S, ⌈H/256⌉), block (32, 8): thread (tx, ty) owns the 8 columns
//     from (blockIdx.y·32 + tx)·8 and the tokens j ≡ ty (mod 8) of its sequence, so each step
//     has three 16-byte loads in flight per thread where v1 had one 4- and one 2-byte load; the
//     8 partial sums of a column are added in the order ty = 0..7 through shared memory (fixed
//     order, no atomics: deterministic, but not v1's order).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float residual_at(const float* x, const T* y, long k) {
    return y != nullptr ? x[k] + to_f32(y[k]) : x[k];
}

template <typename T>
__device__ void final_norm_stats(const float* __restrict__ x, const T* __restrict__ y,
                                 float* __restrict__ stats, int H, float eps) {
    extern __shared__ float row[];
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) row[i] = residual_at(x, y, base + i);
    float mean, rstd;
    row_stats(row, H, eps, scratch, mean, rstd);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
}

template <typename T>
__device__ void final_pool(const float* __restrict__ x, const T* __restrict__ y,
                           const float* __restrict__ w, const float* __restrict__ b,
                           const int* __restrict__ cu_seqlens, const float* __restrict__ stats,
                           float* __restrict__ out, int H) {
    const int s = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= H) return;
    const int start = cu_seqlens[s], n = cu_seqlens[s + 1] - start;
    float acc = 0.f;
#pragma unroll 4
    for (int j = 0; j < n; ++j) {
        const int t = start + j;
        const float v = residual_at(x, y, (long)t * H + i);
        acc += (float)(j + 1) * ((v - stats[2 * t]) * stats[2 * t + 1]);
    }
    const float total = 0.5f * (float)n * (float)(n + 1);
    out[(long)s * H + i] = acc / total * w[i] + b[i];
}

#define FINAL_NORM_POOL(SUFFIX, T)                                                               \
    extern "C" __global__ void final_norm_stats_##SUFFIX(const float* x, const T* y,             \
                                                          float* stats, int H, float eps) {      \
        final_norm_stats(x, y, stats, H, eps);                                                   \
    }                                                                                            \
    extern "C" __global__ void final_pool_##SUFFIX(const float* x, const T* y, const float* w,   \
                                                    const float* b, const int* cu_seqlens,       \
                                                    const float* stats, float* out, int H) {     \
        final_pool(x, y, w, b, cu_seqlens, stats, out, H);                                       \
    }
FINAL_NORM_POOL(f16, __half)
FINAL_NORM_POOL(bf16, __nv_bfloat16)

template <typename T, int C>
__device__ void final_norm_stats_vec(const float* __restrict__ x, const T* __restrict__ y,
                                     float* __restrict__ stats, int H, float eps) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * H;
    float v[C][8] = {}, r[C][8] = {};  // zeros outside the row: the statistics need them
    load_row<C>(x + base, v, H);
    load_row<C>(y + base, r, H);
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
        for (int j = 0; j < 8; ++j) v[c][j] += r[c][j];
    float mean, rstd;
    reg_row_stats<C>(v, H, eps, scratch, mean, rstd);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
}

template <typename T>
__device__ void final_pool_vec(const float* __restrict__ x, const T* __restrict__ y,
                               const float* __restrict__ w, const float* __restrict__ b,
                               const int* __restrict__ cu_seqlens, const float* __restrict__ stats,
                               float* __restrict__ out, int H) {
    __shared__ float part[8][8][32];  // [ty][column within the chunk][tx]: conflict-free writes
    const int s = blockIdx.x, tx = threadIdx.x, ty = threadIdx.y;
    const int c0 = (blockIdx.y * 32 + tx) * 8;
    const int start = cu_seqlens[s], n = cu_seqlens[s + 1] - start;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (c0 < H) {
#pragma unroll 2
        for (int j = ty; j < n; j += 8) {
            const long t = start + j, k = t * H + c0;
            float v[8], r[8];
            load8(x + k, v);
            load8(y + k, r);
#pragma unroll
            for (int q = 0; q < 8; ++q) v[q] += r[q];
            const float mu = stats[2 * t], rs = stats[2 * t + 1], wj = (float)(j + 1);
#pragma unroll
            for (int q = 0; q < 8; ++q) acc[q] += wj * ((v[q] - mu) * rs);
        }
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) part[ty][q][tx] = acc[q];
    __syncthreads();
    // Thread f of 256 finishes column blockIdx.y·256 + f: chunk f / 8 (a tx), entry f % 8.
    const int f = ty * 32 + tx, i = blockIdx.y * 256 + f;
    if (i >= H) return;
    float sum = 0.f;
#pragma unroll
    for (int l = 0; l < 8; ++l) sum += part[l][f % 8][f / 8];
    const float total = 0.5f * (float)n * (float)(n + 1);
    out[(long)s * H + i] = sum / total * w[i] + b[i];
}

#define FINAL_NORM_STATS_VEC(C, SUFFIX, T)                                                       \
    extern "C" __global__ void final_norm_stats_vec##C##_##SUFFIX(const float* x, const T* y,    \
                                                                 float* stats, int H, float eps) { \
        final_norm_stats_vec<T, C>(x, y, stats, H, eps);                                         \
    }
FINAL_NORM_STATS_VEC(1, f16, __half)
FINAL_NORM_STATS_VEC(2, f16, __half)
FINAL_NORM_STATS_VEC(4, f16, __half)
FINAL_NORM_STATS_VEC(1, bf16, __nv_bfloat16)
FINAL_NORM_STATS_VEC(2, bf16, __nv_bfloat16)
FINAL_NORM_STATS_VEC(4, bf16, __nv_bfloat16)
extern "C" __global__ void final_pool_vec_f16(const float* x, const __half* y, const float* w,
                                              const float* b, const int* cu_seqlens,
                                              const float* stats, float* out, int H) {
    final_pool_vec(x, y, w, b, cu_seqlens, stats, out, H);
}
extern "C" __global__ void final_pool_vec_bf16(const float* x, const __nv_bfloat16* y, const float* w,
                                               const float* b, const int* cu_seqlens,
                                               const float* stats, float* out, int H) {
    final_pool_vec(x, y, w, b, cu_seqlens, stats, out, H);
}
