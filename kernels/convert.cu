// convert.cu — dtype conversion of weights on upload: dst[i] = (D) src[i]
//
// Math: widen to f32, round to nearest even in the destination type.
// Layout: src [n] S, dst [n] D, both contiguous; S, D ∈ {f32, f16, bf16}, S ≠ D (equal types
//   are copied without a kernel).
// Launch: grid-stride, block 256, grid = min(ceil(n / 256), 65535·4); no shared memory.
// Numerics: exact for widening; one rounding when narrowing.
// Caller: src/backend/cuda/ops.rs `convert` (used by the weight upload in src/backend/cuda/model.rs).
#include "common.cuh"

template <typename S, typename D>
__device__ void convert(const S* __restrict__ src, D* __restrict__ dst, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dst[i] = from_f32<D>(to_f32(src[i]));
}

#define SGPT_CONVERT(NAME, S, D) \
    extern "C" __global__ void NAME(const S* src, D* dst, long n) { convert(src, dst, n); }
SGPT_CONVERT(convert_f32_f16, float, __half)
SGPT_CONVERT(convert_f32_bf16, float, __nv_bfloat16)
SGPT_CONVERT(convert_f16_bf16, __half, __nv_bfloat16)
SGPT_CONVERT(convert_bf16_f16, __nv_bfloat16, __half)
SGPT_CONVERT(convert_f16_f32, __half, float)
SGPT_CONVERT(convert_bf16_f32, __nv_bfloat16, float)
