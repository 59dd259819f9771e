//! One engine replica per device (`--device cuda:all`, `cuda:0,2`), tested without a GPU with
//! replicas of the CPU engine and a faulty one: the same vectors as one engine, in input order,
//! every replica used, per-device /info and /metrics, and a failing replica failing its batches
//! while the others go on. (Two replicas on one real GPU wait for a device run.)

mod common;
mod server_support;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde_json::json;
use sgpt::backend::cpu::CpuModel;
use sgpt::backend::replicas::Replicas;
use sgpt::backend::Backend;
use sgpt::engine::{Device, Embedder};
use sgpt::model::tokenize::Kind;
use sgpt::model::ModelDir;
use sgpt::server::ServeOptions;

use common::tiny_model;
use server_support::{get, metric, post, wait_healthy, Fault, FaultyBackend, InProcess};

/// The tiny model over `members`, labelled cpu:0, cpu:1, ...
fn replicated(members: Vec<Box<dyn Backend>>, max_batch_tokens: usize) -> Embedder {
    let labelled = members
        .into_iter()
        .enumerate()
        .map(|(k, b)| (format!("cpu:{k}"), b))
        .collect();
    Embedder {
        model: ModelDir::open(&tiny_model()).unwrap(),
        backend: Box::new(Replicas::new(labelled).unwrap()),
        max_batch_tokens,
        notice: None,
    }
}

fn cpu_model() -> Box<dyn Backend> {
    let m = ModelDir::open(&tiny_model()).unwrap();
    Box::new(CpuModel::load(&m.checkpoint, &m.config).unwrap())
}

fn texts(n: usize) -> Vec<(String, Kind)> {
    (0..n)
        .map(|i| {
            let kind = if i % 3 == 0 {
                Kind::Document
            } else {
                Kind::Query
            };
            (format!("text {i} {}", "word ".repeat(i % 37)), kind)
        })
        .collect()
}

#[test]
fn replicas_give_one_engines_vectors_in_input_order() {
    let all = texts(300);
    let mut one = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    one.max_batch_tokens = 64; // many small batches, so both replicas get some
    let two = replicated(vec![cpu_model(), cpu_model()], 64);
    let collect = |e: &Embedder| {
        let mut rows: Vec<(usize, Vec<f32>)> = Vec::new();
        e.embed_pipelined(&all, false, &mut |_| {}, &mut |first, v| {
            rows.push((first, v.to_vec()));
            Ok(())
        })
        .unwrap();
        rows
    };
    let (a, b) = (collect(&one), collect(&two));
    // Same batches (the one packing rule), same first indices, in order, same bits.
    assert_eq!(
        a.iter().map(|r| r.0).collect::<Vec<_>>(),
        b.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for ((first, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "batch at text {first} differs"
        );
    }
    let stats = two.backend.replica_stats();
    assert_eq!(stats.len(), 2);
    assert!(
        stats.iter().all(|s| s.batches > 0 && s.in_service),
        "{stats:?}"
    );
    assert_eq!(stats.iter().map(|s| s.texts).sum::<u64>(), 300);
}

/// The served engine: replica cpu:0 faults as `fault` says, cpu:1 is a plain CPU engine.
fn faulty_pair(fault: Arc<AtomicU8>) -> sgpt::Result<Embedder> {
    let m = ModelDir::open(&tiny_model())?;
    let faulty = FaultyBackend {
        inner: CpuModel::load(&m.checkpoint, &m.config)?,
        next: fault,
    };
    Ok(replicated(vec![Box::new(faulty), cpu_model()], 2048))
}

#[test]
fn the_server_deals_to_every_replica_and_survives_a_failing_one() {
    let fault = Arc::new(AtomicU8::new(Fault::None as u8));
    let f = fault.clone();
    let server = InProcess::start(ServeOptions::new("tiny"), move || faulty_pair(f));
    wait_healthy(server.addr);
    let one = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let want = |t: &str| {
        one.embed_texts(&[(t.to_string(), Kind::Query)], false)
            .unwrap()[0]
            .clone()
    };
    let ask = |t: &str| {
        post(
            server.addr,
            "/embed",
            &json!({"inputs": t, "normalize": false}),
            None,
        )
    };

    // Concurrent clients: every answer equal to one engine's, whichever replica ran it, up to the
    // batch-invariance bound (docs/semantics.md): concurrent texts may share a batch, and a
    // batch of > 48 tokens (skinny::MAX_ROWS) takes another CPU product than one text alone.
    std::thread::scope(|s| {
        for c in 0..4 {
            let ask = &ask;
            let want = &want;
            s.spawn(move || {
                for i in 0..5 {
                    let t = format!("client {c} text {i}");
                    let r = ask(&t);
                    assert_eq!(r.status, 200, "{}", r.text());
                    let got: Vec<f32> = serde_json::from_value(r.json()[0].clone()).unwrap();
                    common::assert_close(&t, &got, &want(&t), 1e-6, 1e-5);
                }
            });
        }
    });
    let info = get(server.addr, "/info").json();
    let replicas = info["replicas"]
        .as_array()
        .expect("replicas in /info")
        .clone();
    assert_eq!(replicas.len(), 2, "{info}");
    for (k, r) in replicas.iter().enumerate() {
        assert_eq!(r["device"], format!("cpu:{k}"));
        assert_eq!(r["in_service"], true);
        assert!(r["batches"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(info["engine"]["replicas"], 2, "{info}");
    for k in 0..2 {
        let sample = format!("sgpt_replica_batches_total{{device=\"cpu:{k}\"}}");
        assert!(metric(server.addr, &sample) > 0.0, "{sample}");
    }

    // cpu:0 breaks: the batch it was running fails, naming it; the server goes on with cpu:1.
    fault.store(Fault::Fatal as u8, Ordering::SeqCst);
    let mut failed = None;
    for i in 0..4 {
        let r = ask(&format!("after the fault {i}"));
        if r.status != 200 {
            failed = Some(r);
            break;
        }
    }
    let r = failed.expect("the faulty replica got one of four batches dealt in turn");
    assert_eq!(r.status, 500, "{}", r.text());
    let msg = r.text();
    assert!(
        msg.contains("cpu:0") && msg.contains("taken out of service"),
        "{msg}"
    );
    for i in 0..4 {
        let t = format!("still served {i}");
        let r = ask(&t);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(get(server.addr, "/health").status, 200);
    let info = get(server.addr, "/info").json();
    assert_eq!(info["replicas"][0]["in_service"], false, "{info}");
    assert!(info["replicas"][0]["error"]
        .as_str()
        .unwrap()
        .contains("ILLEGAL_ADDRESS"));
    assert_eq!(
        metric(server.addr, "sgpt_replica_in_service{device=\"cpu:0\"}"),
        0.0
    );
    assert_eq!(
        metric(server.addr, "sgpt_replica_in_service{device=\"cpu:1\"}"),
        1.0
    );
    server.stop().unwrap();
}

/// `--device cuda:all` and lists are typed: parsed, shown back, and refused with the device
/// named when it cannot be used (here: no GPU).
#[test]
fn device_lists_parse_and_name_the_missing_device() {
    for s in ["cuda:all", "cuda:0,2", "cuda:1,1", "cuda:3"] {
        let d: Device = s.parse().unwrap();
        assert_eq!(d.to_string(), s);
    }
    assert!("cuda:0,"
        .parse::<Device>()
        .unwrap_err()
        .contains("unknown device"));
    for bad in ["cuda:0,x", "cuda:+1", "cuda: 1", "cuda:", "cuda:0,,1"] {
        assert!(bad.parse::<Device>().is_err(), "{bad}");
    }
    assert!("cuda:0,999".parse::<Device>().is_err());
    let list = (0..17).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    assert!(format!("cuda:{list}")
        .parse::<Device>()
        .unwrap_err()
        .contains("at most 16"));
    if sgpt::backend::cuda::device::unavailable_reason(0).is_some() {
        for s in ["cuda:all", "cuda:0,1"] {
            let e = Embedder::open(&tiny_model(), s.parse().unwrap())
                .err()
                .expect("no GPU here")
                .to_string();
            assert!(e.starts_with(&format!("--device {s}: ")), "{e}");
        }
    }
}
