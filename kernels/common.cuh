// common.cuh — helpers shared by every kernel in kernels/ (prepended to each kernel's source
// by src/backend/cuda/nvrtc.rs, which compiles them with NVRTC at start-up).
//
// Activations and weights are stored in `T` = __half or __nv_bfloat16; every reduction and
// every softmax runs in f32. Kernels are written as templates and exported with
// `extern "C"` wrappers named <op>_f16 / <op>_bf16, so Rust looks them up by name.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
// blockDim.x must be a multiple of 32. Contains __syncthreads(): call from all threads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// LayerNorm statistics of one row held in shared memory: mean and 1/sqrt(var + eps), biased
// variance, two passes (mean, then centered squares) in f32. Each thread reads only the
// elements i ≡ threadIdx.x (mod blockDim.x) it wrote itself, so no barrier is needed before the
// call; block_sum's barriers make it a block-wide call.
__device__ __forceinline__ void row_stats(const float* row, int H, float eps, float* scratch,
                                          float& mean, float& rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) s += row[i];
    mean = block_sum(s, scratch) / H;
    float q = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float c = row[i] - mean;
        q += c * c;
    }
    rstd = rsqrtf(block_sum(q, scratch) / H + eps);
}

// ALiBi slope of head h out of n (docs/semantics.md): p = largest power of two <= n;
// h < p: 2^(-8(h+1)/p); else the interleaved extra slopes 2^(-4(2(h-p)+1)/p).
__device__ __forceinline__ float alibi_slope(int h, int n) {
    int p = 1;
    while (p * 2 <= n) p *= 2;
    return h < p ? exp2f(-8.f * (h + 1) / p) : exp2f(-4.f * (2 * (h - p) + 1) / p);
}
