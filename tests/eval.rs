//! `sgpt eval` end to end on the synthetic BEIR set (tests/fixtures/beir-synthetic, from
//! tools/make_eval_fixture.py) with the shipped model: the run file's shape and order, the
//! ranking against a brute-force search over the library's embeddings, the cache (a rerun
//! embeds nothing; a run killed with SIGKILL resumes and gives the identical run file; damaged
//! shards are recomputed), and every malformed input named by file and line.
//! The metrics themselves are checked against trec_eval in tests/python/test_eval.py.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{copy_dir, cosine, root, tiny_model};
use sgpt::engine::{Device, Embedder};
use sgpt::eval::beir::Dataset;
use sgpt::model::tokenize::Kind;

fn fixture() -> PathBuf {
    root().join("tests/fixtures/beir-synthetic")
}

fn sgpt_eval(data: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "sgpt eval failed: {}", stderr(&o));
    o
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

struct RunLine {
    qid: String,
    doc: String,
    rank: usize,
    score: f32,
}

fn read_run(p: &Path) -> Vec<RunLine> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 6, "{l}");
            assert_eq!((f[1], f[5]), ("Q0", "sgpt"), "{l}");
            RunLine {
                qid: f[0].into(),
                doc: f[2].into(),
                rank: f[3].parse().unwrap(),
                score: f[4].parse().unwrap(),
            }
        })
        .collect()
}

fn by_query(run: &[RunLine]) -> Vec<(String, Vec<&RunLine>)> {
    let mut out: Vec<(String, Vec<&RunLine>)> = Vec::new();
    for l in run {
        match out.last_mut() {
            Some((q, v)) if *q == l.qid => v.push(l),
            _ => out.push((l.qid.clone(), vec![l])),
        }
    }
    out
}

/// The documents directory of a cache root, once it exists.
fn doc_cache_dir(cache: &Path) -> Option<PathBuf> {
    std::fs::read_dir(cache)
        .ok()?
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("documents-")
        })
}

/// (shards, rows) listed in a cache directory's manifest; (0, 0) before it exists.
fn manifest_counts(dir: &Path) -> (usize, usize) {
    let Ok(s) = std::fs::read_to_string(dir.join("manifest.json")) else {
        return (0, 0);
    };
    let m: serde_json::Value = serde_json::from_str(&s).unwrap();
    let shards = m["shards"].as_array().unwrap();
    let rows = shards
        .iter()
        .map(|s| s["rows"].as_u64().unwrap() as usize)
        .sum();
    (shards.len(), rows)
}

fn doc_cache(cache: &Path) -> (PathBuf, usize) {
    let dir = doc_cache_dir(cache).expect("a documents cache");
    let (_, rows) = manifest_counts(&dir);
    (dir, rows)
}

#[test]
fn run_file_is_well_formed_and_a_rerun_embeds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, run, metrics) = (
        tmp.path().join("cache"),
        tmp.path().join("run.trec"),
        tmp.path().join("m.json"),
    );
    let args = |run: &Path, metrics: &Path| {
        vec![
            "--cache-dir".to_string(),
            cache.display().to_string(),
            "--run".into(),
            run.display().to_string(),
            "--json".into(),
            metrics.display().to_string(),
        ]
    };
    let a = args(&run, &metrics);
    let out = ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let table = String::from_utf8_lossy(&out.stdout);
    for name in ["NDCG@10", "Recall@100", "MAP@100", "MRR@10"] {
        assert!(table.contains(name), "{table}");
    }
    assert!(stderr(&out).contains("not-in-corpus"), "{}", stderr(&out));

    let data = Dataset::load(&fixture(), "test").unwrap();
    let lines = read_run(&run);
    let queries = by_query(&lines);
    let judged: Vec<&str> = data.queries.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(
        queries.iter().map(|(q, _)| q.as_str()).collect::<Vec<_>>(),
        judged
    );
    for (qid, hits) in &queries {
        assert_eq!(hits.len(), 100, "{qid}");
        assert!(hits.iter().all(|h| h.doc != *qid), "{qid} retrieved itself");
        for (i, w) in hits.windows(2).enumerate() {
            assert_eq!((w[0].rank, w[1].rank), (i + 1, i + 2));
            // trec_eval's order: score descending, then document id descending.
            assert!(
                w[0].score > w[1].score || (w[0].score == w[1].score && w[0].doc > w[1].doc),
                "{qid} ranks {}/{}: {} {} / {} {}",
                w[0].rank,
                w[1].rank,
                w[0].doc,
                w[0].score,
                w[1].doc,
                w[1].score
            );
        }
    }
    // The fixture's identical documents really tie somewhere in the run.
    assert!(lines
        .windows(2)
        .any(|w| w[0].qid == w[1].qid && w[0].score == w[1].score));

    let m = json(&metrics);
    for k in ["ndcg@10", "recall@100", "map@100", "mrr@10"] {
        let v = m[k].as_f64().unwrap();
        assert!(v > 0.0 && v < 1.0, "{k} = {v}");
    }
    assert_eq!(
        (m["engine"]["kind"].as_str(), m["engine"]["dtype"].as_str()),
        (Some("cpu"), Some("f32"))
    );
    let c = &m["counts"];
    assert_eq!(c["documents"], 200);
    assert_eq!(c["queries_in_file"], 36);
    assert_eq!(c["queries_evaluated"], 31);
    assert_eq!(c["queries_without_relevant"], 1);
    assert_eq!(c["queries_with_own_id_in_corpus"], 1);
    assert_eq!(c["judged_documents_not_in_corpus"], 1);
    let docs = &m["embedding"]["documents"];
    assert_eq!(
        (docs["embedded"].as_u64(), docs["from_cache"].as_u64()),
        (Some(200), Some(0))
    );
    assert_eq!(docs["truncated"], 3);
    assert_eq!(m["per_query"].as_object().unwrap().len(), 31);

    // Again with the same cache: nothing embedded, identical run file and metrics.
    let (run2, metrics2) = (tmp.path().join("run2.trec"), tmp.path().join("m2.json"));
    let a = args(&run2, &metrics2);
    ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(std::fs::read(&run).unwrap(), std::fs::read(&run2).unwrap());
    let m2 = json(&metrics2);
    assert_eq!(m2["embedding"]["documents"]["embedded"], 0);
    assert_eq!(m2["embedding"]["documents"]["from_cache"], 200);
    assert_eq!(m2["embedding"]["queries"]["embedded"], 0);
    assert_eq!(m2["ndcg@10"], m["ndcg@10"]);
    assert_eq!(m2["per_query"], m["per_query"]);

    // --top-k only shortens the run file; the metrics still use the top 100.
    let (run3, metrics3) = (tmp.path().join("run3.trec"), tmp.path().join("m3.json"));
    let mut a = args(&run3, &metrics3);
    a.extend(["--top-k".into(), "5".into()]);
    ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let short = read_run(&run3);
    assert_eq!(short.len(), 31 * 5);
    assert!(short.iter().all(|l| l.rank <= 5));
    assert_eq!(json(&metrics3)["recall@100"], m["recall@100"]);
}

#[test]
fn ranking_matches_brute_force_over_library_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run.trec");
    let cache = tmp.path().join("cache");
    ok(sgpt_eval(
        &fixture(),
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "--top-k",
            "200",
            "-q",
        ],
    ));
    let data = Dataset::load(&fixture(), "test").unwrap();
    let e = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let docs = e
        .embed_texts(
            &data
                .corpus
                .texts
                .iter()
                .map(|t| (t.clone(), Kind::Document))
                .collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    let queries = e
        .embed_texts(
            &data
                .queries
                .iter()
                .map(|q| (q.text.clone(), Kind::Query))
                .collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    let lines = read_run(&run);
    let got = by_query(&lines);
    for ((q, qv), (qid, hits)) in data.queries.iter().zip(&queries).zip(&got) {
        assert_eq!(&q.id, qid);
        let want: HashMap<&str, f64> = data
            .corpus
            .ids
            .iter()
            .zip(&docs)
            .filter(|(id, _)| **id != q.id)
            .map(|(id, dv)| (id.as_str(), cosine(qv, dv)))
            .collect();
        // Every document but the query's own is ranked, each with its cosine (f32 GEMM of unit
        // vectors vs f64 over the raw vectors: 1e-6), and no pair is out of order by more.
        assert_eq!(hits.len(), want.len(), "{qid}");
        for h in hits {
            let w = want[h.doc.as_str()];
            assert!(
                (h.score as f64 - w).abs() < 1e-6,
                "{qid} {}: {} vs {w}",
                h.doc,
                h.score
            );
        }
        for pair in hits.windows(2) {
            let (a, b) = (want[pair[0].doc.as_str()], want[pair[1].doc.as_str()]);
            assert!(
                a >= b - 2e-6,
                "{qid}: {} before {}",
                pair[0].doc,
                pair[1].doc
            );
        }
    }
}

/// Waits until the documents manifest lists at least `shards` shards; fails if the process
/// ends first.
fn wait_for_shards(child: &mut std::process::Child, cache: &Path, shards: usize) {
    let t0 = Instant::now();
    loop {
        let listed = doc_cache_dir(cache).map_or(0, |d| manifest_counts(&d).0);
        if listed >= shards {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "sgpt eval ended before it was killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no shards after 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killed_run_resumes_from_the_last_complete_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |n: &str| tmp.path().join(n).display().to_string();
    let shard = ["--shard-docs", "20"];

    // Reference: one uninterrupted run.
    ok(sgpt_eval(
        &fixture(),
        &[
            &[
                "--cache-dir",
                &path("fresh"),
                "--run",
                &path("fresh.trec"),
                "-q",
            ][..],
            &shard,
        ]
        .concat(),
    ));

    // A run paused after every shard, killed (SIGKILL) once three shards are on disk.
    let cache = tmp.path().join("cache");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(["eval", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(fixture())
        .args(["--cache-dir", &path("cache"), "--run", &path("killed.trec")])
        .args(shard)
        .env("SGPT_EVAL_PAUSE_AFTER_SHARD_MS", "300")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_shards(&mut child, &cache, 3);
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(!tmp.path().join("killed.trec").exists());
    let (dir, done) = doc_cache(&cache);
    assert!((60..200).contains(&done), "{done} rows on disk when killed");

    // What a kill in the middle of writing leaves: a temporary and a shard not yet listed.
    std::fs::write(dir.join("rows-0000000180-0000000200.tmp"), b"half a shard").unwrap();
    std::fs::write(dir.join("rows-0000000180-0000000200.npy"), b"not listed").unwrap();

    let m = path("resumed.json");
    let out = ok(sgpt_eval(
        &fixture(),
        &[
            &[
                "--cache-dir",
                &path("cache"),
                "--run",
                &path("resumed.trec"),
                "--json",
                &m,
            ][..],
            &shard,
        ]
        .concat(),
    ));
    let err = stderr(&out);
    assert!(
        err.contains("discarded 2 incomplete shard file(s)"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "documents: 200, {done} from the cache, {} to embed",
            200 - done
        )),
        "{err}"
    );
    let docs = &json(Path::new(&m))["embedding"]["documents"];
    assert_eq!(docs["from_cache"].as_u64(), Some(done as u64));
    assert_eq!(docs["embedded"].as_u64(), Some(200 - done as u64));
    assert!(!dir.join("rows-0000000180-0000000200.tmp").exists());
    assert_eq!(
        std::fs::read_to_string(path("resumed.trec")).unwrap(),
        std::fs::read_to_string(path("fresh.trec")).unwrap(),
        "the resumed run ranks differently from the uninterrupted one"
    );
}

#[test]
fn damaged_shards_are_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let path = |n: &str| tmp.path().join(n).display().to_string();
    let args = |run: &str, m: &str| {
        vec![
            "--cache-dir".to_string(),
            cache.display().to_string(),
            "--run".into(),
            path(run),
            "--json".into(),
            path(m),
            "--shard-docs".into(),
            "50".into(),
        ]
    };
    let a = args("a.trec", "a.json");
    ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let (dir, rows) = doc_cache(&cache);
    assert_eq!(rows, 200);
    // One bit flipped in the second shard: caught by its checksum; it and the rest are redone.
    let f = dir.join("rows-0000000050-0000000100.npy");
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x10;
    std::fs::write(&f, b).unwrap();
    let a = args("b.trec", "b.json");
    let out = ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        stderr(&out).contains("shard at row 50 is damaged"),
        "{}",
        stderr(&out)
    );
    let m = json(Path::new(&path("b.json")));
    assert_eq!(m["embedding"]["documents"]["from_cache"], 50);
    assert_eq!(m["embedding"]["documents"]["embedded"], 150);
    assert_eq!(
        std::fs::read(path("a.trec")).unwrap(),
        std::fs::read(path("b.trec")).unwrap()
    );

    // A hand-edited manifest listing rows past the corpus: ignored, not trusted, no panic.
    let manifest = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let mut extra = m["shards"][3].clone();
    std::fs::copy(
        dir.join(extra["file"].as_str().unwrap()),
        dir.join("rows-0000000200-0000000250.npy"),
    )
    .unwrap();
    extra["file"] = "rows-0000000200-0000000250.npy".into();
    extra["start"] = 200.into();
    m["shards"].as_array_mut().unwrap().push(extra);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let a = args("c.trec", "c.json");
    let out = ok(sgpt_eval(
        &fixture(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        stderr(&out).contains("shards past row 200 ignored"),
        "{}",
        stderr(&out)
    );
    let m = json(Path::new(&path("c.json")));
    assert_eq!(m["embedding"]["documents"]["from_cache"], 200);
    assert_eq!(m["embedding"]["documents"]["embedded"], 0);
    assert_eq!(
        std::fs::read(path("a.trec")).unwrap(),
        std::fs::read(path("c.trec")).unwrap()
    );
}

/// Copies the fixture to a temporary directory, applies `edit`, runs, expects exit 1, no panic
/// and `needle` in the message.
fn expect_data_error(edit: impl Fn(&Path), extra: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    std::fs::create_dir_all(d.join("qrels")).unwrap();
    for f in ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"] {
        std::fs::copy(fixture().join(f), d.join(f)).unwrap();
    }
    edit(&d);
    let cache = tmp.path().join("cache");
    let mut args = vec!["--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = sgpt_eval(&d, &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{needle}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn replace_line(path: &Path, line: usize, with: &str) {
    let s = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<&str> = s.lines().collect();
    lines[line - 1] = with;
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn malformed_inputs_are_named_by_file_and_line() {
    let corpus = |d: &Path| d.join("corpus.jsonl");
    let queries = |d: &Path| d.join("queries.jsonl");
    let qrels = |d: &Path| d.join("qrels/test.tsv");
    expect_data_error(
        |d| replace_line(&corpus(d), 17, "{\"_id\": \"x\", \"text\": "),
        &[],
        "corpus.jsonl:17: expected a JSON object",
    );
    expect_data_error(
        |d| replace_line(&corpus(d), 3, "{\"_id\": \"x\", \"title\": \"t\"}"),
        &[],
        "corpus.jsonl:3: expected a JSON object with \"_id\" (string), \"text\" (string)",
    );
    expect_data_error(
        |d| replace_line(&corpus(d), 9, "{\"_id\": \"f000\", \"text\": \"again\"}"),
        &[],
        "duplicate \"_id\" \"f000\"",
    );
    expect_data_error(
        |d| replace_line(&queries(d), 4, "{\"_id\": \"q03\", \"txt\": \"x\"}"),
        &[],
        "queries.jsonl:4: expected a JSON object",
    );
    expect_data_error(
        |d| replace_line(&qrels(d), 5, "q03\tt03-1\thigh"),
        &[],
        "test.tsv:5: score \"high\" is not an integer",
    );
    expect_data_error(
        |d| replace_line(&qrels(d), 6, "q03\tt03-1"),
        &[],
        "test.tsv:6: expected 3 tab-separated fields",
    );
    expect_data_error(
        |d| replace_line(&qrels(d), 7, "nobody\tt03-1\t1"),
        &[],
        "test.tsv:7: query-id \"nobody\" is not in",
    );
    expect_data_error(
        |d| replace_line(&qrels(d), 1, "q00\tt00-0\t2"),
        &[],
        "test.tsv:1: the first line must be the header",
    );
    expect_data_error(
        |d| {
            let s = std::fs::read_to_string(corpus(d)).unwrap();
            std::fs::write(corpus(d), s + "{\"_id\": \"a b\", \"text\": \"t\"}\n").unwrap();
        },
        &["--run", "/dev/null"],
        "document id \"a b\" contains whitespace",
    );
    expect_data_error(
        |_| {},
        &["--split", "dev"],
        "no qrels for split \"dev\"; splits present: test",
    );
    expect_data_error(
        |d| std::fs::remove_file(queries(d)).unwrap(),
        &[],
        "queries.jsonl",
    );
    expect_data_error(|_| {}, &["--top-k", "0"], "--top-k must be at least 1");
    expect_data_error(
        |_| {},
        &["--shard-docs", "0"],
        "--shard-docs must be at least 1",
    );
    let o = sgpt_eval(Path::new("/nonexistent/beir"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/beir: dataset directory not found"),
        "{}",
        stderr(&o)
    );
}

/// Speed of the exact search at BEIR scale, against the bare GEMM of the same product in the
/// same run (the ceiling: scoring without heaps). Not run by default:
/// `cargo test --test eval -- --ignored --nocapture search_speed`
#[test]
#[ignore]
fn search_speed() {
    use sgpt::backend::cpu::pooling::l2_normalize;
    use sgpt::eval::search::{tie_ranks, CpuScorer, Scorer, SearchPlan};
    let (nq, nd, h) = (1000, 50_000, 1024);
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    let (mut q, mut d) = (rand(nq * h), rand(nd * h));
    l2_normalize(&mut q, h);
    l2_normalize(&mut d, h);
    let flop = 2.0 * nq as f64 * nd as f64 * h as f64;

    // Best of 3, the two alternating, so a busy machine penalizes both alike.
    let ids: Vec<String> = (0..nd).map(|i| format!("d{i}")).collect();
    let (mut gemm_s, mut search_s) = (f64::INFINITY, f64::INFINITY);
    let mut out = vec![0f32; nq * nd];
    for _ in 0..3 {
        let t = Instant::now();
        sgpt::backend::cpu::linear::linear(&q, &d, &vec![0.0; nd], &mut out, false);
        gemm_s = gemm_s.min(t.elapsed().as_secs_f64());

        let plan = SearchPlan {
            k: 100,
            tie_rank: tie_ranks(&ids),
            exclude: vec![None; nq],
        };
        let t = Instant::now();
        let mut scorer = Box::new(CpuScorer::new(q.clone(), h, plan).unwrap());
        for start in (0..nd).step_by(10_000) {
            scorer
                .add_documents(start, &d[start * h..(start + 10_000) * h])
                .unwrap();
        }
        let hits = scorer.finish().unwrap();
        search_s = search_s.min(t.elapsed().as_secs_f64());
        assert!(hits.iter().all(|v| v.len() == 100));
    }
    println!(
        "search {nq} queries x {nd} documents x {h}: {search_s:.2} s ({:.0} GFLOP/s, top 100); \
         bare GEMM of the same product: {gemm_s:.2} s ({:.0} GFLOP/s); {} threads",
        flop / search_s / 1e9,
        flop / gemm_s / 1e9,
        rayon::current_num_threads()
    );
}

/// The eval cache never returns vectors of another engine or model: a rerun with everything the
/// same reads every row back, and changing any one part of the key — backend kind, device,
/// dtype, each kernel choice, max_seq_length, config, tokenizer, a weight file — embeds every
/// row again. (Before: the key held only the first word of the backend's description, so a
/// `--dtype bf16` run reused f16 vectors.) The GPU variants are a CPU backend that reports
/// another identity: the cache sees only what the backend says it is.
#[test]
fn the_cache_misses_whenever_the_engine_or_model_changes() {
    use sgpt::backend::{
        AttentionKernel, Backend, BackendInfo, EmbeddingTable, GemmKernel, KernelChoices, RowKernel,
    };
    use sgpt::eval::{evaluate, EvalOptions};

    struct Relabeled {
        inner: Box<dyn Backend>,
        info: BackendInfo,
    }
    impl Backend for Relabeled {
        fn embed(&self, b: &sgpt::backend::batch::PackedBatch) -> sgpt::Result<Vec<f32>> {
            self.inner.embed(b)
        }
        fn info(&self) -> BackendInfo {
            self.info.clone()
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let data = Dataset::load(&fixture(), "test").unwrap();
    let opts = EvalOptions {
        top_k: 10,
        cache_root: tmp.path().join("cache"),
        shard_rows: 1 << 20,
        shard_seconds: 1e9,
        pause_after_shard: Duration::ZERO,
    };
    // Returns the documents read back from the cache by one run.
    let run = |model: &Path, info: Option<BackendInfo>| -> usize {
        let mut e = Embedder::open(model, Device::Cpu).unwrap();
        if let Some(info) = info {
            let inner = std::mem::replace(&mut e.backend, Box::new(NoBackend));
            e.backend = Box::new(Relabeled { inner, info });
        }
        let out = evaluate(&e, &data, &opts, &mut |_| {}).unwrap();
        assert_eq!(out.documents.total, data.corpus.ids.len());
        out.documents.from_cache
    };
    let all = data.corpus.ids.len();
    let model = tmp.path().join("model");
    copy_dir(&tiny_model(), &model);

    assert_eq!(run(&model, None), 0, "first run");
    assert_eq!(
        run(&model, None),
        all,
        "same engine and model: every row cached"
    );

    let gpu = |dtype, kernels| BackendInfo {
        kind: "cuda",
        device: "NVIDIA H200 (sm_90)".into(),
        dtype,
        threads: None,
        kernels: Some(kernels),
        replicas: None,
    };
    let k = KernelChoices::default();
    let engines = [
        ("cuda f16", gpu("f16", k)),
        ("cuda bf16", gpu("bf16", k)),
        ("cuda fp8", gpu("fp8", k)),
        ("cuda fp8-alternate", gpu("fp8-alternate", k)),
        (
            "another GPU",
            BackendInfo {
                device: "NVIDIA A100 (sm_80)".into(),
                ..gpu("f16", k)
            },
        ),
        (
            "attention mma",
            gpu(
                "f16",
                KernelChoices {
                    attention: AttentionKernel::Mma,
                    ..k
                },
            ),
        ),
        (
            "skinny gemm",
            gpu(
                "f16",
                KernelChoices {
                    gemm: GemmKernel::Skinny,
                    ..k
                },
            ),
        ),
        (
            "cuda graphs",
            gpu(
                "f16",
                KernelChoices {
                    cuda_graphs: true,
                    ..k
                },
            ),
        ),
        (
            "vec row kernels",
            gpu(
                "f16",
                KernelChoices {
                    rows: RowKernel::Vec,
                    ..k
                },
            ),
        ),
        (
            "embedding table in host memory",
            gpu(
                "f16",
                KernelChoices {
                    table: EmbeddingTable::Host,
                    ..k
                },
            ),
        ),
    ];
    for (what, info) in &engines {
        assert_eq!(run(&model, Some(info.clone())), 0, "{what}: must miss");
        assert_eq!(
            run(&model, Some(info.clone())),
            all,
            "{what}: rerun must hit"
        );
    }
    // Threads do not change the CPU's vectors, so they do not split the cache.
    let cpu_info = Embedder::open(&model, Device::Cpu).unwrap().backend.info();
    let more_threads = BackendInfo {
        threads: Some(64),
        ..cpu_info
    };
    assert_eq!(run(&model, Some(more_threads)), all, "thread count");

    type Edit = Box<dyn Fn(&Path)>;
    let edits: [(&str, Edit); 4] = [
        (
            "max_seq_length",
            Box::new(|m: &Path| {
                std::fs::write(
                    m.join("sentence_bert_config.json"),
                    r#"{"max_seq_length": 64}"#,
                )
                .unwrap()
            }),
        ),
        (
            "config.json",
            Box::new(|m: &Path| {
                let p = m.join("config.json");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, format!("{t}\n")).unwrap();
            }),
        ),
        (
            "tokenizer.json",
            Box::new(|m: &Path| {
                let p = m.join("tokenizer.json");
                let t = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, format!("{t}\n")).unwrap();
            }),
        ),
        (
            "weights",
            Box::new(|m: &Path| {
                let p = m.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::remove_file(&p).unwrap();
                std::fs::write(&p, b).unwrap();
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
                    .unwrap();
            }),
        ),
    ];
    for (what, edit) in &edits {
        edit(&model);
        assert_eq!(run(&model, None), 0, "{what} changed: must miss");
        assert_eq!(run(&model, None), all, "{what}: rerun must hit");
    }
}

/// Stands in for a backend moved out of an `Embedder` for a moment.
struct NoBackend;
impl sgpt::backend::Backend for NoBackend {
    fn embed(&self, _: &sgpt::backend::batch::PackedBatch) -> sgpt::Result<Vec<f32>> {
        unreachable!("replaced before use")
    }
    fn info(&self) -> sgpt::backend::BackendInfo {
        unreachable!("replaced before use")
    }
}
