// skinny_gemm.cu — y = x·Wᵀ (+ b) for at most 16 rows of x, on tensor cores, split-K and
// software-pipelined (version 2; written and compile-checked, never run on a GPU)
//
// Math: y[m, n] = Σ_k x[m, k]·W[n, k] (+ b[n]), m < M ≤ 16 — a linear layer for a short query
//   or a small batch of them, where the time is streaming W once (cuBLASLt reached 44–78% of
//   copy bandwidth at M = 12 on an H200, docs/device-runs/). The k range is cut into `splits`
//   pieces of kc (the last one shorter when kc does not divide K): S_s[m, n] = the sum over
//   piece s, then y = T((S_0 + S_1 + … + S_{splits-1}) + b), summed left to right.
// Layout: x [M, K] T, W [N, K] T row-major (nn.Linear), b [N] T or null, y [M, N] T; K, N and
//   kc multiples of 32; x, W, y whole cudaMalloc'd buffers (16-byte aligned). ws [splits, M, N]
//   f32: the partial sums S_s, row-compact (index (s·M + m)·N + n); null when splits == 1.
// Launch: two kernels on one stream (src/backend/cuda/ops.rs `skinny_gemm_with_plan`).
//   skinny_gemm_<T>: grid (N / 32, splits), block 256 = 8 warps, static shared memory
//   8·16·33·4 = 16,896 B, __launch_bounds__(256, 2) so two blocks fit on an SM (≤ 128
//   registers). Block (t, s) computes columns 32t .. 32t+31 of every row over the k range
//   [s·kc, min((s+1)·kc, K)): warp w takes its 32-wide chunks w, w+8, w+16, … (the 8 warps read
//   adjacent 64-byte pieces of each W row, 512 contiguous bytes per row per round of 8 chunks),
//   then the 8 partial 16×32 tiles are summed in shared memory in warp order 0..7. With
//   gridDim.y == 1 the block adds b and writes y itself (one launch); otherwise it writes S_s
//   to ws and skinny_reduce_<T> (grid ⌈M·N/4 / 256⌉, block 256, one thread per 4 consecutive
//   outputs) sums the splits in order 0..splits-1, adds b in f32 and rounds once to T.
//   The launcher picks kc from (N, K) and the SM count (`skinny_plan`): no split when N/32 ≥
//   2·SMs, else enough splits for 2·SMs blocks (two per SM), each at least 4 rounds of 256 k.
// Idea: memory-bound: every W byte is read once, so the kernel must keep enough loads in
//   flight to cover HBM latency (Little's law: 4.18 TB/s × ≈ 0.66 µs ≈ 2.8 MB on the card,
//   ≈ 21 KB per SM; version 1 kept ≈ 1 KB per warp, each load issued after a tensor-core op that
//   waited on the previous one). Here each warp keeps a ring of SK_STAGES = 3 steps of operands
//   in registers (per step and lane: 4 W loads of 16 bytes, one per n-block of 8 columns, and 2
//   x loads) and issues the loads of step j+2 before the mma of step j: while it waits for step
//   j, 12 W loads per lane (6 KB per warp, 48 KB per block, 96 KB per SM at two blocks) are in
//   flight, and never fewer than 8 between the prologue and the last two steps. (Checked in the
//   SASS of NVRTC's sm_90 CUBIN: each unrolled step is 6 LDG.128 then the 8 HMMAs of the step
//   two behind.) Why registers and not a cp.async ring in shared memory: the operands go
//   straight from the load into the mma, in the fragment layout, with no shared-memory round
//   trip or barrier; the ring costs 72 registers, so three stages fit under the 128 of two
//   blocks per SM (four would not), and two blocks per SM double the loads in flight and let
//   one block's epilogue overlap the other's streaming. W is loaded with ld.global.cs (read
//   once: evict-first in L1 and L2, so it does not push the activations out of L2), x with
//   ld.global.nc (re-read by every column block, stays in L2/L1).
//   Split-K: the narrow-N GEMMs (N = 4096: 128 column blocks for 132 SMs on an H200) would
//   leave SMs idle and put one block's loads on each; cutting K gives 2·SMs blocks or more.
//   The partial sums go through a workspace and a second kernel in fixed order: bit-
//   reproducible, no atomics, no counters, nothing to reset between CUDA graph replays. The
//   cost is one more launch (≈ 2–3 µs) and 2·splits·M·N·4 bytes (0.6 MB at M = 12, N = 4096,
//   3 splits: against 33–134 MB of weights), so GEMMs wide enough to cover the card alone are
//   not split, and no piece is shorter than 4 rounds (each warp ≥ 4 steps: the ring fills).
//   mma.sync m16n8k16 with x as the A operand (rows past M are zero) and 4 n-blocks of W rows
//   as B. A reduction index may be permuted as long as A and B use the same permutation: lane
//   (g, c) loads 8 consecutive k, k0 + 8c .. k0 + 8c + 7, of x rows g and g+8 and of W row g of
//   each n-block as one 16-byte load each, and feeds them to two k-steps as logical k (2c, 2c+1,
//   2c+8, 2c+9) = physical k0 + 8c + (0, 1, 2, 3), then + (4, 5, 6, 7).
// Numerics: T inputs, f32 accumulation (tensor cores over a warp's chunks in increasing k, then
//   the 8 warps' partials in warp order, then the splits in split order), bias added in f32, one
//   rounding to T — as cuBLASLt's f32-accumulating GEMM. The order depends on (N, K, SM count)
//   only, never on M or timing: a row's result does not depend on the other rows, and the same
//   call on the same device gives the same bits (another SM count may cut K elsewhere: the bits
//   can then differ within the rounding, as they do between cuBLASLt versions).
// Caller: src/backend/cuda/ops.rs `skinny_gemm` / `skinny_gemm_with_plan`.
#include "common.cuh"

#define SK_WARPS 8
#define SK_COLS 32
#define SK_STAGES 3

// 16 bytes of W: read once by the whole kernel, so streamed (evict-first in L1 and L2).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// 16 bytes of x: read-only here, re-read by every column block.
__device__ __forceinline__ uint4 ld_ro(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// One ring slot: a step's operands for one lane — W row g of the 4 n-blocks, x rows g and g+8
// (zero past M), all at physical k0 + 8c .. k0 + 8c + 7.
struct SkSlot {
    uint4 w[4];
    uint4 xa, xb;
};

template <typename T>
__device__ __forceinline__ void sk_load(SkSlot& s, const T* wp, long w_nblock, const T* xp0, const T* xp1,
                                        bool row0, bool row1) {
#pragma unroll
    for (int b = 0; b < 4; ++b) s.w[b] = ld_stream(wp + b * w_nblock);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    s.xa = row0 ? ld_ro(xp0) : zero;
    s.xb = row1 ? ld_ro(xp1) : zero;
}

template <typename T> __device__ __forceinline__ void sk_mma(float (&acc)[4][4], const SkSlot& s) {
    const u32 a_lo[4] = {s.xa.x, s.xb.x, s.xa.y, s.xb.y};  // physical k0 + 8c + 0..3
    const u32 a_hi[4] = {s.xa.z, s.xb.z, s.xa.w, s.xb.w};  // physical k0 + 8c + 4..7
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        mma_16816<T>(acc[b], a_lo, s.w[b].x, s.w[b].y);
        mma_16816<T>(acc[b], a_hi, s.w[b].z, s.w[b].w);
    }
}

template <typename T>
__device__ void skinny_gemm(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                            T* __restrict__ y, float* __restrict__ ws, int M, int K, int N, int kc) {
    __shared__ float part[SK_WARPS][16][SK_COLS + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int n0 = blockIdx.x * SK_COLS;
    const int kb = blockIdx.y * kc, ke = min(K, kb + kc);
    // This warp's chunks start at k = kb + 32·warp + 256·j, j < steps (0 when the piece has
    // fewer than warp + 1 chunks: the warp then contributes a zero tile).
    const int first = kb + 32 * warp;
    const int steps = first < ke ? (ke - first + SK_WARPS * 32 - 1) / (SK_WARPS * 32) : 0;
    const bool row0 = g < M, row1 = g + 8 < M;
    // Rows past M are never read (their pointers are never dereferenced).
    const T* xp0 = x + (row0 ? (long)g * K : 0) + first + 8 * c;
    const T* xp1 = x + (row1 ? (long)(g + 8) * K : 0) + first + 8 * c;
    const T* wp = w + (long)(n0 + g) * K + first + 8 * c;  // W row n0 + 8b + g is wp + b·8K
    const long w_nblock = 8L * K;

    float acc[4][4];
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[b][e] = 0.f;

    // The ring: slot j % SK_STAGES holds step j. Prologue: steps 0 .. SK_STAGES-2 in flight.
    SkSlot ring[SK_STAGES];
    const int stride = SK_WARPS * 32;
#pragma unroll
    for (int s = 0; s < SK_STAGES - 1; ++s) {
        if (s < steps) sk_load<T>(ring[s], wp, w_nblock, xp0, xp1, row0, row1);
        wp += stride, xp0 += stride, xp1 += stride;
    }
    for (int j0 = 0; j0 < steps; j0 += SK_STAGES) {
#pragma unroll
        for (int s = 0; s < SK_STAGES; ++s) {
            // Issue step j + SK_STAGES - 1 into the slot step j - 1 used, then wait for step j.
            if (j0 + s + SK_STAGES - 1 < steps)
                sk_load<T>(ring[(s + SK_STAGES - 1) % SK_STAGES], wp, w_nblock, xp0, xp1, row0, row1);
            wp += stride, xp0 += stride, xp1 += stride;
            if (j0 + s < steps) sk_mma<T>(acc, ring[s]);
        }
    }

    // acc[b][e]: row g (e < 2) or g + 8, column 8b + 2c + (e & 1)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[warp][g + 8 * (e >> 1)][8 * b + 2 * c + (e & 1)] = acc[b][e];
    __syncthreads();
    const bool direct = gridDim.y == 1;
    for (int o = threadIdx.x; o < M * SK_COLS; o += SK_WARPS * 32) {
        const int m = o / SK_COLS, col = o % SK_COLS;
        float sum = part[0][m][col];
#pragma unroll
        for (int p = 1; p < SK_WARPS; ++p) sum += part[p][m][col];
        if (direct) {
            if (bias != nullptr) sum += to_f32(bias[n0 + col]);
            y[(long)m * N + n0 + col] = from_f32<T>(sum);
        } else {
            ws[((long)blockIdx.y * M + m) * N + n0 + col] = sum;
        }
    }
}

// y[m, n0..n0+3] = T((ws[0] + ws[1] + … + ws[splits-1]) + b), one thread per 4 outputs.
template <typename T>
__device__ void skinny_reduce(const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ y,
                              int M, int N, int splits) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= M * N / 4) return;
    const long e = 4L * q, plane = (long)M * N;
    const int n = (int)(e % N);
    float4 sum = *reinterpret_cast<const float4*>(ws + e);
    for (int s = 1; s < splits; ++s) {
        const float4 v = *reinterpret_cast<const float4*>(ws + s * plane + e);
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    if (bias != nullptr) {
        sum.x += to_f32(bias[n]), sum.y += to_f32(bias[n + 1]);
        sum.z += to_f32(bias[n + 2]), sum.w += to_f32(bias[n + 3]);
    }
    __align__(8) T out[4] = {from_f32<T>(sum.x), from_f32<T>(sum.y), from_f32<T>(sum.z), from_f32<T>(sum.w)};
    *reinterpret_cast<uint2*>(y + e) = *reinterpret_cast<const uint2*>(out);  // y + e: 8-byte aligned
}

extern "C" __global__ void __launch_bounds__(256, 2)
    skinny_gemm_f16(const __half* x, const __half* w, const __half* bias, __half* y, float* ws, int M, int K, int N,
                    int kc) {
    skinny_gemm(x, w, bias, y, ws, M, K, N, kc);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    skinny_gemm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* bias, __nv_bfloat16* y,
                     float* ws, int M, int K, int N, int kc) {
    skinny_gemm(x, w, bias, y, ws, M, K, N, kc);
}
extern "C" __global__ void __launch_bounds__(256)
    skinny_reduce_f16(const float* ws, const __half* bias, __half* y, int M, int N, int splits) {
    skinny_reduce(ws, bias, y, M, N, splits);
}
extern "C" __global__ void __launch_bounds__(256)
    skinny_reduce_bf16(const float* ws, const __nv_bfloat16* bias, __nv_bfloat16* y, int M, int N, int splits) {
    skinny_reduce(ws, bias, y, M, N, splits);
}
