// add_layernorm.cu — residual add fused with LayerNorm: x += y; a = LayerNorm(x)
//
// Math: per row t: x[t] = x[t] + y[t] (skipped when y is null); a[t] = (x[t] - mean) /
//   sqrt(var + eps) * w + b, biased variance. This is BLOOM's `x + dense(ctx)` followed by
//   post_attention_layernorm, and `x + mlp(m)` followed by the next block's input_layernorm.
// Layout: x [T, H] f32, read and written in place (the residual stream); y [T, H] T or null
//   (a GEMM output, bias already added); w, b [H] f32; a [T, H] T (the next GEMM's input).
// Launch: grid (T), block 256, dynamic shared memory H·4 bytes.
// Numerics: the sum x + y in f32, statistics in f32 over the shared-memory row (two passes).
// Caller: src/backend/cuda/ops.rs `add_layernorm`.
#include "common.cuh"

template <typename T>
__device__ void add_layernorm(float* __restrict__ x, const T* __restrict__ y,
                              const float* __restrict__ w, const float* __restrict__ b,
                              T* __restrict__ a, int H, float eps) {
    extern __shared__ float row[];
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = x[base + i];
        if (y != nullptr) {
            v += to_f32(y[base + i]);
            x[base + i] = v;
        }
        row[i] = v;
    }
    float mean, rstd;
    row_stats(row, H, eps, scratch, mean, rstd);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        a[base + i] = from_f32<T>((row[i] - mean) * rstd * w[i] + b[i]);
}

extern "C" __global__ void add_layernorm_f16(float* x, const __half* y, const float* w, const float* b,
                                             __half* a, int H, float eps) {
    add_layernorm(x, y, w, b, a, H, eps);
}
extern "C" __global__ void add_layernorm_bf16(float* x, const __nv_bfloat16* y, const float* w,
                                              const float* b, __nv_bfloat16* a, int H, float eps) {
    add_layernorm(x, y, w, b, a, H, eps);
}
