// alibi_attention.cu — causal ALiBi self-attention over packed variable-length sequences
//
// Math (docs/semantics.md): for query i and key j <= i of the same sequence (positions local to it),
//   s_ij = (q_i · k_j) / sqrt(d) + slope_h · j;  p_ij = softmax_j(s_ij);  ctx_i = Σ_j p_ij v_j.
//   The slope is computed here from (h, n) (common.cuh); no [n, T, T] bias is materialized.
// Layout: qkv [T, 3H] T, BLOOM's fused output interleaved per head: head h, part p (0 q, 1 k,
//   2 v), element e at column h·3d + p·d + e; cu_seqlens [S+1] i32 (0 = first, T = last);
//   ctx [T, H] T with head h in columns h·d .. h·d + d (the dense projection's input).
// Launch: grid (ceil(T / 4), n), block 128 = 4 warps; one warp per (query token, head); no
//   shared memory. Each lane holds elements e = lane + 32k (k < 4) of q and of the accumulator,
//   so d <= 128 (the launcher checks; BLOOM uses 64/80/96/128).
// Numerics: f32 scores and an online (running max) softmax in f32, expf (not __expf);
//   one rounding to T at the end. Version 1: correctness first, O(n²·d) per head with
//   warp-shuffle dot products; the tensor-core tiled version is issue [speed].
// Idea: the online softmax of flash-attention (Dao et al.); packing as in varlen attention.
// Caller: src/backend/cuda/ops.rs `alibi_attention`.
#include "common.cuh"

template <typename T>
__device__ void alibi_attention(const T* __restrict__ qkv, const int* __restrict__ cu_seqlens, int S,
                                T* __restrict__ ctx, int tokens, int heads, int d) {
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // query token
    const int h = blockIdx.y;
    if (t >= tokens) return;  // whole warps leave together: t is per warp
    // The sequence holding t: largest s with cu_seqlens[s] <= t.
    int lo = 0, hi = S;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu_seqlens[mid] <= t) lo = mid; else hi = mid;
    }
    const int start = cu_seqlens[lo], i = t - start;
    const long row = 3L * heads * d;
    const float scale = rsqrtf((float)d), slope = alibi_slope(h, heads);

    float q[4], acc[4];
    const T* qp = qkv + (long)t * row + (long)h * 3 * d;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int e = lane + 32 * k;
        q[k] = e < d ? to_f32(qp[e]) : 0.f;
        acc[k] = 0.f;
    }
    float m = __int_as_float(0xff800000), l = 0.f;  // -inf (NVRTC has no math.h)
    for (int j = 0; j <= i; ++j) {
        const T* kp = qkv + (long)(start + j) * row + (long)h * 3 * d + d;
        float part = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int e = lane + 32 * k;
            if (e < d) part += q[k] * to_f32(kp[e]);
        }
        const float s = warp_sum(part) * scale + slope * (float)j;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int e = lane + 32 * k;
            acc[k] = acc[k] * corr + (e < d ? p * to_f32(kp[d + e]) : 0.f);
        }
        m = m_new;
    }
    T* out = ctx + (long)t * heads * d + (long)h * d;
    const float inv = 1.f / l;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int e = lane + 32 * k;
        if (e < d) out[e] = from_f32<T>(acc[k] * inv);
    }
}

extern "C" __global__ void alibi_attention_f16(const __half* qkv, const int* cu_seqlens, int S,
                                               __half* ctx, int tokens, int heads, int d) {
    alibi_attention(qkv, cu_seqlens, S, ctx, tokens, heads, d);
}
extern "C" __global__ void alibi_attention_bf16(const __nv_bfloat16* qkv, const int* cu_seqlens, int S,
                                                __nv_bfloat16* ctx, int tokens, int heads, int d) {
    alibi_attention(qkv, cu_seqlens, S, ctx, tokens, heads, d);
}
