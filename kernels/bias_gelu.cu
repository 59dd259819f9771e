// bias_gelu.cu — m = gelu(m + b), BLOOM's tanh GELU, in place
//
// Math: v = m[t, i] + b[i]; m[t, i] = 0.5·v·(1 + tanh(0.79788456·v·(1 + 0.044715·v²)))
//   (BLOOM's truncated constant, SPEC.md).
// Layout: m [T, F] T, F = 4H, row-major, in place (the dense_h_to_4h GEMM output, no bias);
//   b [F] f32.
// Launch: grid-stride, block 256, grid = min(ceil(T·F / 256), 65535·4); no shared memory.
// Numerics: f32 arithmetic, tanhf (not the fast-math approximation), one rounding to T.
// Caller: src/cuda/ops.rs `bias_gelu`.
#include "common.cuh"

template <typename T>
__device__ void bias_gelu(T* __restrict__ m, const float* __restrict__ b, long n, int F) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f32(m[i]) + b[i % F];
        m[i] = from_f32<T>(0.5f * v * (1.f + tanhf(0.79788456f * v * (1.f + 0.044715f * v * v))));
    }
}

extern "C" __global__ void bias_gelu_f16(__half* m, const float* b, long n, int F) { bias_gelu(m, b, n, F); }
extern "C" __global__ void bias_gelu_bf16(__nv_bfloat16* m, const float* b, long n, int F) {
    bias_gelu(m, b, n, F);
}
