//! One typed launcher per kernel in `kernels/`. Only this file builds `LaunchConfig`s and pushes
//! kernel arguments; each launcher checks its preconditions and pushes the arguments in the
//! order of the `extern "C"` signature quoted above it (cudarc cannot check order or types).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::backend::cuda::kernels::KERNELS;
use crate::backend::cuda::nvrtc;
use crate::error::{Error, Result};

/// Activation element types: the kernels' `T`.
pub trait Act: crate::backend::cuda::gemm::GemmElem + Fp8Source {
    /// Suffix of the kernel names (`_f16`, `_bf16`).
    const SUFFIX: &'static str;
    /// Host-side conversions (tests, small host uploads).
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Act for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl Act for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Element types `kernels/fp8_quantize.cu` reads: f32 (weights, at load) and the activation
/// types (GEMM inputs); the suffix of its kernel names.
pub trait Fp8Source: cudarc::driver::DeviceRepr {
    /// The kernel that reads this type.
    const QUANTIZE_KERNEL: &'static str;
}

impl Fp8Source for f32 {
    const QUANTIZE_KERNEL: &'static str = "fp8_quantize_rows_f32";
}

impl Fp8Source for half::f16 {
    const QUANTIZE_KERNEL: &'static str = "fp8_quantize_rows_f16";
}

impl Fp8Source for half::bf16 {
    const QUANTIZE_KERNEL: &'static str = "fp8_quantize_rows_bf16";
}

/// Whether the device address of `b` is a multiple of `bytes`.
fn aligned<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>, bytes: u64) -> bool {
    let (p, _g) = b.device_ptr(s);
    p % bytes == 0
}

/// The embedding table as the gather kernels read it (`--embedding-table`): a device buffer, or
/// page-locked host memory mapped into the device's address space. The kernels take a plain
/// `const T*` either way.
#[derive(Clone, Copy)]
pub enum Table<'a, T> {
    Device(&'a CudaSlice<T>),
    Mapped(&'a MappedTable<T>),
}

impl<'a, T> Table<'a, T> {
    fn len(&self) -> usize {
        match self {
            Table::Device(b) => b.len(),
            Table::Mapped(m) => m.host.len(),
        }
    }

    fn aligned16(&self, s: &Arc<CudaStream>) -> bool {
        match self {
            Table::Device(b) => aligned(s, b, 16),
            Table::Mapped(m) => m.ptr % 16 == 0,
        }
    }

    /// Pushes the table's address as the next kernel argument.
    fn push<'b>(&'b self, l: &mut cudarc::driver::LaunchArgs<'b>)
    where
        'a: 'b,
    {
        match self {
            Table::Device(b) => l.arg(*b),
            Table::Mapped(m) => l.arg(&m.ptr),
        };
    }
}

/// Page-locked host memory mapped into the device's address space, with the device address the
/// driver gave it (only [`MappedTable::new`] pairs the two): what the embedding kernels read
/// for `--embedding-table host`. Write-combined: the host only writes it, and the device's reads
/// over the bus skip the host caches. Whoever frees it must first know no kernel still reads
/// it (the model synchronizes its stream when dropped).
pub struct MappedTable<T> {
    host: PinnedHostSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr + ValidAsZeroBits> MappedTable<T> {
    /// `n` elements, their contents unset until [`Self::fill`].
    pub fn new(ctx: &Arc<CudaContext>, n: usize, what: &str) -> Result<Self> {
        use cudarc::driver::sys;
        let what = format!("{what} in page-locked host memory");
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        // SAFETY: plain values; `fill` writes every one before a kernel can be given the table
        // (the model and the bench fill it right after this call).
        let mut host =
            unsafe { ctx.alloc_pinned_with_flags::<T>(n, flags) }.map_err(|e| err(&what, e))?;
        let mut ptr = 0;
        // SAFETY: `host` was allocated by cuMemHostAlloc with DEVICEMAP in this context; the
        // address is valid while `host` lives, and the two are kept together here.
        unsafe {
            let p = host.as_mut_ptr().map_err(|e| err(&what, e))?;
            sys::cuMemHostGetDevicePointer_v2(&mut ptr, p.cast(), 0).result()
        }
        .map_err(|e| err(&what, e))?;
        Ok(MappedTable { host, ptr })
    }

    /// The elements, to write (no kernel reads them yet).
    pub fn fill(&mut self) -> Result<&mut [T]> {
        self.host
            .as_mut_slice()
            .map_err(|e| err("page-locked host memory", e))
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
}

/// Threads per block of the row kernels (a multiple of 32; block_sum relies on it).
const ROW_THREADS: u32 = 256;
/// Warps per block of the attention kernel (one warp per query token).
const ATTN_WARPS: u32 = 4;
/// Shared memory a block may use without opting in, less the kernels' static `scratch[32]`.
const SMEM_LIMIT: usize = 48 * 1024 - 32 * 4;

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    crate::backend::cuda::error(what, e)
}

fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The shape of a `vec` row kernel's block for rows of `h` values, or None where the `vec`
/// kernels do not apply: [`register_rows`] with up to 4 chunks per thread, i.e. h ≤ 8192 (8
/// chunks took 156-172 registers in the layernorms and a third of their compile time, for
/// sizes no SGPT model has).
pub fn vec_rows(h: usize) -> Option<(usize, u32)> {
    register_rows(h, 4)
}

/// The block of a kernel that holds a row of `n` values in registers (common.cuh
/// "Register-resident rows"), or None (n not a multiple of 8, or more than `max_chunks` chunks
/// of 8 per thread of 256): (C, threads) with C the fewest chunks of 8 per thread out of 1, 2,
/// 4, 8 (up to `max_chunks`) that lets ≤ 256 threads cover the row, and threads the next
/// multiple of 32 (block_sum needs whole warps).
pub fn register_rows(n: usize, max_chunks: usize) -> Option<(usize, u32)> {
    if n == 0 || !n.is_multiple_of(8) {
        return None;
    }
    let chunks = n / 8;
    let c = [1usize, 2, 4, 8]
        .into_iter()
        .filter(|&c| c <= max_chunks)
        .find(|c| chunks.div_ceil(*c) <= ROW_THREADS as usize)?;
    Some((c, (chunks.div_ceil(c).next_multiple_of(32)) as u32))
}

/// The FP8 MLP's fused FC1 epilogue + GELU + quantization ([`Kernels::fp8_gelu_quantize_rows`])
/// takes rows of `f` values: up to 8 chunks of 8 per thread, f ≤ 16384 (bloom-7b1's 4H).
pub fn fp8_gelu_rows(f: usize) -> Option<(usize, u32)> {
    register_rows(f, 8)
}

/// One block of [`vec_rows`] threads per row; (config, C).
fn vec_row_launch(rows: usize, h: usize, what: &str) -> Result<(LaunchConfig, usize)> {
    let (c, threads) = vec_rows(h).ok_or_else(|| {
        Error::Cuda(format!(
            "{what}: hidden size {h} is not a multiple of 8 of at most {}",
            4 * 8 * ROW_THREADS
        ))
    })?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(rows, what)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, c))
}

/// A grid's x dimension: at least 1 (checked by the caller) and at most 2^31 − 1 blocks.
fn grid_x(n: usize, what: &str) -> Result<u32> {
    check(n > 0 && n < 1 << 31, || format!("{what}: {n} blocks"))?;
    Ok(n as u32)
}

/// The `vec` kernels' 16-byte accesses need 16-byte-aligned buffers (cudaMalloc gives 256).
fn check_aligned16<T, U>(
    s: &Arc<CudaStream>,
    what: &str,
    act: &[&CudaSlice<T>],
    f32s: &[&CudaSlice<U>],
) -> Result<()> {
    let ok = act.iter().all(|b| aligned(s, b, 16)) && f32s.iter().all(|b| aligned(s, b, 16));
    check(ok, || format!("{what}: a buffer is not 16-byte aligned"))
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Cuda(msg()))
    }
}

/// Most rows of x the skinny GEMM takes (one m16 tile).
pub const SKINNY_MAX_ROWS: usize = 16;

/// Whether [`Kernels::skinny_gemm`] takes [rows × n_in]·[n_out × n_in]ᵀ.
pub fn skinny_fits(rows: usize, n_in: usize, n_out: usize) -> bool {
    (1..=SKINNY_MAX_ROWS).contains(&rows)
        && n_in > 0
        && n_in.is_multiple_of(32)
        && n_out.is_multiple_of(32)
        && n_out > 0
}

/// Input features one round of a skinny GEMM block covers: 8 warps × 32.
const SKINNY_ROUND_K: usize = 256;
/// Fewest rounds per split: each warp then runs ≥ 4 steps, so its 3-deep load ring fills
/// once; a shorter piece saves less streaming time than the second launch costs.
const SKINNY_MIN_SPLIT_ROUNDS: usize = 4;
/// Blocks wanted per SM (the kernel's `__launch_bounds__(256, 2)`: two fit on an SM).
const SKINNY_BLOCKS_PER_SM: usize = 2;
/// Most splits of the reduction (bounds the workspace).
pub const SKINNY_MAX_SPLITS: usize = 32;

/// How a skinny GEMM cuts its reduction: `splits` pieces of `k_per_split` input features (the
/// last one shorter when `k_per_split` does not divide n_in), summed in piece order by a second
/// kernel when `splits > 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyPlan {
    pub k_per_split: usize,
    pub splits: usize,
}

impl SkinnyPlan {
    /// Pieces of `k_per_split` (a positive multiple of 32) over `n_in` features.
    pub fn with_k_per_split(n_in: usize, k_per_split: usize) -> Self {
        SkinnyPlan {
            k_per_split,
            splits: n_in.div_ceil(k_per_split.max(1)),
        }
    }

    /// f32 elements of the partial sums [splits, rows, n_out]; 0 without a split.
    pub fn workspace_len(&self, rows: usize, n_out: usize) -> usize {
        if self.splits > 1 {
            self.splits * rows * n_out
        } else {
            0
        }
    }
}

/// The split rule for [n_out × n_in] weights on a device with `sms` SMs. The grid is
/// (n_out / 32) × splits blocks; the aim is two blocks per SM (2·sms), so the GEMMs whose
/// column blocks alone cover that (n_out ≥ 64·sms: the QKV and fc1 GEMMs of bloom-7b1 on an
/// H200) are not split, and the others get ⌈2·sms / (n_out/32)⌉ splits, at most one per 4
/// rounds of 256 features and at most [`SKINNY_MAX_SPLITS`]; the rounds are dealt evenly, the
/// last piece taking what is left. On 132 SMs at bloom-7b1: dense (4096 → 4096) 3 pieces of
/// 1536, 1536, 1024; fc2 (16384 → 4096) 5632, 5632, 5120. Depends on (n_in, n_out, sms) only, so
/// a row's result never depends on the batch's other rows.
pub fn skinny_plan(n_in: usize, n_out: usize, sms: usize) -> SkinnyPlan {
    let tiles = (n_out / 32).max(1);
    let want = SKINNY_BLOCKS_PER_SM * sms.max(1);
    let rounds = n_in.div_ceil(SKINNY_ROUND_K).max(1);
    let most = (rounds / SKINNY_MIN_SPLIT_ROUNDS).clamp(1, SKINNY_MAX_SPLITS);
    let splits = if tiles >= want {
        1
    } else {
        want.div_ceil(tiles).min(most)
    };
    SkinnyPlan::with_k_per_split(n_in, rounds.div_ceil(splits) * SKINNY_ROUND_K)
}

/// A packed batch's sizes, as the attention launchers need them.
struct AttentionBatch {
    seqs: usize,
    max_len: usize,
    tokens: usize,
    heads: usize,
    d: usize,
}

/// The checks every attention launcher makes: a non-empty batch, cu_seqlens covering it,
/// qkv [T, 3H] and ctx [T, H] long enough, at most 65535 heads (the grid's y).
fn check_attention<T>(
    name: &str,
    qkv: &CudaSlice<T>,
    cu_seqlens: &CudaSlice<i32>,
    ctx: &CudaSlice<T>,
    b: &AttentionBatch,
) -> Result<()> {
    let h = b.heads * b.d;
    check(
        b.tokens > 0 && b.seqs > 0 && b.max_len > 0 && cu_seqlens.len() > b.seqs,
        || format!("{name}: empty batch or short cu_seqlens"),
    )?;
    check(
        qkv.len() >= b.tokens * 3 * h && ctx.len() >= b.tokens * h,
        || format!("{name}: buffers too small"),
    )?;
    check(b.heads <= 65535, || format!("{name}: {} heads", b.heads))
}

/// Head dims with a version-3 attention kernel (one instantiation each, kernels/alibi_attention_mma.cu).
pub const ATTENTION_MMA_DIMS: [usize; 5] = [16, 64, 80, 96, 128];

/// Head dims with a version-4 attention kernel (kernels/alibi_attention_mma2.cu).
pub const ATTENTION_MMA2_DIMS: [usize; 5] = [16, 64, 80, 96, 128];

/// Query rows per block of version 4 for a batch whose longest sequence is `max_len`: 128
/// (two m16 tiles per warp, so each K and V fragment read from shared memory feeds two
/// tensor-core ops) once a sequence spans three 64-row tiles, else 64 (short sequences would
/// leave most of a 128-row tile empty). A prediction, to be settled by `sgpt bench kernels`.
pub fn attention_mma2_rows(max_len: usize) -> usize {
    if max_len >= 192 {
        128
    } else {
        64
    }
}

/// Keys per K/V tile of version 4: 64 with 64 query rows, 32 with 128 (the registers of two
/// m16 tiles of 64 scores pushed head dim 128 into spills).
pub fn attention_mma2_keys(rows: usize) -> usize {
    if rows == 128 {
        32
    } else {
        64
    }
}

/// Dynamic shared memory of version 4: a Q tile of `rows` rows and one K and one V tile,
/// rows padded by 8 elements of 2 bytes.
pub fn attention_mma2_smem(d: usize, rows: usize) -> usize {
    (rows + 2 * attention_mma2_keys(rows)) * (d + 8) * 2
}

/// Blocks version 4 launches: an upper bound of Σ ⌈n_s / rows⌉ over the batch's sequences that
/// depends only on (tokens, sequences, longest), the key of a captured CUDA graph — at most
/// ⌈longest / rows⌉ tiles per sequence, and at most (tokens + sequences·(rows − 1)) / rows in
/// all. Blocks past the true count exit at once.
pub fn attention_mma2_blocks(tokens: usize, seqs: usize, max_len: usize, rows: usize) -> usize {
    (seqs * max_len.div_ceil(rows)).min((tokens + seqs * (rows - 1)) / rows)
}

/// Version 4's work list for one batch, built on the host from its cu_seqlens and uploaded
/// before the launch (as cu_seqlens is), so a block finds its query tile in one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mma2Tiles {
    /// Query rows per block: 64 or 128.
    pub rows: usize,
    /// Map entries, i.e. blocks per head: [`attention_mma2_blocks`] of the batch, which depends
    /// only on (tokens, sequences, longest) — the key of a captured CUDA graph.
    pub blocks: usize,
    /// 4 i32 per entry: (first token of the sequence, its length, the tile's first query row,
    /// 0); every query tile of every sequence once, those with the most keys first (a
    /// longest-first schedule), then padding entries of zeros that the kernel skips.
    pub map: Vec<i32>,
}

/// The tile map of the batch `cu` (cu_seqlens, non-decreasing from 0) at `rows` query rows per
/// block, [`attention_mma2_rows`] of its longest sequence when `None`.
pub fn attention_mma2_tiles(cu: &[i32], rows: Option<usize>) -> Mma2Tiles {
    let lens: Vec<usize> = cu
        .windows(2)
        .map(|w| (w[1] - w[0]).max(0) as usize)
        .collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    let rows = rows.unwrap_or_else(|| attention_mma2_rows(longest));
    let tokens = lens.iter().sum();
    let mut tiles: Vec<[i32; 4]> = Vec::new();
    for (&start, &n) in cu.iter().zip(&lens) {
        tiles.extend(
            (0..n)
                .step_by(rows)
                .map(|q0| [start, n as i32, q0 as i32, 0]),
        );
    }
    // keys of a tile: up to its last row; a stable sort, so ties keep the batch's order
    tiles.sort_by_key(|t| std::cmp::Reverse(t[1].min(t[2] + rows as i32)));
    let blocks = attention_mma2_blocks(tokens, lens.len(), longest, rows);
    let mut map: Vec<i32> = tiles.into_iter().flatten().collect();
    map.resize(4 * blocks, 0);
    Mma2Tiles { rows, blocks, map }
}

/// Dynamic shared memory of `alibi_attention_tc` for head dim `d` (see the kernel's header):
/// Q, K, V tiles of 64 rows, f32 scores, probabilities in T, f32 output rows, for 4 warps.
pub fn attention_tc_smem(d: usize) -> usize {
    let dp = d.div_ceil(16) * 16;
    3 * 64 * (dp + 8) * 2 + 4 * 16 * 68 * 4 + 4 * 16 * 72 * 2 + 4 * 16 * (dp + 4) * 4
}

/// Every kernel function, loaded once at start-up.
pub struct Kernels {
    funcs: HashMap<&'static str, CudaFunction>,
    pub arch: String,
    /// Streaming multiprocessors of the device (the skinny GEMM's split rule).
    pub sms: usize,
    /// Files served from the on-disk cache rather than compiled.
    pub cached: usize,
}

impl Kernels {
    /// Compiles (or loads from `cache_dir`) every kernel for the device's architecture.
    pub fn load(ctx: &Arc<CudaContext>, cache_dir: Option<&Path>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err("compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| err("multiprocessor count", e))?
            .max(1) as usize;
        let mut funcs = HashMap::new();
        let mut cached = 0;
        for k in KERNELS {
            let c = nvrtc::compile(k, &arch, cache_dir)?;
            let from_cache = c.from_cache;
            let module = match ctx.load_module(Ptx::from_binary(c.cubin)) {
                Ok(m) => m,
                // A damaged cache entry: compile afresh (and overwrite it) rather than fail.
                Err(_) if from_cache => {
                    let c = nvrtc::compile_fresh(k, &arch, cache_dir)?;
                    ctx.load_module(Ptx::from_binary(c.cubin))
                        .map_err(|e| err(k.file, e))?
                }
                Err(e) => return Err(err(k.file, e)),
            };
            cached += from_cache as usize;
            for &f in k.functions {
                let func = module.load_function(f).map_err(|e| err(f, e))?;
                if f.starts_with("alibi_attention_mma2") {
                    // Above the default 48 KB at d = 128: opt in once, for the largest.
                    let most = attention_mma2_smem(128, 64).max(attention_mma2_smem(128, 128));
                    func.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        most as i32,
                    )
                    .map_err(|e| err(f, e))?;
                }
                if f.starts_with("alibi_attention_tc") {
                    // Above the default 48 KB: opt in once, for the largest head dim (128).
                    func.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        attention_tc_smem(128) as i32,
                    )
                    .map_err(|e| err(f, e))?;
                }
                funcs.insert(f, func);
            }
        }
        Ok(Kernels {
            funcs,
            arch,
            sms,
            cached,
        })
    }

    fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} not loaded")))
    }

    /// `embedding_layernorm_<T>(const u32* ids, const T* emb, const float* w, const float* b,
    ///  float* x, int H, float eps)` — x[T, H] = LN(emb[ids]).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_layernorm<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        ids: &CudaSlice<u32>,
        emb: Table<'_, T>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        tokens: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        check(
            tokens > 0 && ids.len() >= tokens && x.len() >= tokens * h,
            || "embedding_layernorm: buffers too small".into(),
        )?;
        check(
            w.len() == h && b.len() == h && emb.len().is_multiple_of(h),
            || "embedding_layernorm: bad weight sizes".into(),
        )?;
        check(h * 4 <= SMEM_LIMIT, || {
            format!("hidden size {h} exceeds the row kernels' shared memory")
        })?;
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        let (hi, f) = (
            h as i32,
            self.get(&format!("embedding_layernorm_{}", T::SUFFIX))?,
        );
        // SAFETY: sizes checked above (ids < V is checked on the host by PackedBatch::validate);
        // arguments in the order of the signature.
        unsafe {
            let mut l = s.launch_builder(f);
            l.arg(ids);
            emb.push(&mut l);
            l.arg(w).arg(b).arg(x).arg(&hi).arg(&eps).launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("embedding_layernorm", e))
    }

    /// `add_layernorm_<T>(float* x, const T* y, const float* w, const float* b, T* a, int H,
    ///  float eps)` — x += y (if y), a = LN(x); rows = tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn add_layernorm<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &mut CudaSlice<f32>,
        y: Option<&CudaSlice<T>>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        a: &mut CudaSlice<T>,
        tokens: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let n = tokens * h;
        check(
            tokens > 0 && x.len() >= n && a.len() >= n && y.is_none_or(|y| y.len() >= n),
            || "add_layernorm: buffers too small".into(),
        )?;
        check(w.len() == h && b.len() == h, || {
            "add_layernorm: bad weight sizes".into()
        })?;
        check(h * 4 <= SMEM_LIMIT, || {
            format!("hidden size {h} exceeds the row kernels' shared memory")
        })?;
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        let (hi, f) = (h as i32, self.get(&format!("add_layernorm_{}", T::SUFFIX))?);
        let null: u64 = 0;
        let mut lb = s.launch_builder(f);
        lb.arg(x);
        match y {
            Some(y) => lb.arg(y),
            None => lb.arg(&null), // a null `const T*`: the kernel skips the add
        };
        // SAFETY: sizes checked above; argument order as in the signature.
        unsafe { lb.arg(w).arg(b).arg(a).arg(&hi).arg(&eps).launch(cfg) }
            .map(drop)
            .map_err(|e| err("add_layernorm", e))
    }

    /// `alibi_attention_<T>(const T* qkv, const int* cu_seqlens, int S, T* ctx, int tokens,
    ///  int heads, int d)` — causal ALiBi attention over packed sequences.
    #[allow(clippy::too_many_arguments)]
    pub fn alibi_attention<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        qkv: &CudaSlice<T>,
        cu_seqlens: &CudaSlice<i32>,
        seqs: usize,
        ctx: &mut CudaSlice<T>,
        tokens: usize,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        let b = AttentionBatch {
            seqs,
            max_len: 1, // not used by version 1
            tokens,
            heads,
            d,
        };
        check_attention("alibi_attention", qkv, cu_seqlens, ctx, &b)?;
        check(d <= 128, || format!("alibi_attention: head dim {d} > 128"))?;
        let cfg = LaunchConfig {
            grid_dim: ((tokens as u32).div_ceil(ATTN_WARPS), heads as u32, 1),
            block_dim: (32 * ATTN_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (si, ti, ni, di) = (seqs as i32, tokens as i32, heads as i32, d as i32);
        let f = self.get(&format!("alibi_attention_{}", T::SUFFIX))?;
        // SAFETY: sizes checked; cu_seqlens[0..=S] is consistent (PackedBatch::validate).
        unsafe {
            s.launch_builder(f)
                .arg(qkv)
                .arg(cu_seqlens)
                .arg(&si)
                .arg(ctx)
                .arg(&ti)
                .arg(&ni)
                .arg(&di)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("alibi_attention", e))
    }

    /// `alibi_attention_tc_<T>(const T* qkv, const int* cu_seqlens, int S, int tiles, T* ctx,
    ///  int heads, int d)` — version 2 of the attention on tensor cores; same contract as
    ///  [`Self::alibi_attention`], plus the longest sequence (`max_len`) to size the grid.
    #[allow(clippy::too_many_arguments)]
    pub fn alibi_attention_tc<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        qkv: &CudaSlice<T>,
        cu_seqlens: &CudaSlice<i32>,
        seqs: usize,
        max_len: usize,
        ctx: &mut CudaSlice<T>,
        tokens: usize,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        check(d <= 128, || {
            format!("alibi_attention_tc: head dim {d} > 128")
        })?;
        let f = format!("alibi_attention_tc_{}", T::SUFFIX);
        let b = AttentionBatch {
            seqs,
            max_len,
            tokens,
            heads,
            d,
        };
        self.tiled_attention(
            s,
            &f,
            attention_tc_smem(d),
            Some(d),
            qkv,
            cu_seqlens,
            ctx,
            b,
        )
    }

    /// `alibi_attention_mma_d<D>_<T>(const T* qkv, const int* cu_seqlens, int S, int tiles,
    ///  T* ctx, int heads)` — version 3 of the attention (registers, mma.sync); same contract as
    ///  [`Self::alibi_attention_tc`], for the head dims in [`ATTENTION_MMA_DIMS`].
    #[allow(clippy::too_many_arguments)]
    pub fn alibi_attention_mma<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        qkv: &CudaSlice<T>,
        cu_seqlens: &CudaSlice<i32>,
        seqs: usize,
        max_len: usize,
        ctx: &mut CudaSlice<T>,
        tokens: usize,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        check(ATTENTION_MMA_DIMS.contains(&d), || {
            format!("alibi_attention_mma: head dim {d} not in {ATTENTION_MMA_DIMS:?}")
        })?;
        let f = format!("alibi_attention_mma_d{d}_{}", T::SUFFIX);
        let b = AttentionBatch {
            seqs,
            max_len,
            tokens,
            heads,
            d,
        };
        // static shared memory (the K and V tiles); d is in the function's name
        self.tiled_attention(s, &f, 0, None, qkv, cu_seqlens, ctx, b)
    }

    /// `alibi_attention_mma2_d<D>_r<R>_<T>(const T* qkv, const int4* tiles,
    ///  const float* slopes, T* ctx, int heads)` — version 4 of the attention (ldmatrix,
    ///  cp.async, base-2 softmax, a tile map instead of cu_seqlens); the contract of
    ///  [`Self::alibi_attention_tc`] with the batch given as `plan` (built by
    ///  [`attention_mma2_tiles`] from its cu_seqlens, `plan.map` uploaded to `tiles`) and the
    ///  ALiBi slopes given (`slopes[heads]`, as `cpu::attention::alibi_slopes` computes them),
    ///  for the head dims in [`ATTENTION_MMA2_DIMS`]. `sgpt bench kernels` times both tile
    ///  heights.
    #[allow(clippy::too_many_arguments)]
    pub fn alibi_attention_mma2<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        qkv: &CudaSlice<T>,
        tiles: &CudaSlice<i32>,
        plan: &Mma2Tiles,
        slopes: &CudaSlice<f32>,
        ctx: &mut CudaSlice<T>,
        tokens: usize,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        let name = "alibi_attention_mma2";
        let rows = plan.rows;
        check(ATTENTION_MMA2_DIMS.contains(&d), || {
            format!("{name}: head dim {d} not in {ATTENTION_MMA2_DIMS:?}")
        })?;
        check(rows == 64 || rows == 128, || {
            format!("{name}: {rows} query rows per block (64 or 128)")
        })?;
        check(slopes.len() == heads && heads > 0, || {
            format!("{name}: {} slopes for {heads} heads", slopes.len())
        })?;
        let h = heads * d;
        check(
            qkv.len() >= tokens * 3 * h && ctx.len() >= tokens * h,
            || format!("{name}: buffers too small"),
        )?;
        // Every entry's rows lie inside the batch (a map of another batch could read past qkv).
        let inside = |e: &[i32]| {
            e[0] >= 0 && e[1] >= 0 && e[2] >= 0 && (e[0] as usize + e[1] as usize) <= tokens
        };
        check(
            plan.map.chunks(4).all(inside)
                && plan.map.len() == 4 * plan.blocks
                && tiles.len() >= plan.map.len(),
            || format!("{name}: the tile map does not fit a batch of {tokens} tokens"),
        )?;
        check(
            plan.blocks > 0 && plan.blocks * heads < i32::MAX as usize,
            || format!("{name}: grid too large"),
        )?;
        let cfg = LaunchConfig {
            grid_dim: ((plan.blocks * heads).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: attention_mma2_smem(d, rows) as u32,
        };
        let ni = heads as i32;
        let f = self.get(&format!("{name}_d{d}_r{rows}_{}", T::SUFFIX))?;
        // SAFETY: sizes checked and every map entry inside the batch; `tiles` holds `plan.map`
        // (the caller's upload); order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(qkv)
                .arg(tiles)
                .arg(slopes)
                .arg(ctx)
                .arg(&ni)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err(name, e))
    }

    /// Versions 2 and 3: a block of 128 threads per (64 query rows of a sequence, head), with
    /// arguments (qkv, cu_seqlens, S, tiles, ctx, heads[, d]).
    #[allow(clippy::too_many_arguments)]
    fn tiled_attention<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        name: &str,
        smem: usize,
        d_arg: Option<usize>,
        qkv: &CudaSlice<T>,
        cu_seqlens: &CudaSlice<i32>,
        ctx: &mut CudaSlice<T>,
        b: AttentionBatch,
    ) -> Result<()> {
        check_attention(name, qkv, cu_seqlens, ctx, &b)?;
        let tiles = b.max_len.div_ceil(64);
        check(b.seqs * tiles < i32::MAX as usize, || {
            format!("{name}: grid too large")
        })?;
        let cfg = LaunchConfig {
            grid_dim: ((b.seqs * tiles) as u32, b.heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (si, ti, ni) = (b.seqs as i32, tiles as i32, b.heads as i32);
        let di = d_arg.unwrap_or(0) as i32;
        let f = self.get(name)?;
        let mut lb = s.launch_builder(f);
        lb.arg(qkv)
            .arg(cu_seqlens)
            .arg(&si)
            .arg(&ti)
            .arg(ctx)
            .arg(&ni);
        if d_arg.is_some() {
            lb.arg(&di);
        }
        // SAFETY: sizes checked; cu_seqlens consistent (PackedBatch::validate) with every
        // sequence at most max_len long; order as in the signatures above.
        unsafe { lb.launch(cfg) }
            .map(drop)
            .map_err(|e| err(name, e))
    }

    /// The split rule ([`skinny_plan`]) on this device.
    pub fn skinny_plan(&self, n_in: usize, n_out: usize) -> SkinnyPlan {
        skinny_plan(n_in, n_out, self.sms)
    }

    /// f32 elements of workspace [`Self::skinny_gemm`] needs for this shape on this device (0
    /// when the plan does not split).
    pub fn skinny_workspace_len(&self, rows: usize, n_in: usize, n_out: usize) -> usize {
        self.skinny_plan(n_in, n_out).workspace_len(rows, n_out)
    }

    /// y[rows, n_out] = x[rows, n_in]·Wᵀ (+ b) for rows ≤ [`SKINNY_MAX_ROWS`], n_in and n_out
    /// multiples of 32 — the same contract as `Gemm::linear` for those shapes — cut as this
    /// device's [`skinny_plan`] says; `ws` must hold [`Self::skinny_workspace_len`] f32 when that
    /// is not 0 (the caller allocates it once). See [`Self::skinny_gemm_with_plan`].
    #[allow(clippy::too_many_arguments)]
    pub fn skinny_gemm<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        y: &mut CudaSlice<T>,
        ws: Option<&mut CudaSlice<f32>>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        let plan = self.skinny_plan(n_in, n_out);
        self.skinny_gemm_with_plan(s, x, w, bias, y, ws, rows, n_in, n_out, plan)
    }

    /// `skinny_gemm_<T>(const T* x, const T* w, const T* bias, T* y, float* ws, int M, int K,
    ///  int N, int kc)` on a grid (N / 32, splits), then, when splits > 1,
    /// `skinny_reduce_<T>(const float* ws, const T* bias, T* y, int M, int N, int splits)` —
    /// [`Self::skinny_gemm`] under a given plan (tests force plans; the forward uses the rule).
    /// With one split the first kernel writes y (bias included) and `ws` may be `None`; else it
    /// writes the partial sums to `ws` [splits, rows, n_out] and the second sums them in split
    /// order, adds b and rounds once to T.
    #[allow(clippy::too_many_arguments)]
    pub fn skinny_gemm_with_plan<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        y: &mut CudaSlice<T>,
        mut ws: Option<&mut CudaSlice<f32>>,
        rows: usize,
        n_in: usize,
        n_out: usize,
        plan: SkinnyPlan,
    ) -> Result<()> {
        let shape = format!("[{rows}×{n_in}]·[{n_out}×{n_in}]ᵀ");
        check(skinny_fits(rows, n_in, n_out), || {
            format!("skinny_gemm: {shape} needs ≤ {SKINNY_MAX_ROWS} rows and multiples of 32")
        })?;
        check(
            x.len() >= rows * n_in
                && w.len() >= n_in * n_out
                && y.len() >= rows * n_out
                && bias.is_none_or(|b| b.len() == n_out),
            || format!("skinny_gemm: buffer sizes do not fit {shape}"),
        )?;
        let SkinnyPlan {
            k_per_split: kc,
            splits,
        } = plan;
        check(
            kc > 0
                && kc.is_multiple_of(32)
                && splits == n_in.div_ceil(kc)
                && (1..=SKINNY_MAX_SPLITS).contains(&splits),
            || {
                format!(
                    "skinny_gemm: bad plan {plan:?} for {n_in} input features (pieces: a positive \
                     multiple of 32, at most {SKINNY_MAX_SPLITS})"
                )
            },
        )?;
        // The kernels index with 32-bit ints (row offsets in 64 bits).
        let limit = i32::MAX as usize;
        check(
            n_in + kc <= limit && n_out <= limit && rows * n_out <= limit,
            || format!("skinny_gemm: {shape} too large"),
        )?;
        let need = plan.workspace_len(rows, n_out);
        let have = ws.as_ref().map_or(0, |b| b.len());
        check(need == 0 || have >= need, || {
            format!(
                "skinny_gemm: {shape} in {splits} pieces needs a workspace of {need} f32, got {have}"
            )
        })?;
        let (mi, ki, ni, kci, si) = (
            rows as i32,
            n_in as i32,
            n_out as i32,
            kc as i32,
            splits as i32,
        );
        let null: u64 = 0;
        let cfg = LaunchConfig {
            grid_dim: ((n_out / 32) as u32, splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0, // static: the 8 warps' partial tiles
        };
        let f = self.get(&format!("skinny_gemm_{}", T::SUFFIX))?;
        let mut lb = s.launch_builder(f);
        lb.arg(x).arg(w);
        match bias {
            Some(b) => lb.arg(b),
            None => lb.arg(&null),
        };
        lb.arg(&mut *y);
        match ws.as_deref_mut() {
            Some(b) if need > 0 => lb.arg(b),
            _ => lb.arg(&null), // one piece: the kernel writes y and never touches ws
        };
        // SAFETY: sizes, plan and shape rules checked; order as in the signature.
        unsafe { lb.arg(&mi).arg(&ki).arg(&ni).arg(&kci).launch(cfg) }
            .map_err(|e| err("skinny_gemm", e))?;
        if need == 0 {
            return Ok(());
        }
        let Some(ws) = ws else {
            return Err(Error::Cuda("skinny_gemm: workspace missing".into()));
        };
        let quads = (rows * n_out / 4) as u32; // n_out is a multiple of 32
        let cfg = LaunchConfig {
            grid_dim: (quads.div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.get(&format!("skinny_reduce_{}", T::SUFFIX))?;
        let mut lb = s.launch_builder(f);
        lb.arg(&*ws);
        match bias {
            Some(b) => lb.arg(b),
            None => lb.arg(&null),
        };
        // SAFETY: ws holds splits·rows·n_out f32 written by the launch above (same stream); y
        // and bias checked above; order as in the signature.
        unsafe { lb.arg(y).arg(&mi).arg(&ni).arg(&si).launch(cfg) }
            .map(drop)
            .map_err(|e| err("skinny_reduce", e))
    }

    /// `bias_gelu_<T>(T* m, const float* b, long n, int F)` — m = gelu(m + b) over [tokens, F].
    pub fn bias_gelu<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        m: &mut CudaSlice<T>,
        b: &CudaSlice<f32>,
        tokens: usize,
    ) -> Result<()> {
        let f_dim = b.len();
        let n = tokens * f_dim;
        check(n > 0 && m.len() >= n, || {
            "bias_gelu: buffer too small".into()
        })?;
        let (ni, fi) = (n as i64, f_dim as i32);
        let f = self.get(&format!("bias_gelu_{}", T::SUFFIX))?;
        // SAFETY: n elements of m exist; b has F elements; order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(m)
                .arg(b)
                .arg(&ni)
                .arg(&fi)
                .launch(grid_stride(n.div_ceil(8))) // 8 elements per step (the kernel's header)
        }
        .map(drop)
        .map_err(|e| err("bias_gelu", e))
    }

    /// `final_norm_stats_<T>(const float* x, const T* y, float* stats, int H, float eps)` then
    /// `final_pool_<T>(const float* x, const T* y, const float* w, const float* b,
    ///  const int* cu_seqlens, const float* stats, float* out, int H)` — out[S, H], the
    /// weighted mean of LN_f(x + y) per sequence; `stats` [T, 2] is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn final_norm_pool<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        y: Option<&CudaSlice<T>>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        cu_seqlens: &CudaSlice<i32>,
        seqs: usize,
        tokens: usize,
        stats: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        check(
            seqs > 0 && tokens > 0 && cu_seqlens.len() > seqs && out.len() >= seqs * h,
            || "final_norm_pool: buffers too small".into(),
        )?;
        check(
            x.len() >= tokens * h
                && y.is_none_or(|y| y.len() >= tokens * h)
                && stats.len() >= 2 * tokens,
            || "final_norm_pool: inputs too small".into(),
        )?;
        check(w.len() == h && b.len() == h, || {
            "final_norm_pool: bad weight sizes".into()
        })?;
        check(h * 4 <= SMEM_LIMIT, || {
            format!("hidden size {h} exceeds the pooling kernel's shared memory")
        })?;
        let hi = h as i32;
        let null: u64 = 0;
        let stats_cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        let f = self.get(&format!("final_norm_stats_{}", T::SUFFIX))?;
        let mut lb = s.launch_builder(f);
        lb.arg(x);
        match y {
            Some(y) => lb.arg(y),
            None => lb.arg(&null),
        };
        // SAFETY: sizes checked; order as in the signature.
        unsafe { lb.arg(&mut *stats).arg(&hi).arg(&eps).launch(stats_cfg) }
            .map_err(|e| err("final_norm_stats", e))?;

        let pool_cfg = LaunchConfig {
            grid_dim: (seqs as u32, h.div_ceil(ROW_THREADS as usize) as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.get(&format!("final_pool_{}", T::SUFFIX))?;
        let mut lb = s.launch_builder(f);
        lb.arg(x);
        match y {
            Some(y) => lb.arg(y),
            None => lb.arg(&null),
        };
        // SAFETY: sizes checked; order as in the signature.
        unsafe {
            lb.arg(w)
                .arg(b)
                .arg(cu_seqlens)
                .arg(&*stats)
                .arg(out)
                .arg(&hi)
                .launch(pool_cfg)
        }
        .map(drop)
        .map_err(|e| err("final_pool", e))
    }

    // ---- `--row-kernels vec` (on trial: never run on a GPU) -----------------------------------

    /// `embedding_layernorm_vec<C>_<T>(const u32* ids, const T* emb, const float* we,
    ///  const float* be, const float* w1, const float* b1, float* x, T* a, int H, float eps)` —
    /// x[T, H] = LN_emb(emb[ids]) and a[T, H] = LN_1(x): the embedding layernorm with the first
    /// block's input layernorm fused in. H must suit [`vec_rows`].
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_layernorm_vec<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        ids: &CudaSlice<u32>,
        emb: Table<'_, T>,
        (we, be): (&CudaSlice<f32>, &CudaSlice<f32>),
        (w1, b1): (&CudaSlice<f32>, &CudaSlice<f32>),
        x: &mut CudaSlice<f32>,
        a: &mut CudaSlice<T>,
        tokens: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let (cfg, c) = vec_row_launch(tokens, h, "embedding_layernorm_vec")?;
        check(
            ids.len() >= tokens && x.len() >= tokens * h && a.len() >= tokens * h,
            || "embedding_layernorm_vec: buffers too small".into(),
        )?;
        check(
            [we, be, w1, b1].iter().all(|v| v.len() == h) && emb.len().is_multiple_of(h),
            || "embedding_layernorm_vec: bad weight sizes".into(),
        )?;
        check_aligned16(s, "embedding_layernorm_vec", &[&*a], &[we, be, w1, b1, &*x])?;
        check(emb.aligned16(s), || {
            "embedding_layernorm_vec: the table is not 16-byte aligned".into()
        })?;
        let name = format!("embedding_layernorm_vec{c}_{}", T::SUFFIX);
        let (hi, f) = (h as i32, self.get(&name)?);
        // SAFETY: sizes and alignment checked above (ids < V by PackedBatch::validate);
        // arguments in the order of the signature.
        unsafe {
            let mut l = s.launch_builder(f);
            l.arg(ids);
            emb.push(&mut l);
            l.arg(we)
                .arg(be)
                .arg(w1)
                .arg(b1)
                .arg(x)
                .arg(a)
                .arg(&hi)
                .arg(&eps)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("embedding_layernorm_vec", e))
    }

    /// `add_layernorm_vec<C>_<T>(float* x, const T* y, const float* w, const float* b, T* a,
    ///  int H, float eps)` — x += y, a = LN(x); rows = tokens. H must suit [`vec_rows`].
    #[allow(clippy::too_many_arguments)]
    pub fn add_layernorm_vec<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<T>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        a: &mut CudaSlice<T>,
        tokens: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let (cfg, c) = vec_row_launch(tokens, h, "add_layernorm_vec")?;
        let n = tokens * h;
        check(x.len() >= n && a.len() >= n && y.len() >= n, || {
            "add_layernorm_vec: buffers too small".into()
        })?;
        check(w.len() == h && b.len() == h, || {
            "add_layernorm_vec: bad weight sizes".into()
        })?;
        check_aligned16(s, "add_layernorm_vec", &[y, &*a], &[w, b, &*x])?;
        let (hi, f) = (
            h as i32,
            self.get(&format!("add_layernorm_vec{c}_{}", T::SUFFIX))?,
        );
        // SAFETY: sizes and alignment checked above; argument order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(x)
                .arg(y)
                .arg(w)
                .arg(b)
                .arg(a)
                .arg(&hi)
                .arg(&eps)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("add_layernorm_vec", e))
    }

    /// `bias_gelu_vec_<T>(T* m, const float* b, int F)` — m = gelu(m + b) in place, m [T, F],
    /// F = b.len() a multiple of 8.
    pub fn bias_gelu_vec<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        m: &mut CudaSlice<T>,
        b: &CudaSlice<f32>,
        tokens: usize,
    ) -> Result<()> {
        let f_dim = b.len();
        check(
            tokens > 0 && f_dim.is_multiple_of(8) && m.len() >= tokens * f_dim,
            || format!("bias_gelu_vec: {tokens} rows of {f_dim} (a multiple of 8) do not fit"),
        )?;
        check_aligned16(s, "bias_gelu_vec", &[&*m], &[b])?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(tokens, "bias_gelu_vec")?,
                (f_dim / 8).div_ceil(ROW_THREADS as usize) as u32,
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (fi, f) = (
            f_dim as i32,
            self.get(&format!("bias_gelu_vec_{}", T::SUFFIX))?,
        );
        // SAFETY: tokens·F elements of m exist, b has F; order as in the signature.
        unsafe { s.launch_builder(f).arg(m).arg(b).arg(&fi).launch(cfg) }
            .map(drop)
            .map_err(|e| err("bias_gelu_vec", e))
    }

    /// `final_norm_stats_vec<C>_<T>(const float* x, const T* y, float* stats, int H,
    ///  float eps)` then `final_pool_vec_<T>(const float* x, const T* y, const float* w,
    ///  const float* b, const int* cu_seqlens, const float* stats, float* out, int H)` — out[S,
    /// H], the weighted mean of LN_f(x + y) per sequence; `stats` [T, 2] is scratch. H must suit
    /// [`vec_rows`].
    #[allow(clippy::too_many_arguments)]
    pub fn final_norm_pool_vec<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        y: &CudaSlice<T>,
        (w, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        cu_seqlens: &CudaSlice<i32>,
        seqs: usize,
        tokens: usize,
        stats: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let (stats_cfg, c) = vec_row_launch(tokens, h, "final_norm_pool_vec")?;
        check(
            seqs > 0 && cu_seqlens.len() > seqs && out.len() >= seqs * h,
            || "final_norm_pool_vec: buffers too small".into(),
        )?;
        check(
            x.len() >= tokens * h && y.len() >= tokens * h && stats.len() >= 2 * tokens,
            || "final_norm_pool_vec: inputs too small".into(),
        )?;
        check(w.len() == h && b.len() == h, || {
            "final_norm_pool_vec: bad weight sizes".into()
        })?;
        check_aligned16(s, "final_norm_pool_vec", &[y], &[x])?;
        let hi = h as i32;
        let f = self.get(&format!("final_norm_stats_vec{c}_{}", T::SUFFIX))?;
        // SAFETY: sizes and alignment checked; order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(x)
                .arg(y)
                .arg(&mut *stats)
                .arg(&hi)
                .arg(&eps)
                .launch(stats_cfg)
        }
        .map_err(|e| err("final_norm_stats_vec", e))?;
        let pool_cfg = LaunchConfig {
            grid_dim: (
                grid_x(seqs, "final_pool_vec")?,
                h.div_ceil(256) as u32, // 32 threads × 8 columns per block
                1,
            ),
            block_dim: (32, 8, 1), // the kernel's header: 8 token lanes of 32 column chunks
            shared_mem_bytes: 0,
        };
        let f = self.get(&format!("final_pool_vec_{}", T::SUFFIX))?;
        // SAFETY: sizes checked; order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(x)
                .arg(y)
                .arg(w)
                .arg(b)
                .arg(cu_seqlens)
                .arg(&*stats)
                .arg(out)
                .arg(&hi)
                .launch(pool_cfg)
        }
        .map(drop)
        .map_err(|e| err("final_pool_vec", e))
    }

    /// `fp8_quantize_rows_<S>(const S* x, unsigned char* q, float* s, int n)` — each row r of
    /// x [rows, n] rounded to E4M3 codes q [rows, n] with its own scale s[r] = max(amax / 448,
    /// FLT_MIN): `fp8::quantize(x, n, ActScale::PerToken)` of the CPU emulation, bit for bit.
    pub fn fp8_quantize_rows<S: Fp8Source>(
        &self,
        s: &Arc<CudaStream>,
        x: &CudaSlice<S>,
        q: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        check(rows > 0 && n > 0, || {
            format!("fp8_quantize_rows: empty input ({rows} rows of {n})")
        })?;
        check(
            x.len() >= rows * n && q.len() >= rows * n && scales.len() >= rows,
            || format!("fp8_quantize_rows: buffers too small for {rows} rows of {n}"),
        )?;
        check(rows <= i32::MAX as usize && n <= i32::MAX as usize, || {
            format!("fp8_quantize_rows: {rows} rows of {n} is too large")
        })?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0, // static: block_max's scratch
        };
        let ni = n as i32;
        let f = self.get(S::QUANTIZE_KERNEL)?;
        // SAFETY: sizes checked above; order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(x)
                .arg(q)
                .arg(scales)
                .arg(&ni)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("fp8_quantize_rows", e))
    }

    /// `fp8_gelu_quantize_rowsC(const float* acc, float* sx, const float* sw, const float* b1,
    ///  unsigned char* q, int F)` — per row: m = gelu(acc·(sx·sw) + b1) in f32, then q = its
    /// E4M3 codes and sx overwritten with its scale (FC1's epilogue, GELU and FC2's input
    /// quantization in one pass). F must suit [`fp8_gelu_rows`].
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_gelu_quantize_rows(
        &self,
        s: &Arc<CudaStream>,
        acc: &CudaSlice<f32>,
        sx: &mut CudaSlice<f32>,
        (sw, b1): (&CudaSlice<f32>, &CudaSlice<f32>),
        q: &mut CudaSlice<u8>,
        tokens: usize,
        f: usize,
    ) -> Result<()> {
        let what = "fp8_gelu_quantize_rows";
        let (c, threads) = fp8_gelu_rows(f).ok_or_else(|| {
            Error::Cuda(format!(
                "{what}: width {f} is not a multiple of 8 of at most 16384"
            ))
        })?;
        let n = tokens * f;
        check(
            acc.len() >= n && q.len() >= n && sx.len() >= tokens && sw.len() == f && b1.len() == f,
            || format!("{what}: buffer sizes do not fit {tokens} rows of {f}"),
        )?;
        // sx is read and written by element: no alignment needed
        check_aligned16(s, what, &[acc, sw, b1], &[] as &[&CudaSlice<f32>])?;
        check(aligned(s, q, 8), || {
            format!("{what}: q is not 8-byte aligned")
        })?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x(tokens, what)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (fi, func) = (f as i32, self.get(&format!("{what}{c}"))?);
        // SAFETY: sizes and alignment checked above; argument order as in the signature.
        unsafe {
            s.launch_builder(func)
                .arg(acc)
                .arg(sx)
                .arg(sw)
                .arg(b1)
                .arg(q)
                .arg(&fi)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err(what, e))
    }

    /// `fp8_epilogue_<T>(const float* acc, const float* sx, const float* sw, const float* b,
    ///  T* y, int rows, int N)` — y[t, o] = acc[t, o]·(sx[t]·sw[o]) + b[o] in f32, rounded to T:
    /// the scales and bias of an FP8 GEMM whose unscaled sums `acc` [rows, N] cuBLASLt wrote
    /// (`Gemm::fp8_product`). N must be a multiple of 4; acc, sw, b 16-byte and y 8-byte
    /// aligned (whole allocations are).
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_epilogue<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        acc: &CudaSlice<f32>,
        sx: &CudaSlice<f32>,
        sw: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<T>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        check(rows > 0 && n > 0 && n.is_multiple_of(4), || {
            format!("fp8_epilogue: {rows} rows of {n} (a positive multiple of 4)")
        })?;
        check(
            acc.len() >= rows * n
                && sx.len() >= rows
                && sw.len() == n
                && b.is_none_or(|b| b.len() == n)
                && y.len() >= rows * n,
            || format!("fp8_epilogue: buffer sizes do not fit {rows} rows of {n}"),
        )?;
        check(n <= i32::MAX as usize && rows <= i32::MAX as usize, || {
            format!("fp8_epilogue: {rows} rows of {n} is too large")
        })?;
        check(
            aligned(s, acc, 16)
                && aligned(s, sw, 16)
                && b.is_none_or(|b| aligned(s, b, 16))
                && aligned(s, y, 8),
            || "fp8_epilogue: misaligned buffer (acc, sw, b need 16 bytes, y 8)".into(),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                (n / 4).div_ceil(ROW_THREADS as usize) as u32,
                rows.min(65535) as u32,
                1,
            ),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, ni) = (rows as i32, n as i32);
        let null: u64 = 0;
        let f = self.get(&format!("fp8_epilogue_{}", T::SUFFIX))?;
        let mut lb = s.launch_builder(f);
        lb.arg(acc).arg(sx).arg(sw);
        match b {
            Some(b) => lb.arg(b),
            None => lb.arg(&null), // a null `const float*`: no bias
        };
        // SAFETY: sizes and alignment checked above; order as in the signature.
        unsafe { lb.arg(y).arg(&ri).arg(&ni).launch(cfg) }
            .map(drop)
            .map_err(|e| err("fp8_epilogue", e))
    }

    /// `fp8_epilogue_add_layernorm<C>_<T>(float* x, const float* acc, const float* sx,
    ///  const float* sw, const float* b, const float* w_ln, const float* b_ln, T* a, int H,
    ///  float eps)` — x += acc·(sx·sw) + b in f32, then a = LN(x): an FP8 linear layer's epilogue
    /// fused into the residual add + layernorm after it. H must suit [`vec_rows`].
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_epilogue_add_layernorm<T: Act>(
        &self,
        s: &Arc<CudaStream>,
        x: &mut CudaSlice<f32>,
        (acc, sx): (&CudaSlice<f32>, &CudaSlice<f32>),
        (sw, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        (w_ln, b_ln): (&CudaSlice<f32>, &CudaSlice<f32>),
        a: &mut CudaSlice<T>,
        tokens: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let what = "fp8_epilogue_add_layernorm";
        let (cfg, c) = vec_row_launch(tokens, h, what)?;
        let n = tokens * h;
        check(
            x.len() >= n && acc.len() >= n && sx.len() >= tokens && a.len() >= n,
            || format!("{what}: buffers too small"),
        )?;
        check([sw, b, w_ln, b_ln].iter().all(|v| v.len() == h), || {
            format!("{what}: bad weight sizes")
        })?;
        check_aligned16(s, what, &[&*a], &[acc, sw, b, w_ln, b_ln, &*x])?;
        let (hi, f) = (h as i32, self.get(&format!("{what}{c}_{}", T::SUFFIX))?);
        // SAFETY: sizes and alignment checked above; argument order as in the signature.
        unsafe {
            s.launch_builder(f)
                .arg(x)
                .arg(acc)
                .arg(sx)
                .arg(sw)
                .arg(b)
                .arg(w_ln)
                .arg(b_ln)
                .arg(a)
                .arg(&hi)
                .arg(&eps)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err(what, e))
    }

    /// `convert_<src>_<dst>(const S* src, D* dst, long n)` — element type conversion of `n`
    /// elements; `src_name`/`dst_name` ∈ {f32, f16, bf16}, different.
    pub fn convert<S, D>(
        &self,
        s: &Arc<CudaStream>,
        src: &S,
        src_name: &str,
        dst: &mut D,
        dst_name: &str,
        n: usize,
    ) -> Result<()>
    where
        S: DevicePtr<u8>,
        D: DevicePtrMut<u8>,
    {
        let size = |t: &str| if t == "f32" { 4 } else { 2 };
        check(src_name != dst_name, || "convert: same type".into())?;
        check(
            src.len() >= n * size(src_name) && dst.len() >= n * size(dst_name),
            || "convert: buffers too small".into(),
        )?;
        if n == 0 {
            return Ok(());
        }
        let ni = n as i64;
        let f = self.get(&format!("convert_{src_name}_{dst_name}"))?;
        // SAFETY: both buffers hold n elements of their types (checked in bytes); order as in
        // the signature. Raw byte buffers are passed as the typed pointers the kernel expects.
        let (sp, _g1) = src.device_ptr(s);
        let (dp, _g2) = dst.device_ptr_mut(s);
        unsafe {
            s.launch_builder(f)
                .arg(&sp)
                .arg(&dp)
                .arg(&ni)
                .launch(grid_stride(n))
        }
        .map(drop)
        .map_err(|e| err("convert", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vec row kernels' blocks: every chunk of 8 owned by exactly one (thread, step), whole
    /// warps, ≤ 256 threads, the fewest steps; sizes they cannot take are None.
    #[test]
    fn vec_rows_cover_each_chunk_once() {
        for h in (8..=8192).step_by(8) {
            let (c, threads) = vec_rows(h).unwrap();
            let (chunks, nt) = (h / 8, threads as usize);
            assert!(
                nt.is_multiple_of(32) && nt <= 256 && [1, 2, 4].contains(&c),
                "{h}"
            );
            assert!(
                c == 1 || chunks.div_ceil(c / 2) > 256,
                "H {h}: fewer steps would do"
            );
            // thread i, step k owns chunk k·NT + i: the kernels' chunk_start / 8
            let mut owned = vec![0u8; chunks];
            for k in 0..c {
                for i in 0..nt {
                    if let Some(o) = owned.get_mut(k * nt + i) {
                        *o += 1;
                    }
                }
            }
            assert!(owned.iter().all(|&o| o == 1), "H {h}: C {c}, {nt} threads");
        }
        for h in [0, 4, 33, 1025, 8200, 16384, 1 << 20] {
            assert_eq!(vec_rows(h), None, "{h}");
        }
        assert_eq!(vec_rows(4096), Some((2, 256))); // bloom-7b1

        // the FP8 MLP's fused GELU takes 8 chunks: bloom-7b1's F = 16384 and no wider
        assert_eq!(fp8_gelu_rows(16384), Some((8, 256)));
        assert_eq!(fp8_gelu_rows(4 * 1024), Some((2, 256)));
        assert_eq!(fp8_gelu_rows(16392), None);
        assert_eq!(vec_rows(1024), Some((1, 128))); // bloom-560m
    }

    /// Version 4's grid bounds its true tile count for every batch (a block too few would leave
    /// a tile of queries unwritten), and is exact for a batch of equal lengths.
    #[test]
    fn mma2_grid_covers_every_tile() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % m as u64) as usize
        };
        for _ in 0..2000 {
            let seqs = 1 + next(80);
            let lens: Vec<usize> = (0..seqs).map(|_| 1 + next(600)).collect();
            let (tokens, longest) = (lens.iter().sum(), *lens.iter().max().unwrap());
            let mut cu = vec![0i32];
            for &n in &lens {
                cu.push(cu.last().unwrap() + n as i32);
            }
            for rows in [64, 128] {
                let tiles: usize = lens.iter().map(|n| n.div_ceil(rows)).sum();
                let blocks = attention_mma2_blocks(tokens, seqs, longest, rows);
                assert!(blocks >= tiles, "{lens:?} rows {rows}: {blocks} < {tiles}");
                // the map: every query tile once, most keys first, then zero padding
                let plan = attention_mma2_tiles(&cu, Some(rows));
                assert_eq!((plan.rows, plan.blocks), (rows, blocks));
                assert_eq!(plan.map.len(), 4 * blocks);
                let (work, pad) = plan.map.split_at(4 * tiles);
                assert!(pad.iter().all(|&v| v == 0));
                let mut seen: Vec<(i32, i32)> = Vec::new();
                let mut keys_before = i32::MAX;
                for e in work.chunks(4) {
                    let s = cu.iter().position(|&c| c == e[0]).unwrap();
                    assert_eq!(e[1], cu[s + 1] - cu[s], "{e:?}");
                    assert!(
                        e[2] < e[1] && (e[2] as usize).is_multiple_of(rows) && e[3] == 0,
                        "{e:?}"
                    );
                    let keys = e[1].min(e[2] + rows as i32);
                    assert!(keys <= keys_before, "not longest-first: {e:?}");
                    keys_before = keys;
                    seen.push((e[0], e[2]));
                }
                let mut want: Vec<(i32, i32)> = (0..seqs)
                    .flat_map(|s| (0..lens[s]).step_by(rows).map(move |q| (s, q)))
                    .map(|(s, q)| (cu[s], q as i32))
                    .collect();
                seen.sort();
                want.sort();
                assert_eq!(seen, want);
            }
            let rule = attention_mma2_tiles(&cu, None).rows;
            assert_eq!(rule, attention_mma2_rows(longest));
        }
        for (seqs, len) in [(64, 80), (16, 300), (1, 12), (3, 128)] {
            for rows in [64, 128] {
                let blocks = attention_mma2_blocks(seqs * len, seqs, len, rows);
                assert_eq!(
                    blocks,
                    seqs * len.div_ceil(rows),
                    "{seqs} × {len}, rows {rows}"
                );
            }
        }
        assert_eq!(attention_mma2_rows(191), 64);
        assert_eq!(attention_mma2_rows(192), 128);
        assert_eq!(attention_mma2_smem(128, 128), 52_224);
        assert_eq!(attention_mma2_smem(128, 64), 52_224);
        assert_eq!(attention_mma2_smem(64, 64), 27_648);
    }

    #[test]
    fn skinny_split_rule() {
        let plan = |k, s| SkinnyPlan {
            k_per_split: k,
            splits: s,
        };
        // bloom-7b1 on an H200 (132 SMs): QKV and fc1 have ≥ 264 column blocks, no split;
        // dense and fc2 (128 column blocks) get 3 pieces, the last one shorter.
        assert_eq!(skinny_plan(4096, 12288, 132), plan(4096, 1));
        assert_eq!(skinny_plan(4096, 16384, 132), plan(4096, 1));
        assert_eq!(skinny_plan(4096, 4096, 132), plan(1536, 3));
        assert_eq!(skinny_plan(16384, 4096, 132), plan(5632, 3));
        // bloom-560m: only fc2 (4096 → 1024) has the 16 rounds for a split (4 of 1024).
        assert_eq!(skinny_plan(1024, 3072, 132), plan(1024, 1));
        assert_eq!(skinny_plan(1024, 1024, 132), plan(1024, 1));
        assert_eq!(skinny_plan(4096, 1024, 132), plan(1024, 4));
        // an A100 (108 SMs): 216 blocks wanted
        assert_eq!(skinny_plan(4096, 4096, 108), plan(2048, 2));
        // a K that is no multiple of 256 and a tiny N
        assert_eq!(skinny_plan(2080, 64, 132), plan(1280, 2));
        for n_in in (32..20000).step_by(32 * 7) {
            for n_out in [32, 64, 1024, 4096, 12288] {
                for sms in [1, 16, 108, 132, 200] {
                    let p = skinny_plan(n_in, n_out, sms);
                    // the pieces cover K, none is empty, and the count is bounded
                    assert!(p.k_per_split.is_multiple_of(256) && p.k_per_split > 0);
                    assert_eq!(p.splits, n_in.div_ceil(p.k_per_split));
                    assert!((p.splits - 1) * p.k_per_split < n_in);
                    assert!((1..=SKINNY_MAX_SPLITS).contains(&p.splits));
                    assert!(p.splits == 1 || p.k_per_split >= 1024);
                    assert_eq!(p.workspace_len(12, n_out) > 0, p.splits > 1);
                }
            }
        }
    }
}
