// bias_gelu.cu — m = gelu(m + b), BLOOM's tanh GELU, in place
//
// Math: v = m[t, i] + b[i]; m[t, i] = 0.5·v·(1 + tanh(0.79788456·v·(1 + 0.044715·v²)))
//   (BLOOM's truncated constant, docs/semantics.md).
// Layout: m [T, F] T, F = 4H, row-major, in place (the dense_h_to_4h GEMM output, no bias);
//   b [F] f32.
// Launch: grid-stride, block 256, grid = min(ceil(T·F / 8 / 256), 65535·4); no shared memory.
//   When F % 8 == 0 and m is 16-byte aligned (always, for BLOOM and cudaMalloc'd buffers) each
//   step moves 8 elements in one 16-byte load and store, with one column index per 8; else one
//   element per step. The scalar-only first version ran at 26% of copy bandwidth on an H200
//   (a 64-bit modulo per element; docs/device-runs/).
// Numerics: f32 arithmetic, tanhf (not the fast-math approximation), one rounding to T.
// Caller: src/backend/cuda/ops.rs `bias_gelu`.
//
// bias_gelu_vec_<T> (`--row-kernels vec`, on trial: never run on a GPU): F % 8 == 0, m 16-byte
//   aligned; grid (T, ⌈F/2048⌉), block 256, one 16-byte chunk of one row per thread (the column
//   from the block index: no 64-bit modulo). GELU by the identity 0.5·(1 + tanh(u)) =
//   1/(1 + e^(−2u)) (the CPU forward's too: cpu/gelu.rs `gelu_fast`): gelu(v) =
//   v / (1 + 2^(v·(1 + 0.044715·v²)·k)), k = −2·0.79788456·log2(e) — one ex2.approx and one
//   fast division where tanhf takes ~20 instructions with branches. Why: v1 already moves 16
//   bytes per access yet reached 68% of copy bandwidth on an H200 (docs/device-runs/), so the
//   time left is taken to be the arithmetic (an estimate; the device run will tell).
//   Error: the argument's rounding (a few ulp of |arg| ≤ ~30 where it still matters: ≲ 4e-6
//   relative through 2^arg), ex2.approx's and the division's 2 ulp each: ≲ 5e-6 relative, 100×
//   below f16's rounding step. Large negative v: 2^arg → inf and v/inf → −0 (the limit).
#include "common.cuh"

__device__ __forceinline__ float gelu_bloom(float v) {
    return 0.5f * v * (1.f + tanhf(0.79788456f * v * (1.f + 0.044715f * v * v)));
}

template <typename T>
__device__ void bias_gelu(T* __restrict__ m, const float* __restrict__ b, long n, int F) {
    const long first = (long)blockIdx.x * blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    if ((F & 7) == 0 && (reinterpret_cast<size_t>(m) & 15) == 0) {
        union Pack {
            uint4 raw;
            T e[8];
        };
        uint4* m8 = reinterpret_cast<uint4*>(m);
        for (long k = first; k < n / 8; k += stride) {
            Pack p;
            p.raw = m8[k];
            const int c = (int)((k * 8) % F);
#pragma unroll
            for (int j = 0; j < 8; ++j) p.e[j] = from_f32<T>(gelu_bloom(to_f32(p.e[j]) + b[c + j]));
            m8[k] = p.raw;
        }
    } else {
        for (long i = first; i < n; i += stride) m[i] = from_f32<T>(gelu_bloom(to_f32(m[i]) + b[i % F]));
    }
}

extern "C" __global__ void bias_gelu_f16(__half* m, const float* b, long n, int F) { bias_gelu(m, b, n, F); }
extern "C" __global__ void bias_gelu_bf16(__nv_bfloat16* m, const float* b, long n, int F) {
    bias_gelu(m, b, n, F);
}

template <typename T>
__device__ void bias_gelu_vec(T* __restrict__ m, const float* __restrict__ b, int F) {
    const int i = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (i >= F) return;
    T* p = m + (long)blockIdx.x * F + i;
    float v[8], bv[8];
    load8(p, v);
    load8(b + i, bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = gelu_bloom_fast(v[j] + bv[j]);
    store8(p, v);
}

extern "C" __global__ void bias_gelu_vec_f16(__half* m, const float* b, int F) { bias_gelu_vec(m, b, F); }
extern "C" __global__ void bias_gelu_vec_bf16(__nv_bfloat16* m, const float* b, int F) {
    bias_gelu_vec(m, b, F);
}
