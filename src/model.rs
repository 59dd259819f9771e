//! A model directory opened as a whole: configuration, tokenizer, mapped weights, and the
//! backend that turns packed batches into embeddings.

use std::path::{Path, PathBuf};

use crate::batch::{plan_batches, PackedBatch};
use crate::config::{BloomConfig, SentenceConfig};
use crate::cpu::pooling::l2_normalize;
use crate::cpu::CpuModel;
use crate::error::{Error, Result};
use crate::tokenize::{Encoded, Kind, SpecbTokenizer};
use crate::weights::Checkpoint;

/// The seam between the front end and an engine: a packed batch in, embeddings [S, H] out.
pub trait Backend: Send + Sync {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>>;
    /// e.g. "cpu (2 threads)".
    fn describe(&self) -> String;
}

impl Backend for CpuModel {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        CpuModel::embed(self, batch)
    }
    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
}

/// Which engine runs the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The multi-threaded CPU backend (always available).
    Cpu,
    /// An NVIDIA GPU (the CUDA backend is not built yet).
    Cuda,
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
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = BloomConfig::from_file(&dir.join("config.json"))?;
        let sentence = SentenceConfig::from_dir(dir, config.hidden)?;
        let tokenizer = SpecbTokenizer::from_file(
            &dir.join("tokenizer.json"),
            sentence.max_seq_length,
            config.vocab,
        )?;
        let checkpoint = Checkpoint::open(dir)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            sentence,
            tokenizer,
            checkpoint,
        })
    }
}

/// Tokenizer + backend: texts in, embeddings out.
pub struct Embedder {
    pub model: ModelDir,
    pub backend: Box<dyn Backend>,
    /// Most tokens in one packed batch.
    pub max_batch_tokens: usize,
}

/// Default token budget of one packed batch on the CPU: large enough that GEMMs run near peak,
/// small enough that activations stay in a few tens of MB at bloom-560m size.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;

impl Embedder {
    /// Opens `dir` and builds the backend for `device`.
    pub fn open(dir: &Path, device: Device) -> Result<Self> {
        let model = ModelDir::open(dir)?;
        let backend: Box<dyn Backend> = match device {
            Device::Cpu | Device::Auto => {
                Box::new(CpuModel::load(&model.checkpoint, &model.config)?)
            }
            Device::Cuda => {
                return Err(Error::Unsupported(
                    "--device cuda: the CUDA backend is not built yet; use --device cpu".into(),
                ))
            }
        };
        Ok(Embedder {
            model,
            backend,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
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
            let mut out = self.backend.embed(&batch)?;
            if normalize {
                l2_normalize(&mut out, self.hidden());
            }
            sink(range.start, &out)?;
        }
        Ok(())
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
