//! How an engine is built: which device, which GPU type and kernels, how large a batch, and
//! the one function that turns those options and a checkpoint into a [`Backend`].

use crate::backend::cpu::fp8::{ActScale, Fp8Blocks};
use crate::backend::cpu::CpuModel;
use crate::backend::cuda::device::GpuDtype;
use crate::backend::cuda::model::WeightFormat;
use crate::backend::replicas::Replicas;
use crate::backend::{Backend, KernelChoices, LoadProgress};
use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::weights::Checkpoint;

/// Which engine runs the forward: `auto`, `cpu`, `cuda`, `cuda:N`, or one replica per GPU
/// with `cuda:all` or `cuda:0,2` (a list may name a device twice: two replicas on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU (with a notice saying why).
    Auto,
    /// The multi-threaded CPU backend (always available).
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// One replica on every CUDA device of the machine.
    CudaAll,
    /// One replica on each listed CUDA device (at least two entries).
    CudaList(DeviceList),
}

/// The ordinals of `cuda:0,2`, in order (kept in a fixed array so options stay `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceList {
    ids: [u8; DeviceList::MAX],
    len: u8,
}

impl DeviceList {
    /// Most entries in a list.
    pub const MAX: usize = 16;

    pub fn ordinals(&self) -> Vec<usize> {
        self.ids[..self.len as usize]
            .iter()
            .map(|&o| o as usize)
            .collect()
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let unknown = || {
            format!(
                "unknown device {s:?}: expected auto, cpu, cuda, cuda:N, cuda:all or a list such \
                 as cuda:0,2"
            )
        };
        match s {
            "auto" => return Ok(Device::Auto),
            "cpu" => return Ok(Device::Cpu),
            "cuda" => return Ok(Device::Cuda(0)),
            "cuda:all" => return Ok(Device::CudaAll),
            _ => {}
        }
        let list = s.strip_prefix("cuda:").ok_or_else(unknown)?;
        let ordinals: Vec<usize> = list
            .split(',')
            .map(|n| match n.bytes().all(|c| c.is_ascii_digit()) {
                true => n.parse::<usize>().map_err(|_| unknown()),
                false => Err(unknown()),
            })
            .collect::<std::result::Result<_, _>>()?;
        match ordinals[..] {
            [n] => Ok(Device::Cuda(n)),
            _ if ordinals.len() > DeviceList::MAX => Err(format!(
                "{s:?}: at most {} devices in a list",
                DeviceList::MAX
            )),
            _ => {
                let mut ids = [0u8; DeviceList::MAX];
                for (slot, &o) in ids.iter_mut().zip(&ordinals) {
                    *slot = u8::try_from(o).map_err(|_| unknown())?;
                }
                Ok(Device::CudaList(DeviceList {
                    ids,
                    len: ordinals.len() as u8,
                }))
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaAll => write!(f, "cuda:all"),
            Device::CudaList(l) => {
                let ids: Vec<String> = l.ordinals().iter().map(usize::to_string).collect();
                write!(f, "cuda:{}", ids.join(","))
            }
        }
    }
}

impl Device {
    /// Fails at once, naming the device, when an explicitly asked-for GPU cannot be used
    /// (cheap: no context is created), so a command can check before any expensive work.
    pub fn check_available(&self) -> Result<()> {
        if let Device::Cuda(n) = self {
            if let Some(why) = crate::backend::cuda::device::unavailable_reason(*n) {
                return Err(Error::DeviceUnavailable(format!(
                    "--device cuda:{n}: {why}"
                )));
            }
        }
        self.replica_ordinals().map(drop)
    }

    /// The CUDA ordinals of one replica each, for `cuda:all` and lists; None otherwise. An
    /// error names the device asked for when a GPU is missing.
    pub fn replica_ordinals(&self) -> Result<Option<Vec<usize>>> {
        use crate::backend::cuda::device::unavailable_reason;
        let ordinals = match self {
            Device::CudaAll => {
                if let Some(why) = unavailable_reason(0) {
                    return Err(Error::DeviceUnavailable(format!("--device {self}: {why}")));
                }
                let n = cudarc::driver::CudaContext::device_count()
                    .map_err(|e| Error::Cuda(format!("counting CUDA devices: {e:?}")))?;
                (0..n.max(0) as usize).collect()
            }
            Device::CudaList(l) => l.ordinals(),
            _ => return Ok(None),
        };
        for &o in &ordinals {
            if let Some(why) = unavailable_reason(o) {
                return Err(Error::DeviceUnavailable(format!(
                    "--device {self}: cuda:{o}: {why}"
                )));
            }
        }
        Ok(Some(ordinals))
    }
}

/// How to build the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub device: Device,
    /// Activation/weight type on the GPU, f16 when None; fp8: the four linear layers of each
    /// block in E4M3 with f16 activations (compute capability ≥ 8.9, docs/fp8.md), fp8-alternate
    /// the same in every other block. The CPU computes in f32, or runs the FP8 emulation when
    /// asked for fp8 or fp8-alternate; asking it for f16 or bf16 is an error.
    pub dtype: Option<GpuDtype>,
    /// Most tokens in one packed batch; None: the backend's default.
    pub max_batch_tokens: Option<usize>,
    /// GPU kernel choices and where the GPU keeps the embedding table (the CPU has one
    /// implementation of each op).
    pub kernels: KernelChoices,
}

impl EngineOptions {
    /// Every check of the options on their own, with the messages the CLI and the Python
    /// package share: run by [`build_backend`].
    pub fn check(&self) -> Result<()> {
        if self.max_batch_tokens == Some(0) {
            return Err(Error::Input(
                "max_batch_tokens (--max-batch-tokens) must be positive".into(),
            ));
        }
        if self.device == Device::Cpu && matches!(self.dtype, Some(GpuDtype::F16 | GpuDtype::Bf16))
        {
            // The message is pinned by tests/cli.rs; --help names the fp8 exception.
            return Err(Error::Input(
                "the dtype (--dtype) chooses the GPU's type; the CPU backend always computes in f32"
                    .into(),
            ));
        }
        if self.device == Device::Cpu && self.kernels != KernelChoices::default() {
            return Err(Error::Input(format!(
                "GPU kernel choices ({}) were given with --device cpu: the CPU backend has one \
                 implementation of each op",
                self.kernels
            )));
        }
        Ok(())
    }
}

/// Most CPU threads an engine may be given: 4 × the cores (at least 4); thousands of threads
/// take minutes to start and only slow the GEMMs down. Returns (most, cores).
pub fn max_threads() -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    ((4 * cores).max(4), cores)
}

/// Refuses a thread count of 0 or over [`max_threads`].
pub fn check_threads(n: usize) -> Result<()> {
    let (max, cores) = max_threads();
    if n == 0 || n > max {
        return Err(Error::Input(format!(
            "threads (--threads) must be between 1 and {max} (4 × the {cores} cores here)"
        )));
    }
    Ok(())
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Auto,
            dtype: None,
            max_batch_tokens: None,
            kernels: KernelChoices::default(),
        }
    }
}

/// How replica `k` of the list `ordinals` is named in /info, /metrics and messages: `cuda:N`,
/// or `cuda:N#j` for the j-th replica on a device listed more than once.
pub fn replica_label(ordinals: &[usize], k: usize) -> String {
    let o = ordinals[k];
    if ordinals.iter().filter(|&&x| x == o).count() == 1 {
        return format!("cuda:{o}");
    }
    let j = ordinals[..=k].iter().filter(|&&x| x == o).count();
    format!("cuda:{o}#{j}")
}

/// Default token budget of one packed batch on the CPU: large enough that GEMMs run near peak,
/// small enough that activations stay in a few tens of MB at bloom-560m size.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// On the GPU: enough rows to keep the tensor cores busy (GEMMs are compute-bound above
/// ≈ 270 tokens, docs/semantics.md) while activations stay ≈ 1.5 GB at bloom-7b1 size.
pub const DEFAULT_GPU_MAX_BATCH_TOKENS: usize = 16384;

/// A backend with its batch budget, and the notice `--device auto` leaves when it falls back.
pub struct BuiltBackend {
    pub backend: Box<dyn Backend>,
    pub max_batch_tokens: usize,
    pub notice: Option<String>,
}

/// A checkpoint written by `sgpt quantize` runs as the dtype it was written for: that dtype when
/// none was asked for, the error naming it when another was.
fn with_stored_fp8(
    ckpt: &Checkpoint,
    cfg: &BloomConfig,
    mut opts: EngineOptions,
) -> Result<EngineOptions> {
    if let Some(b) = crate::backend::cpu::fp8::stored_blocks(ckpt, cfg)? {
        match opts.dtype {
            None => {
                opts.dtype = Some(match b {
                    Fp8Blocks::All => GpuDtype::Fp8,
                    Fp8Blocks::Alternate => GpuDtype::Fp8Alternate,
                })
            }
            Some(d) if d.fp8_blocks() == Some(b) => {}
            Some(_) => return Err(crate::backend::cpu::fp8::stored_fp8_needs(&ckpt.dir, b)),
        }
    }
    Ok(opts)
}

/// Builds the backend `opts` asks for over a checkpoint (from a model directory or random
/// weights); `max_seq_length` bounds the longest single sequence the GPU buffers must hold;
/// `progress` is called after each block is loaded.
pub fn build_backend(
    ckpt: &Checkpoint,
    cfg: &BloomConfig,
    opts: EngineOptions,
    max_seq_length: usize,
    progress: LoadProgress,
) -> Result<BuiltBackend> {
    let gpu = match opts.device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
        // Replicas: each device of the list is opened below.
        Device::CudaAll | Device::CudaList(_) => Some(0),
        Device::Auto => crate::backend::cuda::device::unavailable_reason(0)
            .is_none()
            .then_some(0),
    };
    opts.check()?;
    let opts = with_stored_fp8(ckpt, cfg, opts)?;
    let fp8 = opts.dtype.and_then(GpuDtype::fp8_blocks);
    // GPU-only options given with `auto` that fell back are named, not silently dropped (fp8
    // and fp8-alternate are not: the CPU emulates them).
    let mut ignored = Vec::new();
    if let Some(d) = opts.dtype.filter(|_| fp8.is_none()) {
        ignored.push(format!("--dtype {}", d.name()));
    }
    if opts.kernels != KernelChoices::default() {
        ignored.push(format!("the GPU kernel choices ({})", opts.kernels));
    }
    let notice = match opts.device {
        Device::Auto if gpu.is_none() => {
            crate::backend::cuda::device::unavailable_reason(0).map(|why| {
                let ignored = match ignored.is_empty() {
                    true => String::new(),
                    false => format!("; ignoring the GPU-only {}", ignored.join(" and ")),
                };
                let emulated = match opts.dtype.filter(|_| fp8.is_some()) {
                    Some(d) => format!("; {} runs as the CPU emulation", d.name()),
                    None => String::new(),
                };
                format!("using the CPU: {why}{ignored}{emulated}")
            })
        }
        _ => None,
    };
    let Some(ordinal) = gpu else {
        let model = match fp8 {
            Some(blocks) => CpuModel::load_fp8(ckpt, cfg, ActScale::PerToken, blocks, progress)?,
            None => CpuModel::load_reporting(ckpt, cfg, progress)?,
        };
        return Ok(BuiltBackend {
            backend: Box::new(model),
            max_batch_tokens: opts.max_batch_tokens.unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
            notice,
        });
    };
    // Buffers must hold the longest single sequence even under a small budget.
    let budget = opts
        .max_batch_tokens
        .unwrap_or(DEFAULT_GPU_MAX_BATCH_TOKENS)
        .max(max_seq_length);
    fn load<T: crate::backend::cuda::ops::Act>(
        ctx: std::sync::Arc<cudarc::driver::CudaContext>,
        ckpt: &Checkpoint,
        cfg: &BloomConfig,
        budget: usize,
        (kernels, format): (KernelChoices, WeightFormat),
        progress: LoadProgress,
    ) -> Result<Box<dyn Backend>> {
        let m = crate::backend::cuda::model::CudaModel::<T>::load(
            ctx, ckpt, cfg, budget, kernels, format, progress,
        )?;
        Ok(Box::new(m))
    }
    // One replica per listed device (`cuda:all`, `cuda:0,2`), or the one device.
    let ordinals = opts.device.replica_ordinals()?.unwrap_or(vec![ordinal]);
    let n = ordinals.len();
    let mut members = Vec::with_capacity(n);
    for (k, &o) in ordinals.iter().enumerate() {
        let ctx = crate::backend::cuda::device::open(o)?;
        let step = |done: usize, all: usize| progress(k * all + done, n * all);
        // The linear layers in T, or FP8 GEMMs (in every block or every other one) with f16
        // activations: refused with the reason on a device that cannot run them (compute
        // capability < 8.9), never emulated there.
        let (kc, format) = (
            opts.kernels,
            fp8.map_or(WeightFormat::Half, WeightFormat::Fp8),
        );
        let backend = match opts.dtype.unwrap_or(GpuDtype::F16) {
            GpuDtype::Bf16 => load::<half::bf16>(ctx, ckpt, cfg, budget, (kc, format), &step)?,
            GpuDtype::F16 | GpuDtype::Fp8 | GpuDtype::Fp8Alternate => {
                load::<half::f16>(ctx, ckpt, cfg, budget, (kc, format), &step)?
            }
        };
        members.push((replica_label(&ordinals, k), backend));
    }
    let backend: Box<dyn Backend> = match opts.device {
        Device::CudaAll | Device::CudaList(_) => Box::new(Replicas::new(members)?),
        _ => members.pop().map(|(_, b)| b).ok_or_else(|| {
            Error::DeviceUnavailable(format!("--device {}: no CUDA device", opts.device))
        })?,
    };
    Ok(BuiltBackend {
        backend,
        max_batch_tokens: budget,
        notice,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(device: &str, dtype: Option<GpuDtype>) -> EngineOptions {
        EngineOptions {
            device: device.parse().unwrap(),
            dtype,
            ..EngineOptions::default()
        }
    }

    /// `--dtype fp8` and `fp8-alternate` pass the option checks on every device: the CPU
    /// emulates them, a GPU runs them (or says at load why it cannot: compute capability <
    /// 8.9). f16/bf16 with the CPU stay refused.
    #[test]
    fn fp8_is_accepted_on_every_device() {
        for dev in ["auto", "cpu", "cuda", "cuda:1", "cuda:all", "cuda:0,1"] {
            for dt in [GpuDtype::Fp8, GpuDtype::Fp8Alternate] {
                assert!(opts(dev, Some(dt)).check().is_ok(), "{dev} {dt:?}");
            }
        }
        for dt in [GpuDtype::F16, GpuDtype::Bf16] {
            let e = opts("cpu", Some(dt)).check().unwrap_err().to_string();
            assert!(e.contains("the CPU backend always computes in f32"), "{e}");
        }
    }
}
