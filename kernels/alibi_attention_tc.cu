// alibi_attention_tc.cu — version 2 of alibi_attention: the same math on tensor cores
//
// Math: as alibi_attention.cu (docs/semantics.md): for query i and key j <= i of one sequence,
//   s_ij = (q_i · k_j) / sqrt(d) + slope_h · j;  p = softmax_j(s) in f32;  ctx_i = Σ_j p_ij v_j.
// Layout: qkv [T, 3H] T, interleaved per head (column h·3d + part·d + e); cu_seqlens [S+1] i32;
//   ctx [T, H] T, head h in columns h·d ..; the same contract as version 1.
// Launch: grid (S · tiles, n) with tiles = ceil(longest sequence / 64): block b serves query rows
//   64·(b mod tiles) .. of sequence b / tiles (blocks past a sequence's end exit at once);
//   block 128 threads = 4 warps, each owning 16 query rows; dynamic shared memory
//   3·64·(dp+8)·2 + 4·16·68·4 + 4·16·72·2 + 4·16·(dp+4)·4 bytes, dp = d rounded up to 16
//   (112,640 B at d = 128: the launcher opts in above 48 KB).
// Numerics: QKᵀ and PV on tensor cores (WMMA 16×16×16, T inputs, f32 accumulation); scale,
//   ALiBi bias, causal mask and the online softmax (running max and sum per row) in f32; the
//   probabilities are rounded to T for the PV product (as flash-attention does); O in f32.
// Idea: flash-attention's tiling with an online softmax (Dao et al.), packed as in its varlen
//   variant. Version 1 (one warp per query, CUDA cores) stays until a device run picks the faster.
// Caller: src/backend/cuda/ops.rs `alibi_attention_tc`.
#include "common.cuh"
#include <mma.h>

#define TC_BQ 64  // query rows per block
#define TC_BK 64  // keys per tile
#define TC_LDS (TC_BK + 4)  // f32 score scratch row stride
#define TC_LDP (TC_BK + 8)  // probability row stride

template <typename T>
__device__ void alibi_attention_tc(const T* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                   int S, int tiles, T* __restrict__ ctx, int heads, int d) {
    using namespace nvcuda;
    extern __shared__ __align__(32) unsigned char smem_raw[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int s = blockIdx.x / tiles, h = blockIdx.y;
    if (s >= S) return;  // uniform across the block
    const int start = cu_seqlens[s], n = cu_seqlens[s + 1] - start;
    const int q0 = (blockIdx.x % tiles) * TC_BQ;
    if (q0 >= n) return;  // uniform across the block

    const int dp = (d + 15) / 16 * 16, ld = dp + 8;
    T* Qs = reinterpret_cast<T*>(smem_raw);              // [64][ld]
    T* Ks = Qs + TC_BQ * ld;                             // [64][ld]
    T* Vs = Ks + TC_BK * ld;                             // [64][ld]
    float* Sw = reinterpret_cast<float*>(Vs + TC_BK * ld) + warp * 16 * TC_LDS;  // [16][68]
    T* Pw = reinterpret_cast<T*>(reinterpret_cast<float*>(Vs + TC_BK * ld) + 4 * 16 * TC_LDS) +
            warp * 16 * TC_LDP;                                                   // [16][72]
    float* Ow = reinterpret_cast<float*>(reinterpret_cast<T*>(reinterpret_cast<float*>(Vs + TC_BK * ld) +
                                                             4 * 16 * TC_LDS) + 4 * 16 * TC_LDP) +
                warp * 16 * (dp + 4);                                              // [16][dp+4]

    const long row = 3L * heads * d;
    const T* base = qkv + (long)start * row + (long)h * 3 * d;
    const T zero = from_f32<T>(0.f);
    for (int x = threadIdx.x; x < TC_BQ * dp; x += blockDim.x) {
        const int r = x / dp, c = x % dp;
        Qs[r * ld + c] = (q0 + r < n && c < d) ? base[(long)(q0 + r) * row + c] : zero;
    }
    for (int x = lane; x < 16 * (dp + 4); x += 32) Ow[x] = 0.f;

    // This lane's row of the warp's 16 and its half of the columns.
    const int r = lane >> 1, half = lane & 1;
    const int i = q0 + warp * 16 + r;  // query position in the sequence
    const float scale = rsqrtf((float)d), slope = alibi_slope(h, heads);
    float m = __int_as_float(0xff800000), l = 0.f;  // running max (-inf) and sum
    const int warp_last = min(q0 + warp * 16 + 15, n - 1);
    const int block_last = min(q0 + TC_BQ - 1, n - 1);

    for (int j0 = 0; j0 <= block_last; j0 += TC_BK) {
        __syncthreads();  // the previous tile's K/V are no longer read
        for (int x = threadIdx.x; x < TC_BK * dp; x += blockDim.x) {
            const int kr = x / dp, c = x % dp;
            const bool in = j0 + kr < n && c < d;
            Ks[kr * ld + c] = in ? base[(long)(j0 + kr) * row + d + c] : zero;
            Vs[kr * ld + c] = in ? base[(long)(j0 + kr) * row + 2 * d + c] : zero;
        }
        __syncthreads();
        if (q0 + warp * 16 >= n || j0 > warp_last) continue;  // all masked for this warp

        // S = Q_w · K_tileᵀ: [16 × 64], f32.
        for (int jb = 0; jb < TC_BK / 16; ++jb) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int kk = 0; kk < dp; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                wmma::load_matrix_sync(a, Qs + warp * 16 * ld + kk, ld);
                wmma::load_matrix_sync(b, Ks + jb * 16 * ld + kk, ld);  // B(k, j) = K[j][k]
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Sw + jb * 16, acc, TC_LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this tile's 64 keys: two lanes per row, 32 columns each.
        float v[32], tile_max = __int_as_float(0xff800000);
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const int j = j0 + half * 32 + c;
            const bool ok = j <= i && j < n && i < n;
            v[c] = ok ? Sw[r * TC_LDS + half * 32 + c] * scale + slope * (float)j : __int_as_float(0xff800000);
            tile_max = fmaxf(tile_max, v[c]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);
        // Rows with no visible key yet (or padding rows) keep m = -inf: contribute nothing.
        const bool live = m_new != __int_as_float(0xff800000);
        const float corr = live ? expf(m - m_new) : 1.f;
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const float p = live ? expf(v[c] - m_new) : 0.f;
            sum += p;
            Pw[r * TC_LDP + half * 32 + c] = from_f32<T>(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum;
        m = m_new;
        for (int c = half * (dp / 2); c < (half + 1) * (dp / 2); ++c) Ow[r * (dp + 4) + c] *= corr;
        __syncwarp();

        // O_w += P_w · V_tile: [16 × 64]·[64 × dp].
        for (int db = 0; db < dp; db += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, Ow + db, dp + 4, wmma::mem_row_major);
            for (int kk = 0; kk < TC_BK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
                wmma::load_matrix_sync(a, Pw + kk, TC_LDP);
                wmma::load_matrix_sync(b, Vs + kk * ld + db, ld);
                wmma::mma_sync(o, a, b, o);
            }
            wmma::store_matrix_sync(Ow + db, o, dp + 4, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (i < n) {
        const float inv = 1.f / l;
        T* out = ctx + (long)(start + i) * heads * d + (long)h * d;
        for (int c = half * (dp / 2); c < (half + 1) * (dp / 2); ++c)
            if (c < d) out[c] = from_f32<T>(Ow[r * (dp + 4) + c] * inv);
    }
}

extern "C" __global__ void alibi_attention_tc_f16(const __half* qkv, const int* cu_seqlens, int S, int tiles,
                                                  __half* ctx, int heads, int d) {
    alibi_attention_tc(qkv, cu_seqlens, S, tiles, ctx, heads, d);
}
extern "C" __global__ void alibi_attention_tc_bf16(const __nv_bfloat16* qkv, const int* cu_seqlens, int S,
                                                   int tiles, __nv_bfloat16* ctx, int heads, int d) {
    alibi_attention_tc(qkv, cu_seqlens, S, tiles, ctx, heads, d);
}
