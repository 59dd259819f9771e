//! Texts in, embeddings out: the tokenizer and a backend, with the one streaming pipeline
//! (tokenize the next chunk while the backend embeds this one; order kept; bounded memory) that
//! `sgpt embed`, `sgpt eval` and the Python package use.

use std::ops::Range;
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
    /// batch's first index and its embeddings [S, H], in input order. With a replica set
    /// ([`Backend::concurrency`] > 1) that many batches run at once.
    pub fn embed_encoded(
        &self,
        seqs: &[Encoded],
        normalize: bool,
        sink: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let lengths: Vec<usize> = seqs.iter().map(|e| e.ids.len()).collect();
        let plans: Vec<Range<usize>> = plan_batches(&lengths, self.max_batch_tokens);
        let run = |i: usize| -> Result<Vec<f32>> {
            let range = plans[i].clone();
            let ids: Vec<&[u32]> = seqs[range.clone()].iter().map(|e| &e.ids[..]).collect();
            // Name the inputs, not the positions within this batch.
            let mut out = self
                .embed_batch(&PackedBatch::from_seqs(&ids))
                .map_err(|e| offset_non_finite(e, range.start))?;
            if normalize {
                l2_normalize(&mut out, self.hidden());
            }
            Ok(out)
        };
        let lanes = self.backend.concurrency().min(plans.len());
        if lanes <= 1 {
            for (i, range) in plans.iter().enumerate() {
                sink(range.start, &run(i)?)?;
            }
            return Ok(());
        }
        in_order(plans.len(), lanes, &run, &mut |i, out| {
            sink(plans[i].start, &out)
        })
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

/// Runs `work(0..n)` on `lanes` threads and hands each result to `deliver` in index order, as
/// soon as its predecessors are delivered; no thread starts an item more than 2 × `lanes` ahead
/// of delivery, so results held waiting stay bounded. As a sequential loop would: the first
/// error in index order is returned after the items before it are delivered (every item before
/// it still runs; none after it starts once it is known), and a panic in `work` or `deliver`
/// propagates (the other threads stop taking items) instead of leaving anyone waiting.
pub fn in_order<T: Send>(
    n: usize,
    lanes: usize,
    work: &(dyn Fn(usize) -> Result<T> + Sync),
    deliver: &mut dyn FnMut(usize, T) -> Result<()>,
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, PoisonError};

    /// Items delivered so far, and the first item not to start (`n` until something fails).
    struct Gate {
        delivered: usize,
        cut: usize,
    }
    /// Lowers the cut to `at` (under the lock, then wakes every waiter) when dropped armed:
    /// how a panic, an error or an early return stops the other threads.
    struct Cut<'a> {
        gate: &'a Mutex<Gate>,
        moved: &'a Condvar,
        at: Option<usize>,
    }
    impl Drop for Cut<'_> {
        fn drop(&mut self) {
            if let Some(at) = self.at {
                let mut g = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
                g.cut = g.cut.min(at);
                self.moved.notify_all();
            }
        }
    }

    let next = AtomicUsize::new(0);
    let gate = Mutex::new(Gate {
        delivered: 0,
        cut: n,
    });
    let moved = Condvar::new();
    let window = 2 * lanes.max(1);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<T>)>();
        for _ in 0..lanes.max(1) {
            let tx = tx.clone();
            let (next, gate, moved) = (&next, &gate, &moved);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                {
                    let mut g = gate.lock().unwrap_or_else(PoisonError::into_inner);
                    loop {
                        if i >= g.cut.min(n) {
                            return;
                        }
                        if i < g.delivered + window {
                            break;
                        }
                        g = moved.wait(g).unwrap_or_else(PoisonError::into_inner);
                    }
                }
                // Armed while `work` runs: a panic stops every item from i on.
                let mut stop = Cut {
                    gate,
                    moved,
                    at: Some(i),
                };
                let r = work(i);
                // An error stops the items after it; the ones before still run.
                stop.at = r.is_err().then_some(i + 1);
                drop(stop);
                if tx.send((i, r)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        // Armed until the end: an early return or a panic in `deliver` stops every thread.
        let mut stop = Cut {
            gate: &gate,
            moved: &moved,
            at: Some(0),
        };
        let mut waiting: BTreeMap<usize, Result<T>> = BTreeMap::new();
        let mut d = 0;
        for (i, r) in rx {
            waiting.insert(i, r);
            while let Some(r) = waiting.remove(&d) {
                deliver(d, r?)?;
                d += 1;
                let mut g = gate.lock().unwrap_or_else(PoisonError::into_inner);
                g.delivered = d;
                moved.notify_all();
            }
        }
        stop.at = None;
        // Every thread has ended. Short only if a `work` panicked: the scope re-raises it.
        if d == n {
            Ok(())
        } else {
            Err(Error::Input(format!(
                "only {d} of {n} batches were embedded"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items finish out of order (later ones faster) yet are delivered in order; an error is
    /// returned after exactly the items before it were delivered; no item starts more than
    /// 2 × lanes ahead of delivery.
    #[test]
    fn in_order_delivers_in_order_and_stops_at_the_first_error() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let started = AtomicUsize::new(0);
        let delivered_at_start = std::sync::Mutex::new(Vec::new());
        let seen = std::sync::Mutex::new(0usize);
        let work = |i: usize| -> Result<usize> {
            started.fetch_add(1, Ordering::SeqCst);
            delivered_at_start
                .lock()
                .unwrap()
                .push((i, *seen.lock().unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(((20 - i % 20) * 2) as u64));
            Ok(i * 10)
        };
        let mut got = Vec::new();
        in_order(40, 3, &work, &mut |i, v| {
            got.push((i, v));
            *seen.lock().unwrap() = i + 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(got, (0..40).map(|i| (i, i * 10)).collect::<Vec<_>>());
        for (i, d) in delivered_at_start.into_inner().unwrap() {
            assert!(i < d + 6, "item {i} started with only {d} delivered");
        }

        let failing = |i: usize| -> Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(if i == 5 {
                30
            } else {
                1
            }));
            if i == 5 || i == 9 {
                Err(Error::Input(format!("item {i}")))
            } else {
                Ok(i)
            }
        };
        let mut got = Vec::new();
        let e = in_order(30, 4, &failing, &mut |i, _| {
            got.push(i);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "item 5");
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }
    /// A panic in work() or in deliver() propagates (as in a sequential loop) instead of
    /// leaving a thread waiting forever.
    #[test]
    fn in_order_does_not_hang_when_work_or_deliver_panics() {
        use std::time::Duration;
        fn returns_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                let _ = tx.send(caught.is_err());
            });
            rx.recv_timeout(Duration::from_secs(secs)) == Ok(true)
        }
        let work_panics = || {
            let work = |i: usize| -> Result<usize> {
                if i == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                    panic!("boom in work");
                }
                Ok(i)
            };
            let _ = in_order(100, 2, &work, &mut |_, _| Ok(()));
        };
        let deliver_panics = || {
            let slow_first = |i: usize| -> Result<usize> {
                if i == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(i)
            };
            let _ = in_order(100, 2, &slow_first, &mut |_, _| -> Result<()> {
                panic!("boom in sink")
            });
        };
        assert!(
            returns_within(10, work_panics),
            "in_order hung (or did not panic) after work() panicked"
        );
        assert!(
            returns_within(10, deliver_panics),
            "in_order hung (or did not panic) after deliver() panicked"
        );
    }

    /// An error stops later items but every item before it still runs and is delivered, even
    /// when an earlier item starts late (the first error in order is the one returned).
    #[test]
    fn in_order_runs_every_item_before_the_first_error() {
        let work = |i: usize| -> Result<usize> {
            if i == 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if i == 3 {
                Err(Error::Input("item 3".into()))
            } else {
                Ok(i)
            }
        };
        let mut got = Vec::new();
        let e = in_order(50, 3, &work, &mut |i, _| {
            got.push(i);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "item 3");
        assert_eq!(got, vec![0, 1, 2]);
    }
}
