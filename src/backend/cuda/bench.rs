//! GPU measurements for `sgpt bench`: the device's copy bandwidth and cuBLASLt GEMM rate (the
//! ceilings the results are compared with, measured in the same run) and per-kernel timings at
//! a model's shapes (`sgpt bench kernels`). Timed with CUDA events on the one stream.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::backend::cuda::gemm::Gemm;
use crate::backend::cuda::ops::{
    attention_mma2_tiles, vec_rows, Act, Kernels, MappedTable, Mma2Tiles, SkinnyPlan, Table,
    SKINNY_MAX_ROWS,
};
use crate::error::{Error, Result};
use crate::model::config::BloomConfig;

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    crate::backend::cuda::error(what, e)
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

/// cuBLASLt's FP8 rate in FLOP/s at [tokens × k]·[n × k]ᵀ: E4M3 inputs, f32 output, fast
/// accumulation off — the product `--dtype fp8` runs ([`Gemm::fp8_product`]), without the
/// quantization and epilogue kernels around it. Needs compute capability ≥ 8.9.
pub fn fp8_gemm_rate(s: &Arc<CudaStream>, tokens: usize, k: usize, n: usize) -> Result<f64> {
    let mut g = Gemm::new(s.clone())?;
    let xq = s
        .alloc_zeros::<u8>(tokens * k)
        .map_err(|e| err("alloc", e))?;
    let wq = s.alloc_zeros::<u8>(n * k).map_err(|e| err("alloc", e))?;
    let mut acc = s
        .alloc_zeros::<f32>(tokens * n)
        .map_err(|e| err("alloc", e))?;
    let ms = time_ms(s, 10, || g.fp8_product(&xq, &wq, &mut acc, tokens, k, n))?;
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
    let v: Vec<T> = crate::seeded::uniform(n, seed, scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    s.clone_htod(&v).map_err(|e| err("upload", e))
}

fn seeded32(s: &Arc<CudaStream>, n: usize, scale: f32, seed: u64) -> Result<CudaSlice<f32>> {
    s.clone_htod(&crate::seeded::uniform(n, seed, scale))
        .map_err(|e| err("upload", e))
}

/// Sets of distinct rows the host-table rows cycle through (8 × 4,800 tokens of bloom-7b1:
/// 315 MB, several times the H200's 50 MB of L2).
const HOST_SETS: usize = 8;

/// The ops of one block that `sgpt bench kernels` and the criterion GPU benches time.
pub const OPS: &[&str] = &[
    "embedding_layernorm",
    "embedding_layernorm_host",
    "embedding_layernorm_vec_host",
    "add_layernorm",
    "alibi_attention",
    "alibi_attention_tc",
    "alibi_attention_mma",
    "alibi_attention_mma2_r64",
    "alibi_attention_mma2_r128",
    "bias_gelu",
    "final_norm_pool",
    "embedding_layernorm_vec",
    "add_layernorm_vec",
    "bias_gelu_vec",
    "final_norm_pool_vec",
    "gemm_qkv",
    "gemm_dense",
    "gemm_fc1",
    "gemm_fc2",
    "skinny_qkv",
    "skinny_dense",
    "skinny_fc1",
    "skinny_fc2",
    "skinny_dense_s1",
    "skinny_dense_s2",
    "skinny_fc2_s1",
    "skinny_fc2_s2",
];

/// The plan a `skinny_<gemm>_s<n>` op forces: K in n pieces of whole 256-feature rounds (the
/// device's own rule gives 3 on an H200 for dense and fc2; 1 and 2 are the alternatives a
/// device run should time before the rule is settled).
fn forced_skinny_plan(op: &str, n_in: usize) -> Option<SkinnyPlan> {
    let splits: usize = op.rsplit_once("_s")?.1.parse().ok()?;
    let k = n_in.div_ceil(splits.max(1)).div_ceil(256) * 256;
    Some(SkinnyPlan::with_k_per_split(n_in, k))
}

/// The FP8 path's ops (`sgpt bench kernels --dtype fp8`), per GEMM of the block: the input's
/// per-token quantization, the E4M3 product (against the FP8 GEMM ceiling) and the epilogue
/// (scales, bias; fc1's bias is added later in bias_gelu, as in the forward).
pub const FP8_OPS: &[&str] = &[
    "fp8_quantize_qkv",
    "fp8_gemm_qkv",
    "fp8_epilogue_qkv",
    "fp8_quantize_dense",
    "fp8_gemm_dense",
    "fp8_epilogue_dense",
    "fp8_quantize_fc1",
    "fp8_gemm_fc1",
    "fp8_epilogue_fc1",
    "fp8_quantize_fc2",
    "fp8_gemm_fc2",
    "fp8_epilogue_fc2",
];

/// The GEMMs of one block, in the order of the `gemm_*`, `skinny_*` and `fp8_*` ops.
const GEMMS: [&str; 4] = ["qkv", "dense", "fc1", "fc2"];

/// One GEMM's FP8 operands: the input's codes and scales, the weight's, the f32 bias and sums.
struct Fp8Operands {
    xq: CudaSlice<u8>,
    sx: CudaSlice<f32>,
    wq: CudaSlice<u8>,
    sw: CudaSlice<f32>,
    b: CudaSlice<f32>,
    acc: CudaSlice<f32>,
}

/// One GEMM's input, weight, bias and output.
struct Linear<T> {
    x: CudaSlice<T>,
    w: CudaSlice<T>,
    b: CudaSlice<T>,
    y: CudaSlice<T>,
}

/// Inputs and outputs for every op of one block at a model's shape, on `seqs` sequences of `len`
/// tokens, seeded random (never zeros), allocated once; `launch` enqueues one op.
pub struct KernelBench<'k, T: Act> {
    s: Arc<CudaStream>,
    k: &'k Kernels,
    cfg: BloomConfig,
    seqs: usize,
    len: usize,
    x: CudaSlice<f32>,
    y: CudaSlice<T>,
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    act: CudaSlice<T>,
    qkv: CudaSlice<T>,
    ctx: CudaSlice<T>,
    m: CudaSlice<T>,
    b_f: CudaSlice<f32>,
    cu: CudaSlice<i32>,
    slopes: CudaSlice<f32>,
    /// Attention version 4's tile maps of this batch, 64 and 128 query rows per block.
    mma2: [(CudaSlice<i32>, Mma2Tiles); 2],
    stats: CudaSlice<f32>,
    out: CudaSlice<f32>,
    emb: CudaSlice<T>,
    /// A table in page-locked host memory the kernel reads over the bus (`--embedding-table
    /// host`): [`HOST_SETS`] sets of T distinct rows, each launch gathering the next set, so
    /// that no launch finds its rows in the device's L2 from the one before.
    emb_host: MappedTable<T>,
    ids_host: Vec<CudaSlice<u32>>,
    host_set: usize,
    ids: CudaSlice<u32>,
    gemm: Gemm,
    /// Per GEMM (qkv, dense, fc1, fc2).
    lin: Vec<Linear<T>>,
    /// The skinny GEMM's split-K partial sums (the most any of the four needs; ≥ 1 element).
    skinny_ws: CudaSlice<f32>,
    /// Per GEMM, after [`Self::with_fp8`].
    fp8: Vec<Fp8Operands>,
}

impl<'k, T: Act> KernelBench<'k, T> {
    pub fn new(
        ctx: &Arc<CudaContext>,
        k: &'k Kernels,
        cfg: &BloomConfig,
        seqs: usize,
        len: usize,
    ) -> Result<Self> {
        let s = ctx.default_stream();
        let (t, h, f) = (seqs * len, cfg.hidden, 4 * cfg.hidden);
        let rows = 4096.min(cfg.vocab); // a slice of the embedding matrix is enough to gather from
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % rows as u32).collect();
        let cu: Vec<i32> = (0..=seqs).map(|i| (i * len) as i32).collect();
        let mut lin = Vec::new();
        let dims = [(h, 3 * h), (h, h), (h, f), (f, h)];
        let rows_max = t.min(SKINNY_MAX_ROWS);
        let forced_len = |(n_in, n_out): (usize, usize)| {
            let plans = ["_s1", "_s2"].map(|sfx| forced_skinny_plan(sfx, n_in));
            plans
                .iter()
                .flatten()
                .map(|p| p.workspace_len(rows_max, n_out))
                .max()
        };
        let ws_len = dims
            .iter()
            .map(|&(n_in, n_out)| {
                let own = k.skinny_workspace_len(rows_max, n_in, n_out);
                own.max(forced_len((n_in, n_out)).unwrap_or(0))
            })
            .max()
            .unwrap_or(0);
        for (i, (n_in, n_out)) in dims.into_iter().enumerate() {
            let seed = 11 + 4 * i as u64;
            lin.push(Linear {
                x: seeded(&s, t * n_in, 1.0, seed)?,
                w: seeded(&s, n_out * n_in, 0.02, seed + 1)?,
                b: seeded(&s, n_out, 0.02, seed + 2)?,
                y: s.alloc_zeros(t * n_out).map_err(|e| err("alloc", e))?,
            });
        }
        let mma2 = |rows| -> Result<(CudaSlice<i32>, Mma2Tiles)> {
            let plan = attention_mma2_tiles(&cu, Some(rows));
            Ok((s.clone_htod(&plan.map).map_err(|e| err("upload", e))?, plan))
        };
        Ok(KernelBench {
            x: seeded32(&s, t * h, 2.0, 1)?,
            y: seeded(&s, t * h, 1.0, 2)?,
            w: seeded32(&s, h, 1.0, 3)?,
            b: seeded32(&s, h, 0.1, 4)?,
            act: seeded(&s, t * h, 1.0, 5)?,
            qkv: seeded(&s, t * 3 * h, 1.0, 6)?,
            ctx: seeded(&s, t * h, 1.0, 7)?,
            m: seeded(&s, t * f, 1.0, 8)?,
            b_f: seeded32(&s, f, 0.1, 9)?,
            cu: s.clone_htod(&cu).map_err(|e| err("upload", e))?,
            slopes: s
                .clone_htod(&crate::backend::cpu::attention::alibi_slopes(cfg.heads))
                .map_err(|e| err("upload", e))?,
            mma2: [mma2(64)?, mma2(128)?],
            stats: s.alloc_zeros(2 * t).map_err(|e| err("alloc", e))?,
            out: s.alloc_zeros(seqs * h).map_err(|e| err("alloc", e))?,
            emb: seeded(&s, rows * h, 1.0, 10)?,
            emb_host: {
                let n = HOST_SETS * t * h;
                let mut m = MappedTable::<T>::new(ctx, n, "the bench's table")?;
                let v = crate::seeded::uniform(n, 10, 1.0);
                m.fill()?
                    .iter_mut()
                    .zip(v)
                    .for_each(|(d, v)| *d = T::from_f32(v));
                m
            },
            ids_host: (0..HOST_SETS)
                .map(|k| {
                    let ids: Vec<u32> = (0..t).map(|i| (k * t + (i * 7919) % t) as u32).collect();
                    s.clone_htod(&ids).map_err(|e| err("upload", e))
                })
                .collect::<Result<_>>()?,
            host_set: 0,
            ids: s.clone_htod(&ids).map_err(|e| err("upload", e))?,
            gemm: Gemm::new(s.clone())?,
            lin,
            skinny_ws: s.alloc_zeros(ws_len.max(1)).map_err(|e| err("alloc", e))?,
            fp8: Vec::new(),
            s,
            k,
            cfg: cfg.clone(),
            seqs,
            len,
        })
    }

    /// Adds the FP8 operands of the four GEMMs (for [`FP8_OPS`]): each GEMM's input and
    /// weight quantized on the device as the forward does it.
    pub fn with_fp8(mut self) -> Result<Self> {
        let (s, k, t, h) = (&self.s, self.k, self.seqs * self.len, self.cfg.hidden);
        let dims = [(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)];
        for (l, (n_in, n_out)) in self.lin.iter().zip(dims) {
            let zeros8 = |n| s.alloc_zeros::<u8>(n).map_err(|e| err("alloc", e));
            let zeros32 = |n| s.alloc_zeros::<f32>(n).map_err(|e| err("alloc", e));
            let mut o = Fp8Operands {
                xq: zeros8(t * n_in)?,
                sx: zeros32(t)?,
                wq: zeros8(n_out * n_in)?,
                sw: zeros32(n_out)?,
                b: seeded32(s, n_out, 0.02, 40 + n_out as u64)?,
                acc: zeros32(t * n_out)?,
            };
            k.fp8_quantize_rows(s, &l.x, &mut o.xq, &mut o.sx, t, n_in)?;
            k.fp8_quantize_rows(s, &l.w, &mut o.wq, &mut o.sw, n_out, n_in)?;
            self.fp8.push(o);
        }
        Ok(self)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.s
    }

    /// (bytes moved, FLOPs done) by one run of `op`.
    pub fn work(&self, op: &str) -> (f64, f64) {
        let (t, h, a) = (
            (self.seqs * self.len) as f64,
            self.cfg.hidden as f64,
            std::mem::size_of::<T>() as f64,
        );
        let pairs = (self.seqs * self.len * (self.len + 1) / 2) as f64;
        let gemm = |n_in: f64, n_out: f64| {
            (
                (t * n_in + n_in * n_out + t * n_out) * a,
                2.0 * t * n_in * n_out,
            )
        };
        match op {
            "embedding_layernorm" | "embedding_layernorm_host" => (t * h * (a + 4.0), 0.0),
            "embedding_layernorm_vec_host" => (t * h * (a + 4.0 + a), 0.0),
            // + the first block's input layernorm: a written (v1: a separate add_layernorm)
            "embedding_layernorm_vec" => (t * h * (a + 4.0 + a), 0.0),
            "add_layernorm" | "add_layernorm_vec" => (t * h * (4.0 + a + 4.0 + a), 0.0),
            "alibi_attention"
            | "alibi_attention_tc"
            | "alibi_attention_mma"
            | "alibi_attention_mma2_r64"
            | "alibi_attention_mma2_r128" => (t * h * 4.0 * a, 4.0 * h * pairs),
            "bias_gelu" | "bias_gelu_vec" => (t * 4.0 * h * 2.0 * a, 0.0),
            // two passes over x + y
            "final_norm_pool" | "final_norm_pool_vec" => (2.0 * t * h * (4.0 + a), 0.0),
            "gemm_qkv" | "skinny_qkv" => gemm(h, 3.0 * h),
            "gemm_dense" | "skinny_dense" | "skinny_dense_s1" | "skinny_dense_s2" => gemm(h, h),
            "gemm_fc1" | "skinny_fc1" => gemm(h, 4.0 * h),
            "gemm_fc2" | "skinny_fc2" | "skinny_fc2_s1" | "skinny_fc2_s2" => gemm(4.0 * h, h),
            _ if op.starts_with("fp8_") => {
                let (stage, name) = op["fp8_".len()..].split_once('_').unwrap_or_default();
                let (n_in, n_out) = match name {
                    "qkv" => (h, 3.0 * h),
                    "dense" => (h, h),
                    "fc1" => (h, 4.0 * h),
                    _ => (4.0 * h, h),
                };
                match stage {
                    "quantize" => (t * n_in * (a + 1.0) + t * 4.0, 0.0),
                    "gemm" => (
                        t * n_in + n_in * n_out + t * n_out * 4.0,
                        2.0 * t * n_in * n_out,
                    ),
                    _ => (t * n_out * (4.0 + a) + n_out * 8.0, 0.0),
                }
            }
            _ => (0.0, 0.0),
        }
    }

    /// Whether `op` runs at this batch's shape (the skinny GEMM takes at most 16 tokens) and
    /// with these operands (the FP8 ops after [`Self::with_fp8`]).
    pub fn applies(&self, op: &str) -> bool {
        (!op.starts_with("skinny_") || self.seqs * self.len <= SKINNY_MAX_ROWS)
            && (!op.starts_with("fp8_") || !self.fp8.is_empty())
            && (!op.contains("_vec") || vec_rows(self.cfg.hidden).is_some())
    }

    /// Enqueues one run of `op` (one of [`OPS`]).
    pub fn launch(&mut self, op: &str) -> Result<()> {
        if op.ends_with("_host") {
            self.host_set = (self.host_set + 1) % HOST_SETS; // the next set of rows
        }
        let (s, k) = (&self.s, self.k);
        let (t, h, n, d, eps) = (
            self.seqs * self.len,
            self.cfg.hidden,
            self.cfg.heads,
            self.cfg.head_dim(),
            self.cfg.eps,
        );
        let dims = [(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)];
        match op {
            "embedding_layernorm" => k.embedding_layernorm(
                s,
                &self.ids,
                Table::Device(&self.emb),
                &self.w,
                &self.b,
                &mut self.x,
                t,
                h,
                eps,
            ),
            "embedding_layernorm_host" => k.embedding_layernorm(
                s,
                &self.ids_host[self.host_set],
                Table::Mapped(&self.emb_host),
                &self.w,
                &self.b,
                &mut self.x,
                t,
                h,
                eps,
            ),
            "add_layernorm" => k.add_layernorm(
                s,
                &mut self.x,
                Some(&self.y),
                &self.w,
                &self.b,
                &mut self.act,
                t,
                h,
                eps,
            ),
            "alibi_attention" => {
                k.alibi_attention(s, &self.qkv, &self.cu, self.seqs, &mut self.ctx, t, n, d)
            }
            "alibi_attention_tc" => k.alibi_attention_tc(
                s,
                &self.qkv,
                &self.cu,
                self.seqs,
                self.len,
                &mut self.ctx,
                t,
                n,
                d,
            ),
            "alibi_attention_mma" => k.alibi_attention_mma(
                s,
                &self.qkv,
                &self.cu,
                self.seqs,
                self.len,
                &mut self.ctx,
                t,
                n,
                d,
            ),
            "alibi_attention_mma2_r64" | "alibi_attention_mma2_r128" => {
                let (map, plan) = &self.mma2[usize::from(op.ends_with("r128"))];
                let (q, sl) = (&self.qkv, &self.slopes);
                k.alibi_attention_mma2(s, q, map, plan, sl, &mut self.ctx, t, n, d)
            }
            "bias_gelu" => k.bias_gelu(s, &mut self.m, &self.b_f, t),
            "embedding_layernorm_vec_host" => {
                let ids = &self.ids_host[self.host_set];
                let ln = (&self.w, &self.b);
                let (x, a) = (&mut self.x, &mut self.act);
                let emb = Table::Mapped(&self.emb_host);
                k.embedding_layernorm_vec(s, ids, emb, ln, ln, x, a, t, h, eps)
            }
            "embedding_layernorm_vec" => {
                let ln = (&self.w, &self.b); // as the first block's layernorm too
                let (x, a) = (&mut self.x, &mut self.act);
                let emb = Table::Device(&self.emb);
                k.embedding_layernorm_vec(s, &self.ids, emb, ln, ln, x, a, t, h, eps)
            }
            "add_layernorm_vec" => {
                let (w, b, a) = (&self.w, &self.b, &mut self.act);
                k.add_layernorm_vec(s, &mut self.x, &self.y, w, b, a, t, h, eps)
            }
            "bias_gelu_vec" => k.bias_gelu_vec(s, &mut self.m, &self.b_f, t),
            "final_norm_pool_vec" => {
                let (ln, cu, seqs) = ((&self.w, &self.b), &self.cu, self.seqs);
                let (st, out) = (&mut self.stats, &mut self.out);
                k.final_norm_pool_vec(s, &self.x, &self.y, ln, cu, seqs, t, st, out, h, eps)
            }
            "final_norm_pool" => k.final_norm_pool(
                s,
                &self.x,
                Some(&self.y),
                &self.w,
                &self.b,
                &self.cu,
                self.seqs,
                t,
                &mut self.stats,
                &mut self.out,
                h,
                eps,
            ),
            _ if op.starts_with("gemm_") || op.starts_with("skinny_") => {
                let (kind, rest) = op.split_once('_').unwrap_or_default();
                let name = rest.split_once("_s").map_or(rest, |(n, _)| n);
                let i = GEMMS
                    .iter()
                    .position(|g| *g == name)
                    .ok_or_else(|| Error::Input(format!("unknown op {op}")))?;
                let l = &mut self.lin[i];
                let (n_in, n_out) = dims[i];
                if kind == "skinny" {
                    let ws = Some(&mut self.skinny_ws);
                    match forced_skinny_plan(op, n_in) {
                        Some(plan) => k.skinny_gemm_with_plan(
                            s,
                            &l.x,
                            &l.w,
                            Some(&l.b),
                            &mut l.y,
                            ws,
                            t,
                            n_in,
                            n_out,
                            plan,
                        ),
                        None => {
                            k.skinny_gemm(s, &l.x, &l.w, Some(&l.b), &mut l.y, ws, t, n_in, n_out)
                        }
                    }
                } else {
                    self.gemm
                        .linear(&l.x, &l.w, Some(&l.b), &mut l.y, t, n_in, n_out)
                }
            }
            _ if op.starts_with("fp8_") => {
                let (stage, name) = op["fp8_".len()..].split_once('_').unwrap_or_default();
                let i = GEMMS
                    .iter()
                    .position(|g| *g == name)
                    .ok_or_else(|| Error::Input(format!("unknown op {op}")))?;
                let (l, (n_in, n_out)) = (&mut self.lin[i], dims[i]);
                let o = self.fp8.get_mut(i).ok_or_else(|| {
                    Error::Input(format!("{op}: the FP8 operands were not built (with_fp8)"))
                })?;
                match stage {
                    "quantize" => k.fp8_quantize_rows(s, &l.x, &mut o.xq, &mut o.sx, t, n_in),
                    "gemm" => self
                        .gemm
                        .fp8_product(&o.xq, &o.wq, &mut o.acc, t, n_in, n_out),
                    "epilogue" => {
                        let b = (name != "fc1").then_some(&o.b); // fc1's bias: in bias_gelu
                        k.fp8_epilogue(s, &o.acc, &o.sx, &o.sw, b, &mut l.y, t, n_out)
                    }
                    _ => Err(Error::Input(format!("unknown op {op}"))),
                }
            }
            other => Err(Error::Input(format!("unknown op {other}"))),
        }
    }
}

/// Times every op of [`OPS`], and of [`FP8_OPS`] when `fp8` (median of 20 after a warm-up).
pub fn kernel_times<T: Act>(
    ctx: &Arc<CudaContext>,
    k: &Kernels,
    cfg: &BloomConfig,
    seqs: usize,
    len: usize,
    fp8: bool,
) -> Result<Vec<KernelTime>> {
    let mut bench = KernelBench::<T>::new(ctx, k, cfg, seqs, len)?;
    if fp8 {
        bench = bench.with_fp8()?;
    }
    let s = bench.stream().clone();
    let ops: Vec<&str> = OPS
        .iter()
        .chain(FP8_OPS)
        .copied()
        .filter(|op| bench.applies(op))
        .collect();
    ops.into_iter()
        .map(|op| {
            let ms = time_ms(&s, 20, || bench.launch(op))?;
            let (bytes, flops) = bench.work(op);
            Ok(KernelTime {
                name: op.to_string(),
                ms,
                bytes,
                flops,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_skinny_plans_by_op_name() {
        let plan = |op, n_in| forced_skinny_plan(op, n_in).map(|p| (p.k_per_split, p.splits));
        assert_eq!(plan("skinny_fc2_s2", 16384), Some((8192, 2)));
        assert_eq!(plan("skinny_dense_s2", 4096), Some((2048, 2)));
        assert_eq!(plan("skinny_dense_s1", 4096), Some((4096, 1)));
        assert_eq!(plan("skinny_fc2_s2", 1056), Some((768, 2))); // whole rounds of 256
        assert_eq!(plan("skinny_dense", 4096), None); // the device's own rule
        assert_eq!(plan("skinny_fc2", 16384), None);
        for op in OPS.iter().filter(|o| o.starts_with("skinny_")) {
            let name = op["skinny_".len()..].split('_').next().unwrap();
            assert!(GEMMS.contains(&name), "{op}");
        }
    }
}
