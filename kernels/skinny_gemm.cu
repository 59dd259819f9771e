// skinny_gemm.cu — y = x·Wᵀ (+ b) for at most 16 rows of x, on tensor cores
//
// Math: y[m, n] = Σ_k x[m, k]·W[n, k] (+ b[n]), m < M ≤ 16 — a linear layer for a short query
//   or a small batch of them, where the time is streaming W once (cuBLASLt reached 44–78% of
//   copy bandwidth at M = 12 on an H200, docs/device-runs/).
// Layout: x [M, K] T, W [N, K] T row-major (nn.Linear), b [N] T or null, y [M, N] T; K and N
//   multiples of 32; x and W 16-byte aligned (whole cudaMalloc'd buffers).
// Launch: grid (N / 32), block 256 = 8 warps; static shared memory 8·16·33·4 = 16,896 B. Block b
//   computes columns 32b .. 32b+31 for every row: warp w takes the 32-wide chunks w, w+8, … of K
//   (the 8 warps read adjacent pieces of each W row), then the 8 partial tiles are summed in
//   shared memory in warp order, so the result does not depend on timing.
// Idea: mma.sync m16n8k16 with x as the A operand (rows past M are zero) and 4 n-blocks of W
//   rows as B. A reduction index may be permuted as long as A and B use the same permutation:
//   lane (g, c) loads 8 consecutive k, k0 + 8c .. k0 + 8c + 7, of x rows g and g+8 and of W row
//   g of each n-block as one 16-byte load each, and feeds them to two k-steps as logical k
//   (2c, 2c+1, 2c+8, 2c+9) = physical k0 + 8c + (0, 1, 2, 3), then + (4, 5, 6, 7).
// Numerics: T inputs, f32 accumulation (tensor cores, then the fixed-order sum of 8 partials),
//   bias added in f32, one rounding to T — as cuBLASLt's f32-accumulating GEMM.
// Caller: src/backend/cuda/ops.rs `skinny_gemm`.
#include "common.cuh"

#define SK_WARPS 8
#define SK_COLS 32

template <typename T> __device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<__half>(float* d, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ void skinny_gemm(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                            T* __restrict__ y, int M, int K, int N) {
    __shared__ float part[SK_WARPS][16][SK_COLS + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int n0 = blockIdx.x * SK_COLS;
    const bool row0 = g < M, row1 = g + 8 < M;
    // rows past M are never read (their pointers stay at x, in bounds)
    const T* x0 = x + (row0 ? (long)g * K + 8 * c : 0);
    const T* x1 = x + (row1 ? (long)(g + 8) * K + 8 * c : 0);
    const T* wr = w + (long)(n0 + g) * K + 8 * c;  // W row n0 + 8b + g is wr + 8b·K

    float acc[4][4];
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[b][e] = 0.f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 2
    for (int k0 = warp * 32; k0 < K; k0 += SK_WARPS * 32) {
        const uint4 xa = row0 ? *reinterpret_cast<const uint4*>(x0 + k0) : zero;
        const uint4 xb = row1 ? *reinterpret_cast<const uint4*>(x1 + k0) : zero;
        const u32 a_lo[4] = {xa.x, xb.x, xa.y, xb.y};  // physical k0 + 8c + 0..3
        const u32 a_hi[4] = {xa.z, xb.z, xa.w, xb.w};  // physical k0 + 8c + 4..7
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const uint4 wv = *reinterpret_cast<const uint4*>(wr + (long)b * 8 * K + k0);
            mma16816<T>(acc[b], a_lo, wv.x, wv.y);
            mma16816<T>(acc[b], a_hi, wv.z, wv.w);
        }
    }
    // acc[b][e]: row g (e < 2) or g + 8, column 8b + 2c + (e & 1)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][g + 8 * (e >> 1)][8 * b + 2 * c + (e & 1)] = acc[b][e];
    __syncthreads();
    for (int o = threadIdx.x; o < 16 * SK_COLS; o += blockDim.x) {
        const int m = o / SK_COLS, col = o % SK_COLS;
        if (m >= M) continue;
        float v = bias != nullptr ? to_f32(bias[n0 + col]) : 0.f;
        float sum = 0.f;
#pragma unroll
        for (int p = 0; p < SK_WARPS; ++p) sum += part[p][m][col];
        y[(long)m * N + n0 + col] = from_f32<T>(sum + v);
    }
}

extern "C" __global__ void __launch_bounds__(256) skinny_gemm_f16(const __half* x, const __half* w, const __half* bias,
                                                                 __half* y, int M, int K, int N) {
    skinny_gemm(x, w, bias, y, M, K, N);
}
extern "C" __global__ void __launch_bounds__(256) skinny_gemm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w,
                                                                  const __nv_bfloat16* bias, __nv_bfloat16* y,
                                                                  int M, int K, int N) {
    skinny_gemm(x, w, bias, y, M, K, N);
}
