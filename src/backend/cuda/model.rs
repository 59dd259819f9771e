//! The BLOOM forward on the GPU, over one packed batch, top to bottom — the same steps as
//! `src/backend/cpu/model.rs`, with the residual stream in f32 and everything else in T (f16/bf16).
//! With `--dtype fp8` ([`WeightFormat::Fp8`], docs/fp8.md) the four linear layers of each block
//! hold E4M3 weights and run FP8 GEMMs, with `fp8-alternate` those of every other block;
//! activations stay in T (f16).
//!
//! Glossary: T tokens in the packed batch, S sequences, H hidden, n heads, d head dim, L blocks,
//! V embedding rows, F = 4H. All activation buffers are sized once for `max_tokens`; nothing is
//! allocated in the forward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use rayon::prelude::*;

use crate::backend::batch::PackedBatch;
use crate::backend::cpu::fp8::Fp8Blocks;
use crate::backend::cuda::gemm::{check_fp8_shape, Gemm};
use crate::backend::cuda::ops::{
    attention_mma2_tiles, fp8_gelu_rows, skinny_fits, vec_rows, Act, Kernels, MappedTable,
    Mma2Tiles, Table, ATTENTION_MMA2_DIMS, ATTENTION_MMA_DIMS, SKINNY_MAX_ROWS,
};
use crate::backend::{AttentionKernel, EmbeddingTable, GemmKernel, KernelChoices, RowKernel};
use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::weights::{Checkpoint, DType, TensorRef};

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    crate::backend::cuda::error(what, e)
}

/// What loading cost, for the operator (and `sgpt bench`).
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub device: String,
    pub arch: String,
    /// Bytes read from the checkpoint.
    pub bytes: u64,
    /// Bytes the weights take on the device, as held (= [`device_weight_bytes`]).
    pub weight_bytes: u64,
    /// Bytes of the embedding table in page-locked host memory (`--embedding-table host`).
    pub host_table_bytes: u64,
    pub upload_seconds: f64,
    pub compile_seconds: f64,
    pub kernels_from_cache: usize,
}

impl LoadReport {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.upload_seconds.max(1e-9) / 1e9
    }
}

/// Copies tensors from the memory map to the device in chunks through two pinned buffers (one
/// is filled from the map while the other's copy runs), converting on the device when the
/// stored dtype differs from the wanted one.
struct Uploader<'k> {
    stream: Arc<CudaStream>,
    kernels: &'k Kernels,
    pinned: [cudarc::driver::PinnedHostSlice<u8>; 2],
    /// Recorded after the copy out of `pinned[i]`: it must complete before `pinned[i]` is
    /// refilled (copies from page-locked memory are asynchronous).
    done: [Option<CudaEvent>; 2],
    next: usize,
    staging: CudaSlice<u8>,
    bytes: u64,
}

const CHUNK_BYTES: usize = 64 << 20;

fn type_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        // Copied as they are (`upload::<u8>(t, "u8")`); no kernel converts them.
        DType::F8E4M3 => "u8",
    }
}

impl<'k> Uploader<'k> {
    fn new(ctx: &Arc<CudaContext>, stream: Arc<CudaStream>, kernels: &'k Kernels) -> Result<Self> {
        // SAFETY: host allocations of plain bytes; each is written before it is read.
        let pin = || {
            unsafe { ctx.alloc_pinned::<u8>(CHUNK_BYTES) }
                .map_err(|e| err("pinned staging buffer", e))
        };
        let pinned = [pin()?, pin()?];
        // SAFETY: device scratch, written before each read.
        let staging = unsafe { stream.alloc::<u8>(CHUNK_BYTES) }
            .map_err(|e| err("device staging buffer", e))?;
        Ok(Uploader {
            stream,
            kernels,
            pinned,
            done: [None, None],
            next: 0,
            staging,
            bytes: 0,
        })
    }

    /// `t` as a device buffer of `D` (named `dst`: "f32", "f16" or "bf16").
    fn upload<D: DeviceRepr + ValidAsZeroBits>(
        &mut self,
        t: &TensorRef,
        dst: &str,
    ) -> Result<CudaSlice<D>> {
        let n = t.numel();
        let (src, src_size, dst_size) =
            (type_name(t.dtype), t.dtype.size(), std::mem::size_of::<D>());
        let mut out = self
            .stream
            .alloc_zeros::<D>(n.max(1))
            .map_err(|e| err(&t.name, e))?;
        let bytes = t.bytes();
        let per_chunk = CHUNK_BYTES / src_size;
        for start in (0..n).step_by(per_chunk.max(1)) {
            let count = per_chunk.min(n - start);
            let chunk = &bytes[start * src_size..(start + count) * src_size];
            let i = self.next;
            self.next = 1 - i;
            if let Some(e) = self.done[i].take() {
                e.synchronize().map_err(|e| err("upload sync", e))?;
            }
            let host = self.pinned[i]
                .as_mut_slice()
                .map_err(|e| err("pinned buffer", e))?;
            host[..chunk.len()].copy_from_slice(chunk);
            let host = &self.pinned[i]
                .as_slice()
                .map_err(|e| err("pinned buffer", e))?[..chunk.len()];
            // SAFETY: `out` holds n elements of D = n·dst_size bytes; we view them as bytes.
            let mut out_bytes = unsafe { out.transmute_mut::<u8>(n * dst_size) }
                .ok_or_else(|| Error::Cuda("byte view".into()))?;
            let mut dst_range = out_bytes.slice_mut(start * dst_size..(start + count) * dst_size);
            if src == dst {
                self.stream
                    .memcpy_htod(host, &mut dst_range)
                    .map_err(|e| err(&t.name, e))?;
            } else {
                let mut stage = self.staging.slice_mut(..chunk.len());
                self.stream
                    .memcpy_htod(host, &mut stage)
                    .map_err(|e| err(&t.name, e))?;
                let stage = self.staging.slice(..chunk.len());
                self.kernels
                    .convert(&self.stream, &stage, src, &mut dst_range, dst, count)?;
            }
            self.done[i] = Some(
                self.stream
                    .record_event(None)
                    .map_err(|e| err("upload event", e))?,
            );
        }
        self.bytes += bytes.len() as u64;
        Ok(out)
    }
}

struct Norm {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
}

/// How the four linear layers of each block hold their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// In the activation type T (`--dtype f16|bf16`).
    Half,
    /// In the blocks given (every block for `--dtype fp8`, the odd ones for `fp8-alternate`):
    /// E4M3 with one f32 scale per output row, quantized on the device at load, the GEMM input
    /// quantized per token before each GEMM (docs/fp8.md); in the other blocks as `Half`.
    /// Activations in T.
    Fp8(Fp8Blocks),
}

impl WeightFormat {
    /// Whether block `l`'s linear layers are FP8 ([`Fp8Blocks::covers`]).
    pub fn fp8_block(self, l: usize) -> bool {
        match self {
            WeightFormat::Half => false,
            WeightFormat::Fp8(blocks) => blocks.covers(l),
        }
    }
}

/// One linear layer, y[T, out] = x·Wᵀ (+ b), W [out, in] row-major.
enum Linear<T> {
    /// W and b in T: cuBLASLt with the bias in its epilogue, or the skinny GEMM.
    Half {
        w: CudaSlice<T>,
        b: Option<CudaSlice<T>>,
    },
    /// W as E4M3 codes with per-row scales `sw` [out], b in f32: x quantized per token, the
    /// FP8 product in f32, then y = acc·sx·sw + b rounded to T (the CPU emulation's order).
    Fp8 {
        w: CudaSlice<u8>,
        sw: CudaSlice<f32>,
        b: Option<CudaSlice<f32>>,
    },
}

impl<T> Linear<T> {
    /// Device bytes held.
    fn bytes(&self) -> u64 {
        let n = |len: usize, size: usize| (len * size) as u64;
        match self {
            Linear::Half { w, b } => {
                let t = std::mem::size_of::<T>();
                n(w.len(), t) + b.as_ref().map_or(0, |b| n(b.len(), t))
            }
            Linear::Fp8 { w, sw, b } => {
                n(w.len(), 1) + n(sw.len(), 4) + b.as_ref().map_or(0, |b| n(b.len(), 4))
            }
        }
    }
}

struct Block<T> {
    ln1: Norm,
    qkv: Linear<T>,   // [3H, H], rows interleaved per head
    dense: Linear<T>, // [H, H]
    ln2: Norm,
    fc1: Linear<T>, // [F, H], no bias: bias_gelu (or the FP8 MLP's fused kernel) adds it
    fc1_b: CudaSlice<f32>, // [F]
    fc2: Linear<T>, // [H, F]
}

/// The embedding table where `--embedding-table` put it.
enum EmbTable<T> {
    Device(CudaSlice<T>),
    Host(MappedTable<T>),
}

impl<T> EmbTable<T> {
    fn table(&self) -> Table<'_, T> {
        match self {
            EmbTable::Device(b) => Table::Device(b),
            EmbTable::Host(m) => Table::Mapped(m),
        }
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> EmbTable<T> {
    /// Bytes on the device, and in page-locked host memory.
    fn bytes(&self) -> (u64, u64) {
        let size = std::mem::size_of::<T>() as u64;
        match self {
            EmbTable::Device(b) => (b.len() as u64 * size, 0),
            EmbTable::Host(m) => (0, m.len() as u64 * size),
        }
    }
}

/// `--embedding-table host`: the table `t` [V, H] converted to T on the host ([`fill_rows`])
/// into a [`MappedTable`] (no device memory).
fn host_table<T: Act + ValidAsZeroBits>(
    ctx: &Arc<CudaContext>,
    t: &TensorRef,
    h: usize,
) -> Result<EmbTable<T>> {
    let mut m = MappedTable::<T>::new(ctx, t.numel(), "the embedding table")?;
    fill_rows(t, h, m.fill()?);
    Ok(EmbTable::Host(m))
}

/// The rows of `t` [V, h] converted to T into `out` [V·h], a task per 1024 rows on every core.
/// The conversion rounds as the upload's device-side one does (through f32, to nearest even),
/// so a host table holds the values a device table would (NaN payloads aside: the device
/// writes its canonical NaN).
fn fill_rows<T: Act>(t: &TensorRef, h: usize, out: &mut [T]) {
    const ROWS: usize = 1024;
    out.par_chunks_mut(ROWS * h)
        .enumerate()
        .for_each(|(c, out)| {
            let mut row = vec![0f32; h];
            for (r, o) in out.chunks_mut(h).enumerate() {
                t.row_to_f32(c * ROWS + r, &mut row);
                o.iter_mut()
                    .zip(&row)
                    .for_each(|(o, &v)| *o = T::from_f32(v));
            }
        });
}

/// Bytes the weights of `cfg` take on the device with activations of `act_size` bytes: the
/// embedding table and the biases of the 16-bit linear layers in T, layernorms and fc1's bias
/// in f32, and the four linear layers of each block in T or, in an FP8 block, 1 byte per weight
/// plus an f32 scale per output row and their biases in f32; the table only when `table` puts
/// it on the device. What [`LoadReport::weight_bytes`] counts from the buffers themselves
/// (tests/gpu.rs checks the two agree).
pub fn device_weight_bytes(
    cfg: &BloomConfig,
    format: WeightFormat,
    act_size: usize,
    table: EmbeddingTable,
) -> u64 {
    let (h, v) = (cfg.hidden as u64, cfg.vocab as u64);
    let a = act_size as u64;
    // A layernorm's weight and bias are f32. qkv, dense and fc2 carry a bias in the GEMM
    // (3H + H + H); fc1's is f32, added in bias_gelu.
    let norms = 2 * h * 4;
    let (weights, biases) = (12 * h * h, 5 * h);
    let block = |fp8: bool| {
        let linear = if fp8 {
            weights + (9 * h) * 4 + biases * 4 // scales for 3H + H + 4H + H rows
        } else {
            (weights + biases) * a
        };
        2 * norms + linear + 4 * h * 4
    };
    let blocks: u64 = (0..cfg.layers).map(|l| block(format.fp8_block(l))).sum();
    let table = match table {
        EmbeddingTable::Device => v * h * a,
        EmbeddingTable::Host => 0,
    };
    table + 2 * norms + blocks
}

/// Why `--dtype fp8` (or `fp8-alternate`) cannot run on a device of compute capability `cc` with these kernel
/// choices and hidden size, or None: cuBLASLt's FP8 GEMMs need compute capability 8.9 (Ada,
/// Hopper) and widths that are multiples of 16; the skinny GEMM has no FP8 version.
pub fn fp8_refusal(cc: (i32, i32), choices: KernelChoices, hidden: usize) -> Option<String> {
    if cc < (8, 9) {
        return Some(format!(
            "FP8 needs compute capability 8.9 or newer (Ada, Hopper); this device is sm_{}{}",
            cc.0, cc.1
        ));
    }
    if choices.gemm == GemmKernel::Skinny {
        return Some(
            "--gemm skinny has no FP8 version: with --dtype fp8 every GEMM runs in cuBLASLt \
             (drop --gemm skinny)"
                .into(),
        );
    }
    check_fp8_shape(1, hidden, 4 * hidden).err().map(|_| {
        format!("FP8 needs a hidden size that is a multiple of 16; this model's is {hidden}")
    })
}

/// The FP8 path's scratch, sized once for the largest GEMM of a batch of `max_tokens`.
struct Fp8Scratch {
    xq: CudaSlice<u8>,   // [T, F] the GEMM input's E4M3 codes
    sx: CudaSlice<f32>,  // [T] its per-token scales
    acc: CudaSlice<f32>, // [T, F] the unscaled f32 sums (F = 4H ≥ 3H, the widest output)
}

/// Whether a block's MLP runs fused (`CudaModel::mlp`): FC1 and FC2 in FP8 (FC2 with its bias)
/// and rows that fit the fused kernels (4H ≤ 16384, H ≤ 8192, multiples of 8).
fn fused_fp8_mlp<T>(blk: &Block<T>, h: usize) -> bool {
    matches!(
        (&blk.fc1, &blk.fc2),
        (Linear::Fp8 { .. }, Linear::Fp8 { b: Some(_), .. })
    ) && fp8_gelu_rows(4 * h).is_some()
        && vec_rows(h).is_some()
}

/// The GEMMs' mutable state: cuBLASLt's plans, and the scratch of the skinny and FP8 paths.
struct Gemms {
    cublaslt: Gemm,
    /// The skinny GEMM's split-K partial sums, sized once for the largest of the block's four
    /// GEMMs (≤ 16 rows × n_out × splits f32); only with `--gemm skinny` and a split plan.
    skinny_ws: Option<CudaSlice<f32>>,
    /// Only with `--dtype fp8` or `fp8-alternate`.
    fp8: Option<Fp8Scratch>,
}

impl Gemms {
    /// cuBLASLt and the FP8 scratch, borrowed apart (an FP8 layer needs both).
    fn fp8_parts(&mut self) -> Result<(&mut Gemm, &mut Fp8Scratch)> {
        let f = self.fp8.as_mut();
        let f = f.ok_or_else(|| Error::Cuda("fp8 linear layer without its scratch".into()))?;
        Ok((&mut self.cublaslt, f))
    }
}

/// Activation buffers and the GEMM plans: the mutable state of a forward.
struct State<T> {
    gemms: Gemms,
    ids: CudaSlice<u32>,   // [T]
    cu: CudaSlice<i32>,    // [S+1]
    x: CudaSlice<f32>,     // [T, H] residual stream
    a: CudaSlice<T>,       // [T, H] layernorm output
    qkv: CudaSlice<T>,     // [T, 3H]
    ctx: CudaSlice<T>,     // [T, H]
    y: CudaSlice<T>,       // [T, H] projection outputs
    m: CudaSlice<T>,       // [T, F]
    stats: CudaSlice<f32>, // [T, 2] final layernorm statistics
    out: CudaSlice<f32>,   // [S, H]
    /// Attention version 4's tile map [4 × blocks ≤ 4T] and the plan it was built with (for
    /// this batch, uploaded with cu_seqlens); only with `--attention mma2`.
    mma2: Option<(CudaSlice<i32>, Mma2Tiles)>,
    /// Captured forwards of small batches, by (tokens, sequences, longest).
    graphs: HashMap<(usize, usize, usize), Graph>,
}

/// A captured forward. SAFETY of `Send`: a CUDA graph may be launched from any thread; this one
/// is only reached through the model's Mutex.
struct Graph(CudaGraph);
unsafe impl Send for Graph {}

/// The kernel a batch whose longest sequence is `longest` gets at head dim `d`, under the
/// choice `k`. Measured on an H200 at bloom-7b1 shape (docs/device-runs/): tc is 2.0× faster
/// than v1 at 16 × 300 tokens (1.47 vs 3.00 ms), v1 1.2× faster at 64 × 80 tokens (0.93 vs
/// 1.16 ms) and 2.3× at one 12-token query, so `Auto` picks tc from 128 tokens on. `Mma` and
/// `Mma2` (on trial, never run on a GPU yet) cover only some head dims; the others fall back to
/// `Auto`.
fn pick_attention(k: AttentionKernel, longest: usize, d: usize) -> AttentionKernel {
    const TC_FROM_LEN: usize = 128;
    match k {
        AttentionKernel::Mma if ATTENTION_MMA_DIMS.contains(&d) => AttentionKernel::Mma,
        AttentionKernel::Mma2 if ATTENTION_MMA2_DIMS.contains(&d) => AttentionKernel::Mma2,
        AttentionKernel::V1 | AttentionKernel::Tc => k,
        _ if longest >= TC_FROM_LEN => AttentionKernel::Tc,
        _ => AttentionKernel::V1,
    }
}

/// What [`CudaModel::forward_observed`] calls with (layer, hidden states [T, H]).
type Observer<'a> = &'a mut dyn FnMut(usize, &[f32]);

/// Batches up to this many tokens take the graph path (single queries, small service batches).
const GRAPH_MAX_TOKENS: usize = 128;
/// Most graphs kept at once.
const MAX_GRAPHS: usize = 256;

pub struct CudaModel<T: Act> {
    pub cfg: BloomConfig,
    pub report: LoadReport,
    pub max_tokens: usize,
    /// Attention kernel, GEMM path, CUDA graphs: the engine options (`--attention`, `--gemm`,
    /// `--cuda-graphs`).
    choices: KernelChoices,
    /// The linear layers' weights: T, or FP8 in some or all blocks (`--dtype`).
    format: WeightFormat,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    emb: EmbTable<T>, // [V, H]
    emb_ln: Norm,
    blocks: Vec<Block<T>>,
    ln_f: Norm,
    /// ALiBi slopes [heads] as the reference computes them (attention version 4 reads them).
    slopes: CudaSlice<f32>,
    state: Mutex<State<T>>,
}

impl<T: Act> CudaModel<T> {
    /// Compiles the kernels, uploads every weight (checking shapes against `cfg`; the linear
    /// layers' in `format`) and sizes the activation buffers for batches of up to `max_tokens`
    /// tokens. FP8 on a device that cannot run it is an [`Error::Unsupported`] naming why
    /// ([`fp8_refusal`]), before anything is uploaded.
    pub fn load(
        ctx: Arc<CudaContext>,
        ckpt: &Checkpoint,
        cfg: &BloomConfig,
        max_tokens: usize,
        choices: KernelChoices,
        format: WeightFormat,
        progress: crate::backend::LoadProgress,
    ) -> Result<Self> {
        crate::model::schema::check(ckpt, cfg)?;
        // Stored E4M3 weights (`sgpt quantize`) load only as the format they were written for.
        let stored = crate::backend::cpu::fp8::stored_blocks(ckpt, cfg)?;
        match (stored, format) {
            (Some(b), WeightFormat::Fp8(f)) if b == f => {}
            (Some(b), _) => return Err(crate::backend::cpu::fp8::stored_fp8_needs(&ckpt.dir, b)),
            (None, _) => {}
        }
        if let WeightFormat::Fp8(_) = format {
            let cc = ctx
                .compute_capability()
                .map_err(|e| err("compute capability", e))?;
            if let Some(why) = fp8_refusal(cc, choices, cfg.hidden) {
                return Err(Error::Unsupported(why));
            }
        }
        // Graphs cannot be captured on the legacy default stream: they need a stream of our own,
        // and cudarc's per-launch event tracking (for several streams) off — the model uses
        // exactly one stream.
        let stream = if choices.cuda_graphs {
            // SAFETY: every buffer of this model is allocated, used and freed on `stream` only.
            unsafe { ctx.disable_event_tracking() };
            ctx.new_stream().map_err(|e| err("stream", e))?
        } else {
            ctx.default_stream()
        };
        let device = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let t0 = Instant::now();
        let kernels = Kernels::load(
            &ctx,
            crate::backend::cuda::nvrtc::default_cache_dir().as_deref(),
        )?;
        let compile_seconds = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let (h, f, dt) = (cfg.hidden, 4 * cfg.hidden, T::SUFFIX);
        let mut up = Uploader::new(&ctx, stream.clone(), &kernels)?;
        let norm = |up: &mut Uploader, p: &str| -> Result<Norm> {
            Ok(Norm {
                w: up.upload(&ckpt.get_shaped(&format!("{p}.weight"), &[h])?, "f32")?,
                b: up.upload(&ckpt.get_shaped(&format!("{p}.bias"), &[h])?, "f32")?,
            })
        };
        let table = ckpt.get_shaped("word_embeddings.weight", &[cfg.vocab, h])?;
        let t_host = Instant::now();
        let emb = match choices.table {
            EmbeddingTable::Device => EmbTable::Device(up.upload(&table, dt)?),
            EmbeddingTable::Host => host_table(&ctx, &table, h)?,
        };
        // The host table's conversion is not upload time (its bytes are not counted there).
        let host_seconds = match choices.table {
            EmbeddingTable::Host => t_host.elapsed().as_secs_f64(),
            EmbeddingTable::Device => 0.0,
        };
        let emb_ln = norm(&mut up, "word_embeddings_layernorm")?;
        // The linear layer `{p}.weight` [n_out, n_in] (and `{p}.bias` when `bias`), in FP8 when
        // `fp8` (its block's format), else in T.
        let linear = |up: &mut Uploader,
                      p: String,
                      (n_out, n_in): (usize, usize),
                      bias: bool,
                      fp8: bool|
         -> Result<Linear<T>> {
            let name = format!("{p}.weight");
            let b = bias
                .then(|| ckpt.get_shaped(&format!("{p}.bias"), &[n_out]))
                .transpose()?;
            let stored = match fp8 && stored.is_some() {
                true => crate::backend::cpu::fp8::stored_weight(ckpt, &name)?,
                false => None,
            };
            if let Some((codes, scales)) = stored {
                // Codes and scales as `sgpt quantize` wrote them (the values the quantize
                // kernel below computes from the floats), read and checked as the CPU reads
                // them, copied as they are.
                let up_err = |e| err(&format!("{name} (stored fp8)"), e);
                up.bytes += (codes.len() + 4 * scales.len()) as u64;
                return Ok(Linear::Fp8 {
                    w: stream.clone_htod(&codes).map_err(up_err)?,
                    sw: stream.clone_htod(&scales).map_err(up_err)?,
                    b: b.map(|b| up.upload(&b, "f32")).transpose()?,
                });
            }
            let w = ckpt.get_shaped(&name, &[n_out, n_in])?;
            Ok(if fp8 {
                // f32 on the device (exact from f16/bf16), then rounded per row; the f32
                // copy is freed (stream-ordered) once the quantize kernel has read it.
                let w32 = up.upload::<f32>(&w, "f32")?;
                let alloc = |e| err(&format!("{p}.weight (fp8)"), e);
                let mut codes = stream.alloc_zeros::<u8>(n_out * n_in).map_err(alloc)?;
                let mut sw = stream.alloc_zeros::<f32>(n_out).map_err(alloc)?;
                kernels.fp8_quantize_rows(&stream, &w32, &mut codes, &mut sw, n_out, n_in)?;
                Linear::Fp8 {
                    w: codes,
                    sw,
                    b: b.map(|b| up.upload(&b, "f32")).transpose()?,
                }
            } else {
                Linear::Half {
                    w: up.upload(&w, dt)?,
                    b: b.map(|b| up.upload(&b, dt)).transpose()?,
                }
            })
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let (p, fp8) = (format!("h.{i}"), format.fp8_block(i));
            blocks.push(Block {
                ln1: norm(&mut up, &format!("{p}.input_layernorm"))?,
                qkv: linear(
                    &mut up,
                    format!("{p}.self_attention.query_key_value"),
                    (3 * h, h),
                    true,
                    fp8,
                )?,
                dense: linear(
                    &mut up,
                    format!("{p}.self_attention.dense"),
                    (h, h),
                    true,
                    fp8,
                )?,
                ln2: norm(&mut up, &format!("{p}.post_attention_layernorm"))?,
                fc1: linear(
                    &mut up,
                    format!("{p}.mlp.dense_h_to_4h"),
                    (f, h),
                    false,
                    fp8,
                )?,
                fc1_b: up.upload(
                    &ckpt.get_shaped(&format!("{p}.mlp.dense_h_to_4h.bias"), &[f])?,
                    "f32",
                )?,
                fc2: linear(&mut up, format!("{p}.mlp.dense_4h_to_h"), (h, f), true, fp8)?,
            });
            progress(i + 1, cfg.layers);
        }
        let ln_f = norm(&mut up, "ln_f")?;
        stream.synchronize().map_err(|e| err("upload", e))?;
        let bytes = up.bytes;
        drop(up);
        let upload_seconds = t1.elapsed().as_secs_f64() - host_seconds;
        let norm_bytes = |n: &Norm| ((n.w.len() + n.b.len()) * 4) as u64;
        let (table_bytes, host_table_bytes) = emb.bytes();
        let weight_bytes = table_bytes
            + norm_bytes(&emb_ln)
            + norm_bytes(&ln_f)
            + blocks
                .iter()
                .map(|b| {
                    norm_bytes(&b.ln1)
                        + norm_bytes(&b.ln2)
                        + [&b.qkv, &b.dense, &b.fc1, &b.fc2]
                            .iter()
                            .map(|l| l.bytes())
                            .sum::<u64>()
                        + (b.fc1_b.len() * 4) as u64
                })
                .sum::<u64>();

        let tmax = max_tokens.max(1);
        let z = |n: usize| {
            stream
                .alloc_zeros::<T>(n)
                .map_err(|e| err("activation buffer", e))
        };
        let z32 = |n: usize| {
            stream
                .alloc_zeros::<f32>(n)
                .map_err(|e| err("activation buffer", e))
        };
        // The skinny GEMM's workspace: the most any of the four GEMMs needs under this
        // device's split rule, at the most rows it takes.
        let skinny_ws = if choices.gemm == GemmKernel::Skinny && format == WeightFormat::Half {
            let rows = SKINNY_MAX_ROWS.min(tmax);
            let len = [(h, 3 * h), (h, h), (h, f), (f, h)]
                .into_iter()
                .filter(|&(n_in, n_out)| skinny_fits(rows, n_in, n_out))
                .map(|(n_in, n_out)| kernels.skinny_workspace_len(rows, n_in, n_out))
                .max()
                .unwrap_or(0);
            (len > 0).then(|| z32(len)).transpose()?
        } else {
            None
        };
        let fp8 = match format {
            WeightFormat::Half => None,
            WeightFormat::Fp8(_) => Some(Fp8Scratch {
                xq: stream
                    .alloc_zeros::<u8>(tmax * f)
                    .map_err(|e| err("fp8 input buffer", e))?,
                sx: z32(tmax)?,
                acc: z32(tmax * f)?,
            }),
        };
        let state = State {
            gemms: Gemms {
                cublaslt: Gemm::new(stream.clone())?,
                skinny_ws,
                fp8,
            },
            ids: stream
                .alloc_zeros::<u32>(tmax)
                .map_err(|e| err("ids buffer", e))?,
            cu: stream
                .alloc_zeros::<i32>(tmax + 1)
                .map_err(|e| err("cu_seqlens buffer", e))?,
            x: z32(tmax * h)?,
            a: z(tmax * h)?,
            qkv: z(tmax * 3 * h)?,
            ctx: z(tmax * h)?,
            y: z(tmax * h)?,
            // [T, F], unless every block's MLP is fused (it never writes m): then one element,
            // so a launcher would refuse it rather than the model hold 2·T·4H bytes for nothing
            m: z(if blocks.iter().all(|b| fused_fp8_mlp(b, h)) {
                1
            } else {
                tmax * f
            })?,
            stats: z32(tmax * 2)?,
            out: z32(tmax * h)?,
            // blocks ≤ tokens (attention_mma2_blocks), 4 i32 each
            mma2: match choices.attention {
                AttentionKernel::Mma2 => Some((
                    stream
                        .alloc_zeros::<i32>(4 * tmax)
                        .map_err(|e| err("tile map buffer", e))?,
                    attention_mma2_tiles(&[0], None),
                )),
                _ => None,
            },
            graphs: HashMap::new(),
        };
        let slopes = stream
            .clone_htod(&crate::backend::cpu::attention::alibi_slopes(cfg.heads))
            .map_err(|e| err("slopes upload", e))?;
        Ok(CudaModel {
            cfg: cfg.clone(),
            report: LoadReport {
                device,
                arch: kernels.arch.clone(),
                bytes,
                weight_bytes,
                host_table_bytes,
                upload_seconds,
                compile_seconds,
                kernels_from_cache: kernels.cached,
            },
            max_tokens: tmax,
            choices,
            format,
            ctx,
            stream,
            kernels,
            emb,
            emb_ln,
            blocks,
            ln_f,
            slopes,
            state: Mutex::new(state),
        })
    }

    /// Embeddings [S, H] of a packed batch (unit-length scaling, when asked for, is the
    /// caller's: `Embedder` does it on the host for every backend).
    pub fn forward(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        self.run(batch, None)
    }

    /// [`Self::forward`], showing `observe(i, states)` the residual stream [T, H] as the CPU
    /// forward's `observe` shows it (transformers' `output_hidden_states`): i = 0 after the
    /// embedding layernorm, i = 1..L-1 after block i-1 (the final layernorm's output is not
    /// materialized on the GPU: it is fused into the pooling). The per-layer view of a GPU
    /// test, so a numerical bug points at its layer; it synchronizes after every block and
    /// never takes the CUDA-graph path.
    pub fn forward_observed(
        &self,
        batch: &PackedBatch,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        self.run(batch, Some(observe))
    }

    fn run(&self, batch: &PackedBatch, observe: Option<Observer>) -> Result<Vec<f32>> {
        batch.validate(self.cfg.vocab)?;
        let (t, s_count) = (batch.num_tokens(), batch.num_seqs());
        if s_count == 0 {
            return Ok(Vec::new()); // as the CPU path: nothing in, nothing out
        }
        if t > self.max_tokens {
            return Err(Error::Input(format!(
                "batch of {t} tokens exceeds the {} the GPU buffers were sized for",
                self.max_tokens
            )));
        }
        let (h, s) = (self.cfg.hidden, &self.stream);
        self.ctx
            .bind_to_thread()
            .map_err(|e| err("bind context", e))?;
        let mut guard = self
            .state
            .lock()
            // A forward that panicked left the device buffers half-written.
            .map_err(|_| Error::DeviceFatal("a previous forward panicked".into()))?;
        let st = &mut *guard;
        let cu: Vec<i32> = batch.cu_seqlens.iter().map(|&c| c as i32).collect();
        s.memcpy_htod(&batch.ids, &mut st.ids.slice_mut(..t))
            .map_err(|e| err("ids upload", e))?;
        s.memcpy_htod(&cu, &mut st.cu.slice_mut(..s_count + 1))
            .map_err(|e| err("cu_seqlens upload", e))?;
        let max_len = batch.max_len();
        let d = self.cfg.head_dim();
        if let Some((buf, plan)) = st.mma2.as_mut() {
            if pick_attention(self.choices.attention, max_len, d) == AttentionKernel::Mma2 {
                *plan = attention_mma2_tiles(&cu, None);
                s.memcpy_htod(&plan.map, &mut buf.slice_mut(..plan.map.len()))
                    .map_err(|e| err("tile map upload", e))?;
            }
        }

        if self.choices.cuda_graphs && t <= GRAPH_MAX_TOKENS && observe.is_none() {
            // The latency path: one graph launch instead of ≈ 9 launches per layer. Captured
            // once per (tokens, sequences, longest); inputs live at fixed addresses.
            let key = (t, s_count, max_len);
            if !st.graphs.contains_key(&key) {
                if st.graphs.len() >= MAX_GRAPHS {
                    s.synchronize().map_err(|e| err("graph eviction", e))?; // none still running
                    st.graphs.clear();
                }
                s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| err("graph capture", e))?;
                let enqueued = self.enqueue(st, t, s_count, max_len, None);
                // End the capture whatever happened, so the stream is usable again.
                let graph = s
                    .end_capture(
                        CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
                    )
                    .map_err(|e| err("graph instantiate", e))?;
                enqueued?;
                let graph =
                    graph.ok_or_else(|| Error::Cuda("graph capture produced no graph".into()))?;
                st.graphs.insert(key, Graph(graph));
            }
            st.graphs[&key]
                .0
                .launch()
                .map_err(|e| err("graph launch", e))?;
        } else {
            self.enqueue(st, t, s_count, max_len, observe)?;
        }
        let mut host = vec![0f32; s_count * h];
        s.memcpy_dtoh(&st.out.slice(..s_count * h), &mut host)
            .map_err(|e| err("embeddings download", e))?;
        // A copy into pageable memory is synchronous in practice, not by contract: make sure.
        s.synchronize().map_err(|e| err("embeddings download", e))?;
        Ok(host)
    }

    /// y[T, out] = x·Wᵀ (+ b) for one linear layer. 16-bit weights: the skinny kernel for ≤ 16
    /// tokens when enabled (its split-K partial sums in `g.skinny_ws`), else cuBLASLt. FP8
    /// weights: x quantized per token, the E4M3 product in f32 (cuBLASLt), then the scales and
    /// the bias (docs/fp8.md).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        g: &mut Gemms,
        x: &CudaSlice<T>,
        lin: &Linear<T>,
        y: &mut CudaSlice<T>,
        t: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        let (k, s) = (&self.kernels, &self.stream);
        match lin {
            Linear::Half { w, b } => {
                if self.choices.gemm == GemmKernel::Skinny && skinny_fits(t, n_in, n_out) {
                    let ws = g.skinny_ws.as_mut();
                    return k.skinny_gemm(s, x, w, b.as_ref(), y, ws, t, n_in, n_out);
                }
                g.cublaslt.linear(x, w, b.as_ref(), y, t, n_in, n_out)
            }
            Linear::Fp8 { w, sw, b } => {
                let (gemm, f) = g.fp8_parts()?;
                self.fp8_sums(gemm, f, x, w, t, n_in, n_out)?;
                k.fp8_epilogue(s, &f.acc, &f.sx, sw, b.as_ref(), y, t, n_out) // y = acc·sx·sw + b
            }
        }
    }

    /// An FP8 layer's input quantized per token and its unscaled product sums: the scratch's
    /// acc = xq·wᵀ [T, n_out] f32 and sx [T].
    #[allow(clippy::too_many_arguments)]
    fn fp8_sums(
        &self,
        gemm: &mut Gemm,
        f: &mut Fp8Scratch,
        x: &CudaSlice<T>,
        w: &CudaSlice<u8>,
        t: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        let (k, s) = (&self.kernels, &self.stream);
        k.fp8_quantize_rows(s, x, &mut f.xq, &mut f.sx, t, n_in)?; // xq, sx
        gemm.fp8_product(&f.xq, w, &mut f.acc, t, n_in, n_out) // acc = xq·wᵀ
    }

    /// The MLP and the residual after it: x += fc2(gelu(fc1(a) + b1)), then a = the next
    /// block's LN1(x) — or, after the last block (`next` None), y = the MLP's output, which the
    /// final layernorm adds. An FP8 block whose rows fit runs FC1's epilogue, the GELU and
    /// FC2's input quantization as one kernel and FC2's epilogue inside the add + layernorm: m
    /// is never written (the emulation's f32 order, docs/fp8.md). `m` [T, F] is scratch.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        g: &mut Gemms,
        blk: &Block<T>,
        (x, a, m, y): (
            &mut CudaSlice<f32>,
            &mut CudaSlice<T>,
            &mut CudaSlice<T>,
            &mut CudaSlice<T>,
        ),
        next: Option<&Norm>,
        t: usize,
        vec: bool,
    ) -> Result<()> {
        let (k, s, h, eps) = (&self.kernels, &self.stream, self.cfg.hidden, self.cfg.eps);
        let f = 4 * h;
        let fits = fused_fp8_mlp(blk, h);
        if let (
            Linear::Fp8 { w: w1, sw: sw1, .. },
            Linear::Fp8 {
                w: w2,
                sw: sw2,
                b: Some(b2),
            },
        ) = (&blk.fc1, &blk.fc2)
        {
            if fits {
                let (gemm, sc) = g.fp8_parts()?;
                self.fp8_sums(gemm, sc, a, w1, t, h, f)?; // FC1's sums and input scales
                let fc1 = (sw1, &blk.fc1_b);
                k.fp8_gelu_quantize_rows(s, &sc.acc, &mut sc.sx, fc1, &mut sc.xq, t, f)?;
                // xq, sx: FC2's quantized input
                gemm.fp8_product(&sc.xq, w2, &mut sc.acc, t, f, h)?; // FC2's sums
                let sums = (&sc.acc, &sc.sx);
                return match next {
                    Some(ln) => {
                        let lnw = (&ln.w, &ln.b);
                        k.fp8_epilogue_add_layernorm(s, x, sums, (sw2, b2), lnw, a, t, h, eps)
                    }
                    None => k.fp8_epilogue(s, sums.0, sums.1, sw2, Some(b2), y, t, h),
                };
            }
        }
        self.linear(g, a, &blk.fc1, m, t, h, f)?; // [T, F]
        if vec {
            k.bias_gelu_vec(s, m, &blk.fc1_b, t)?; // m = gelu(m + b1)
        } else {
            k.bias_gelu(s, m, &blk.fc1_b, t)?;
        }
        match next {
            Some(ln) => self.residual_layernorm(g, m, &blk.fc2, y, x, ln, a, t, f, vec),
            None => self.linear(g, m, &blk.fc2, y, t, f, h),
        }
    }

    /// x += lin(input); a = LN(x): the residual add and layernorm after the attention output
    /// and the MLP down projection (`y` [T, H] scratch). An FP8 layer's epilogue is fused into
    /// them where the row fits the vec kernels (x += acc·(sx·sw) + b in f32, y never rounded to
    /// T: the emulation's order); else the layer writes y in T and the add follows, by the
    /// row kernels chosen (`vec`).
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm(
        &self,
        g: &mut Gemms,
        input: &CudaSlice<T>,
        lin: &Linear<T>,
        y: &mut CudaSlice<T>,
        x: &mut CudaSlice<f32>,
        ln: &Norm,
        a: &mut CudaSlice<T>,
        t: usize,
        n_in: usize,
        vec: bool,
    ) -> Result<()> {
        let (k, s, h, eps) = (&self.kernels, &self.stream, self.cfg.hidden, self.cfg.eps);
        if let Linear::Fp8 { w, sw, b: Some(b) } = lin {
            if vec_rows(h).is_some() {
                let (gemm, f) = g.fp8_parts()?;
                self.fp8_sums(gemm, f, input, w, t, n_in, h)?;
                let (sums, lnw) = ((&f.acc, &f.sx), (&ln.w, &ln.b));
                return k.fp8_epilogue_add_layernorm(s, x, sums, (sw, b), lnw, a, t, h, eps);
            }
        }
        self.linear(g, input, lin, y, t, n_in, h)?;
        if vec {
            k.add_layernorm_vec(s, x, y, &ln.w, &ln.b, a, t, h, eps)
        } else {
            k.add_layernorm(s, x, Some(y), &ln.w, &ln.b, a, t, h, eps)
        }
    }

    /// Enqueues the whole forward on the stream (no host synchronization, no host copies, so it
    /// can be captured into a graph — unless `observe` is given: then the residual stream is
    /// downloaded for it after the embedding and after every block but the last): ids and
    /// cu_seqlens already uploaded; out [S, H] written.
    fn enqueue(
        &self,
        st: &mut State<T>,
        t: usize,
        s_count: usize,
        max_len: usize,
        mut observe: Option<Observer>,
    ) -> Result<()> {
        let (h, n, d, eps) = (
            self.cfg.hidden,
            self.cfg.heads,
            self.cfg.head_dim(),
            self.cfg.eps,
        );
        let (k, s) = (&self.kernels, &self.stream);
        // `--row-kernels vec` where its kernels apply (h a multiple of 8), else version 1.
        let vec = self.choices.rows == RowKernel::Vec && vec_rows(h).is_some();
        let first = &self.blocks[0].ln1;
        if vec {
            let (emb_ln, ln1) = ((&self.emb_ln.w, &self.emb_ln.b), (&first.w, &first.b));
            let (x, a) = (&mut st.x, &mut st.a);
            let emb = self.emb.table();
            k.embedding_layernorm_vec(s, &st.ids, emb, emb_ln, ln1, x, a, t, h, eps)?;
            // x [T, H], a = LN1(x)
        } else {
            k.embedding_layernorm(
                s,
                &st.ids,
                self.emb.table(),
                &self.emb_ln.w,
                &self.emb_ln.b,
                &mut st.x,
                t,
                h,
                eps,
            )?; // x [T, H]
        }
        let mut look = |i: usize, x: &CudaSlice<f32>| -> Result<()> {
            if let Some(f) = observe.as_mut() {
                let mut host = vec![0f32; t * h];
                s.memcpy_dtoh(&x.slice(..t * h), &mut host)
                    .map_err(|e| err("hidden states download", e))?;
                s.synchronize()
                    .map_err(|e| err("hidden states download", e))?;
                f(i, &host);
            }
            Ok(())
        };
        look(0, &st.x)?;
        if !vec {
            k.add_layernorm::<T>(s, &mut st.x, None, &first.w, &first.b, &mut st.a, t, h, eps)?;
            // a = LN1(x)
        }
        for (l, blk) in self.blocks.iter().enumerate() {
            self.linear(&mut st.gemms, &st.a, &blk.qkv, &mut st.qkv, t, h, 3 * h)?; // [T, 3H]
            let (qkv, cu, ctx) = (&st.qkv, &st.cu, &mut st.ctx);
            let mma2 = st.mma2.as_ref();
            match pick_attention(self.choices.attention, max_len, d) {
                AttentionKernel::Mma => {
                    k.alibi_attention_mma(s, qkv, cu, s_count, max_len, ctx, t, n, d)?
                }
                AttentionKernel::Mma2 => {
                    let (map, plan) = mma2.ok_or_else(|| Error::Cuda("no tile map".into()))?;
                    k.alibi_attention_mma2(s, qkv, map, plan, &self.slopes, ctx, t, n, d)?
                }
                AttentionKernel::Tc => {
                    k.alibi_attention_tc(s, qkv, cu, s_count, max_len, ctx, t, n, d)?
                }
                _ => k.alibi_attention(s, qkv, cu, s_count, ctx, t, n, d)?,
            } // ctx [T, H]
            let (g, x, y, a) = (&mut st.gemms, &mut st.x, &mut st.y, &mut st.a);
            self.residual_layernorm(g, &st.ctx, &blk.dense, y, x, &blk.ln2, a, t, h, vec)?;
            // x += dense(ctx); a = LN2(x)
            let next = self.blocks.get(l + 1).map(|b| &b.ln1);
            let bufs = (&mut st.x, &mut st.a, &mut st.m, &mut st.y);
            self.mlp(&mut st.gemms, blk, bufs, next, t, vec)?; // x += mlp(a); a = LN1'(x)
            if next.is_some() {
                look(l + 1, &st.x)?;
            }
        }
        // x + y of the last block (the config guarantees L ≥ 1), LN_f, weighted mean: [S, H]
        let ln_f = (&self.ln_f.w, &self.ln_f.b);
        let (cu, stats, out) = (&st.cu, &mut st.stats, &mut st.out);
        if vec {
            k.final_norm_pool_vec(s, &st.x, &st.y, ln_f, cu, s_count, t, stats, out, h, eps)?;
        } else {
            let (w, b) = ln_f;
            k.final_norm_pool(
                s,
                &st.x,
                Some(&st.y),
                w,
                b,
                cu,
                s_count,
                t,
                stats,
                out,
                h,
                eps,
            )?;
        }
        Ok(())
    }

    pub fn device_name(&self) -> &str {
        &self.report.device
    }
}

impl<T: Act> crate::backend::Backend for CudaModel<T> {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        self.forward(batch)
    }
    fn info(&self) -> crate::backend::BackendInfo {
        crate::backend::BackendInfo {
            kind: "cuda",
            device: format!("{} ({})", self.report.device, self.report.arch),
            dtype: match self.format {
                WeightFormat::Half => T::SUFFIX,
                WeightFormat::Fp8(Fp8Blocks::All) => "fp8",
                WeightFormat::Fp8(Fp8Blocks::Alternate) => "fp8-alternate",
            },
            threads: None,
            kernels: Some(self.choices),
            replicas: None,
        }
    }
    fn cuda_context(&self) -> Option<Arc<CudaContext>> {
        Some(self.ctx.clone())
    }
    fn load_summary(&self) -> Option<String> {
        let r = &self.report;
        let host = match r.host_table_bytes {
            0 => String::new(),
            b => format!(
                ", the embedding table {:.2} GB in host memory",
                b as f64 / 1e9
            ),
        };
        Some(format!(
            "loaded {:.2} GB onto {} in {:.2} s ({:.1} GB/s; the weights take {:.2} GB there{host}); \
             kernels ready in {:.2} s ({} from the cache)",
            r.bytes as f64 / 1e9,
            r.device,
            r.upload_seconds,
            r.gb_per_s(),
            r.weight_bytes as f64 / 1e9,
            r.compile_seconds,
            r.kernels_from_cache
        ))
    }
}

/// A forward that fails after enqueuing work returns without synchronizing; what its kernels
/// read must outlive them — the host table above all, which the driver frees without waiting
/// for the stream (device buffers are freed in stream order).
impl<T: Act> Drop for CudaModel<T> {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::{device_weight_bytes, fp8_refusal, pick_attention, Fp8Blocks, WeightFormat};
    use crate::backend::AttentionKernel::{Auto, Mma, Mma2, Tc, V1};
    use crate::backend::EmbeddingTable::{Device, Host};
    use crate::backend::{GemmKernel, KernelChoices};
    use crate::model::weights::DType;

    #[test]
    fn fp8_is_refused_where_it_cannot_run() {
        let k = KernelChoices::default();
        // Ada (8.9) and Hopper (9.0) run it; Ampere (8.0, 8.6) does not.
        assert_eq!(fp8_refusal((9, 0), k, 4096), None);
        assert_eq!(fp8_refusal((8, 9), k, 64), None);
        assert_eq!(fp8_refusal((10, 0), k, 1024), None);
        assert_eq!(
            fp8_refusal((8, 6), k, 4096).as_deref(),
            Some("FP8 needs compute capability 8.9 or newer (Ada, Hopper); this device is sm_86")
        );
        assert!(fp8_refusal((8, 0), k, 4096).unwrap().ends_with("sm_80"));
        let skinny = KernelChoices {
            gemm: GemmKernel::Skinny,
            ..k
        };
        assert!(fp8_refusal((9, 0), skinny, 4096)
            .unwrap()
            .contains("--gemm skinny has no FP8 version"));
        assert!(fp8_refusal((9, 0), k, 72)
            .unwrap()
            .contains("multiple of 16; this model's is 72"));
    }

    /// What the weights take on the device at bloom-7b1 (docs/fp8.md quotes these numbers).
    #[test]
    fn weight_bytes_at_bloom_7b1() {
        let cfg = crate::bench::shape("bloom-7b1").unwrap();
        let f16 = device_weight_bytes(&cfg, WeightFormat::Half, 2, Device);
        let fp8 = device_weight_bytes(&cfg, WeightFormat::Fp8(Fp8Blocks::All), 2, Device);
        let emb = 250_880 * 4096 * 2;
        assert_eq!(emb, 2_055_208_960);
        // Per block: 12·H² weights + 9H scales + 5H biases (f32) + fc1's 4H bias + 2 layernorms.
        let (h, l) = (4096u64, 30u64);
        let block = 12 * h * h + 9 * h * 4 + 5 * h * 4 + 4 * h * 4 + 4 * h * 4;
        assert_eq!(fp8, emb + 2 * 2 * h * 4 + l * block);
        assert_eq!(fp8, 8_105_885_696);
        assert_eq!(f16, 14_140_030_976);
        // Without the embedding table, FP8 halves them (the f32 scales and biases are ~0.2%).
        let ratio = (fp8 - emb) as f64 / (f16 - emb) as f64;
        assert!((0.5..0.502).contains(&ratio), "{ratio}");
        // With the table in host memory: the "≈ 7.1 GB instead of 14.1" and below.
        let fp8_host = device_weight_bytes(&cfg, WeightFormat::Fp8(Fp8Blocks::All), 2, Host);
        let f16_host = device_weight_bytes(&cfg, WeightFormat::Half, 2, Host);
        assert_eq!(fp8_host, fp8 - emb);
        assert_eq!(fp8_host, 6_050_676_736);
        assert_eq!(f16_host, 12_084_822_016);
    }

    /// `fp8-alternate` at bloom-7b1: blocks 1, 3, …, 29 in FP8 (15 of 30), the other 15 in f16.
    #[test]
    fn weight_bytes_at_bloom_7b1_fp8_alternate() {
        let cfg = crate::bench::shape("bloom-7b1").unwrap();
        let alt = device_weight_bytes(&cfg, WeightFormat::Fp8(Fp8Blocks::Alternate), 2, Device);
        let (h, emb, ends) = (4096u64, 2_055_208_960u64, 2 * 2 * 4096 * 4);
        // An FP8 block: 12·H² weights (1 byte) + 9H scales + 5H biases + fc1's 4H bias + the
        // two layernorms' 4H, those four in f32: 201,326,592 + 88·4096 = 201,687,040 bytes.
        let fp8_block = 12 * h * h + (9 + 5 + 4 + 4) * h * 4;
        assert_eq!(fp8_block, 201_687_040);
        // An f16 block: 12·H² weights + 5H biases in f16, fc1's bias and the layernorms in f32:
        // 402,653,184 + 10·4096 + 32·4096 = 402,825,216 bytes.
        let f16_block = (12 * h * h + 5 * h) * 2 + (4 + 4) * h * 4;
        assert_eq!(f16_block, 402_825_216);
        // 2,055,208,960 + 65,536 + 15·201,687,040 + 15·402,825,216.
        assert_eq!(alt, emb + ends + 15 * fp8_block + 15 * f16_block);
        assert_eq!(alt, 11_122_958_336);
        // Halfway between f16 (14.14 GB) and fp8 (8.11 GB): the block weights at 0.75× f16's.
        let (f16, fp8) = (
            device_weight_bytes(&cfg, WeightFormat::Half, 2, Device),
            device_weight_bytes(&cfg, WeightFormat::Fp8(Fp8Blocks::All), 2, Device),
        );
        assert_eq!(2 * alt, f16 + fp8);
        let ratio = (alt - emb) as f64 / (f16 - emb) as f64;
        assert!((0.75..0.751).contains(&ratio), "{ratio}");
    }

    /// The host table's parallel fill, across several of its 1024-row tasks, against a
    /// conversion of the whole table in one go.
    #[test]
    fn host_table_rows_land_where_they_belong() {
        let mut cfg = crate::bench::shape("bloom-560m").unwrap();
        (cfg.hidden, cfg.heads, cfg.layers, cfg.vocab) = (8, 1, 1, 2500);
        for dt in [DType::F32, DType::BF16] {
            let ckpt = crate::bench::random_checkpoint(&cfg, dt, 3).unwrap();
            let t = ckpt.get("word_embeddings.weight").unwrap();
            let mut got = vec![half::f16::ZERO; 2500 * 8];
            super::fill_rows(&t, 8, &mut got);
            let want: Vec<half::f16> = t.to_f32().iter().map(|&v| half::f16::from_f32(v)).collect();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt:?}"
            );
        }
    }

    #[test]
    fn attention_kernel_by_length_and_head_dim() {
        // Auto: version 1 for short batches, version 2 from 128 tokens (the H200 timings).
        assert_eq!(pick_attention(Auto, 127, 128), V1);
        assert_eq!(pick_attention(Auto, 128, 128), Tc);
        // Forced versions stay; version 3 only where it has an instantiation, else Auto.
        assert_eq!(pick_attention(V1, 300, 128), V1);
        assert_eq!(pick_attention(Tc, 1, 128), Tc);
        assert_eq!(pick_attention(Mma, 12, 80), Mma);
        assert_eq!(pick_attention(Mma, 12, 32), V1);
        assert_eq!(pick_attention(Mma, 300, 32), Tc);
        assert_eq!(pick_attention(Mma2, 12, 128), Mma2);
        assert_eq!(pick_attention(Mma2, 12, 32), V1);
    }
}
