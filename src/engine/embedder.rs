//! Texts in, embeddings out: the tokenizer and a backend, with the one streaming pipeline
//! (tokenize the next chunk while the backend embeds this one; order kept; bounded memory) that
//! `sgpt embed`, `sgpt eval` and the Python package use.

use std::path::Path;

use crate::backend::batch::{plan_batches, PackedBatch};
use crate::backend::cpu::pooling::l2_normalize;
use crate::backend::{Backend, LoadProgress};
use crate::engine::options::{build_backend, Device, EngineOptions};
use crate::error::{Error, Result};
use crate::model::tokenize::{Encoded, Kind};
use crate::model::ModelDir;

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

/// How [`Embedder::embed_stream_with`] cuts its input into chunks (the unit of tokenization,
/// batching and memory).
#[derive(Clone, Copy)]
pub struct Chunks<'a> {
    /// Where the chunk that starts at text `start` ends (exclusive, counted in texts).
    pub end: &'a (dyn Fn(usize) -> usize + Sync),
    /// A chunk also ends once it holds this many bytes of text (None: no byte limit; a caller
    /// that needs batch boundaries to depend only on `end`, like eval's resumable shards).
    pub max_bytes: Option<usize>,
}

/// One packed batch's results, handed out in input order.
pub struct Embedded<'a> {
    /// Index in the stream of the batch's first text.
    pub first: usize,
    /// The batch's texts as tokenized (ids with brackets, truncation flag).
    pub seqs: &'a [Encoded],
    /// Their embeddings, [seqs.len(), H].
    pub vectors: &'a [f32],
}

/// Tokenizer + backend: texts in, embeddings out.
pub struct Embedder {
    pub model: ModelDir,
    pub backend: Box<dyn Backend>,
    /// Most tokens in one packed batch.
    pub max_batch_tokens: usize,
    /// Set when `--device auto` fell back to the CPU: the reason, for the operator.
    pub notice: Option<String>,
}

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
        Self::open_reporting(dir, opts, &|_, _| {})
    }

    /// [`Embedder::open_with`], calling `progress` as the weights load (see [`LoadProgress`]).
    pub fn open_reporting(dir: &Path, opts: EngineOptions, progress: LoadProgress) -> Result<Self> {
        let model = ModelDir::open(dir)?;
        let built = build_backend(
            &model.checkpoint,
            &model.config,
            opts,
            model.sentence.max_seq_length,
            progress,
        )?;
        Ok(Embedder {
            model,
            backend: built.backend,
            max_batch_tokens: built.max_batch_tokens,
            notice: built.notice,
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
    /// than memory (an error from it stops the run). A chunk is 4096 texts or 64 MiB of text,
    /// whichever comes first. `truncated` gets the index of every text cut to the length limit;
    /// `sink` gets (index of the first text, embeddings [S, H]).
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
        let chunks = Chunks {
            end: &|start| start + 4096,
            max_bytes: Some(64 << 20),
        };
        self.embed_stream_with(texts, normalize, chunks, &mut |b| {
            b.seqs
                .iter()
                .enumerate()
                .filter(|(_, e)| e.truncated)
                .for_each(|(i, _)| truncated(b.first + i));
            sink(b.first, b.vectors)
        })
    }

    /// The pipeline itself, the one every caller uses (`embed`, `eval`, the Python package):
    /// texts are cut into chunks by `chunks`, each tokenized on a thread while the previous one
    /// is embedded; each chunk is packed into batches (`batch::plan_batches`) and every batch's
    /// results go to `sink` in input order, with the texts' ids.
    pub fn embed_stream_with<I>(
        &self,
        texts: I,
        normalize: bool,
        chunks: Chunks<'_>,
        sink: &mut dyn FnMut(Embedded<'_>) -> Result<()>,
    ) -> Result<()>
    where
        I: Iterator<Item = Result<(String, Kind)>> + Send,
    {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<Encoded>)>>(1);
            scope.spawn(move || {
                let mut texts = texts.peekable();
                let mut start = 0;
                while texts.peek().is_some() {
                    let end = (chunks.end)(start).max(start + 1);
                    let mut chunk = Vec::new();
                    let mut bytes = 0;
                    let mut failed = None;
                    while start + chunk.len() < end
                        && chunks
                            .max_bytes
                            .is_none_or(|m| chunk.is_empty() || bytes < m)
                    {
                        match texts.next() {
                            Some(Ok(t)) => {
                                bytes += t.0.len();
                                chunk.push(t);
                            }
                            Some(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                            None => break,
                        }
                    }
                    let r = match failed {
                        Some(e) => Err(e),
                        None => self.encode(&chunk),
                    };
                    let failed = r.is_err();
                    // A closed channel means the consumer stopped on an error: stop too.
                    if tx.send(r.map(|e| (start, e))).is_err() || failed {
                        break;
                    }
                    start += chunk.len();
                }
            });
            for msg in rx {
                let (start, enc) = msg?;
                self.embed_encoded(&enc, normalize, &mut |first, out| {
                    let rows = out.len() / self.hidden().max(1);
                    sink(Embedded {
                        first: start + first,
                        seqs: &enc[first..first + rows],
                        vectors: out,
                    })
                })
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
