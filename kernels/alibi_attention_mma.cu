// alibi_attention_mma.cu — version 3 of alibi_attention: tensor cores with register tiles
//
// Math: as alibi_attention.cu (docs/semantics.md): for query i and key j <= i of one sequence,
//   s_ij = (q_i · k_j) / sqrt(d) + slope_h · j;  p = softmax_j(s) in f32;  ctx_i = Σ_j p_ij v_j.
// Layout: qkv [T, 3H] T, interleaved per head (column h·3d + part·d + e); cu_seqlens [S+1] i32;
//   ctx [T, H] T, head h in columns h·d ..; the same contract as versions 1 and 2.
// Launch: grid (S · tiles, n) with tiles = ceil(longest sequence / 64): block b serves query rows
//   64·(b mod tiles) .. of sequence b / tiles (blocks past a sequence's end exit at once);
//   block 128 threads = 4 warps of 16 query rows; static shared memory 2·64·(D+8)·2 bytes (K and
//   V tiles, 34,816 B at D = 128). One function per head dim D ∈ {16, 64, 80, 96, 128}, so the
//   fragments live in registers: alibi_attention_mma_d<D>_<T>.
// Idea: FlashAttention-2's warp tiling (Dao 2023) with mma.sync m16n8k16 (sm_80+): each warp keeps
//   its Q fragments, the 16×64 score tile, its row max and sum, and its 16×D output in registers,
//   so shared memory holds only the K/V tiles (16-byte loads). The score tile's accumulator layout
//   is the A-operand layout of the PV product, so P goes from f32 to T without leaving registers.
//   Version 2 ran its scores, probabilities and O through shared memory: 8 TFLOP/s on an H200.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4): A (16×16, row): a0 (g,
//   2c..2c+1), a1 (g+8, 2c..), a2 (g, 2c+8..), a3 (g+8, 2c+8..); B (16×8, col): b0 (k 2c..2c+1,
//   n g), b1 (k 2c+8.., n g); C (16×8 f32): c0 c1 (g, 2c..2c+1), c2 c3 (g+8, 2c..2c+1).
// Numerics: QKᵀ and PV on tensor cores (T inputs, f32 accumulation); scale, ALiBi bias, causal
//   mask and the online softmax in f32; P rounded to T for PV (as versions 2 and FlashAttention).
// Caller: src/backend/cuda/ops.rs `alibi_attention_mma`.
#include "common.cuh"

#define MMA_BQ 64  // query rows per block (4 warps × 16)
#define MMA_BK 64  // keys per tile

// Two T values (lower index in the low half), as one 32-bit operand register.
template <typename T> __device__ __forceinline__ u32 pair(const T* lo, const T* hi) {
    const unsigned short l = *reinterpret_cast<const unsigned short*>(lo);
    const unsigned short h = *reinterpret_cast<const unsigned short*>(hi);
    return (u32)l | ((u32)h << 16);
}

template <typename T, int D>
__device__ void alibi_attention_mma(const T* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                    int S, int tiles, T* __restrict__ ctx, int heads) {
    constexpr int KS = D / 16;     // k-steps of the QKᵀ product
    constexpr int NO = D / 8;      // n-blocks of the output
    constexpr int LD = D + 8;      // tile row stride in T: rows 16 B apart mod 128, no bank conflicts
    constexpr int NB = MMA_BK / 8; // n-blocks of the score tile
    __shared__ __align__(16) T Ks[MMA_BK * LD];
    __shared__ __align__(16) T Vs[MMA_BK * LD];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int s = blockIdx.x / tiles, h = blockIdx.y;
    if (s >= S) return;  // uniform across the block
    const int start = cu_seqlens[s], n = cu_seqlens[s + 1] - start;
    const int q0 = (blockIdx.x % tiles) * MMA_BQ;
    if (q0 >= n) return;  // uniform across the block

    const long stride = 3L * heads * D;
    const T* base = qkv + (long)start * stride + (long)h * 3 * D;
    const int w0 = q0 + warp * 16;                // the warp's first query row
    const int rows[2] = {w0 + g, w0 + g + 8};     // this thread's two rows (fragment rows g, g+8)

    // Q as A fragments for the whole kernel; rows past the sequence are zero.
    u32 qf[KS][4];
#pragma unroll
    for (int k = 0; k < KS; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = rows[e & 1], col = k * 16 + 2 * c + ((e & 2) ? 8 : 0);
            qf[k][e] = r < n ? *reinterpret_cast<const u32*>(base + (long)r * stride + col) : 0u;
        }

    float o[NO][4];
#pragma unroll
    for (int b = 0; b < NO; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[b][e] = 0.f;
    const float neg_inf = __int_as_float(0xff800000);
    float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};  // running max and sum per row
    const float scale = rsqrtf((float)D), slope = alibi_slope(h, heads);
    const int warp_last = min(w0 + 15, n - 1);
    const int block_last = min(q0 + MMA_BQ - 1, n - 1);

    for (int j0 = 0; j0 <= block_last; j0 += MMA_BK) {
        __syncthreads();  // the previous tile is no longer read
        // K and V rows j0.. in 16-byte pieces; rows past the sequence are zero.
        constexpr int P = D / 8;  // pieces per row
        for (int x = threadIdx.x; x < MMA_BK * P; x += blockDim.x) {
            const int kr = x / P, pc = x % P;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
            if (j0 + kr < n) {
                const T* src = base + (long)(j0 + kr) * stride + pc * 8;
                kv = *reinterpret_cast<const uint4*>(src + D);
                vv = *reinterpret_cast<const uint4*>(src + 2 * D);
            }
            *reinterpret_cast<uint4*>(Ks + kr * LD + pc * 8) = kv;
            *reinterpret_cast<uint4*>(Vs + kr * LD + pc * 8) = vv;
        }
        __syncthreads();
        if (w0 >= n || j0 > warp_last) continue;  // every key of this tile masked for the warp

        // S = Q · K_tileᵀ, 16 × 64 in f32: n-block b holds keys j0 + 8b ...
        float sc[NB][4];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[b][e] = 0.f;
            const T* krow = Ks + (b * 8 + g) * LD + 2 * c;
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                const u32 b0 = *reinterpret_cast<const u32*>(krow + k * 16);
                const u32 b1 = *reinterpret_cast<const u32*>(krow + k * 16 + 8);
                mma_16816<T>(sc[b], qf[k], b0, b1);
            }
        }

        // Online softmax; element e of a block is row rows[e >> 1], key j0 + 8b + 2c + (e & 1).
        float tmax[2] = {neg_inf, neg_inf};
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + b * 8 + 2 * c + (e & 1), i = rows[e >> 1];
                const float v = (j <= i && i < n) ? sc[b][e] * scale + slope * (float)j : neg_inf;
                sc[b][e] = v;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
            }
        float corr[2], sum[2] = {0.f, 0.f};
        bool live[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // the four lanes of a quad hold one row's 64 keys
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            const float m_new = fmaxf(m[r], tmax[r]);
            live[r] = m_new != neg_inf;  // a row with no visible key yet contributes nothing
            corr[r] = live[r] ? expf(m[r] - m_new) : 1.f;
            m[r] = m_new;
        }
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const float p = live[r] ? expf(sc[b][e] - m[r]) : 0.f;
                sc[b][e] = p;
                sum[r] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
            l[r] = l[r] * corr[r] + sum[r];
        }
#pragma unroll
        for (int b = 0; b < NO; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[b][e] *= corr[e >> 1];

        // O += P · V_tile: k-step kk covers keys 16kk .. 16kk+15 = score n-blocks 2kk, 2kk+1,
        // whose accumulator layout is exactly the A fragment's.
#pragma unroll
        for (int kk = 0; kk < MMA_BK / 16; ++kk) {
            u32 a[4];
            a[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
            a[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
            a[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            a[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
            const T* v0 = Vs + (kk * 16 + 2 * c) * LD + g;  // B(k, n) = V[key k][dim n]
#pragma unroll
            for (int b = 0; b < NO; ++b) {
                const T* v = v0 + b * 8;
                const u32 b0 = pair(v, v + LD);
                const u32 b1 = pair(v + 8 * LD, v + 9 * LD);
                mma_16816<T>(o[b], a, b0, b1);
            }
        }
    }

    // ctx rows of this thread, two adjacent columns per store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= n) continue;
        const float inv = 1.f / l[r];
        T* out = ctx + (long)(start + rows[r]) * heads * D + (long)h * D + 2 * c;
#pragma unroll
        for (int b = 0; b < NO; ++b)
            *reinterpret_cast<u32*>(out + b * 8) = pack2<T>(o[b][2 * r] * inv, o[b][2 * r + 1] * inv);
    }
}

#define ATTENTION_MMA(D)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) alibi_attention_mma_d##D##_f16(                \
        const __half* qkv, const int* cu_seqlens, int S, int tiles, __half* ctx, int heads) {        \
        alibi_attention_mma<__half, D>(qkv, cu_seqlens, S, tiles, ctx, heads);                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(128) alibi_attention_mma_d##D##_bf16(               \
        const __nv_bfloat16* qkv, const int* cu_seqlens, int S, int tiles, __nv_bfloat16* ctx,      \
        int heads) {                                                                                 \
        alibi_attention_mma<__nv_bfloat16, D>(qkv, cu_seqlens, S, tiles, ctx, heads);                \
    }
ATTENTION_MMA(16)
ATTENTION_MMA(64)
ATTENTION_MMA(80)
ATTENTION_MMA(96)
ATTENTION_MMA(128)
