//! `sgpt serve` end to end on the CPU backend: the same vectors as `sgpt embed`, no result
//! lost or misrouted under concurrent clients, dynamic batching across requests, readiness,
//! the concurrency limit, and graceful shutdown (in-process and by SIGTERM to the binary).
//! Every error status is in tests/server_errors.rs.

mod common;
mod server_support;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sgpt::backend::cpu::pooling::l2_normalize;
use sgpt::engine::{Device, Embedder};
use sgpt::model::tokenize::Kind;
use sgpt::server::ServeOptions;

use common::{assert_close, tiny_model};
use server_support::*;

/// A text of the model's full length and more (cut to 297 tokens), and ordinary ones.
fn texts() -> Vec<String> {
    vec![
        "What is the capital of France?".into(),
        "  leading spaces are kept, trailing ones are not   \n".into(),
        "Ünïcödé — 東京 🙂 مرحبا".into(),
        "[brackets] {inside} the text".into(),
        "lorem ipsum dolor sit amet ".repeat(80),
    ]
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// `sgpt embed` on the same texts, one JSON vector per line.
fn sgpt_embed(texts: &[String], extra: &[&str]) -> Vec<Vec<f32>> {
    let out = Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .arg("embed")
        .arg("--model")
        .arg(tiny_model())
        .args(["--quiet", "--device", "cpu"])
        .args(extra)
        .args(texts)
        .output()
        .expect("running sgpt embed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| floats(&serde_json::from_str::<Value>(l).unwrap()["embedding"]))
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(floats)
        .collect()
}

fn openai_rows(v: &Value) -> Vec<Vec<f32>> {
    let data = v["data"].as_array().expect("data");
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i, "index of data[{i}]");
        assert_eq!(d["object"], "embedding");
    }
    data.iter()
        .map(|d| match &d["embedding"] {
            Value::String(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64")
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            other => floats(other),
        })
        .collect()
}

#[test]
fn vectors_equal_sgpt_embed() {
    let texts = texts();
    let raw = sgpt_embed(&texts, &[]);
    let unit = sgpt_embed(&texts, &["--normalize"]);
    let docs = sgpt_embed(&texts, &["--normalize", "--kind", "document"]);
    let s = ServerProcess::start(&[]);

    // One request with every text is packed exactly as `sgpt embed` packs them: bit-equal.
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": texts, "normalize": false}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rows(&r.json()), raw, "/embed normalize=false vs sgpt embed");
    let r = post(s.addr, "/embed", &json!({"inputs": texts}), None);
    assert_eq!(rows(&r.json()), unit, "/embed vs sgpt embed --normalize");
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": texts, "input_type": "document"}),
        None,
    );
    assert_eq!(rows(&r.json()), docs, "/embed document vs --kind document");

    for format in ["float", "base64"] {
        let r = post(
            s.addr,
            "/v1/embeddings",
            &json!({"input": texts, "model": "my-model", "encoding_format": format, "user": "u"}),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "my-model");
        assert_eq!(openai_rows(&v), unit, "/v1/embeddings {format}");
        // usage: every kept token, brackets included (the long text is cut to 297 + 2).
        let lib = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
        let tokens: usize = texts
            .iter()
            .map(|t| {
                lib.model
                    .tokenizer
                    .encode(t, Kind::Query)
                    .unwrap()
                    .ids
                    .len()
            })
            .sum();
        assert_eq!(v["usage"]["prompt_tokens"], tokens);
        assert_eq!(v["usage"]["total_tokens"], tokens);
    }

    // One text per request: each alone, as `sgpt embed` of that text alone.
    for t in &texts {
        let want = sgpt_embed(std::slice::from_ref(t), &["--normalize"]);
        let r = post(s.addr, "/v1/embeddings", &json!({"input": t}), None);
        assert_eq!(openai_rows(&r.json()), want, "{t:?} alone");
    }

    // dimensions: the first d values of the raw vector, re-normalized.
    let r = post(
        s.addr,
        "/v1/embeddings",
        &json!({"input": texts, "dimensions": 16}),
        None,
    );
    let got = openai_rows(&r.json());
    for (g, full) in got.iter().zip(&raw) {
        let mut want = full[..16].to_vec();
        l2_normalize(&mut want, 16);
        assert_eq!(g, &want);
        let norm: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "norm {norm}");
    }
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": "x", "dimensions": 8}),
        None,
    );
    assert_eq!(rows(&r.json())[0].len(), 8);
}

/// 32 clients × 4 requests of 1–3 different texts each, all at once: every request gets its
/// own vectors, in its own order. Batched with others, a vector may differ from the text
/// alone by GEMM blocking only (the bound of tests/golden.rs `batch_invariance`), while any two
/// texts here differ by far more, so a misrouted row cannot pass.
#[test]
fn concurrent_clients_get_their_own_vectors() {
    let s = ServerProcess::start(&[]);
    let text = |c: usize, r: usize, k: usize| {
        format!(
            "client {c} asks question {r} part {k}: {}",
            "why ".repeat(c % 7 + k)
        )
    };
    let (clients, requests) = (32, 4);
    let all: Vec<String> = (0..clients)
        .flat_map(|c| (0..requests).flat_map(move |r| (0..(c + r) % 3 + 1).map(move |k| (c, r, k))))
        .map(|(c, r, k)| text(c, r, k))
        .collect();
    let lib = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let alone: Vec<Vec<f32>> = all
        .iter()
        .map(|t| {
            lib.embed_texts(&[(t.clone(), Kind::Query)], true)
                .unwrap()
                .remove(0)
        })
        .collect();
    let want: std::collections::HashMap<&String, &Vec<f32>> = all.iter().zip(&alone).collect();
    let mut closest = f32::INFINITY;
    for (i, a) in alone.iter().enumerate() {
        for b in &alone[i + 1..] {
            closest = closest.min(common::max_abs_diff(a, b));
        }
    }
    assert!(
        closest > 1e-3,
        "two test texts embed too closely: {closest}"
    );

    let addr = s.addr;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                (0..requests)
                    .map(|r| {
                        let texts: Vec<String> =
                            (0..(c + r) % 3 + 1).map(|k| text(c, r, k)).collect();
                        let route = if (c + r) % 2 == 0 {
                            "/embed"
                        } else {
                            "/v1/embeddings"
                        };
                        let body = if route == "/embed" {
                            json!({"inputs": texts})
                        } else {
                            json!({"input": texts, "encoding_format": "base64"})
                        };
                        let resp = post(addr, route, &body, None);
                        assert_eq!(resp.status, 200, "{}", resp.text());
                        let v = resp.json();
                        let got = if route == "/embed" {
                            rows(&v)
                        } else {
                            openai_rows(&v)
                        };
                        (texts, got)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered = 0;
    for h in handles {
        for (texts, got) in h.join().expect("client thread") {
            assert_eq!(got.len(), texts.len(), "vectors for {texts:?}");
            for (t, g) in texts.iter().zip(&got) {
                assert_close(&format!("{t:?}"), g, want[t], 1e-6, 1e-5);
            }
            answered += 1;
        }
    }
    assert_eq!(answered, clients * requests);
    assert_eq!(metric(addr, "sgpt_texts_total") as usize, all.len());
    assert_eq!(metric(addr, "sgpt_queue_depth"), 0.0);
    assert_eq!(metric(addr, "sgpt_requests_in_flight"), 0.0);
}

/// With the engine held shut, 24 requests queue up; opened, the worker packs them into a few
/// shared batches, and each request still gets exactly its own rows.
#[test]
fn queued_requests_share_batches() {
    let gate = Gate::default();
    let g = gate.clone();
    let server = InProcess::start(ServeOptions::new("tiny"), move || gated_embedder(g));
    wait_healthy(server.addr);
    let warmup_batches = gate.batches.load(Ordering::SeqCst);
    gate.close();
    let lib = Arc::new(Embedder::open(&tiny_model(), Device::Cpu).unwrap());
    let addr = server.addr;
    // The first request is taken alone and held at the gate; the rest wait in the queue.
    let handles: Vec<_> = (0..24)
        .map(|i| {
            let lib = lib.clone();
            let h = std::thread::spawn(move || {
                let texts = vec![format!("request {i}"), format!("request {i}, second text")];
                let r = post(addr, "/embed", &json!({"inputs": texts}), None);
                assert_eq!(r.status, 200, "{}", r.text());
                for (t, g) in texts.iter().zip(rows(&r.json())) {
                    let want = lib.embed_texts(&[(t.clone(), Kind::Query)], true).unwrap();
                    assert_close(t, &g, &want[0], 1e-6, 1e-5);
                }
            });
            if i == 0 {
                gate.wait_waiting(1);
            }
            h
        })
        .collect();
    let t0 = Instant::now();
    while metric(addr, "sgpt_queue_depth") < 46.0 {
        assert!(t0.elapsed() < TIMEOUT, "requests never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    gate.open();
    for h in handles {
        h.join().expect("client");
    }
    let batches = gate.batches.load(Ordering::SeqCst) - warmup_batches;
    assert_eq!(metric(addr, "sgpt_texts_total"), 48.0);
    assert!(batches <= 3, "24 queued requests took {batches} batches");
    server.stop().expect("clean stop");
}

/// Each answered embedding request adds one observation to every stage of
/// `sgpt_request_stage_seconds`, a refused one none; time spent in the forward is counted as
/// `engine`, time waiting behind another batch as `queue`, and the stages fit in the request.
#[test]
fn stage_timings_count_each_answered_request_once() {
    const STAGES: [&str; 6] = ["read", "parse", "tokenize", "queue", "engine", "respond"];
    let sample = |m: &str, what: &str, s: &str| {
        sample_of(
            m,
            &format!("sgpt_request_stage_seconds_{what}{{stage=\"{s}\"}}"),
        )
    };
    // Observations of stage `s` of at most `secs`: the largest bucket bound not above it.
    let at_most = |m: &str, s: &str, secs: f64| -> f64 {
        let head = format!("sgpt_request_stage_seconds_bucket{{stage=\"{s}\",le=\"");
        m.lines()
            .filter_map(|l| {
                let (le, count) = l.strip_prefix(head.as_str())?.split_once("\"} ")?;
                Some((le.parse::<f64>().ok()?, count.parse::<f64>().ok()?))
            })
            .filter(|&(le, _)| le <= secs)
            .map(|(_, count)| count)
            .fold(0.0, f64::max)
    };
    let gate = Gate::default();
    let g = gate.clone();
    let server = InProcess::start(ServeOptions::new("tiny"), move || gated_embedder(g));
    wait_healthy(server.addr);
    let addr = server.addr;
    let m = get(addr, "/metrics").text();
    for s in STAGES {
        assert_eq!(sample(&m, "count", s), 0.0, "{s} before any request");
    }
    // A is held in its forward; B and C wait in the queue behind it, all for at least `held`.
    gate.close();
    let a = std::thread::spawn(move || post(addr, "/embed", &json!({"inputs": "first"}), None));
    gate.wait_waiting(1);
    let b =
        std::thread::spawn(move || post(addr, "/v1/embeddings", &json!({"input": "second"}), None));
    let c = std::thread::spawn(move || post(addr, "/embed", &json!({"inputs": "third"}), None));
    assert_eq!(
        wait_metric(addr, "sgpt_queue_depth", 2.0),
        2.0,
        "B, C never queued"
    );
    let held = Duration::from_millis(150);
    std::thread::sleep(held);
    gate.open();
    for h in [a, b, c] {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = get(addr, "/metrics").text();
    for s in STAGES {
        assert_eq!(
            sample(&m, "count", s),
            3.0,
            "{s} after three answered requests"
        );
    }
    // A's wait is in `engine`, B's and C's in `queue`; each fast stage well under `held`.
    let quick = held.as_secs_f64() / 2.0;
    assert_eq!(
        at_most(&m, "engine", quick),
        2.0,
        "engine: B and C quick\n{m}"
    );
    assert_eq!(at_most(&m, "queue", quick), 1.0, "queue: A quick\n{m}");
    let stages: f64 = STAGES.iter().map(|s| sample(&m, "sum", s)).sum();
    let requests = sample_of(&m, "sgpt_request_duration_seconds_sum{route=\"/embed\"}")
        + sample_of(
            &m,
            "sgpt_request_duration_seconds_sum{route=\"/v1/embeddings\"}",
        );
    assert!(
        stages >= 3.0 * held.as_secs_f64() && stages <= requests,
        "stages {stages} s, requests {requests} s"
    );
    // Refused requests (bad input, wrong dimensions) leave every stage as it was.
    let r = post(addr, "/embed", &json!({"inputs": []}), None);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = post(
        addr,
        "/embed",
        &json!({"inputs": "x", "dimensions": 0}),
        None,
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let m = get(addr, "/metrics").text();
    for s in STAGES {
        assert_eq!(sample(&m, "count", s), 3.0, "{s} after refused requests");
    }
    server.stop().expect("clean stop");
}

#[test]
fn health_is_503_until_the_model_is_loaded() {
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let server = InProcess::start(ServeOptions::new("tiny"), move || {
        let _ = wait.recv_timeout(TIMEOUT);
        gated_embedder(Gate::default())
    });
    let r = get(server.addr, "/health");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error_type"], "Unhealthy");
    let r = post(server.addr, "/embed", &json!({"inputs": "a"}), None);
    assert_eq!(r.status, 503, "{}", r.text());
    let r = post(server.addr, "/v1/embeddings", &json!({"input": "a"}), None);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert_eq!(get(server.addr, "/info").status, 503);
    assert!(get(server.addr, "/metrics").text().contains("sgpt_ready 0"));
    go.send(()).unwrap();
    wait_healthy(server.addr);
    let info = get(server.addr, "/info").json();
    assert_eq!(info["dimensions"], 64);
    assert_eq!(info["max_input_length"], 299);
    // The gated backend describes itself as the CPU backend it wraps.
    let backend = info["backend"].as_str().unwrap_or_default();
    assert!(backend.starts_with("cpu (f32"), "{backend}");
    // ... and typed: the engine's kind and precision, no GPU kernel choices on the CPU.
    assert_eq!(info["engine"]["kind"], "cpu");
    assert_eq!(info["engine"]["dtype"], "f32");
    assert!(info["engine"].get("kernels").is_none());
    assert!(get(server.addr, "/metrics").text().contains("sgpt_ready 1"));
    server.stop().expect("clean stop");
}

#[test]
fn a_model_that_fails_to_load_stops_the_server() {
    let not_a_model = root().join("tests/fixtures");
    let mut s = ServerProcess::spawn(&not_a_model, &[]);
    let status = s.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", s.stderr());
    assert!(s.stderr().contains("loading the model"), "{}", s.stderr());
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
    // The cause is said once (it used to be printed twice, after "loading the model: ").
    let err = s.stderr();
    let line = err
        .lines()
        .find(|l| l.starts_with("sgpt: error:"))
        .unwrap_or_default();
    assert_eq!(line.matches("config.json").count(), 1, "{line}");
}

/// One request held in the engine uses the only permit: the next is refused at once.
#[test]
fn over_the_concurrency_limit_is_429_at_once() {
    let gate = Gate::default();
    let g = gate.clone();
    let mut opts = ServeOptions::new("tiny");
    opts.max_concurrent_requests = 1;
    let server = InProcess::start(opts, move || gated_embedder(g));
    wait_healthy(server.addr);
    gate.close();
    let addr = server.addr;
    let held = std::thread::spawn(move || post(addr, "/embed", &json!({"inputs": "held"}), None));
    gate.wait_waiting(1);
    for (route, body) in [
        ("/embed", json!({"inputs": "b"})),
        ("/v1/embeddings", json!({"input": "b"})),
    ] {
        let t0 = Instant::now();
        let r = post(addr, route, &body, None);
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "429 took {:?}",
            t0.elapsed()
        );
        let v = r.json();
        if route == "/embed" {
            assert_eq!(v["error_type"], "Overloaded");
        } else {
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        }
    }
    assert_eq!(get(addr, "/health").status, 200, "probes are not limited");
    gate.open();
    assert_eq!(held.join().unwrap().status, 200);
    assert_eq!(
        post(addr, "/embed", &json!({"inputs": "c"}), None).status,
        200
    );
    server.stop().expect("clean stop");
}

/// Shutdown while a request is in the engine: no new connections, the request completes,
/// `serve` returns Ok.
#[test]
fn shutdown_finishes_requests_in_flight() {
    let gate = Gate::default();
    let g = gate.clone();
    let mut server = InProcess::start(ServeOptions::new("tiny"), move || gated_embedder(g));
    wait_healthy(server.addr);
    gate.close();
    let addr = server.addr;
    let held = std::thread::spawn(move || {
        post(
            addr,
            "/embed",
            &json!({"inputs": ["in flight", "at shutdown"]}),
            None,
        )
    });
    gate.wait_waiting(1);
    server.begin_shutdown();
    let t0 = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        assert!(t0.elapsed() < TIMEOUT, "still accepting connections");
        std::thread::sleep(Duration::from_millis(10));
    }
    gate.open();
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rows(&r.json()).len(), 2);
    server.stop().expect("clean stop");
}

/// SIGTERM to the binary while 8 clients' large requests are being served: every one is
/// answered in full, the process exits 0. The drain deadline is set far out: this test is about
/// finishing what is in flight. With the default 25 s it once failed on a 2-core machine busy
/// compiling: 5 of 8 connections closed unanswered, which is what the deadline does when it
/// passes. The deadline itself is `sigterm_with_half_sent_requests_exits_at_the_deadline`'s
/// subject.
#[test]
fn sigterm_while_busy_finishes_requests_and_exits_0() {
    let mut s = ServerProcess::start(&["--shutdown-timeout-secs", "300"]);
    let addr = s.addr;
    let long = "lorem ipsum dolor sit amet ".repeat(80);
    let handles: Vec<_> = (0..8)
        .map(|c| {
            let texts: Vec<String> = (0..32).map(|k| format!("{c} {k} {long}")).collect();
            std::thread::spawn(move || {
                let r = post(addr, "/embed", &json!({"inputs": texts}), None);
                (r, Instant::now())
            })
        })
        .collect();
    // Signal once all 8 are inside the server (a connection still in the accept queue at
    // shutdown is refused, as it should be).
    let t0 = Instant::now();
    loop {
        let m = get(addr, "/metrics").text();
        let accepted = sample_of(&m, "sgpt_requests_in_flight")
            + sample_of(&m, "sgpt_requests_total{route=\"/embed\",status=\"200\"}");
        if accepted >= 8.0 {
            break;
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "the requests never reached the server"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    s.signal("-TERM");
    let signalled = Instant::now();
    let mut after = 0;
    for h in handles {
        let (r, done) = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(rows(&r.json()).len(), 32);
        after += usize::from(done > signalled);
    }
    let status = s.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", s.stderr());
    println!("{after} of 8 requests finished after SIGTERM");
    assert!(
        after > 0,
        "every request finished before SIGTERM: the test proved nothing"
    );
    let log = s.stderr();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Options with small timeouts, for the tests of slow clients.
fn quick(header: u64, body: u64, idle: u64) -> ServeOptions {
    let mut o = ServeOptions::new("tiny");
    o.header_timeout = Duration::from_secs(header);
    o.body_timeout = Duration::from_secs(body);
    o.idle_timeout = Duration::from_secs(idle);
    o
}

/// Issue 11: connections that send a request's head and part of its body, then stall, held
/// every concurrency permit (taken before the body was read) and real requests got 429. Now
/// the permit is taken once the body is read, and a stalled body gets 408 at the body timeout.
#[test]
fn stalled_uploads_take_no_concurrency_slot_and_get_408() {
    let mut opts = quick(30, 2, 30);
    opts.max_concurrent_requests = 2;
    let server = InProcess::start(opts, || gated_embedder(Gate::default()));
    wait_healthy(server.addr);
    let mut stalled: Vec<_> = (0..8)
        .map(|_| partial_post(server.addr, "/v1/embeddings", 100, b"{\"input\":"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for route in ["/embed", "/v1/embeddings"] {
        let body = json!({"input": "real", "inputs": "real"});
        let r = post(server.addr, route, &body, None);
        assert_eq!(r.status, 200, "{route} while 8 uploads stall: {}", r.text());
    }
    for s in &mut stalled {
        let (raw, after) = read_until_closed(s, Duration::from_secs(10))
            .expect("a stalled upload was never answered");
        let r = parse_response(&raw).expect("an HTTP response");
        assert_eq!(r.status, 408, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "request_timeout");
        assert!(after < Duration::from_secs(5), "answered after {after:?}");
    }
    let sample = "sgpt_requests_total{route=\"/v1/embeddings\",status=\"408\"}";
    assert_eq!(metric(server.addr, sample), 8.0);
    assert_eq!(metric(server.addr, "sgpt_requests_in_flight"), 0.0);
    server.stop().expect("clean stop");
}

/// Issue 11: slowloris connections (headers a byte at a time, never finished) were never
/// closed, nor were idle ones. Now a new connection must send its first head within the
/// header timeout (1 s here) and a kept-alive one its next head within the idle timeout (4 s).
#[test]
fn slowloris_and_idle_connections_are_closed() {
    let server = InProcess::start(quick(1, 30, 4), || gated_embedder(Gate::default()));
    let addr = server.addr;
    wait_healthy(addr);
    let slow: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = connect(addr);
                let t0 = Instant::now();
                let _ = s.write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\n");
                // One header byte every 100 ms, for at most 10 s.
                for _ in 0..100 {
                    if s.write_all(b"X").is_err()
                        || read_until_closed(&mut s, Duration::from_millis(100)).is_some()
                    {
                        return Some(t0.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    let mut silent = connect(addr);
    let (_, after) = read_until_closed(&mut silent, Duration::from_secs(10))
        .expect("a silent connection was never closed");
    assert!(
        after < Duration::from_secs(3),
        "silent closed after {after:?}"
    );
    for h in slow {
        let after = h
            .join()
            .unwrap()
            .expect("a slowloris connection was never closed");
        assert!(
            after < Duration::from_secs(3),
            "slowloris closed after {after:?}"
        );
    }

    // Kept alive after a request: closed at the idle timeout, not the header timeout.
    let mut s = connect(addr);
    let body = br#"{"inputs": "kept alive"}"#;
    let head = format!(
        "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let t0 = Instant::now();
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(15))
        .expect("an idle kept-alive connection was never closed");
    let idle = t0.elapsed();
    assert_eq!(parse_response(&raw).unwrap().status, 200);
    assert!(
        idle > Duration::from_millis(3500) && idle < Duration::from_secs(7),
        "kept-alive connection closed after {idle:?}"
    );
    assert_eq!(
        wait_metric(addr, "sgpt_open_connections", 1.0),
        1.0,
        "only /metrics' own"
    );
    server.stop().expect("clean stop");
}

/// Over --max-connections a new connection is closed at once and counted; the open ones stay.
#[test]
fn connections_over_the_limit_are_closed_and_counted() {
    let mut opts = quick(30, 30, 30);
    opts.max_connections = 3;
    let server = InProcess::start(opts, || gated_embedder(Gate::default()));
    let addr = server.addr;
    wait_healthy(addr);
    let mut held: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = connect(addr);
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let (raw, after) = read_until_closed(&mut extra, Duration::from_secs(10))
        .expect("the connection over the limit was kept open");
    assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
    for s in &mut held {
        assert!(still_open(s), "a connection within the limit was closed");
    }
    held.pop();
    // Every scrape is a connection of its own, and the server frees a slot only once it has
    // seen the close, which under load can take longer than any fixed sleep: a scrape refused
    // meanwhile is retried, and counted, since the server counts it too.
    let mut refused = 1; // the extra connection above
    let mut scrape = || {
        let t0 = std::time::Instant::now();
        loop {
            match request(addr, "GET", "/metrics", &[], b"") {
                Ok(r) => return r.text(),
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(10), "no slot freed: {e}");
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    };
    // 2 held + the scrape itself, once the closes of earlier scrapes are counted.
    let t0 = std::time::Instant::now();
    let text = loop {
        let text = scrape();
        if sample_of(&text, "sgpt_open_connections") == 3.0 {
            break text;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sample_of(&text, "sgpt_refused_connections_total"),
        refused as f64
    );
    drop(held);
    server.stop().expect("clean stop");
}

/// Issue 11: SIGTERM never completed while a client held a half-sent request. Now the
/// requests in flight get --shutdown-timeout-secs, then their connections are closed and the
/// process exits with status 1, saying so.
#[test]
fn sigterm_with_half_sent_requests_exits_at_the_deadline() {
    let mut s = ServerProcess::start(&[
        "--shutdown-timeout-secs",
        "2",
        "--header-timeout-secs",
        "60",
        "--body-timeout-secs",
        "60",
    ]);
    let mut half_body = partial_post(s.addr, "/embed", 100, b"{\"inputs\":");
    let mut half_head = connect(s.addr);
    half_head
        .write_all(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.signal("-TERM");
    let t0 = Instant::now();
    let status = s.wait_exit();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(status.code(), Some(1), "{}", s.stderr());
    assert!(s.stderr().contains("shutdown deadline"), "{}", s.stderr());
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
    for c in [&mut half_body, &mut half_head] {
        assert!(read_until_closed(c, Duration::from_secs(5)).is_some());
    }
}

/// Bodies are counted against --max-body-bytes-in-flight as they arrive: two stalled uploads
/// holding 8000 bytes of a budget of 8192 make a third body 429, until they time out.
#[test]
fn the_body_byte_budget_bounds_bytes_in_flight() {
    let mut opts = quick(30, 2, 30);
    opts.payload_limit = 4096;
    opts.max_body_bytes_in_flight = 8192;
    let server = InProcess::start(opts, || gated_embedder(Gate::default()));
    let addr = server.addr;
    wait_healthy(addr);
    let text = format!("{{\"inputs\": \"{}", "x".repeat(3988));
    assert_eq!(text.len(), 4000);
    let mut stalled: Vec<_> = (0..2)
        .map(|_| partial_post(addr, "/embed", 4096, text.as_bytes()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let body = json!({"inputs": "y".repeat(500)});
    let r = post(addr, "/embed", &body, None);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.text().contains("--max-body-bytes-in-flight"),
        "{}",
        r.text()
    );
    for s in &mut stalled {
        let (raw, _) = read_until_closed(s, Duration::from_secs(10)).expect("answered");
        assert_eq!(parse_response(&raw).unwrap().status, 408);
    }
    assert_eq!(post(addr, "/embed", &body, None).status, 200);
    server.stop().expect("clean stop");
}

/// Issue 11: a panic in a forward poisoned the engine while /health said 200. Now: NaN in
/// the output fails that batch with 500 naming it; out of memory fails it with 503 and the
/// server goes on; a panic (as a fatal device error) fails its batch with 500, then /health
/// and the embedding routes answer 503 saying why, until a restart.
#[test]
fn engine_failures_are_visible() {
    let next = Arc::new(std::sync::atomic::AtomicU8::new(Fault::None as u8));
    let n = next.clone();
    let server = InProcess::start(ServeOptions::new("tiny"), move || faulty_embedder(n));
    let addr = server.addr;
    wait_healthy(addr);
    let ask = |fault: Fault| {
        next.store(fault as u8, Ordering::SeqCst);
        post(addr, "/v1/embeddings", &json!({"input": "a"}), None)
    };

    let r = ask(Fault::Nan);
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("NaN or Inf"), "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "engine_error");
    assert_eq!(get(addr, "/health").status, 200);

    let r = ask(Fault::OutOfMemory);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "out_of_memory");
    assert_eq!(get(addr, "/health").status, 200);
    assert_eq!(ask(Fault::None).status, 200, "goes on after out of memory");

    let r = ask(Fault::Panic);
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("panicked"), "{}", r.text());
    let h = get(addr, "/health");
    assert_eq!(h.status, 503);
    let why = h.json()["error"].as_str().unwrap().to_string();
    assert!(
        why.contains("panicked") && why.contains("restarted"),
        "{why}"
    );
    let r = ask(Fault::None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("restarted"), "{}", r.text());
    let r = post(addr, "/embed", &json!({"inputs": "a"}), None);
    assert_eq!(r.json()["error_type"], "Unhealthy");
    assert!(get(addr, "/metrics").text().contains("sgpt_ready 0"));
    server
        .stop()
        .expect("stops cleanly even with a broken engine");
}
