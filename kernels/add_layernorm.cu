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
//
// add_layernorm_vec<C>_<T> (`--row-kernels vec`, on trial: never run on a GPU): the same math
// with y required, H % 8 == 0, the row in registers (common.cuh "Register-resident rows"):
// grid (T), block NT = 32·⌈H/(8·C·32)⌉ ≤ 256 threads of C chunks of 8, no dynamic shared
// memory; x, y, w, b read and x, a written once each in 16-byte pieces (v1 reads scalars and
// passes over a shared-memory copy three times). Same statistics, summed in another order.
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

template <typename T, int C>
__device__ void add_layernorm_vec(float* __restrict__ x, const T* __restrict__ y,
                                  const float* __restrict__ w, const float* __restrict__ b,
                                  T* __restrict__ a, int H, float eps) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * H;
    float v[C][8] = {}, r[C][8] = {};  // zeros outside the row: the statistics need them
    load_row<C>(x + base, v, H);
    load_row<C>(y + base, r, H);
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[c][j] += r[c][j];
        if (i < H) store8(x + base + i, v[c]);
    }
    float mean, rstd;
    reg_row_stats<C>(v, H, eps, scratch, mean, rstd);
    store_normalized<T, C>(v, mean, rstd, w, b, a + base, H);
}

#define ADD_LAYERNORM_VEC(C, SUFFIX, T)                                                          \
    extern "C" __global__ void add_layernorm_vec##C##_##SUFFIX(float* x, const T* y, const float* w, \
                                                             const float* b, T* a, int H, float eps) { \
        add_layernorm_vec<T, C>(x, y, w, b, a, H, eps);                                          \
    }
ADD_LAYERNORM_VEC(1, f16, __half)
ADD_LAYERNORM_VEC(2, f16, __half)
ADD_LAYERNORM_VEC(4, f16, __half)
ADD_LAYERNORM_VEC(1, bf16, __nv_bfloat16)
ADD_LAYERNORM_VEC(2, bf16, __nv_bfloat16)
ADD_LAYERNORM_VEC(4, bf16, __nv_bfloat16)
