//! A model directory opened as a whole: configuration, tokenizer, mapped weights, and the
//! backend that turns packed batches into embeddings.

use std::path::{Path, PathBuf};

use crate::batch::{plan_batches, PackedBatch};
use crate::config::{BloomConfig, SentenceConfig};
use crate::cpu::pooling::l2_normalize;
use crate::cpu::CpuModel;
use crate::cuda::device::GpuDtype;
use crate::error::{Error, Result};
use crate::tokenize::{Encoded, Kind, SpecbTokenizer};
use crate::weights::Checkpoint;

pub use crate::backend::{Backend, BackendInfo, KernelChoices};

/// Which engine runs the forward: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU (with a notice saying why).
    Auto,
    /// The multi-threaded CPU backend (always available).
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How to build the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub device: Device,
    /// Activation/weight type on the GPU (the CPU always computes in f32).
    pub dtype: GpuDtype,
    /// Most tokens in one packed batch; None: the backend's default.
    pub max_batch_tokens: Option<usize>,
    /// GPU kernel choices (the CPU has one implementation of each op).
    pub kernels: KernelChoices,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Auto,
            dtype: GpuDtype::F16,
            max_batch_tokens: None,
            kernels: KernelChoices::default(),
        }
    }
}

/// Everything read from a model directory.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: BloomConfig,
    pub sentence: SentenceConfig,
    pub tokenizer: SpecbTokenizer,
    pub checkpoint: Checkpoint,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let why = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => None,
            Ok(_) => Some("not a directory: give the model's directory, not a file in it"),
            Err(_) => Some("model directory not found"),
        };
        if let Some(why) = why {
            return Err(Error::io(dir, std::io::Error::other(why)));
        }
        let config = BloomConfig::from_file(&dir.join("config.json"))?;
        let sentence = SentenceConfig::from_dir(dir, config.hidden)?;
        let tokenizer = SpecbTokenizer::from_file(
            &dir.join("tokenizer.json"),
            sentence.max_seq_length,
            config.vocab,
        )?;
        let checkpoint = Checkpoint::open(dir)?;
        crate::schema::check(&checkpoint, &config)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            sentence,
            tokenizer,
            checkpoint,
        })
    }
}

/// A backend with its batch budget, and the notice `--device auto` leaves when it falls back.
pub struct BuiltBackend {
    pub backend: Box<dyn Backend>,
    pub max_batch_tokens: usize,
    pub notice: Option<String>,
    /// The GPU ordinal in use, if any.
    pub gpu: Option<usize>,
}

/// Builds the backend `opts` asks for over a checkpoint (from a model directory or random
/// weights); `max_seq_length` bounds the longest single sequence the GPU buffers must hold.
pub fn build_backend(
    ckpt: &Checkpoint,
    cfg: &BloomConfig,
    opts: EngineOptions,
    max_seq_length: usize,
) -> Result<BuiltBackend> {
    let gpu = match opts.device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
        Device::Auto => crate::cuda::device::unavailable_reason(0)
            .is_none()
            .then_some(0),
    };
    let gpu_only = opts.kernels != KernelChoices::default();
    if opts.device == Device::Cpu && gpu_only {
        return Err(Error::Input(format!(
            "GPU kernel choices ({}) were given with --device cpu: the CPU backend has one \
             implementation of each op",
            opts.kernels
        )));
    }
    let notice = match opts.device {
        Device::Auto if gpu.is_none() => crate::cuda::device::unavailable_reason(0).map(|why| {
            let ignored = if gpu_only {
                "; the GPU kernel choices do not apply"
            } else {
                ""
            };
            format!("using the CPU: {why}{ignored}")
        }),
        _ => None,
    };
    let Some(ordinal) = gpu else {
        return Ok(BuiltBackend {
            backend: Box::new(CpuModel::load(ckpt, cfg)?),
            max_batch_tokens: opts.max_batch_tokens.unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
            notice,
            gpu: None,
        });
    };
    // Buffers must hold the longest single sequence even under a small budget.
    let budget = opts
        .max_batch_tokens
        .unwrap_or(DEFAULT_GPU_MAX_BATCH_TOKENS)
        .max(max_seq_length);
    let ctx = crate::cuda::device::open(ordinal)?;
    let backend: Box<dyn Backend> = match opts.dtype {
        GpuDtype::F16 => Box::new(crate::cuda::model::CudaModel::<half::f16>::load(
            ctx,
            ckpt,
            cfg,
            budget,
            opts.kernels,
        )?),
        GpuDtype::Bf16 => Box::new(crate::cuda::model::CudaModel::<half::bf16>::load(
            ctx,
            ckpt,
            cfg,
            budget,
            opts.kernels,
        )?),
    };
    Ok(BuiltBackend {
        backend,
        max_batch_tokens: budget,
        notice,
        gpu: Some(ordinal),
    })
}

/// Fails with [`Error::NonFinite`] if any row of `out` ([S, hidden]) holds NaN or Inf.
pub fn check_finite(out: &[f32], hidden: usize) -> Result<()> {
    let bad: Vec<usize> = out
        .chunks(hidden.max(1))
        .enumerate()
        .filter(|(_, row)| row.iter().any(|v| !v.is_finite()))
        .map(|(s, _)| s)
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::NonFinite { seqs: bad })
    }
}

/// Shifts the sequence indices of an [`Error::NonFinite`] by `start`.
fn offset_non_finite(e: Error, start: usize) -> Error {
    match e {
        Error::NonFinite { seqs } => Error::NonFinite {
            seqs: seqs.iter().map(|s| start + s).collect(),
        },
        e => e,
    }
}

/// Tokenizer + backend: texts in, embeddings out.
pub struct Embedder {
    pub model: ModelDir,
    pub backend: Box<dyn Backend>,
    /// Most tokens in one packed batch.
    pub max_batch_tokens: usize,
    /// Set when `--device auto` fell back to the CPU: the reason, for the operator.
    pub notice: Option<String>,
    /// The GPU the backend runs on, if any (other GPU work, e.g. `sgpt eval`'s search, follows).
    pub gpu: Option<usize>,
}

/// Default token budget of one packed batch on the CPU: large enough that GEMMs run near peak,
/// small enough that activations stay in a few tens of MB at bloom-560m size.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// On the GPU: enough rows to keep the tensor cores busy (GEMMs are compute-bound above
/// ≈ 270 tokens, docs/semantics.md) while activations stay ≈ 1.5 GB at bloom-7b1 size.
pub const DEFAULT_GPU_MAX_BATCH_TOKENS: usize = 16384;

impl Embedder {
    /// Opens `dir` for `device` with default options.
    pub fn open(dir: &Path, device: Device) -> Result<Self> {
        Self::open_with(
            dir,
            EngineOptions {
                device,
                ..EngineOptions::default()
            },
        )
    }

    /// Opens `dir` and builds the backend the options ask for.
    pub fn open_with(dir: &Path, opts: EngineOptions) -> Result<Self> {
        let model = ModelDir::open(dir)?;
        let built = build_backend(
            &model.checkpoint,
            &model.config,
            opts,
            model.sentence.max_seq_length,
        )?;
        Ok(Embedder {
            model,
            backend: built.backend,
            max_batch_tokens: built.max_batch_tokens,
            notice: built.notice,
            gpu: built.gpu,
        })
    }

    pub fn hidden(&self) -> usize {
        self.model.config.hidden
    }

    /// Tokenizes in parallel; order kept.
    pub fn encode(&self, texts: &[(String, Kind)]) -> Result<Vec<Encoded>> {
        use rayon::prelude::*;
        texts
            .par_iter()
            .map(|(t, k)| self.model.tokenizer.encode(t, *k))
            .collect()
    }

    /// One packed batch through the backend: embeddings [S, H], never a non-finite value (a
    /// batch with NaN/Inf fails with [`Error::NonFinite`] naming its sequences). Every caller
    /// (CLI, eval, server) goes through here rather than calling the backend directly.
    pub fn embed_batch(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let out = self.backend.embed(batch)?;
        check_finite(&out, self.hidden())?;
        Ok(out)
    }

    /// Embeds already tokenized sequences in token-budget batches, calling `sink` with each
    /// batch's first index and its embeddings [S, H], in input order.
    pub fn embed_encoded(
        &self,
        seqs: &[Encoded],
        normalize: bool,
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let lengths: Vec<usize> = seqs.iter().map(|e| e.ids.len()).collect();
        for range in plan_batches(&lengths, self.max_batch_tokens) {
            let batch = PackedBatch::from_seqs(
                &seqs[range.clone()]
                    .iter()
                    .map(|e| &e.ids[..])
                    .collect::<Vec<_>>(),
            );
            // Name the inputs, not the positions within this batch.
            let mut out = self
                .embed_batch(&batch)
                .map_err(|e| offset_non_finite(e, range.start))?;
            if normalize {
                l2_normalize(&mut out, self.hidden());
            }
            sink(range.start, &out)?;
        }
        Ok(())
    }

    /// Texts → embeddings in input order, tokenizing the next chunk of texts on another thread
    /// while the backend embeds the current one, so the engine never waits for the tokenizer and
    /// only one chunk of texts and token ids is held at a time: `texts` may be a stream larger
    /// than memory (an error from it stops the run). `truncated` gets the index of every text cut
    /// to the length limit; `sink` gets (index of the first text, embeddings [S, H]).
    pub fn embed_stream<I>(
        &self,
        texts: I,
        normalize: bool,
        truncated: &mut dyn FnMut(usize),
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()>
    where
        I: Iterator<Item = Result<(String, Kind)>> + Send,
    {
        const CHUNK: usize = 4096;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<Encoded>)>>(1);
            scope.spawn(move || {
                let mut texts = texts;
                let mut start = 0;
                loop {
                    let chunk: Result<Vec<(String, Kind)>> = texts.by_ref().take(CHUNK).collect();
                    let r = chunk.and_then(|c| self.encode(&c));
                    let (n, failed) = match &r {
                        Ok(enc) => (enc.len(), false),
                        Err(_) => (0, true),
                    };
                    if n == 0 && !failed {
                        break; // the stream is done
                    }
                    // A closed channel means the consumer stopped on an error: stop too.
                    if tx.send(r.map(|e| (start, e))).is_err() || failed {
                        break;
                    }
                    start += n;
                }
            });
            for msg in rx {
                let (start, enc) = msg?;
                enc.iter()
                    .enumerate()
                    .filter(|(_, e)| e.truncated)
                    .for_each(|(i, _)| truncated(start + i));
                self.embed_encoded(&enc, normalize, &mut |first, out| sink(start + first, out))
                    .map_err(|e| offset_non_finite(e, start))?;
            }
            Ok(())
        })
    }

    /// [`Self::embed_stream`] over texts in memory.
    pub fn embed_pipelined(
        &self,
        texts: &[(String, Kind)],
        normalize: bool,
        truncated: &mut dyn FnMut(usize),
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let stream = texts.iter().map(|(t, k)| Ok((t.clone(), *k)));
        self.embed_stream(stream, normalize, truncated, sink)
    }

    /// Convenience: texts → one vector each.
    pub fn embed_texts(&self, texts: &[(String, Kind)], normalize: bool) -> Result<Vec<Vec<f32>>> {
        let enc = self.encode(texts)?;
        let mut all = Vec::with_capacity(texts.len());
        let h = self.hidden();
        self.embed_encoded(&enc, normalize, &mut |_, e| {
            all.extend(e.chunks(h).map(<[f32]>::to_vec));
            Ok(())
        })?;
        Ok(all)
    }
}
