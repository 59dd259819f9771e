// embedding_layernorm.cu — x = LayerNorm_emb(E[ids])
//
// Math: for token t, e = E[ids[t], :]; x[t] = (e - mean(e)) / sqrt(var(e) + eps) * w + b,
//   biased variance, as torch.nn.LayerNorm.
// Layout: ids [T] u32; E [V, H] T (row-major, the device copy of word_embeddings.weight);
//   w, b [H] f32; x [T, H] f32 (the residual stream, kept in f32 for the whole forward).
// Launch: grid (T), block 256, dynamic shared memory H·4 bytes (the row, read once).
// Numerics: f32 sums, two passes over the row in shared memory (mean, then centered variance).
// Caller: src/backend/cuda/ops.rs `embedding_layernorm`. Ids are validated on the host (< V).
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
