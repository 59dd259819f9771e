// alibi_attention_mma2.cu — version 4 of alibi_attention: version 3 without the limiters a desk
// review of it found (docs/perf-notes.md "v8")
//
// Math: as alibi_attention.cu (docs/semantics.md): for query i and key j <= i of one sequence,
//   s_ij = (q_i · k_j) / sqrt(d) + slope_h · j;  p = softmax_j(s) in f32;  ctx_i = Σ_j p_ij v_j.
// Layout: qkv [T, 3H] T, interleaved per head (column h·3d + part·d + e); ctx [T, H] T, head h
//   in columns h·d ..; as versions 1 to 3. In place of cu_seqlens, a tile map [blocks] int4
//   built on the host (ops.rs `attention_mma2_tiles`): per query tile (first token of its
//   sequence, sequence length, first query row, 0), heaviest (most keys) first, then entries of
//   length 0 up to the launch's `blocks`; slopes [heads] f32, the ALiBi slopes as the reference
//   computes them (the CPU path's alibi_slopes) instead of exp2f in the kernel.
// Launch: grid (blocks · heads), block 128 threads = 4 warps, dynamic shared memory
//   (R + 2·BK)·(D + 8)·2 bytes (a Q tile of R rows, one K and one V tile of BK keys; 52,224 B at
//   D = 128 for both shapes, (R, BK) = (64, 64) and (128, 32): the caller opts in above 48 KB).
//   Block x serves head x mod heads of map entry x / heads: R = 64·MT query rows of one
//   sequence, so every head of the heaviest tiles starts first (a longest-first schedule for
//   ragged batches) and a block finds its work in one 16-byte load. `blocks` is an upper bound
//   of the tile count computed from (tokens, sequences, longest), so a captured CUDA graph stays
//   valid for every batch of that shape (the map is uploaded before each launch, as cu_seqlens
//   is); blocks on padding entries exit at once.
//   One function per (D, R, T): alibi_attention_mma2_d<D>_r<R>_<T>, D ∈ {16, 64, 80, 96, 128},
//   R ∈ {64, 128}.
// Idea (FlashAttention-2, Dao 2023): warp w owns query rows 16w.. and, when MT = 2, 64 + 16w..
//   of the tile (two m16 tiles, so every K and V fragment read from shared memory feeds two
//   tensor-core ops); scores, running max and sum, and the output stay in registers; the score
//   accumulator is re-packed in registers as the A operand of P·V. Against version 3:
//   - K and V tiles arrive by cp.async, overlapped with compute: V_t is loaded while S = Q·K_tᵀ
//     and the softmax run, K_t+1 while O += P·V_t (two barriers per tile, as before);
//   - fragments come from shared memory by ldmatrix (x4: four 8×8 matrices per instruction;
//     .trans for V) instead of 2- and 4-byte loads with shuffles;
//   - the softmax runs in base 2: x = s·log2(e) is one FFMA (scale and slope pre-multiplied),
//     p = 2^(x − max) by ex2.approx (no subnormal fix-up); the causal mask is applied only on
//     tiles that cross the diagonal of the m16 tile, and tiles wholly above it are skipped;
//   - no empty blocks for ragged batches (the tile map above), and 128-row query tiles
//     for long sequences (the launcher's rule) to halve K/V traffic per query.
// Why no −inf guards: key tile 0 is processed first by every m16 tile that is processed at all,
//   and key 0 is visible to every row, so each row's running max is finite from the first tile
//   on; a later tile with no visible key for a row gives exp2(−inf − m) = 0 and a correction of
//   exp2(0) = 1. Keys and queries past the sequence are zero-filled: keys past it are masked
//   for every real row by causality (only diagonal tiles can hold them), rows past it are
//   computed (finite) and never stored.
// Numerics: QKᵀ and PV on tensor cores (T inputs, f32 accumulation); scale, bias, mask and the
//   online softmax in f32 (ex2.approx: ≤ 2 ulp per probability, like version 3's expf; results
//   below 2^-126 flushed to 0, invisible once P is rounded to T or summed with the row's 1);
//   P rounded to T for PV, as versions 2, 3 and FlashAttention.
// Caller: src/backend/cuda/ops.rs `alibi_attention_mma2`.
#include "common.cuh"

#define M2_THREADS 128

// ROWS rows of one part (Q, K or V: `src` points at the part's column 0 of the sequence's row
// 0) starting at row r0, into a shared tile with row stride LD; rows at or past n are zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long stride, int r0, int n) {
    constexpr int P = D / 8;  // 16-byte pieces per row
    constexpr int LD = D + 8;
#pragma unroll 1  // unrolled, the pieces' addresses were hoisted out of the tile loop: 30 registers
    for (int x = threadIdx.x; x < ROWS * P; x += M2_THREADS) {
        const int r = x / P, pc = x % P;
        const bool in = r0 + r < n;
        cp_async16(dst + r * LD + pc * 8, src + (in ? (long)(r0 + r) * stride : 0) + pc * 8, in);
    }
}

template <typename T, int D, int MT, int BK>
__device__ void attention_mma2(const T* __restrict__ qkv, const int4* __restrict__ tiles,
                               const float* __restrict__ slopes, T* __restrict__ ctx, int heads) {
    constexpr int R = 64 * MT;      // query rows per block
    constexpr int KS = D / 16;      // k-steps of Q·Kᵀ
    constexpr int NO = D / 8;       // n-blocks of the output (even for every D above)
    constexpr int NB = BK / 8;      // n-blocks of the score tile
    constexpr int LD = D + 8;       // row stride in T: 8 rows of an ldmatrix hit distinct banks
    extern __shared__ __align__(16) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem);
    T* Ks = Qs + R * LD;
    T* Vs = Ks + BK * LD;

    const int h = blockIdx.x % heads;
    const int4 work = tiles[blockIdx.x / heads];
    const int start = work.x, n = work.y, q0 = work.z;
    if (q0 >= n) return;  // a padding entry (n = 0); uniform across the block
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int key_tiles = (min(q0 + R, n) - 1) / BK + 1;  // keys 0 .. the block's last row
    const long stride = 3L * heads * D;
    const T* base = qkv + (long)start * stride + (long)h * 3 * D;

    load_tile<T, D, R>(Qs, base, stride, q0, n);
    load_tile<T, D, BK>(Ks, base + D, stride, 0, n);
    cp_async_commit();

    int row0[MT];  // first row (in the sequence) of each m16 tile of this warp
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row0[mt] = q0 + 64 * mt + 16 * warp;
    float o[MT][NO][4], m[MT][2], l[MT][2];
    const float neg_inf = __int_as_float(0xff800000);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int b = 0; b < NO; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][b][e] = 0.f;
        m[mt][0] = m[mt][1] = neg_inf;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const float log2e = 1.4426950408889634f;
    const float qk_scale = rsqrtf((float)D) * log2e, key_bias = slopes[h] * log2e;

    // ldmatrix row addresses of this lane (see common.cuh): for Q (A operand) matrices 0..3 are
    // (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8); for K (B operand, two n-blocks) (keys +0,
    // dims +0), (+0, +8), (+8, +0), (+8, +8); for V (B operand via .trans, two n-blocks) (keys
    // +0, dims +0), (+8, +0), (+0, +8), (+8, +8).
    const int lr = lane & 7, lm = lane >> 3;
    // (32-bit shared addresses: the unrolled offsets below are immediates of the one register)
    const u32 q_lane = smem_addr(Qs + (16 * warp + lr + 8 * (lm & 1)) * LD + 8 * (lm >> 1));
    const u32 k_lane = smem_addr(Ks + (lr + 8 * (lm >> 1)) * LD + 8 * (lm & 1));
    const u32 v_lane = smem_addr(Vs + (lr + 8 * (lm & 1)) * LD + 8 * (lm >> 1));
    constexpr u32 ROW = LD * sizeof(T);  // bytes per tile row

    for (int t = 0; t < key_tiles; ++t) {
        const int j0 = t * BK;
        cp_async_wait_all();
        __syncthreads();  // K_t (and Q) visible to all; every warp is done with V_t-1
        load_tile<T, D, BK>(Vs, base + 2 * D, stride, j0, n);
        cp_async_commit();

        // m16 tiles with a visible key in this tile: a real row, and not wholly above the diagonal
        bool act[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) act[mt] = row0[mt] < n && j0 <= min(row0[mt] + 15, n - 1);

        // S = Q·K_tᵀ: sc[mt][b] holds keys j0 + 8b .. of m16 tile mt
        float sc[MT][NB][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[mt][b][e] = 0.f;
        if (act[0] || (MT > 1 && act[MT - 1])) {
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    if (act[mt]) ldmatrix_x4(qa[mt], q_lane + 64 * mt * ROW + 32 * k);
#pragma unroll
                for (int b = 0; b < NB; b += 2) {
                    u32 kb[4];
                    ldmatrix_x4(kb, k_lane + 8 * b * ROW + 32 * k);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        if (act[mt]) {
                            mma_16816<T>(sc[mt][b], qa[mt], kb[0], kb[1]);
                            mma_16816<T>(sc[mt][b + 1], qa[mt], kb[2], kb[3]);
                        }
                }
            }
        }

        // Online softmax in base 2; element e of n-block b: row row0 + g + 8(e >> 1), key
        // j0 + 8b + 2c + (e & 1). P is packed at once as the A operand of P·V.
        u32 pa[MT][BK / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (!act[mt]) continue;
            const bool diagonal = j0 + BK - 1 > row0[mt];  // some key may follow some row
            const float tile_bias = key_bias * (float)(j0 + 2 * c);  // bias of key j0 + 2c
            float tmax[2] = {neg_inf, neg_inf};
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + 8 * b + 2 * c + (e & 1);
                    float x = fmaf(sc[mt][b][e], qk_scale, fmaf(key_bias, (float)(8 * b + (e & 1)), tile_bias));
                    if (diagonal && j > row0[mt] + g + 8 * (e >> 1)) x = neg_inf;
                    sc[mt][b][e] = x;
                    tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
                }
            float corr[2], sum[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // the four lanes of a quad hold one row's BK keys
                tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
                tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
                const float m_new = fmaxf(m[mt][r], tmax[r]);  // finite: see the header
                corr[r] = exp2_fast(m[mt][r] - m_new);
                m[mt][r] = m_new;
            }
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = exp2_fast(sc[mt][b][e] - m[mt][e >> 1]);
                    sc[mt][b][e] = p;
                    sum[e >> 1] += p;
                }
            // l stays this lane's partial sum (m and corr are the quad's): reduced once, at the end
#pragma unroll
            for (int r = 0; r < 2; ++r) l[mt][r] = l[mt][r] * corr[r] + sum[r];
#pragma unroll
            for (int b = 0; b < NO; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[mt][b][e] *= corr[e >> 1];
            // k-step kk of P·V covers keys 16kk .. 16kk+15 = score n-blocks 2kk and 2kk+1, whose
            // accumulator layout is exactly the A fragment's
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                pa[mt][kk][0] = pack2<T>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
                pa[mt][kk][1] = pack2<T>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
                pa[mt][kk][2] = pack2<T>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
                pa[mt][kk][3] = pack2<T>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
            }
        }

        cp_async_wait_all();
        __syncthreads();  // V_t visible to all; every warp is done with K_t
        if (t + 1 < key_tiles) {
            load_tile<T, D, BK>(Ks, base + D, stride, j0 + BK, n);
            cp_async_commit();
        }

        // O += P·V_t
        if (act[0] || (MT > 1 && act[MT - 1])) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
                for (int b = 0; b < NO; b += 2) {
                    u32 vb[4];
                    ldmatrix_x4_trans(vb, v_lane + 16 * kk * ROW + 16 * b);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        if (act[mt]) {
                            mma_16816<T>(o[mt][b], pa[mt][kk], vb[0], vb[1]);
                            mma_16816<T>(o[mt][b + 1], pa[mt][kk], vb[2], vb[3]);
                        }
                }
        }
    }

    // ctx rows of this thread, two adjacent columns per store
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = l[mt][r];  // the quad's four partial sums (all lanes shuffle)
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int row = row0[mt] + g + 8 * r;
            if (row >= n) continue;
            const float inv = 1.f / sum;
            T* out = ctx + (long)(start + row) * heads * D + (long)h * D + 2 * c;
#pragma unroll
            for (int b = 0; b < NO; ++b)
                *reinterpret_cast<u32*>(out + b * 8) = pack2<T>(o[mt][b][2 * r] * inv, o[mt][b][2 * r + 1] * inv);
        }
}

// __launch_bounds__' second argument: the blocks per SM the registers must allow (4 for 64 rows,
// 2 for 128: what NVRTC 13.0 reached unasked), so another compiler cannot lower occupancy.
#define ATTENTION_MMA2(D, MT, R, BK)                                                                 \
    extern "C" __global__ void __launch_bounds__(M2_THREADS, 4 / MT)                                 \
        alibi_attention_mma2_d##D##_r##R##_f16(const __half* qkv, const int4* tiles,                 \
                                               const float* slopes, __half* ctx, int heads) {        \
        attention_mma2<__half, D, MT, BK>(qkv, tiles, slopes, ctx, heads);                           \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(M2_THREADS, 4 / MT)                                 \
        alibi_attention_mma2_d##D##_r##R##_bf16(const __nv_bfloat16* qkv, const int4* tiles,        \
                                                const float* slopes, __nv_bfloat16* ctx, int heads) { \
        attention_mma2<__nv_bfloat16, D, MT, BK>(qkv, tiles, slopes, ctx, heads);                    \
    }
// 64 query rows with 64-key tiles; 128 query rows with 32-key tiles (two m16 tiles of scores
// and of output per warp: with 64-key tiles the score registers pushed d = 128 into spills)
#define ATTENTION_MMA2_DIM(D) ATTENTION_MMA2(D, 1, 64, 64) ATTENTION_MMA2(D, 2, 128, 32)
ATTENTION_MMA2_DIM(16)
ATTENTION_MMA2_DIM(64)
ATTENTION_MMA2_DIM(80)
ATTENTION_MMA2_DIM(96)
ATTENTION_MMA2_DIM(128)
