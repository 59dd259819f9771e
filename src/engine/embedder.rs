//! Texts in, embeddings out: the tokenizer and a backend, with the one streaming pipeline
//! (tokenize the next chunk while the backend embeds this one; order kept; bounded memory) that
//! `sgpt embed`, `sgpt eval` and the Python package use.

use std::path::Path;

use crate::backend::batch::{plan_batches, PackedBatch};
use crate::backend::cpu::pooling::l2_normalize;
use crate::backend::Backend;
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
