//! Dynamic batching: requests' tokenized texts wait in one queue (bounded by the server's limit
//! on requests in flight); a packer thread takes as many queued texts as fit the token budget,
//! in arrival order, packs them into one batch (no padding) and hands it to a free engine
//! runner — a thread per replica of the engine (`--device cuda:all`); with one replica the
//! packer runs the batch itself — which runs the backend; each request gets its own rows, in
//! its own order, through a oneshot channel. A batch is packed only when a runner is free, so
//! while the engine is busy the queue grows and the next batch is fuller.
//!
//! Packing rule (`batch::takes`, shared with `batch::plan_batches`): walk the queue in order
//! and take each text while the batch is empty or the text still fits `max_batch_tokens`; stop
//! at the first that does not fit (a text longer than the budget gets a batch of its own). A
//! request's texts may span several batches (with several runners, running at once). For one
//! request alone this is exactly `batch::plan_batches`, so the server reproduces `sgpt embed`
//! bit for bit; mixed with other requests a text sits at another offset of another batch,
//! which changes nothing but GEMM blocking (the engine's weights are 1..n and it never pads).
//!
//! A request whose client has gone away (its receiver dropped) is skipped before packing.
//!
//! A failing batch fails the requests it carries (whole: their other rows are dropped) and the
//! engine goes on: an ordinary error (e.g. non-finite output), a device out of memory, or one
//! replica of several failing (the replica set takes it out of service). A panic or a fatal
//! device error leaves the engine in an unknown state (the CUDA context dead, a mutex
//! poisoned), so the engine is marked broken: that batch fails, every later request is refused
//! at once with [`BatchError::Broken`], and [`Batcher::health`] says why, until the process is
//! restarted.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

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

/// A request's embeddings and when the forward of its last batch ended (so the caller can
/// time what follows).
#[derive(Debug)]
pub struct Embedded {
    pub rows: Vec<f32>,
    pub engine_done: Instant,
}

type Reply = oneshot::Sender<Result<Embedded, BatchError>>;

struct Job {
    seqs: Vec<Vec<u32>>,
    /// Texts packed into a batch so far (a prefix of `seqs`).
    taken: usize,
    /// Texts embedded so far (any of the taken ones; batches may finish out of order).
    done: usize,
    /// The embeddings, [seqs.len(), H] once the first rows arrive.
    out: Vec<f32>,
    reply: Reply,
    /// When the request was queued, and the span of its batches' forwards so far
    /// (`sgpt_request_stage_seconds` `queue` and `engine`).
    enqueued: Instant,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
    /// [`IN_TRANSIT`], then [`TAKEN`] by the packer or [`ABANDONED`] by the request (dropped
    /// before the packer saw it): whichever side moves it first gives back the request's
    /// place in `in_transit`, exactly once.
    state: Arc<AtomicU8>,
}

const IN_TRANSIT: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// Held by a request while its job is in the packer's inbox: dropped (the request answered, or
/// its client gone), it marks a job the packer has not taken yet abandoned and frees its place,
/// so clients that give up during a long forward cannot fill `in_transit` with dead requests.
struct Transit {
    state: Arc<AtomicU8>,
    in_transit: Arc<AtomicUsize>,
}

impl Drop for Transit {
    fn drop(&mut self) {
        let abandon =
            self.state
                .compare_exchange(IN_TRANSIT, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        if abandon.is_ok() {
            self.in_transit.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Rows `[offset, offset + count)` of job `job` (its id) travel in a batch.
struct Part {
    job: u64,
    offset: usize,
    count: usize,
}

/// What the packer thread waits for.
enum Event {
    Job(Job),
    /// The request queue is closed: finish what is queued, then stop.
    Closed,
    /// Runner `runner` finished a batch.
    Done {
        runner: usize,
        parts: Vec<Part>,
        seqs: usize,
        tokens: usize,
        /// The forward's own span, measured by the runner.
        started: Instant,
        ended: Instant,
        result: Result<Vec<f32>, BatchError>,
    },
}

/// The queue's sending side and the worker thread.
pub struct Batcher {
    /// The packer's inbox; taken (and `Closed` sent) on close. Requests are sent while this
    /// lock is held, so none can follow `Closed`.
    tx: Mutex<Option<std_mpsc::Sender<Event>>>,
    /// Requests sent but not yet taken in by the packer, at most `capacity`.
    in_transit: Arc<AtomicUsize>,
    capacity: usize,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Why the engine is unusable, once it is.
    broken: Arc<OnceLock<String>>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the worker with one engine runner. `capacity` bounds the queue in requests.
    pub fn start(
        embed: EmbedFn,
        hidden: usize,
        max_batch_tokens: usize,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Self::start_many(vec![embed], hidden, max_batch_tokens, capacity, metrics)
    }

    /// Starts the worker with one runner per `embeds` (one per engine replica), all fed from
    /// the one queue.
    pub fn start_many(
        embeds: Vec<EmbedFn>,
        hidden: usize,
        max_batch_tokens: usize,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        if embeds.is_empty() {
            // nothing could ever run a batch: every request would wait forever
            return Err(std::io::Error::other(
                "the batcher needs at least one engine",
            ));
        }
        let m = metrics.clone();
        let broken = Arc::new(OnceLock::new());
        let b = broken.clone();
        // Requests go straight into the packer's inbox, so `capacity` bounds requests in
        // transit only; what bounds the queue is the server's limit on requests in flight
        // (`--max-concurrent-requests`, a semaphore of the same size), each holding at most
        // `--max-client-batch-size` texts.
        let (events, inbox) = std_mpsc::channel();
        let in_transit = Arc::new(AtomicUsize::new(0));
        let runners = if embeds.len() == 1 {
            Runners::Inline(embeds.into_iter().next().expect("one runner"))
        } else {
            let mut runners = Vec::with_capacity(embeds.len());
            for (k, embed) in embeds.into_iter().enumerate() {
                let (work, todo) = std_mpsc::channel::<(PackedBatch, Vec<Part>)>();
                let done = events.clone();
                std::thread::Builder::new()
                    .name(format!("sgpt-engine-{k}"))
                    .spawn(move || runner(k, embed, hidden, todo, done))?;
                runners.push(work);
            }
            Runners::Threads(runners)
        };
        let transit = in_transit.clone();
        let worker = std::thread::Builder::new()
            .name("sgpt-packer".into())
            .spawn(move || {
                packer(
                    inbox,
                    runners,
                    hidden,
                    max_batch_tokens.max(1),
                    m,
                    b,
                    transit,
                )
            })?;
        Ok(Batcher {
            tx: Mutex::new(Some(events)),
            in_transit,
            capacity: capacity.max(1),
            worker: Mutex::new(Some(worker)),
            broken,
            metrics,
        })
    }

    /// Embeds `seqs` (token ids, brackets included): [seqs.len(), H], in order. Never waits
    /// for queue space: a full queue is an immediate `QueueFull`.
    pub async fn embed(&self, seqs: Vec<Vec<u32>>) -> Result<Vec<f32>, BatchError> {
        self.embed_timed(seqs).await.map(|e| e.rows)
    }

    /// [`Batcher::embed`], with when the engine finished the request.
    pub async fn embed_timed(&self, seqs: Vec<Vec<u32>>) -> Result<Embedded, BatchError> {
        if let Some(why) = self.broken.get() {
            return Err(BatchError::Broken(why.clone()));
        }
        if seqs.is_empty() {
            return Ok(Embedded {
                rows: Vec::new(),
                engine_done: Instant::now(),
            });
        }
        let n = seqs.len() as i64;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            seqs,
            taken: 0,
            done: 0,
            out: Vec::new(),
            reply,
            enqueued: Instant::now(),
            first_start: None,
            last_end: None,
            state: Arc::new(AtomicU8::new(IN_TRANSIT)),
        };
        let transit = {
            let tx = self.tx.lock().map_err(|_| BatchError::Stopped)?;
            let tx = tx.as_ref().ok_or(BatchError::Stopped)?;
            if self.in_transit.fetch_add(1, Ordering::Relaxed) >= self.capacity {
                self.in_transit.fetch_sub(1, Ordering::Relaxed);
                return Err(BatchError::QueueFull);
            }
            let transit = Transit {
                state: job.state.clone(),
                in_transit: self.in_transit.clone(),
            };
            // Counted before sending so the worker's decrement can never come first.
            self.metrics.queue_depth.add(n);
            // A plain send: the packer's thread wakes at once, with no hop in between.
            if tx.send(Event::Job(job)).is_err() {
                self.metrics.queue_depth.sub(n);
                return Err(BatchError::Stopped); // `transit` gives the place back
            }
            transit
        };
        let answer = rx.await.map_err(|_| BatchError::Stopped)?;
        drop(transit);
        answer
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
        // a poisoned lock still holds the sender: the packer must hear `Closed` to finish
        let mut tx = self
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = tx.take() {
            let _ = tx.send(Event::Closed);
        }
        drop(tx);
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

/// Where the packer's batches run.
enum Runners {
    /// One replica: the packer runs each batch itself, sparing a hand-off to another thread
    /// and one back per batch (nothing else could run while it does).
    Inline(EmbedFn),
    /// Several: a thread each (`runner`), so their batches run at once.
    Threads(Vec<std_mpsc::Sender<(PackedBatch, Vec<Part>)>>),
}

impl Runners {
    fn len(&self) -> usize {
        match self {
            Runners::Inline(_) => 1,
            Runners::Threads(r) => r.len(),
        }
    }
}

/// One engine runner thread: runs each batch it is given and reports the outcome to the packer.
fn runner(
    k: usize,
    mut embed: EmbedFn,
    hidden: usize,
    todo: std_mpsc::Receiver<(PackedBatch, Vec<Part>)>,
    done: std_mpsc::Sender<Event>,
) {
    for (batch, parts) in todo {
        if done.send(run(k, &mut embed, hidden, batch, parts)).is_err() {
            return;
        }
    }
}

/// Runs one batch on runner `k`: its outcome, a panic or a wrong-sized result included.
fn run(
    k: usize,
    embed: &mut EmbedFn,
    hidden: usize,
    batch: PackedBatch,
    parts: Vec<Part>,
) -> Event {
    let (seqs, tokens) = (batch.num_seqs(), batch.num_tokens());
    let started = Instant::now();
    let result = match catch_unwind(AssertUnwindSafe(|| embed(&batch))) {
        Ok(Ok(out)) if out.len() == seqs * hidden => Ok(out),
        Ok(Ok(out)) => Err(BatchError::Failed(format!(
            "the backend returned {} values for {seqs} texts of hidden size {hidden}",
            out.len()
        ))),
        Ok(Err(e @ crate::Error::DeviceOutOfMemory(_))) => {
            Err(BatchError::OutOfMemory(e.to_string()))
        }
        Ok(Err(e @ crate::Error::DeviceFatal(_))) => Err(BatchError::Broken(e.to_string())),
        Ok(Err(e)) => Err(BatchError::Failed(e.to_string())),
        Err(payload) => Err(BatchError::Broken(format!(
            "the backend panicked: {}",
            crate::error::panic_message(&*payload)
        ))),
    };
    Event::Done {
        runner: k,
        parts,
        seqs,
        tokens,
        started,
        ended: Instant::now(),
        result,
    }
}

/// The packer: keeps the queue of requests, packs a batch whenever a runner is free, and puts
/// each batch's rows into its requests, answering each one when all its rows are in.
fn packer(
    inbox: std_mpsc::Receiver<Event>,
    mut runners: Runners,
    hidden: usize,
    budget: usize,
    metrics: Arc<Metrics>,
    broken: Arc<OnceLock<String>>,
    in_transit: Arc<AtomicUsize>,
) {
    // Jobs in arrival order, each with its id; a job leaves when answered.
    let mut jobs: VecDeque<(u64, Job)> = VecDeque::new();
    let mut next_id = 0u64;
    let mut free: Vec<usize> = (0..runners.len()).rev().collect();
    let mut closed = false;
    // The outcome of the batch the packer ran itself (`Runners::Inline`), handled first.
    let mut ran: Option<Event> = None;
    // Drops a job, counting its texts that never reached a batch out of the queue depth.
    let leave = |job: &Job| metrics.queue_depth.sub((job.seqs.len() - job.taken) as i64);
    loop {
        if closed && jobs.is_empty() && free.len() == runners.len() {
            return; // queue closed and drained, nothing in flight
        }
        let first = match ran.take() {
            Some(event) => event,
            None => match inbox.recv() {
                Ok(event) => event,
                Err(_) => return,
            },
        };
        for event in std::iter::once(first).chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
            match event {
                Event::Job(job) => {
                    let take = job.state.compare_exchange(
                        IN_TRANSIT,
                        TAKEN,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    if take.is_err() {
                        // its request is gone (and gave its place back): never run it
                        metrics.queue_depth.sub(job.seqs.len() as i64);
                        continue;
                    }
                    in_transit.fetch_sub(1, Ordering::Relaxed);
                    jobs.push_back((next_id, job));
                    next_id += 1;
                }
                Event::Closed => closed = true,
                Event::Done {
                    runner,
                    parts,
                    seqs,
                    tokens,
                    started,
                    ended,
                    result,
                } => {
                    free.push(runner);
                    metrics
                        .batch_duration
                        .observe((ended - started).as_secs_f64());
                    metrics.batch_sequences.observe(seqs as f64);
                    metrics.batch_tokens.observe(tokens as f64);
                    let span = (started, ended);
                    deliver(
                        &mut jobs, parts, result, span, seqs, tokens, hidden, &metrics, &broken,
                        &leave,
                    );
                }
            }
        }
        jobs.retain(|(_, j)| {
            let gone = j.reply.is_closed();
            if gone {
                leave(j);
            }
            !gone
        });
        if let Some(why) = broken.get() {
            // Never touch a broken engine again: refuse what is queued.
            for (_, job) in jobs.drain(..) {
                leave(&job);
                let _ = job.reply.send(Err(BatchError::Broken(why.clone())));
            }
            continue;
        }
        while let Some(&runner) = free.last() {
            // Pack from the jobs with texts not yet in a batch, in arrival order.
            let mut batch = PackedBatch::new();
            let mut parts: Vec<Part> = Vec::new();
            'jobs: for (id, job) in jobs.iter_mut().filter(|(_, j)| j.taken < j.seqs.len()) {
                let offset = job.taken;
                for s in &job.seqs[offset..] {
                    if !takes(batch.num_seqs(), batch.num_tokens(), s.len(), budget) {
                        break;
                    }
                    batch.push(s);
                    job.taken += 1;
                }
                if job.taken > offset {
                    parts.push(Part {
                        job: *id,
                        offset,
                        count: job.taken - offset,
                    });
                }
                if job.taken < job.seqs.len() {
                    break 'jobs; // the next text does not fit: the batch is full
                }
            }
            if parts.is_empty() {
                break;
            }
            metrics.queue_depth.sub(batch.num_seqs() as i64);
            free.pop();
            match &mut runners {
                Runners::Inline(embed) => ran = Some(run(runner, embed, hidden, batch, parts)),
                Runners::Threads(threads) => {
                    if threads[runner].send((batch, parts)).is_err() {
                        return; // a runner thread is gone: nothing more can run
                    }
                }
            }
        }
    }
}

/// Puts a finished batch's rows into its jobs (or fails them) and answers completed jobs.
#[allow(clippy::too_many_arguments)]
fn deliver(
    jobs: &mut VecDeque<(u64, Job)>,
    parts: Vec<Part>,
    result: Result<Vec<f32>, BatchError>,
    (started, ended): (Instant, Instant),
    seqs: usize,
    tokens: usize,
    hidden: usize,
    metrics: &Metrics,
    broken: &OnceLock<String>,
    leave: &dyn Fn(&Job),
) {
    // A job is found by id; one failed or abandoned earlier is gone and its rows are dropped.
    let find = |jobs: &VecDeque<(u64, Job)>, id: u64| jobs.iter().position(|(j, _)| *j == id);
    match result {
        Ok(out) => {
            metrics.texts.inc_by(seqs as u64);
            metrics.tokens.inc_by(tokens as u64);
            let mut rows = out.chunks_exact(hidden);
            for p in parts {
                let Some(at) = find(jobs, p.job) else {
                    rows.by_ref().take(p.count).for_each(drop);
                    continue;
                };
                let job = &mut jobs[at].1;
                if job.out.is_empty() {
                    job.out = vec![0.0; job.seqs.len() * hidden];
                }
                for (k, row) in rows.by_ref().take(p.count).enumerate() {
                    let r = p.offset + k;
                    job.out[r * hidden..(r + 1) * hidden].copy_from_slice(row);
                }
                job.done += p.count;
                // Batches may start and end in any order (several runners).
                let first = job.first_start.map_or(started, |t| t.min(started));
                let last = job.last_end.map_or(ended, |t| t.max(ended));
                (job.first_start, job.last_end) = (Some(first), Some(last));
                if job.done == job.seqs.len() {
                    if let Some((_, job)) = jobs.remove(at) {
                        // only answered requests are timed (every stage once per answer)
                        if !job.reply.is_closed() {
                            let stages = &metrics.stages;
                            let since = |a: Instant, b: Instant| b.saturating_duration_since(a);
                            stages
                                .queue
                                .observe(since(job.enqueued, first).as_secs_f64());
                            stages.engine.observe(since(first, last).as_secs_f64());
                        }
                        let _ = job.reply.send(Ok(Embedded {
                            rows: job.out,
                            engine_done: last,
                        }));
                    }
                }
            }
        }
        Err(err) => {
            eprintln!("sgpt: error: batch of {seqs} texts, {tokens} tokens: {err}");
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
            // Fail the batch's jobs whole; their texts outside this batch leave with them.
            for p in parts {
                if let Some(at) = find(jobs, p.job) {
                    if let Some((_, job)) = jobs.remove(at) {
                        leave(&job);
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

    /// Two async workers, so requests really arrive concurrently.
    fn rt_multi() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
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
        // Four forwards, one request: its queue wait and its engine span observed once.
        assert_eq!(m.batch_duration.get_sample_count(), 4);
        assert_eq!(m.stages.queue.get_sample_count(), 1);
        assert_eq!(m.stages.engine.get_sample_count(), 1);
    }

    /// Requests whose clients give up while the engine is busy (their futures dropped with
    /// their jobs still in the packer's inbox) give their places back at once and are never
    /// run: a live request right after them is queued, not refused as `QueueFull`, even though
    /// as many jobs as the capacity were sent before it.
    #[test]
    fn abandoned_requests_free_their_places_and_never_run() {
        let (seen_tx, seen) = std_mpsc::channel();
        let (started_tx, started) = std_mpsc::channel();
        let (gate_tx, gate) = std_mpsc::channel::<()>();
        let mut inner = fake(seen_tx);
        let mut first = true;
        let engine: EmbedFn = Box::new(move |b: &PackedBatch| {
            if std::mem::take(&mut first) {
                let _ = started_tx.send(());
                let _ = gate.recv(); // the first forward is held until the test opens it
            }
            inner(b)
        });
        let m = Arc::new(Metrics::new().unwrap());
        let b = Arc::new(Batcher::start(engine, 2, 64, 2, m.clone()).unwrap());
        let rt = rt_multi();
        let a = rt.spawn({
            let b = b.clone();
            async move { b.embed(vec![vec![1, 1]]).await }
        });
        started.recv().unwrap(); // A's forward is running and holds the packer
        rt.block_on(async {
            for id in [2u32, 3] {
                // sent, then dropped when the client gives up
                let gave_up = tokio::time::timeout(
                    std::time::Duration::from_millis(20),
                    b.embed(vec![vec![id; 3]]),
                );
                assert!(
                    gave_up.await.is_err(),
                    "request {id} was answered while the engine was held"
                );
            }
        });
        let d = rt.spawn({
            let b = b.clone();
            async move { b.embed(vec![vec![4]]).await }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        gate_tx.send(()).unwrap();
        assert_eq!(rt.block_on(a).unwrap().unwrap(), vec![1.0, 2.0]);
        assert_eq!(rt.block_on(d).unwrap().unwrap(), vec![4.0, 1.0]);
        b.close();
        // the engine saw A's and D's texts only
        assert_eq!(seen.try_iter().collect::<Vec<_>>(), vec![vec![2], vec![1]]);
        assert_eq!(m.queue_depth.get(), 0);
        assert_eq!(m.stages.queue.get_sample_count(), 2);
    }

    #[test]
    fn concurrent_requests_get_their_own_rows() {
        let (tx, _rx) = std_mpsc::channel();
        let m = Arc::new(Metrics::new().unwrap());
        let b = Arc::new(Batcher::start(fake(tx), 2, 64, 256, m.clone()).unwrap());
        let rt = rt_multi();
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
        // Only the answered request has stage timings.
        assert_eq!(m.stages.engine.get_sample_count(), 1);
        assert!(b.is_alive());
        b.close();
        assert!(!b.is_alive());
        assert_eq!(
            rt.block_on(b.embed(vec![vec![1]])),
            Err(BatchError::Stopped)
        );
        assert_eq!(m.queue_depth.get(), 0);
    }

    /// Two runners, the first slow: the batches of one request finish out of order, yet each
    /// request gets its rows in its own order; a failing batch fails only its requests.
    #[test]
    fn several_runners_fill_each_request_in_order() {
        let runner = |pause_ms: u64| -> EmbedFn {
            let (tx, _rx) = std_mpsc::channel();
            let mut inner = fake(tx);
            Box::new(move |b: &PackedBatch| {
                std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                inner(b)
            })
        };
        let m = Arc::new(Metrics::new().unwrap());
        let b = Arc::new(
            Batcher::start_many(vec![runner(80), runner(0)], 2, 10, 64, m.clone()).unwrap(),
        );
        let rt = rt_multi();
        rt.block_on(async {
            let mut handles = Vec::new();
            for r in 0..16u32 {
                let b = b.clone();
                handles.push(tokio::spawn(async move {
                    // Texts of 5 tokens under a budget of 10: a request spans several batches.
                    let mut seqs: Vec<Vec<u32>> = (0..6).map(|k| vec![r * 10 + k; 5]).collect();
                    if r == 3 {
                        seqs[4][0] = 666; // poisons the batch it lands in
                    }
                    (r, b.embed(seqs).await)
                }));
            }
            let mut ok = 0;
            for h in handles {
                let (r, out) = h.await.unwrap();
                if r == 3 {
                    assert!(matches!(out, Err(BatchError::Failed(_))), "{out:?}");
                    continue;
                }
                let want: Vec<f32> = (0..6).flat_map(|k| [(r * 10 + k) as f32, 5.0]).collect();
                match out {
                    Ok(out) => {
                        assert_eq!(out, want, "request {r}");
                        ok += 1;
                    }
                    // A request sharing the poisoned batch fails with it, whole.
                    Err(e) => assert!(matches!(e, BatchError::Failed(_)), "request {r}: {e:?}"),
                }
            }
            // The poisoned batch holds at most two texts, so at most one other request.
            assert!(ok >= 14, "{ok} of 15 requests succeeded");
        });
        assert!(b.health().is_ok());
        b.close();
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
