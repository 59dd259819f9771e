// final_norm_pool.cu — x += y; h = LayerNorm_f(x); e = Σ_j j·h_j / Σ_j j; optional e /= |e|
//
// Math: per sequence s of n tokens (positions j = 1..n inside the sequence, SPEC.md):
//   h_j = LN_f(x_j + y_j) (biased variance), e = Σ_j j·h_j / (n(n+1)/2), then if `normalize`
//   e = e / ||e||₂ (left as is when ||e|| = 0). Weights never depend on the batch.
// Layout: x [T, H] f32 (the residual stream, read only); y [T, H] T or null (the last block's
//   MLP output with bias); w, b [H] f32; cu_seqlens [S+1] i32; out [S, H] f32.
// Launch: grid (S), block 256, dynamic shared memory 2·H·4 bytes (the current row and the
//   pooled accumulator). Each thread owns columns i ≡ threadIdx.x (mod 256) of both.
// Numerics: f32 throughout; the weighted sum accumulates in f32 (≤ 300 rows of O(1) values).
// Caller: src/cuda/ops.rs `final_norm_pool`.
#include "common.cuh"

template <typename T>
__device__ void final_norm_pool(const float* __restrict__ x, const T* __restrict__ y,
                                const float* __restrict__ w, const float* __restrict__ b,
                                const int* __restrict__ cu_seqlens, float* __restrict__ out, int H,
                                float eps, int normalize) {
    extern __shared__ float smem[];
    float* row = smem;
    float* acc = smem + H;
    __shared__ float scratch[32];
    const int s = blockIdx.x;
    const int start = cu_seqlens[s], n = cu_seqlens[s + 1] - start;
    for (int i = threadIdx.x; i < H; i += blockDim.x) acc[i] = 0.f;
    for (int j = 0; j < n; ++j) {
        const long base = (long)(start + j) * H;
        for (int i = threadIdx.x; i < H; i += blockDim.x) {
            float v = x[base + i];
            if (y != nullptr) v += to_f32(y[base + i]);
            row[i] = v;
        }
        float mean, rstd;
        row_stats(row, H, eps, scratch, mean, rstd);
        const float wj = (float)(j + 1);
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            acc[i] += wj * ((row[i] - mean) * rstd * w[i] + b[i]);
    }
    const float total = 0.5f * (float)n * (float)(n + 1);
    float sq = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        acc[i] /= total;
        sq += acc[i] * acc[i];
    }
    float scale = 1.f;
    if (normalize) {
        const float norm = sqrtf(block_sum(sq, scratch));
        if (norm > 0.f) scale = 1.f / norm;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) out[(long)s * H + i] = acc[i] * scale;
}

extern "C" __global__ void final_norm_pool_f16(const float* x, const __half* y, const float* w,
                                               const float* b, const int* cu_seqlens, float* out, int H,
                                               float eps, int normalize) {
    final_norm_pool(x, y, w, b, cu_seqlens, out, H, eps, normalize);
}
extern "C" __global__ void final_norm_pool_bf16(const float* x, const __nv_bfloat16* y, const float* w,
                                                const float* b, const int* cu_seqlens, float* out, int H,
                                                float eps, int normalize) {
    final_norm_pool(x, y, w, b, cu_seqlens, out, H, eps, normalize);
}
