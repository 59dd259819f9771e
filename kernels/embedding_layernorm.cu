// embedding_layernorm.cu — x = LayerNorm_emb(E[ids])
//
// Math: for token t, e = E[ids[t], :]; x[t] = (e - mean(e)) / sqrt(var(e) + eps) * w + b,
//   biased variance, as torch.nn.LayerNorm.
// Layout: ids [T] u32; E [V, H] T (row-major, the device copy of word_embeddings.weight);
//   w, b [H] f32; x [T, H] f32 (the residual stream, kept in f32 for the whole forward).
// Launch: grid (T), block 256, dynamic shared memory H·4 bytes (the row, read once).
// Numerics: f32 sums, two passes over the row in shared memory (mean, then centered variance).
// Caller: src/backend/cuda/ops.rs `embedding_layernorm`. Ids are validated on the host (< V).
//
// embedding_layernorm_vec<C>_<T> (`--row-kernels vec`, on trial: never run on a GPU) also
// computes the first block's input layernorm from the row it holds, which v1 leaves to a
// separate add_layernorm pass that reads x again: x[t] = LN_emb(E[ids[t]]) as above, then
// a[t] = LN_1(x[t]) (w1, b1 [H] f32; a [T, H] T, the QKV GEMM's input). H % 8 == 0, the row in
// registers (common.cuh "Register-resident rows"): grid (T), block NT = 32·⌈H/(8·C·32)⌉ ≤ 256,
// no dynamic shared memory, 16-byte loads and stores.
#include "common.cuh"

template <typename T>
__device__ void embedding_layernorm(const u32* __restrict__ ids, const T* __restrict__ emb,
                                    const float* __restrict__ w, const float* __restrict__ b,
                                    float* __restrict__ x, int H, float eps) {
    extern __shared__ float row[];
    __shared__ float scratch[32];
    const long t = blockIdx.x;
    const T* e = emb + (long)ids[t] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) row[i] = to_f32(e[i]);
    float mean, rstd;
    row_stats(row, H, eps, scratch, mean, rstd);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        x[t * H + i] = (row[i] - mean) * rstd * w[i] + b[i];
}

extern "C" __global__ void embedding_layernorm_f16(const u32* ids, const __half* emb, const float* w,
                                                   const float* b, float* x, int H, float eps) {
    embedding_layernorm(ids, emb, w, b, x, H, eps);
}
extern "C" __global__ void embedding_layernorm_bf16(const u32* ids, const __nv_bfloat16* emb,
                                                    const float* w, const float* b, float* x, int H,
                                                    float eps) {
    embedding_layernorm(ids, emb, w, b, x, H, eps);
}

template <typename T, int C>
__device__ void embedding_layernorm_vec(const u32* __restrict__ ids, const T* __restrict__ emb,
                                        const float* __restrict__ we, const float* __restrict__ be,
                                        const float* __restrict__ w1, const float* __restrict__ b1,
                                        float* __restrict__ x, T* __restrict__ a, int H, float eps) {
    __shared__ float scratch[32];
    const long t = blockIdx.x;
    const T* e = emb + (long)ids[t] * H;
    float v[C][8] = {};  // zeros outside the row: the statistics need them
    load_row<C>(e, v, H);
    float mean, rstd;
    reg_row_stats<C>(v, H, eps, scratch, mean, rstd);
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < H) {
            normalize8(v[c], mean, rstd, we, be, i, v[c]);  // in place: v is x from here on
            store8(x + t * H + i, v[c]);
        }
    }
    reg_row_stats<C>(v, H, eps, scratch, mean, rstd);
    store_normalized<T, C>(v, mean, rstd, w1, b1, a + t * H, H);
}

#define EMBEDDING_LAYERNORM_VEC(C, SUFFIX, T)                                                    \
    extern "C" __global__ void embedding_layernorm_vec##C##_##SUFFIX(                             \
        const u32* ids, const T* emb, const float* we, const float* be, const float* w1,         \
        const float* b1, float* x, T* a, int H, float eps) {                                     \
        embedding_layernorm_vec<T, C>(ids, emb, we, be, w1, b1, x, a, H, eps);                   \
    }
EMBEDDING_LAYERNORM_VEC(1, f16, __half)
EMBEDDING_LAYERNORM_VEC(2, f16, __half)
EMBEDDING_LAYERNORM_VEC(4, f16, __half)
EMBEDDING_LAYERNORM_VEC(1, bf16, __nv_bfloat16)
EMBEDDING_LAYERNORM_VEC(2, bf16, __nv_bfloat16)
EMBEDDING_LAYERNORM_VEC(4, bf16, __nv_bfloat16)
