// common.cuh — helpers shared by every kernel in kernels/ (prepended to each kernel's source
// by src/backend/cuda/nvrtc.rs, which compiles them with NVRTC at start-up).
//
// Activations and weights are stored in `T` = __half or __nv_bfloat16; every reduction and
// every softmax runs in f32. Kernels are written as templates and exported with
// `extern "C"` wrappers named <op>_f16 / <op>_bf16, so Rust looks them up by name.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds 32 floats.
// blockDim.x must be a multiple of 32. Contains __syncthreads(): call from all threads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// LayerNorm statistics of one row held in shared memory: mean and 1/sqrt(var + eps), biased
// variance, two passes (mean, then centered squares) in f32. Each thread reads only the
// elements i ≡ threadIdx.x (mod blockDim.x) it wrote itself, so no barrier is needed before the
// call; block_sum's barriers make it a block-wide call.
__device__ __forceinline__ void row_stats(const float* row, int H, float eps, float* scratch,
                                          float& mean, float& rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) s += row[i];
    mean = block_sum(s, scratch) / H;
    float q = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float c = row[i] - mean;
        q += c * c;
    }
    rstd = rsqrtf(block_sum(q, scratch) / H + eps);
}

// ALiBi slope of head h out of n (docs/semantics.md): p = largest power of two <= n;
// h < p: 2^(-8(h+1)/p); else the interleaved extra slopes 2^(-4(2(h-p)+1)/p).
__device__ __forceinline__ float alibi_slope(int h, int n) {
    int p = 1;
    while (p * 2 <= n) p *= 2;
    return h < p ? exp2f(-8.f * (h + 1) / p) : exp2f(-4.f * (2 * (h - p) + 1) / p);
}

// ---- Tensor-core building blocks (sm_80+; see the PTX ISA for the fragment layouts) ----------
// mma.sync.m16n8k16, g = lane / 4, c = lane % 4: A (16×16, row-major) a0 (g, 2c..2c+1),
// a1 (g+8, 2c..), a2 (g, 2c+8..), a3 (g+8, 2c+8..); B (16×8, "col": k × n) b0 (k 2c..2c+1, n g),
// b1 (k 2c+8.., n g); C/D (16×8, f32) c0 c1 (g, 2c..2c+1), c2 c3 (g+8, 2c..2c+1).

// Two values rounded to T, the lower index in the low half: one operand register.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}
template <> __device__ __forceinline__ u32 pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// d += a·b on tensor cores, T inputs, f32 accumulation. Not volatile: no side effects, so the
// compiler may schedule it (e.g. after loads issued later in the source).
template <typename T> __device__ __forceinline__ void mma_16816(float* d, const u32* a, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma_16816<__half>(float* d, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* d, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 b16 matrices from shared memory: lanes 8i .. 8i+7 give the 16-byte row addresses of
// matrix i (`row`: a shared-window address, smem_addr). Without .trans, r[i] of lane l holds row
// l/4, columns 2(l%4) and 2(l%4)+1 of matrix i; with .trans, rows 2(l%4) and 2(l%4)+1 of column
// l/4 (the transpose's fragment).
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}

// 16 bytes global -> shared without passing through registers (cp.async, L2 only); zeros
// instead when !fill (src is then not read, but must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    const int n = fill ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits for every cp.async this thread issued; a __syncthreads() after it publishes them to all.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// 2^x by the special-function unit (ex2.approx.ftz: ≤ 2 ulp, results below 2^-126 flushed to 0,
// 2^-inf = 0). exp2f adds a compare and two multiplies per call to keep f32 subnormal results,
// which a softmax probability never needs: it is rounded to f16/bf16 or summed with terms ≥ 1.
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// BLOOM's GELU as v / (1 + 2^(v·(1 + 0.044715·v²)·k)), k = −2·0.79788456·log2(e): the identity
// 0.5·(1 + tanh(u)) = 1/(1 + e^(−2u)), one ex2.approx and one fast division; its error and
// limits are in bias_gelu.cu's header (bias_gelu_vec, and the FP8 path's fused GELU).
__device__ __forceinline__ float gelu_bloom_fast(float v) {
    const float k = -2.f * 0.79788456f * 1.44269504f;
    return __fdividef(v, 1.f + exp2_fast(v * (1.f + 0.044715f * v * v) * k));
}

// ---- Register-resident rows (the `vec` row kernels, on trial) ---------------------------------
// One row of H values (H % 8 == 0, rows 16-byte aligned) per block, in chunks of 8 consecutive
// values: thread i owns chunks i, i + NT, …, i + (C-1)·NT (NT = blockDim.x) of the H/8, so every
// load and store instruction of a warp covers consecutive 16-byte pieces, and the row is read
// from memory once and kept in registers (C is a template parameter so it can be).

// The first element of this thread's chunk c (inside the row when < H).
__device__ __forceinline__ int chunk_start(int c) { return (c * (int)blockDim.x + (int)threadIdx.x) * 8; }

// 8 consecutive values widened to f32: one 16-byte load (two for f32).
__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T> __device__ __forceinline__ void load8(const T* p, float* v) {
    union {
        uint4 raw;
        T e[8];
    } u;
    u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_f32(u.e[j]);
}

// 8 f32 values rounded to the destination type: one 16-byte store (two for f32).
__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float* v) {
    uint4 raw;
    raw.x = pack2<T>(v[0], v[1]), raw.y = pack2<T>(v[2], v[3]);
    raw.z = pack2<T>(v[4], v[5]), raw.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// This thread's chunks of a row (`row` its first element) into registers; chunks outside the
// row are left as they are (callers zero-initialize v: the statistics need zeros there). No use
// of the values in between, so every load of a kernel's rows is issued before any is used.
template <int C, typename S>
__device__ __forceinline__ void load_row(const S* row, float (&v)[C][8], int H) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < H) load8(row + i, v[c]);
    }
}

// LayerNorm statistics of a register-resident row (chunks outside the row must hold zeros):
// mean and 1/sqrt(var + eps), biased variance, two passes in f32 as row_stats. Block-wide.
template <int C>
__device__ __forceinline__ void reg_row_stats(const float (&v)[C][8], int H, float eps, float* scratch,
                                              float& mean, float& rstd) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
        for (int j = 0; j < 8; ++j) s += v[c][j];
    mean = block_sum(s, scratch) / H;
    float q = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c)
        if (chunk_start(c) < H)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float d = v[c][j] - mean;
                q += d * d;
            }
    rstd = rsqrtf(block_sum(q, scratch) / H + eps);
}

// o = (v - mean)·rstd·w + b for one chunk starting at element i.
__device__ __forceinline__ void normalize8(const float* v, float mean, float rstd, const float* w,
                                           const float* b, int i, float* o) {
    float wv[8], bv[8];
    load8(w + i, wv);
    load8(b + i, bv);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = (v[j] - mean) * rstd * wv[j] + bv[j];
}

// out = LayerNorm(row) (w, b) for a register-resident row whose statistics are known: each
// thread's chunks, rounded to T, 16-byte stores. `out` is the row's first element.
template <typename T, int C>
__device__ __forceinline__ void store_normalized(const float (&v)[C][8], float mean, float rstd,
                                                 const float* w, const float* b, T* out, int H) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int i = chunk_start(c);
        if (i < H) {
            float o[8];
            normalize8(v[c], mean, rstd, w, b, i, o);
            store8(out + i, o);
        }
    }
}
