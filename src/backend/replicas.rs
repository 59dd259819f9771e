//! Several engines as one: a [`Backend`] that deals each batch to a free replica — one per GPU
//! of `--device cuda:all` or `cuda:0,2`. Batches wait in one queue (callers blocked in
//! [`Backend::embed`]) and go to the next free replica in turn, so up to
//! [`Backend::concurrency`] batches run at once when that many callers embed at once (the
//! embedding pipeline and the server's batcher do). Every replica computes the same function,
//! so which one ran a batch never changes a vector beyond what the device itself does.
//!
//! A replica whose device fails fatally (a sticky CUDA error) or whose forward panics is taken
//! out of service: that batch fails with an error naming the device, later batches go to the
//! others, and only when none is left does `embed` return [`Error::DeviceFatal`]. Ordinary
//! errors (bad input, out of memory, non-finite output) fail the batch and leave the replica in
//! service.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::backend::batch::PackedBatch;
use crate::backend::{Backend, BackendInfo};
use crate::error::{Error, Result};

/// One replica as `/info` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStats {
    /// The device as the user names it, e.g. "cuda:1".
    pub device: String,
    /// The backend on it, e.g. "cuda (NVIDIA H200 (sm_90), f16)".
    pub backend: String,
    pub batches: u64,
    pub texts: u64,
    pub tokens: u64,
    pub failed_batches: u64,
    /// Seconds spent in this replica's forward.
    pub busy_seconds: f64,
    pub in_service: bool,
    /// Why it was taken out of service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    texts: AtomicU64,
    tokens: AtomicU64,
    failed: AtomicU64,
    busy_ns: AtomicU64,
}

struct Member {
    device: String,
    backend: Box<dyn Backend>,
    counters: Counters,
    out_of_service: OnceLock<String>,
}

/// Which replicas are running a batch now, and where the round-robin search starts.
struct Dispatch {
    busy: Vec<bool>,
    next: usize,
}

pub struct Replicas {
    members: Vec<Member>,
    dispatch: Mutex<Dispatch>,
    freed: Condvar,
}

impl Replicas {
    /// `members`: (device label, backend), at least one; all must compute the same vectors
    /// (same kind of device, dtype and kernels: one identity), else an error names the odd one.
    pub fn new(members: Vec<(String, Box<dyn Backend>)>) -> Result<Self> {
        let Some((first, b0)) = members.first() else {
            return Err(Error::Input(
                "a replica set needs at least one device".into(),
            ));
        };
        let want = b0.info();
        for (label, b) in &members[1..] {
            let got = b.info();
            if got.identity() != want.identity() {
                return Err(Error::Input(format!(
                    "replicas must compute the same vectors, but {label} is {got} while {first} \
                     is {want}: give devices of one model (e.g. --device cuda:0,1)"
                )));
            }
        }
        let n = members.len();
        Ok(Replicas {
            members: members
                .into_iter()
                .map(|(device, backend)| Member {
                    device,
                    backend,
                    counters: Counters::default(),
                    out_of_service: OnceLock::new(),
                })
                .collect(),
            dispatch: Mutex::new(Dispatch {
                busy: vec![false; n],
                next: 0,
            }),
            freed: Condvar::new(),
        })
    }

    fn in_service(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.out_of_service.get().is_none())
            .count()
    }

    /// Waits for a free replica in service, the next one after the last dealt (so consecutive
    /// batches visit every replica); an error once none is in service.
    fn acquire(&self) -> Result<usize> {
        let mut d = self
            .dispatch
            .lock()
            .map_err(|_| Error::DeviceFatal("the replica dispatcher was poisoned".into()))?;
        loop {
            if self.in_service() == 0 {
                return Err(self.none_left());
            }
            let n = self.members.len();
            let free = (0..n)
                .map(|k| (d.next + k) % n)
                .find(|&i| !d.busy[i] && self.members[i].out_of_service.get().is_none());
            if let Some(i) = free {
                d.busy[i] = true;
                d.next = (i + 1) % n;
                return Ok(i);
            }
            d = self
                .freed
                .wait(d)
                .map_err(|_| Error::DeviceFatal("the replica dispatcher was poisoned".into()))?;
        }
    }

    fn release(&self, i: usize) {
        if let Ok(mut d) = self.dispatch.lock() {
            d.busy[i] = false;
        }
        // All waiters: one may be waiting for a replica, others to learn none is left.
        self.freed.notify_all();
    }

    fn none_left(&self) -> Error {
        let why: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| m.out_of_service.get().map(|w| format!("{}: {w}", m.device)))
            .collect();
        Error::DeviceFatal(format!(
            "every replica is out of service ({})",
            why.join("; ")
        ))
    }

    /// Takes replica `i` out of service for `why`; the error its batch gets.
    fn retire(&self, i: usize, why: String) -> Error {
        let m = &self.members[i];
        let _ = m.out_of_service.set(why.clone());
        eprintln!(
            "sgpt: error: {}: taken out of service ({why}); {} replica(s) go on",
            m.device,
            self.in_service()
        );
        if self.in_service() == 0 {
            self.none_left()
        } else {
            Error::Cuda(format!(
                "{} failed on this batch and was taken out of service (the other replicas go \
                 on): {why}",
                m.device
            ))
        }
    }
}

impl Backend for Replicas {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let i = self.acquire()?;
        let m = &self.members[i];
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| m.backend.embed(batch)));
        let c = &m.counters;
        c.busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        let result = match result {
            Ok(Ok(out)) => {
                c.texts
                    .fetch_add(batch.num_seqs() as u64, Ordering::Relaxed);
                c.tokens
                    .fetch_add(batch.num_tokens() as u64, Ordering::Relaxed);
                Ok(out)
            }
            Ok(Err(Error::DeviceFatal(why))) => Err(self.retire(i, why)),
            Ok(Err(e)) => Err(e),
            Err(payload) => Err(self.retire(
                i,
                format!(
                    "the forward panicked: {}",
                    crate::error::panic_message(&*payload)
                ),
            )),
        };
        if result.is_err() {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.release(i);
        result
    }

    /// The first replica's description (all compute the same thing), with their count.
    fn info(&self) -> BackendInfo {
        let mut info = self.members[0].backend.info();
        info.replicas = Some(self.members.len());
        info
    }

    fn load_summary(&self) -> Option<String> {
        let lines: Vec<String> = self
            .members
            .iter()
            .filter_map(|m| {
                m.backend
                    .load_summary()
                    .map(|s| format!("{}: {s}", m.device))
            })
            .collect();
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    fn cuda_context(&self) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
        self.members[0].backend.cuda_context()
    }

    fn concurrency(&self) -> usize {
        self.members.len()
    }

    fn replica_stats(&self) -> Vec<ReplicaStats> {
        self.members
            .iter()
            .map(|m| {
                let c = &m.counters;
                ReplicaStats {
                    device: m.device.clone(),
                    backend: m.backend.describe(),
                    batches: c.batches.load(Ordering::Relaxed),
                    texts: c.texts.load(Ordering::Relaxed),
                    tokens: c.tokens.load(Ordering::Relaxed),
                    failed_batches: c.failed.load(Ordering::Relaxed),
                    busy_seconds: c.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    in_service: m.out_of_service.get().is_none(),
                    error: m.out_of_service.get().cloned(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A fake replica: each text's embedding is [replica id] (H = 1); it fails as `fail` says
    /// on the call numbers given, and counts its calls.
    struct Fake {
        id: f32,
        calls: Arc<AtomicUsize>,
        fail: fn(usize) -> Option<Error>,
        pause: std::time::Duration,
        /// Calls running now across the set, and the most seen at once.
        now: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
    }

    impl Backend for Fake {
        fn embed(&self, b: &PackedBatch) -> Result<Vec<f32>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let running = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(running, Ordering::SeqCst);
            std::thread::sleep(self.pause);
            self.now.fetch_sub(1, Ordering::SeqCst);
            if call == 7 && self.id == 9.0 {
                panic!("boom");
            }
            match (self.fail)(call) {
                Some(e) => Err(e),
                None => Ok(vec![self.id; b.num_seqs()]),
            }
        }
        fn info(&self) -> BackendInfo {
            BackendInfo {
                kind: "cpu",
                device: "fake".into(),
                dtype: "f32",
                threads: None,
                kernels: None,
                replicas: None,
            }
        }
    }

    /// Two fakes; the calls of each, and the most calls seen running at once.
    fn set(
        fails: [fn(usize) -> Option<Error>; 2],
        ids: [f32; 2],
    ) -> (Replicas, [Arc<AtomicUsize>; 2], Arc<AtomicUsize>) {
        let calls = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let members = (0..2)
            .map(|k| {
                let b: Box<dyn Backend> = Box::new(Fake {
                    id: ids[k],
                    calls: calls[k].clone(),
                    fail: fails[k],
                    pause: std::time::Duration::from_millis(100),
                    now: now.clone(),
                    peak: peak.clone(),
                });
                (format!("fake:{k}"), b)
            })
            .collect();
        (Replicas::new(members).unwrap(), calls, peak)
    }

    fn one() -> PackedBatch {
        PackedBatch::from_seqs(&[&[1u32, 2][..]])
    }

    #[test]
    fn batches_are_dealt_in_turn_and_run_at_once() {
        let (r, calls, peak) = set([|_| None, |_| None], [0.0, 1.0]);
        assert_eq!(r.concurrency(), 2);
        // One caller: the replicas take turns.
        let got: Vec<f32> = (0..4).map(|_| r.embed(&one()).unwrap()[0]).collect();
        assert_eq!(got, [0.0, 1.0, 0.0, 1.0]);
        assert_eq!(peak.load(Ordering::SeqCst), 1);
        // Two callers at once: each gets a replica of its own (neither waits for the other's).
        let busy_both = std::thread::scope(|s| {
            let a = s.spawn(|| r.embed(&one()).unwrap()[0]);
            let b = s.spawn(|| r.embed(&one()).unwrap()[0]);
            let mut v = [a.join().unwrap(), b.join().unwrap()];
            v.sort_by(f32::total_cmp);
            v
        });
        assert_eq!(busy_both, [0.0, 1.0]);
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "the two batches ran at once"
        );
        let stats = r.replica_stats();
        assert_eq!(stats.iter().map(|s| s.batches).sum::<u64>(), 6);
        assert!(stats
            .iter()
            .all(|s| s.in_service && s.texts == 3 && s.tokens == 6));
        assert_eq!(calls[0].load(Ordering::SeqCst), 3);
        assert_eq!(r.info().replicas, Some(2));
    }

    #[test]
    fn a_fatal_replica_is_retired_and_the_other_goes_on() {
        let (r, calls, _) = set(
            [
                |call| (call == 0).then(|| Error::DeviceFatal("ILLEGAL_ADDRESS".into())),
                |_| None,
            ],
            [0.0, 1.0],
        );
        let e = r.embed(&one()).unwrap_err().to_string();
        assert!(
            e.contains("fake:0") && e.contains("taken out of service") && e.contains("ILLEGAL"),
            "{e}"
        );
        for _ in 0..3 {
            assert_eq!(r.embed(&one()).unwrap(), vec![1.0]);
        }
        assert_eq!(
            calls[0].load(Ordering::SeqCst),
            1,
            "the retired replica is not called"
        );
        let s = r.replica_stats();
        assert!(!s[0].in_service && s[0].failed_batches == 1, "{s:?}");
        assert!(s[0].error.as_deref().unwrap().contains("ILLEGAL"));
        assert!(s[1].in_service && s[1].batches == 3);
        // Ordinary errors leave a replica in service.
        let (r, _, _) = set([|_| Some(Error::Input("bad".into())), |_| None], [0.0, 1.0]);
        assert!(matches!(r.embed(&one()), Err(Error::Input(_))));
        assert!(r.replica_stats()[0].in_service);
    }

    #[test]
    fn when_none_is_left_the_error_is_fatal() {
        let fatal = |_| Some(Error::DeviceFatal("LAUNCH_FAILED".into()));
        let (r, _, _) = set([fatal, fatal], [0.0, 1.0]);
        assert!(matches!(r.embed(&one()), Err(Error::Cuda(_))));
        let last = r.embed(&one()).unwrap_err();
        assert!(
            matches!(last, Error::DeviceFatal(ref m) if m.contains("every replica")),
            "{last}"
        );
        // Later calls fail at once, naming both.
        let again = r.embed(&one()).unwrap_err().to_string();
        assert!(
            again.contains("fake:0") && again.contains("fake:1"),
            "{again}"
        );
    }

    #[test]
    fn a_panicking_replica_is_retired() {
        // Replica id 9 panics on its 8th call.
        let (r, _, _) = set([|_| None, |_| None], [9.0, 1.0]);
        let mut errors = Vec::new();
        for _ in 0..20 {
            if let Err(e) = r.embed(&one()) {
                errors.push(e.to_string());
            }
        }
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("panicked: boom"), "{errors:?}");
        assert!(!r.replica_stats()[0].in_service);
    }
    #[test]
    fn replicas_must_share_one_identity() {
        let fake = |device: &str| -> Box<dyn Backend> {
            struct Named(String);
            impl Backend for Named {
                fn embed(&self, b: &PackedBatch) -> Result<Vec<f32>> {
                    Ok(vec![0.0; b.num_seqs()])
                }
                fn info(&self) -> BackendInfo {
                    BackendInfo {
                        kind: "cuda",
                        device: self.0.clone(),
                        dtype: "f16",
                        threads: None,
                        kernels: None,
                        replicas: None,
                    }
                }
            }
            Box::new(Named(device.into()))
        };
        let same = vec![
            ("cuda:0".into(), fake("H200")),
            ("cuda:1".into(), fake("H200")),
        ];
        assert!(Replicas::new(same).is_ok());
        let mixed = vec![
            ("cuda:0".into(), fake("H200")),
            ("cuda:1".into(), fake("A100")),
        ];
        let e = Replicas::new(mixed).err().unwrap().to_string();
        assert!(
            e.contains("cuda:1") && e.contains("A100") && e.contains("H200"),
            "{e}"
        );
        let labels: Vec<String> = (0..4)
            .map(|k| crate::engine::options::replica_label(&[0, 2, 0, 1], k))
            .collect();
        assert_eq!(labels, ["cuda:0#1", "cuda:2", "cuda:0#2", "cuda:1"]);
    }
}
