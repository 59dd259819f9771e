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
//   outer-vector scale mode would do inside the GEMM (docs/fp8.md). Used for QKV and the last
//   block's FC2 (and every FP8 layer of a model too wide for the fused kernels); the attention
//   output and the other FC2s take the fused kernel below, FC1 fp8_quantize.cu's fused one.
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

// fp8_epilogue_add_layernorm<C>_<T> — the epilogue fused into the residual add + layernorm that
// follows the attention output and MLP down projections (never run on a GPU):
//   x[t] += acc[t]·(sx[t]·sw) + b, then a[t] = LN(x[t]) (w, b_ln; biased variance), each
//   epilogue operation rounded in f32 in the order above, y never rounded to T — exactly
//   `Fp8Linear`'s accumulate (the emulation adds its f32 y to the residual stream), where the
//   unfused path rounds y to T first. Saves the epilogue's pass (acc read, y written and read
//   again: 4 + 2 + 2 bytes per element). Layout: x [T, H] f32 in place; acc [T, H] f32; sx [T],
//   sw [H], b [H] (the linear's bias), w, b_ln [H] f32; a [T, H] T. H % 8 == 0; the row in
//   registers as the vec row kernels (common.cuh "Register-resident rows"): grid (T), block
//   NT = 32·⌈H/(8·C·32)⌉ ≤ 256, 16-byte accesses.
template <typename T, int C>
__device__ void fp8_epilogue_add_layernorm(float* __restrict__ x, const float* __restrict__ acc,
                                           const float* __restrict__ sx, const float* __restrict__ sw,
                                           const float* __restrict__ b, const float* __restrict__ w_ln,
                                           const float* __restrict__ b_ln, T* __restrict__ a, int H,
                                           float eps) {
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * H;
    const float s = sx[blockIdx.x];
    float v[C][8] = {}, r[C][8] = {};  // zeros outside the row: the statistics need them
    load_row<C>(x + base, v, H);
    load_row<C>(acc + base, r, H);
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < H) {
            float ws[8], bs[8];
            load8(sw + i, ws);
            load8(b + i, bs);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                v[c][j] = __fadd_rn(v[c][j], __fadd_rn(__fmul_rn(r[c][j], __fmul_rn(s, ws[j])), bs[j]));
            store8(x + base + i, v[c]);
        }
    }
    float mean, rstd;
    reg_row_stats<C>(v, H, eps, scratch, mean, rstd);
    store_normalized<T, C>(v, mean, rstd, w_ln, b_ln, a + base, H);
}

#define FP8_EPILOGUE_ADD_LAYERNORM(C, SUFFIX, T)                                                  \
    extern "C" __global__ void fp8_epilogue_add_layernorm##C##_##SUFFIX(                          \
        float* x, const float* acc, const float* sx, const float* sw, const float* b,            \
        const float* w_ln, const float* b_ln, T* a, int H, float eps) {                          \
        fp8_epilogue_add_layernorm<T, C>(x, acc, sx, sw, b, w_ln, b_ln, a, H, eps);              \
    }
FP8_EPILOGUE_ADD_LAYERNORM(1, f16, __half)
FP8_EPILOGUE_ADD_LAYERNORM(2, f16, __half)
FP8_EPILOGUE_ADD_LAYERNORM(4, f16, __half)
FP8_EPILOGUE_ADD_LAYERNORM(1, bf16, __nv_bfloat16)
FP8_EPILOGUE_ADD_LAYERNORM(2, bf16, __nv_bfloat16)
FP8_EPILOGUE_ADD_LAYERNORM(4, bf16, __nv_bfloat16)
