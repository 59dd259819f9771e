// fp8_epilogue.cu — the FP8 GEMM's scales and bias: y[t, o] = acc[t, o]·(sx[t]·sw[o]) + b[o]
//
// Math: acc = Σ_k qx[t, k]·qw[o, k], the E4M3 product sum cuBLASLt wrote in f32 with scalar
//   scales of 1; y = acc·(sx[t]·sw[o]) + b[o] (b optional), each operation rounded in f32 in
//   that order (__fmul_rn/__fadd_rn: never contracted into an FMA), then rounded to T once.
//   The same order as src/backend/cpu/fp8.rs's `Fp8Linear` epilogue: product sum, times
//   (sx·sw), plus bias.
// Layout: acc [T, N] f32 row-major (cuBLASLt's column-major [N, T]); sx [T] f32 (the input's
//   per-token scales, kernels/fp8_quantize.cu); sw [N] f32 (the weight's per-row scales); b [N]
//   f32 or null; y [T, N] T row-major (the next kernel's input, as the f16 GEMM writes it).
// Launch: grid (ceil(N / 4 / 256), min(T, 65535)), block 256, no shared memory; a thread owns
//   4 adjacent columns (one 16-byte load of acc, one 8-byte store of y) and walks the rows
//   blockIdx.y, blockIdx.y + gridDim.y, …, so its column scales and bias are loaded once.
//   Needs N % 4 == 0, acc 16-byte and y 8-byte aligned (the launcher checks).
// Idea: an elementwise pass over the f32 sums (4 + 2 bytes per output): what cuBLASLt's
//   outer-vector scale mode would do inside the GEMM (docs/fp8.md, the next step).
// Numerics: f32; the unscaled sums reach K·448² ≈ 3.3e9 at K = 16384, beyond f16: hence f32.
// Caller: src/backend/cuda/ops.rs `fp8_epilogue` (src/backend/cuda/model.rs's FP8 linear).
#include "common.cuh"

template <typename T>
__device__ void fp8_epilogue(const float* __restrict__ acc, const float* __restrict__ sx,
                             const float* __restrict__ sw, const float* __restrict__ b,
                             T* __restrict__ y, int rows, int N) {
    const int quads = N >> 2;
    const int c4 = blockIdx.x * blockDim.x + threadIdx.x;
    if (c4 >= quads) return;  // no barrier below
    const float4 w = reinterpret_cast<const float4*>(sw)[c4];
    const float4 bias = b != nullptr ? reinterpret_cast<const float4*>(b)[c4] : make_float4(0.f, 0.f, 0.f, 0.f);
    const bool has_bias = b != nullptr;
    for (long t = blockIdx.y; t < rows; t += gridDim.y) {
        const float4 a = reinterpret_cast<const float4*>(acc)[t * quads + c4];
        const float s = sx[t];
        float v0 = __fmul_rn(a.x, __fmul_rn(s, w.x)), v1 = __fmul_rn(a.y, __fmul_rn(s, w.y));
        float v2 = __fmul_rn(a.z, __fmul_rn(s, w.z)), v3 = __fmul_rn(a.w, __fmul_rn(s, w.w));
        if (has_bias) {
            v0 = __fadd_rn(v0, bias.x);
            v1 = __fadd_rn(v1, bias.y);
            v2 = __fadd_rn(v2, bias.z);
            v3 = __fadd_rn(v3, bias.w);
        }
        reinterpret_cast<uint2*>(y)[t * quads + c4] = make_uint2(pack2<T>(v0, v1), pack2<T>(v2, v3));
    }
}

extern "C" __global__ void fp8_epilogue_f16(const float* acc, const float* sx, const float* sw, const float* b,
                                            __half* y, int rows, int N) {
    fp8_epilogue(acc, sx, sw, b, y, rows, N);
}
extern "C" __global__ void fp8_epilogue_bf16(const float* acc, const float* sx, const float* sw,
                                             const float* b, __nv_bfloat16* y, int rows, int N) {
    fp8_epilogue(acc, sx, sw, b, y, rows, N);
}
