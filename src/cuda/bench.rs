//! GPU measurements for `sgpt bench`: the device's copy bandwidth and cuBLASLt GEMM rate (the
//! ceilings the results are compared with, measured in the same run) and per-kernel timings at
//! a model's shapes (`sgpt bench kernels`). Timed with CUDA events on the one stream.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::config::BloomConfig;
use crate::cuda::gemm::Gemm;
use crate::cuda::ops::{Act, Kernels};
use crate::error::{Error, Result};

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Median milliseconds of `reps` runs of `f` (after one warm-up), timed with events.
pub fn time_ms(s: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let a = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err("event", e))?;
        f()?;
        let b = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err("event", e))?;
        b.synchronize().map_err(|e| err("event sync", e))?;
        v.push(a.elapsed_ms(&b).map_err(|e| err("event time", e))? as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Device-to-device copy bandwidth in bytes/s (read + written) of a 1 GiB copy.
pub fn copy_bandwidth(s: &Arc<CudaStream>) -> Result<f64> {
    let n = 1usize << 30;
    let src = s.alloc_zeros::<u8>(n).map_err(|e| err("alloc", e))?;
    let mut dst = s.alloc_zeros::<u8>(n).map_err(|e| err("alloc", e))?;
    let ms = time_ms(s, 10, || {
        s.memcpy_dtod(&src, &mut dst).map_err(|e| err("copy", e))
    })?;
    Ok(2.0 * n as f64 / (ms / 1e3))
}

/// cuBLASLt rate in FLOP/s at [tokens × k]·[n × k]ᵀ in T (a model's largest projection).
pub fn gemm_rate<T: Act>(s: &Arc<CudaStream>, tokens: usize, k: usize, n: usize) -> Result<f64> {
    let mut g = Gemm::new(s.clone())?;
    let x = s
        .alloc_zeros::<T>(tokens * k)
        .map_err(|e| err("alloc", e))?;
    let w = s.alloc_zeros::<T>(n * k).map_err(|e| err("alloc", e))?;
    let mut y = s
        .alloc_zeros::<T>(tokens * n)
        .map_err(|e| err("alloc", e))?;
    let ms = time_ms(s, 10, || g.linear(&x, &w, None, &mut y, tokens, k, n))?;
    Ok(2.0 * (tokens * k * n) as f64 / (ms / 1e3))
}

/// Device memory in use (bytes), as the driver reports it.
pub fn memory_used(ctx: &Arc<CudaContext>) -> Result<usize> {
    let (free, total) = ctx.mem_get_info().map_err(|e| err("mem_get_info", e))?;
    Ok(total - free)
}

/// One kernel's measurement: median ms, and bytes moved or FLOPs done.
pub struct KernelTime {
    pub name: String,
    pub ms: f64,
    pub bytes: f64,
    pub flops: f64,
}

fn seeded<T: Act>(s: &Arc<CudaStream>, n: usize, scale: f32, seed: u64) -> Result<CudaSlice<T>> {
    let v: Vec<T> = crate::bench::uniform(n, seed, scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    s.clone_htod(&v).map_err(|e| err("upload", e))
}

fn seeded32(s: &Arc<CudaStream>, n: usize, scale: f32, seed: u64) -> Result<CudaSlice<f32>> {
    s.clone_htod(&crate::bench::uniform(n, seed, scale))
        .map_err(|e| err("upload", e))
}

/// Times every kernel and GEMM of one block at `cfg`'s shape on `seqs` sequences of `len`
/// tokens each, with seeded random inputs (never zeros).
pub fn kernel_times<T: Act>(
    ctx: &Arc<CudaContext>,
    k: &Kernels,
    cfg: &BloomConfig,
    seqs: usize,
    len: usize,
) -> Result<Vec<KernelTime>> {
    let s = ctx.default_stream();
    let (t, h, f, n, d, a) = (
        seqs * len,
        cfg.hidden,
        4 * cfg.hidden,
        cfg.heads,
        cfg.head_dim(),
        std::mem::size_of::<T>() as f64,
    );
    let (tf, hf) = (t as f64, h as f64);
    let mut x: CudaSlice<f32> = seeded32(&s, t * h, 2.0, 1)?;
    let y: CudaSlice<T> = seeded(&s, t * h, 1.0, 2)?;
    let w = seeded32(&s, h, 1.0, 3)?;
    let b = seeded32(&s, h, 0.1, 4)?;
    let mut act: CudaSlice<T> = seeded(&s, t * h, 1.0, 5)?;
    let qkv: CudaSlice<T> = seeded(&s, t * 3 * h, 1.0, 6)?;
    let mut ctxb: CudaSlice<T> = seeded(&s, t * h, 1.0, 7)?;
    let mut m: CudaSlice<T> = seeded(&s, t * f, 1.0, 8)?;
    let b_f = seeded32(&s, f, 0.1, 9)?;
    let cu: Vec<i32> = (0..=seqs).map(|i| (i * len) as i32).collect();
    let cu = s.clone_htod(&cu).map_err(|e| err("upload", e))?;
    let mut out: CudaSlice<f32> = s.alloc_zeros(seqs * h).map_err(|e| err("alloc", e))?;
    let emb: CudaSlice<T> = seeded(&s, 4096.min(cfg.vocab) * h, 1.0, 10)?;
    let ids_small: Vec<u32> = (0..t as u32)
        .map(|i| (i * 7919) % 4096.min(cfg.vocab) as u32)
        .collect();
    let ids_small = s.clone_htod(&ids_small).map_err(|e| err("upload", e))?;
    let pairs = (seqs * len * (len + 1) / 2) as f64;
    let reps = 20;
    let mut r = Vec::new();
    let mut push = |name: &str, ms: f64, bytes: f64, flops: f64| {
        r.push(KernelTime {
            name: name.into(),
            ms,
            bytes,
            flops,
        })
    };

    let ms = time_ms(&s, reps, || {
        k.embedding_layernorm(&s, &ids_small, &emb, &w, &b, &mut x, t, h, cfg.eps)
    })?;
    push("embedding_layernorm", ms, tf * hf * (a + 4.0), 0.0);
    let ms = time_ms(&s, reps, || {
        k.add_layernorm(&s, &mut x, Some(&y), &w, &b, &mut act, t, h, cfg.eps)
    })?;
    push("add_layernorm", ms, tf * hf * (4.0 + a + 4.0 + a), 0.0);
    let ms = time_ms(&s, reps, || {
        k.alibi_attention(&s, &qkv, &cu, seqs, &mut ctxb, t, n, d)
    })?;
    push("alibi_attention", ms, tf * hf * 4.0 * a, 4.0 * hf * pairs);
    let ms = time_ms(&s, reps, || {
        k.alibi_attention_tc(&s, &qkv, &cu, seqs, len, &mut ctxb, t, n, d)
    })?;
    push(
        "alibi_attention_tc",
        ms,
        tf * hf * 4.0 * a,
        4.0 * hf * pairs,
    );
    let ms = time_ms(&s, reps, || k.bias_gelu(&s, &mut m, &b_f, t))?;
    push("bias_gelu", ms, tf * 4.0 * hf * 2.0 * a, 0.0);
    let ms = time_ms(&s, reps, || {
        k.final_norm_pool(
            &s,
            &x,
            Some(&y),
            &w,
            &b,
            &cu,
            seqs,
            t,
            &mut out,
            h,
            cfg.eps,
            true,
        )
    })?;
    push("final_norm_pool", ms, tf * hf * (4.0 + a), 0.0);

    let mut g = Gemm::new(s.clone())?;
    for (name, n_in, n_out) in [
        ("gemm_qkv", h, 3 * h),
        ("gemm_dense", h, h),
        ("gemm_fc1", h, f),
        ("gemm_fc2", f, h),
    ] {
        let xin: CudaSlice<T> = seeded(&s, t * n_in, 1.0, 11)?;
        let wt: CudaSlice<T> = seeded(&s, n_out * n_in, 0.02, 12)?;
        let bias: CudaSlice<T> = seeded(&s, n_out, 0.02, 13)?;
        let mut yo: CudaSlice<T> = s.alloc_zeros(t * n_out).map_err(|e| err("alloc", e))?;
        let ms = time_ms(&s, reps, || {
            g.linear(&xin, &wt, Some(&bias), &mut yo, t, n_in, n_out)
        })?;
        push(
            name,
            ms,
            (t * n_in + n_in * n_out + t * n_out) as f64 * a,
            2.0 * (t * n_in * n_out) as f64,
        );
    }
    Ok(r)
}
