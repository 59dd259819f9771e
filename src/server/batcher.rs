//! Dynamic batching: requests' tokenized texts wait in one bounded queue; ONE engine worker
//! thread (per device) takes as many queued texts as fit the token budget, in arrival order,
//! packs them into one batch (no padding), runs the backend, and hands each request its own
//! rows, in its own order, through a oneshot channel.
//!
//! Packing rule (`batch::takes`, shared with `batch::plan_batches`): walk the queue in order
//! and take each text while the batch is empty or the text still fits `max_batch_tokens`; stop
//! at the first that does not fit (a text longer than the budget gets a batch of its own). A request's texts may span several batches. For one
//! request alone this is exactly `batch::plan_batches`, so the server reproduces `sgpt embed`
//! bit for bit; mixed with other requests a text sits at another offset of another batch,
//! which changes nothing but GEMM blocking (the engine's weights are 1..n and it never pads).
//!
//! A request whose client has gone away (its receiver dropped) is skipped before packing.
//!
//! A failing backend fails the requests of that batch only and the worker goes on: an ordinary
//! error (e.g. non-finite output) or a device out of memory. A panic or a fatal device error
//! leaves the engine in an unknown state (the CUDA context dead, a mutex poisoned), so the
//! engine is marked broken: that batch fails, every later request is refused at once with
//! [`BatchError::Broken`], and [`Batcher::health`] says why, until the process is restarted.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::backend::batch::{takes, PackedBatch};
use crate::server::metrics::Metrics;

/// The engine as the worker sees it: a packed batch in, embeddings [S, H] out.
pub type EmbedFn = Box<dyn FnMut(&PackedBatch) -> crate::Result<Vec<f32>> + Send>;

/// Why a request got no embeddings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the engine queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    /// This batch failed; the engine goes on.
    #[error("the engine failed: {0}")]
    Failed(String),
    /// The device ran out of memory on this batch; the engine goes on.
    #[error("the device ran out of memory on this batch; retry later, or with fewer or shorter texts: {0}")]
    OutOfMemory(String),
    /// The engine is unusable until the server is restarted.
    #[error("the engine is broken and the server must be restarted: {0}")]
    Broken(String),
}

type Reply = oneshot::Sender<Result<Vec<f32>, BatchError>>;

struct Job {
    seqs: Vec<Vec<u32>>,
    /// Texts already embedded (a prefix of `seqs`).
    done: usize,
    /// Their embeddings, [done, H].
    out: Vec<f32>,
    reply: Reply,
}

/// The queue's sending side and the worker thread.
pub struct Batcher {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Why the engine is unusable, once it is.
    broken: Arc<OnceLock<String>>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the worker thread. `capacity` bounds the queue in requests.
    pub fn start(
        embed: EmbedFn,
        hidden: usize,
        max_batch_tokens: usize,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let m = metrics.clone();
        let broken = Arc::new(OnceLock::new());
        let b = broken.clone();
        let worker = std::thread::Builder::new()
            .name("sgpt-engine".into())
            .spawn(move || worker(rx, embed, hidden, max_batch_tokens.max(1), m, b))?;
        Ok(Batcher {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            broken,
            metrics,
        })
    }

    /// Embeds `seqs` (token ids, brackets included): [seqs.len(), H], in order. Never waits
    /// for queue space: a full queue is an immediate `QueueFull`.
    pub async fn embed(&self, seqs: Vec<Vec<u32>>) -> Result<Vec<f32>, BatchError> {
        if let Some(why) = self.broken.get() {
            return Err(BatchError::Broken(why.clone()));
        }
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self
            .tx
            .lock()
            .map_err(|_| BatchError::Stopped)?
            .clone()
            .ok_or(BatchError::Stopped)?;
        let n = seqs.len() as i64;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            seqs,
            done: 0,
            out: Vec::new(),
            reply,
        };
        // Counted before sending so the worker's decrement can never come first.
        self.metrics.queue_depth.add(n);
        if let Err(e) = tx.try_send(job) {
            self.metrics.queue_depth.sub(n);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => BatchError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => BatchError::Stopped,
            });
        }
        rx.await.map_err(|_| BatchError::Stopped)?
    }

    /// Whether the worker thread is still running.
    pub fn is_alive(&self) -> bool {
        self.worker
            .lock()
            .map(|w| w.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Ok while the engine can serve; else why not (for `/health`).
    pub fn health(&self) -> Result<(), String> {
        if let Some(why) = self.broken.get() {
            Err(format!(
                "the engine is broken and the server must be restarted: {why}"
            ))
        } else if !self.is_alive() {
            Err("the engine worker has stopped".into())
        } else {
            Ok(())
        }
    }

    /// Closes the queue and waits for the worker to finish what is queued. Blocks.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(
    mut rx: mpsc::Receiver<Job>,
    mut embed: EmbedFn,
    hidden: usize,
    budget: usize,
    metrics: Arc<Metrics>,
    broken: Arc<OnceLock<String>>,
) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.blocking_recv() {
                Some(job) => pending.push_back(job),
                None => return, // queue closed and drained
            }
        }
        while let Ok(job) = rx.try_recv() {
            pending.push_back(job);
        }
        pending.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                metrics.queue_depth.sub((j.seqs.len() - j.done) as i64);
            }
            !gone
        });
        if let Some(why) = broken.get() {
            // Never touch a broken engine again: refuse what is queued.
            for job in pending.drain(..) {
                metrics.queue_depth.sub((job.seqs.len() - job.done) as i64);
                let _ = job.reply.send(Err(BatchError::Broken(why.clone())));
            }
            continue;
        }
        if pending.is_empty() {
            continue;
        }

        // Pack: (job index, texts taken) in queue order.
        let mut batch = PackedBatch::new();
        let mut parts: Vec<(usize, usize)> = Vec::new();
        'jobs: for (j, job) in pending.iter().enumerate() {
            let mut taken = 0;
            for s in &job.seqs[job.done..] {
                if !takes(batch.num_seqs(), batch.num_tokens(), s.len(), budget) {
                    if taken > 0 {
                        parts.push((j, taken));
                    }
                    break 'jobs;
                }
                batch.push(s);
                taken += 1;
            }
            parts.push((j, taken));
        }
        let (s_count, t_count) = (batch.num_seqs(), batch.num_tokens());
        metrics.queue_depth.sub(s_count as i64);

        let t0 = Instant::now();
        let result = match catch_unwind(AssertUnwindSafe(|| embed(&batch))) {
            Ok(Ok(out)) if out.len() == s_count * hidden => Ok(out),
            Ok(Ok(out)) => Err(BatchError::Failed(format!(
                "the backend returned {} values for {s_count} texts of hidden size {hidden}",
                out.len()
            ))),
            Ok(Err(e @ crate::Error::DeviceOutOfMemory(_))) => {
                Err(BatchError::OutOfMemory(e.to_string()))
            }
            Ok(Err(e @ crate::Error::DeviceFatal(_))) => Err(BatchError::Broken(e.to_string())),
            Ok(Err(e)) => Err(BatchError::Failed(e.to_string())),
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(BatchError::Broken(format!("the backend panicked: {what}")))
            }
        };
        metrics.batch_duration.observe(t0.elapsed().as_secs_f64());
        metrics.batch_sequences.observe(s_count as f64);
        metrics.batch_tokens.observe(t_count as f64);

        match result {
            Ok(out) => {
                metrics.texts.inc_by(s_count as u64);
                metrics.tokens.inc_by(t_count as u64);
                let mut rows = out.chunks_exact(hidden);
                for &(j, n) in &parts {
                    let job = &mut pending[j];
                    for row in rows.by_ref().take(n) {
                        job.out.extend_from_slice(row);
                    }
                    job.done += n;
                }
                // Jobs complete in queue order, so the finished ones are a prefix.
                while pending.front().is_some_and(|j| j.done == j.seqs.len()) {
                    if let Some(job) = pending.pop_front() {
                        let _ = job.reply.send(Ok(job.out));
                    }
                }
            }
            Err(err) => {
                eprintln!("sgpt: error: batch of {s_count} texts, {t_count} tokens: {err}");
                let err = match err {
                    BatchError::Broken(why) => {
                        eprintln!(
                            "sgpt: error: the engine is broken; /health answers 503 and every \
                             embedding request is refused until the server is restarted"
                        );
                        metrics.ready.set(0);
                        let _ = broken.set(why.clone());
                        // The batch that broke it failed inside the engine: a 500, not a 503.
                        BatchError::Failed(why)
                    }
                    e => e,
                };
                // The batch's jobs are the first parts.len() of the queue (parts[k].0 == k):
                // fail them whole; their texts outside this batch leave the queue with them.
                for &(_, taken) in &parts {
                    if let Some(job) = pending.pop_front() {
                        let rest = job.seqs.len() - job.done - taken;
                        metrics.queue_depth.sub(rest as i64);
                        let _ = job.reply.send(Err(err.clone()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    /// A fake engine: the embedding of a text is [its first id, its length] (H = 2); every
    /// batch's lengths are reported on `seen`. A text whose first id is 666 fails the batch.
    fn fake(seen: std_mpsc::Sender<Vec<usize>>) -> EmbedFn {
        Box::new(move |b: &PackedBatch| {
            let lens: Vec<usize> = (0..b.num_seqs()).map(|s| b.seq(s).len()).collect();
            let _ = seen.send(lens);
            let mut out = Vec::new();
            for s in 0..b.num_seqs() {
                let first = b.ids[b.seq(s).start];
                if first == 666 {
                    return Err(crate::Error::Input("poisoned".into()));
                }
                out.extend([first as f32, b.seq(s).len() as f32]);
            }
            Ok(out)
        })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn one_request_is_packed_like_plan_batches() {
        let (tx, rx) = std_mpsc::channel();
        let m = Arc::new(Metrics::new().unwrap());
        let b = Batcher::start(fake(tx), 2, 10, 8, m.clone()).unwrap();
        let lens = [5usize, 5, 5, 20, 1, 1];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u32; n])
            .collect();
        let out = rt().block_on(b.embed(seqs)).unwrap();
        let want: Vec<f32> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| [i as f32, n as f32])
            .collect();
        assert_eq!(out, want);
        b.close();
        let batches: Vec<Vec<usize>> = rx.try_iter().collect();
        // plan_batches(&lens, 10) == [0..2, 2..3, 3..4, 4..6]
        assert_eq!(batches, vec![vec![5, 5], vec![5], vec![20], vec![1, 1]]);
        assert_eq!(m.queue_depth.get(), 0);
        assert_eq!(m.texts.get(), 6);
        assert_eq!(m.tokens.get(), 37);
    }

    #[test]
    fn concurrent_requests_get_their_own_rows() {
        let (tx, _rx) = std_mpsc::channel();
        let m = Arc::new(Metrics::new().unwrap());
        let b = Arc::new(Batcher::start(fake(tx), 2, 64, 256, m.clone()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut handles = Vec::new();
            for r in 0..64u32 {
                let b = b.clone();
                handles.push(tokio::spawn(async move {
                    let seqs: Vec<Vec<u32>> = (0..(r % 5 + 1))
                        .map(|k| vec![r * 10 + k; (k + 1) as usize])
                        .collect();
                    (r, b.embed(seqs).await)
                }));
            }
            for h in handles {
                let (r, out) = h.await.unwrap();
                let out = out.unwrap();
                let want: Vec<f32> = (0..(r % 5 + 1))
                    .flat_map(|k| [(r * 10 + k) as f32, (k + 1) as f32])
                    .collect();
                assert_eq!(out, want, "request {r}");
            }
        });
        assert_eq!(m.queue_depth.get(), 0);
    }

    #[test]
    fn a_failing_batch_fails_only_its_requests() {
        let (tx, _rx) = std_mpsc::channel();
        let m = Arc::new(Metrics::new().unwrap());
        let b = Batcher::start(fake(tx), 2, 10, 8, m.clone()).unwrap();
        let rt = rt();
        let bad = rt.block_on(b.embed(vec![vec![666, 1]]));
        assert!(matches!(bad, Err(BatchError::Failed(ref m)) if m.contains("poisoned")));
        let good = rt.block_on(b.embed(vec![vec![7, 7, 7]])).unwrap();
        assert_eq!(good, vec![7.0, 3.0]);
        assert!(b.is_alive());
        b.close();
        assert!(!b.is_alive());
        assert_eq!(
            rt.block_on(b.embed(vec![vec![1]])),
            Err(BatchError::Stopped)
        );
        assert_eq!(m.queue_depth.get(), 0);
    }

    /// A backend failing with `first` on its first call, then succeeding.
    fn fails_once(first: impl FnOnce() -> crate::Error + Send + 'static) -> EmbedFn {
        let mut first = Some(first);
        Box::new(move |b: &PackedBatch| match first.take() {
            Some(f) => Err(f()),
            None => Ok(vec![1.0; b.num_seqs()]),
        })
    }

    /// A panic (or a fatal device error) fails its batch, then marks the engine broken: later
    /// requests are refused without calling it, and `health` says why.
    #[test]
    fn a_panicking_or_fatal_backend_marks_the_engine_broken() {
        let rt = rt();
        let fatal = || crate::Error::DeviceFatal("CUDA_ERROR_ILLEGAL_ADDRESS".into());
        let panics: EmbedFn = {
            let mut calls = 0;
            Box::new(move |b: &PackedBatch| {
                calls += 1;
                if calls == 1 {
                    panic!("boom");
                }
                Ok(vec![1.0; b.num_seqs()])
            })
        };
        for (embed, why) in [
            (panics, "panicked: boom"),
            (fails_once(fatal), "ILLEGAL_ADDRESS"),
        ] {
            let m = Arc::new(Metrics::new().unwrap());
            m.ready.set(1);
            let b = Batcher::start(embed, 1, 10, 8, m.clone()).unwrap();
            assert!(b.health().is_ok());
            let first = rt.block_on(b.embed(vec![vec![1]]));
            assert!(
                matches!(first, Err(BatchError::Failed(ref m)) if m.contains(why)),
                "{first:?}"
            );
            let next = rt.block_on(b.embed(vec![vec![1]]));
            assert!(matches!(next, Err(BatchError::Broken(_))), "{next:?}");
            let h = b.health().unwrap_err();
            assert!(h.contains(why) && h.contains("restarted"), "{h}");
            assert_eq!(m.ready.get(), 0);
            assert_eq!(m.queue_depth.get(), 0);
        }
    }

    /// Out of memory fails that batch only: the engine goes on and stays healthy.
    #[test]
    fn out_of_memory_fails_the_batch_and_the_engine_goes_on() {
        let rt = rt();
        let oom = || crate::Error::DeviceOutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into());
        let m = Arc::new(Metrics::new().unwrap());
        let b = Batcher::start(fails_once(oom), 1, 10, 8, m).unwrap();
        let first = rt.block_on(b.embed(vec![vec![1]]));
        assert!(
            matches!(first, Err(BatchError::OutOfMemory(_))),
            "{first:?}"
        );
        assert_eq!(rt.block_on(b.embed(vec![vec![1]])).unwrap(), vec![1.0]);
        assert!(b.health().is_ok());
    }
}
