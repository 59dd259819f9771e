//! A bounded soak of `sgpt serve` (issue 11): valid, invalid-JSON, slowloris, stalled-body and
//! aborting clients all at once against the binary on the tiny model, CPU backend, loopback.
//! Asserts no valid request lost or given another's vectors, every slow client cut off by the
//! timeouts, every aborted upload counted as such, and the server's RSS after the soak within a
//! fixed margin of its RSS before. About 35 s; every loop is bounded in count and time.

mod common;
mod server_support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sgpt::engine::{Device, Embedder};
use sgpt::model::tokenize::Kind;

use common::{assert_close, max_abs_diff, tiny_model};
use server_support::*;

/// The small timeouts the soak runs with (seconds), and the slack allowed on top of them for a
/// busy 2-core machine.
const HEADER_TIMEOUT: u64 = 1;
const BODY_TIMEOUT: u64 = 2;
const SLACK: Duration = Duration::from_millis(2500);

/// RSS may grow by this much over the soak. The warm-up phase runs the same mix first, so
/// thread stacks, malloc arenas and tokio's blocking pool are already at their working size
/// when "before" is read; what remains is allocator noise (about 1 MiB measured, on an RSS of
/// about 18 MiB). A leak of 1 KiB per request over the soak's ~10,000 requests, or the bodies
/// of the stalled and aborted uploads kept after their connection, would exceed it.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

fn texts() -> Vec<String> {
    (0..24)
        .map(|i| {
            format!(
                "soak text {i}: {}",
                "why does the sky look blue ".repeat(i % 6 + 1)
            )
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// What each kind of client did.
#[derive(Default)]
struct Counts {
    valid: AtomicUsize,
    invalid: AtomicUsize,
    slowloris: AtomicUsize,
    stalled: AtomicUsize,
    aborted: AtomicUsize,
}

/// Runs every kind of client until `until`; panics (failing the test) on any lost, mixed or
/// wrong answer and on any slow client not cut off in time.
fn run_mix(addr: SocketAddr, want: &Arc<Vec<(String, Vec<f32>)>>, until: Instant, n: &Arc<Counts>) {
    let mut handles = Vec::new();
    for c in 0..6 {
        let (want, n) = (want.clone(), n.clone());
        handles.push(std::thread::spawn(move || {
            for i in 0..100_000usize {
                if Instant::now() >= until {
                    break;
                }
                let k = (c * 7 + i) % want.len();
                let picked: Vec<&(String, Vec<f32>)> = (0..i % 3 + 1)
                    .map(|j| &want[(k + j * 5) % want.len()])
                    .collect();
                let texts: Vec<&String> = picked.iter().map(|(t, _)| t).collect();
                let (route, body) = if i % 2 == 0 {
                    ("/embed", json!({"inputs": texts}))
                } else {
                    ("/v1/embeddings", json!({"input": texts}))
                };
                let r = post(addr, route, &body, None);
                assert_eq!(r.status, 200, "valid client {c}: {}", r.text());
                let v = r.json();
                let got: Vec<Vec<f32>> = if route == "/embed" {
                    v.as_array().expect("rows").iter().map(floats).collect()
                } else {
                    let data = v["data"].as_array().expect("data");
                    data.iter().map(|d| floats(&d["embedding"])).collect()
                };
                assert_eq!(got.len(), picked.len(), "vectors for {texts:?}");
                for ((t, w), g) in picked.iter().zip(&got) {
                    assert_close(t, g, w, 1e-6, 1e-5);
                }
                n.valid.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in 0..2 {
        let n = n.clone();
        handles.push(std::thread::spawn(move || {
            for i in 0..100_000usize {
                if Instant::now() >= until {
                    break;
                }
                let path = if (c + i) % 2 == 0 {
                    "/embed"
                } else {
                    "/v1/embeddings"
                };
                let h = [("Content-Type", "application/json")];
                let r = request(addr, "POST", path, &h, b"{\"inputs\": [\"a\",").unwrap();
                assert_eq!(r.status, 400, "{}", r.text());
                assert!(r.text().contains("not valid JSON"), "{}", r.text());
                n.invalid.fetch_add(1, Ordering::Relaxed);
                // Paced: a connection per request, and loopback has ~28k ephemeral ports.
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    // Slowloris: a header byte every 150 ms, never finished; cut by the header timeout.
    for _ in 0..4 {
        let n = n.clone();
        handles.push(std::thread::spawn(move || {
            for _ in 0..1000 {
                if Instant::now() >= until {
                    break;
                }
                let mut s = connect(addr);
                let t0 = Instant::now();
                let _ = s.write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\n");
                let mut cut = false;
                for _ in 0..200 {
                    if s.write_all(b"X").is_err()
                        || read_until_closed(&mut s, Duration::from_millis(150)).is_some()
                    {
                        cut = true;
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(HEADER_TIMEOUT) + SLACK {
                        break;
                    }
                }
                assert!(
                    cut,
                    "a slowloris connection was still open after {:?}",
                    t0.elapsed()
                );
                n.slowloris.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Stalled bodies: answered 408 (or closed) by the body timeout.
    for _ in 0..3 {
        let n = n.clone();
        handles.push(std::thread::spawn(move || {
            for _ in 0..1000 {
                if Instant::now() >= until {
                    break;
                }
                let mut s = partial_post(addr, "/v1/embeddings", 200, b"{\"input\": \"stal");
                let limit = Duration::from_secs(BODY_TIMEOUT) + SLACK;
                let (raw, _) = read_until_closed(&mut s, limit)
                    .expect("a stalled upload outlived the body timeout");
                if let Ok(r) = parse_response(&raw) {
                    assert_eq!(r.status, 408, "{}", r.text());
                }
                n.stalled.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Aborted uploads: part of the body, then the connection closed.
    for c in 0..2 {
        let n = n.clone();
        handles.push(std::thread::spawn(move || {
            for i in 0..100_000usize {
                if Instant::now() >= until {
                    break;
                }
                let path = if (c + i) % 2 == 0 {
                    "/embed"
                } else {
                    "/v1/embeddings"
                };
                let s = partial_post(addr, path, 5000, &[b'x'; 1000]);
                std::thread::sleep(Duration::from_millis(20));
                let _ = s.shutdown(std::net::Shutdown::Both);
                n.aborted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.join().expect("a soak client failed");
    }
}

#[test]
fn soak_valid_invalid_slow_and_aborted_clients_at_once() {
    let lib = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let want: Vec<(String, Vec<f32>)> = texts()
        .into_iter()
        .map(|t| {
            let v = lib.embed_texts(&[(t.clone(), Kind::Query)], true).unwrap();
            (t, v.into_iter().next().unwrap())
        })
        .collect();
    drop(lib);
    // A misrouted vector must not pass the closeness check.
    for (i, (_, a)) in want.iter().enumerate() {
        for (_, b) in &want[i + 1..] {
            assert!(
                max_abs_diff(a, b) > 1e-3,
                "two soak texts embed too closely"
            );
        }
    }
    let want = Arc::new(want);

    let h = HEADER_TIMEOUT.to_string();
    let b = BODY_TIMEOUT.to_string();
    let s = ServerProcess::start(&[
        "--header-timeout-secs",
        &h,
        "--body-timeout-secs",
        &b,
        "--idle-timeout-secs",
        &b,
    ]);
    let addr = s.addr;
    let pid = s.child.id();

    let warm = Arc::new(Counts::default());
    run_mix(addr, &want, Instant::now() + Duration::from_secs(8), &warm);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);

    let n = Arc::new(Counts::default());
    run_mix(addr, &want, Instant::now() + Duration::from_secs(25), &n);

    let aborted = (warm.aborted.load(Ordering::Relaxed) + n.aborted.load(Ordering::Relaxed)) as f64;
    assert_eq!(
        wait_metric(addr, "sgpt_aborted_requests_total", aborted),
        aborted,
        "aborted uploads counted"
    );
    assert_eq!(
        wait_metric(addr, "sgpt_open_connections", 1.0),
        1.0,
        "connections left open besides /metrics' own"
    );
    let m = get(addr, "/metrics").text();
    assert_eq!(sample_of(&m, "sgpt_requests_in_flight"), 0.0);
    assert_eq!(sample_of(&m, "sgpt_queue_depth"), 0.0);
    assert_eq!(sample_of(&m, "sgpt_refused_connections_total"), 0.0);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);

    let count = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    println!(
        "soak: {} valid, {} invalid, {} slowloris, {} stalled, {} aborted; \
         RSS {before} KiB before, {after} KiB after",
        count(&n.valid),
        count(&n.invalid),
        count(&n.slowloris),
        count(&n.stalled),
        count(&n.aborted)
    );
    for (what, c) in [
        ("valid", &n.valid),
        ("invalid", &n.invalid),
        ("slowloris", &n.slowloris),
        ("stalled", &n.stalled),
        ("aborted", &n.aborted),
    ] {
        assert!(count(c) >= 4, "only {} {what} clients ran", count(c));
    }
    assert!(
        after <= before + RSS_MARGIN_KIB,
        "RSS grew from {before} KiB to {after} KiB over the soak (margin {RSS_MARGIN_KIB} KiB)"
    );
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}
