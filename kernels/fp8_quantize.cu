// fp8_quantize.cu — rows rounded to E4M3 with one scale per row: q[r] = e4m3(x[r] / s[r]),
// s[r] = max(amax(x[r]) / 448, FLT_MIN)
//
// Math: per row r of x [rows, n]: amax = max |x[r, i]| (NaN ignored, as fmaxf does);
//   s = max(amax / 448, FLT_MIN) (the division correctly rounded; an all-zero row divides by the
//   smallest normal f32 and gets codes 0); q[r, i] = e4m3(x[r, i] / s), the division correctly
//   rounded (__fdiv_rn), then __nv_cvt_float_to_fp8(…, __NV_SATFINITE, __NV_E4M3): nearest, ties
//   to even, subnormals kept, beyond ±448 saturated to ±448; NaN → 0x7F. Exactly
//   src/backend/cpu/fp8.rs's `scale_for`, `to_e4m3` and `quantize` (per token), bit for bit.
// Layout: x [rows, n] S ∈ {f32, f16, bf16} row-major; q [rows, n] bytes (E4M3 codes); s [rows]
//   f32. Weights W [out, in] (a row = an output channel, S = f32, once at load) and GEMM inputs
//   x [T, in] (a row = a token, S = the activation type, before every FP8 GEMM) alike.
// Launch: grid (rows), block 256 (a multiple of 32: block_max relies on it), no dynamic shared
//   memory. When n % 8 == 0 and x is 16-byte and q 8-byte aligned (always for cudaMalloc'd
//   buffers at BLOOM's widths) each step reads 8 elements in one or two 16-byte loads and writes
//   8 codes in one 8-byte store; else one element per step.
// Idea: two passes over the row, the second one mostly from L1/L2: the amax (a block
//   reduction), then the codes. The standalone pass, for the layernorm outputs and the
//   attention output; FC2's input is quantized by the fused kernel at the end of this file.
// Numerics: f32 throughout; codes and scales bit-identical to the CPU emulation's.
// Caller: src/backend/cuda/ops.rs `fp8_quantize_rows` (weights at load and GEMM inputs in
//   src/backend/cuda/model.rs).
#include "common.cuh"
#include <cuda_fp8.h>

// f32 → E4M3 code as fp8.rs's `to_e4m3`: NaN handled here so its code does not depend on
// the instruction's NaN output (fp8.rs writes 0x7F whatever the NaN's sign).
__device__ __forceinline__ unsigned char e4m3_code(float v) {
    if (isnan(v)) return 0x7F;
    return (unsigned char)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// Largest value over the block; every thread gets it. `scratch` holds 32 floats; blockDim.x a
// multiple of 32; call from all threads (contains __syncthreads()).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_max(v);
}

template <typename S>
__device__ void fp8_quantize_rows(const S* __restrict__ x, unsigned char* __restrict__ q,
                                  float* __restrict__ scales, int n) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * n;
    const S* row = x + base;
    unsigned char* out = q + base;
    const bool vec = (n & 7) == 0 && (reinterpret_cast<size_t>(row) & 15) == 0 &&
                     (reinterpret_cast<size_t>(out) & 7) == 0;
    float m = 0.f;
    if (vec) {
        for (int i = threadIdx.x * 8; i < n; i += blockDim.x * 8) {
            float v[8];
            load8(row + i, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(to_f32(row[i])));
    }
    const float amax = block_max(m, scratch);
    const float s = fmaxf(__fdiv_rn(amax, 448.f), __int_as_float(0x00800000));  // FLT_MIN, 2^-126
    if (threadIdx.x == 0) scales[blockIdx.x] = s;
    if (vec) {
        for (int i = threadIdx.x * 8; i < n; i += blockDim.x * 8) {
            float v[8];
            load8(row + i, v);
            u32 lo = 0, hi = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                lo |= (u32)e4m3_code(__fdiv_rn(v[j], s)) << (8 * j);
                hi |= (u32)e4m3_code(__fdiv_rn(v[j + 4], s)) << (8 * j);
            }
            *reinterpret_cast<uint2*>(out + i) = make_uint2(lo, hi);
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = e4m3_code(__fdiv_rn(to_f32(row[i]), s));
    }
}

extern "C" __global__ void fp8_quantize_rows_f32(const float* x, unsigned char* q, float* s, int n) {
    fp8_quantize_rows(x, q, s, n);
}
extern "C" __global__ void fp8_quantize_rows_f16(const __half* x, unsigned char* q, float* s, int n) {
    fp8_quantize_rows(x, q, s, n);
}
extern "C" __global__ void fp8_quantize_rows_bf16(const __nv_bfloat16* x, unsigned char* q, float* s, int n) {
    fp8_quantize_rows(x, q, s, n);
}

// fp8_gelu_quantize_rows<C> — FC1's epilogue, BLOOM's GELU and FC2's input quantization in one
// pass (never run on a GPU): per row t of the FC1 sums acc [T, F] f32,
//   m = gelu(acc·(sx[t]·sw) + b1) in f32 (the epilogue's order, then gelu_bloom_fast), then
//   q[t] = e4m3(m / s'), s' = max(amax(m) / 448, FLT_MIN), exactly as fp8_quantize_rows above;
//   sx [T] is read (FC1's input scales) and overwritten with s' (FC2's) — each block reads its
//   own entry before the barriers of block_max and writes it after. Replaces the epilogue (acc
//   read, m written in T), bias_gelu (m read and written) and the quantize pass (m read twice):
//   4 + 1 bytes per element instead of 15. m is never rounded to T, as in the emulation (its FC1
//   output is f32), which also adds the bias in the epilogue. Layout: sw, b1 [F] f32; q [T, F]
//   codes. F % 8 == 0, rows in registers (common.cuh "Register-resident rows") with up to 8
//   chunks of 8 per thread: grid (T), block NT = 32·⌈F/(8·C·32)⌉ ≤ 256.
template <int C>
__device__ void fp8_gelu_quantize_rows(const float* __restrict__ acc, float* __restrict__ sx,
                                       const float* __restrict__ sw, const float* __restrict__ b1,
                                       unsigned char* __restrict__ q, int F) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * F;
    const float s_in = sx[blockIdx.x];
    float v[C][8] = {};
    load_row<C>(acc + base, v, F);
    float m = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < F) {
            float ws[8], bs[8];
            load8(sw + i, ws);
            load8(b1 + i, bs);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                v[c][j] = gelu_bloom_fast(__fadd_rn(__fmul_rn(v[c][j], __fmul_rn(s_in, ws[j])), bs[j]));
                m = fmaxf(m, fabsf(v[c][j]));
            }
        }
    }
    const float amax = block_max(m, scratch);
    const float s = fmaxf(__fdiv_rn(amax, 448.f), __int_as_float(0x00800000));  // FLT_MIN, 2^-126
    if (threadIdx.x == 0) sx[blockIdx.x] = s;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < F) {
            u32 lo = 0, hi = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                lo |= (u32)e4m3_code(__fdiv_rn(v[c][j], s)) << (8 * j);
                hi |= (u32)e4m3_code(__fdiv_rn(v[c][j + 4], s)) << (8 * j);
            }
            *reinterpret_cast<uint2*>(q + base + i) = make_uint2(lo, hi);
        }
    }
}

#define FP8_GELU_QUANTIZE_ROWS(C)                                                                 \
    extern "C" __global__ void fp8_gelu_quantize_rows##C(const float* acc, float* sx, const float* sw, \
                                                         const float* b1, unsigned char* q, int F) { \
        fp8_gelu_quantize_rows<C>(acc, sx, sw, b1, q, F);                                        \
    }
FP8_GELU_QUANTIZE_ROWS(1)
FP8_GELU_QUANTIZE_ROWS(2)
FP8_GELU_QUANTIZE_ROWS(4)
FP8_GELU_QUANTIZE_ROWS(8)
