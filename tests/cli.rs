//! The `sgpt` binary end to end: outputs in order and in both formats, and every bad input
//! giving a clear error and a non-zero exit, never a panic.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    assert_close, copy_model, edit_json, parse_jsonl, rewrite_weights, tiny_b_model, tiny_model,
};
use safetensors::Dtype;
use sgpt::engine::{Device, Embedder};
use sgpt::model::tokenize::Kind;

fn sgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(args)
        .output()
        .unwrap()
}

fn sgpt_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects failure with `needle` in the message and no panic.
fn expect_error(args: &[&str], needle: &str) {
    let o = sgpt(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
}

fn read_npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

fn m(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn embed_arguments_match_the_library_in_order() {
    let model = m(&tiny_model());
    let texts = ["What is the capital of France?", "北京是首都", "[[{x}]]"];
    let mut args = vec!["embed", "--model", &model, "--device", "cpu"];
    args.extend(texts);
    let o = sgpt(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = parse_jsonl(&o.stdout);
    let e = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let want = e
        .embed_texts(
            &texts
                .iter()
                .map(|t| (t.to_string(), Kind::Query))
                .collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    assert_eq!(got.len(), texts.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        // JSON carries f32 exactly (shortest round-trip form), and the batches are the same.
        assert_close(&format!("cli text {k}"), g, w, 0.0, 0.0);
    }
}

#[test]
fn jsonl_file_to_npy_and_stdin_to_jsonl_agree() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines = [
        r#"{"text": "a query about cats", "kind": "query"}"#,
        r#"{"text": "Cats are small mammals.", "kind": "document", "title": "Cat"}"#,
        r#"{"text": "no kind given: --kind applies", "id": 7}"#,
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let npy = dir.path().join("out.npy");
    let model = m(&tiny_model());
    let o = sgpt(&[
        "embed",
        "-m",
        &model,
        "--input",
        &m(&input),
        "--kind",
        "document",
        "-o",
        &m(&npy),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, data) = read_npy(&npy);
    assert_eq!(shape, vec![3, 64]);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".partial")
        })
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");

    let o = sgpt_stdin(
        &["embed", "-m", &model, "--input", "-", "--kind", "document"],
        &(lines.join("\n") + "\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = parse_jsonl(&o.stdout);
    assert_eq!(rows.len(), 3);
    for (k, r) in rows.iter().enumerate() {
        assert_close(
            &format!("npy vs jsonl row {k}"),
            &data[k * 64..(k + 1) * 64],
            r,
            0.0,
            0.0,
        );
    }
    // The title is joined as "title text", and kinds pick the brackets.
    let e = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let want = e
        .embed_texts(
            &[
                ("a query about cats".into(), Kind::Query),
                ("Cat Cats are small mammals.".into(), Kind::Document),
                ("no kind given: --kind applies".into(), Kind::Document),
            ],
            false,
        )
        .unwrap();
    for (k, w) in want.iter().enumerate() {
        assert_close(&format!("jsonl semantics row {k}"), &rows[k], w, 0.0, 0.0);
    }
}

/// A corpus of several tokenizer chunks (4096 texts each) is streamed from a file and from
/// stdin: same rows, in order, equal to embedding in memory; truncation notes name the right
/// lines; a line that is not UTF-8 is named and nothing is written.
#[test]
fn long_inputs_stream_in_order_from_file_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let n = 9000;
    let long = "word ".repeat(400);
    let texts: Vec<String> = (0..n)
        .map(|i| match i {
            4999 | 8999 => long.clone(),
            _ => format!(
                "text number {i} about {}",
                ["cats", "rivers", "maths"][i % 3]
            ),
        })
        .collect();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let model = m(&tiny_model());
    let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
    let o = sgpt(&["embed", "-m", &model, "--input", &m(&input), "-o", &m(&a)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("2 of 9000 texts") && stderr(&o).contains("line/argument 5000, 9000"),
        "{}",
        stderr(&o)
    );
    let o = sgpt_stdin(
        &["embed", "-m", &model, "--input", "-", "-o", &m(&b)],
        &(texts.join("\n") + "\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let ((sa, da), (sb, db)) = (read_npy(&a), read_npy(&b));
    assert_eq!((sa.clone(), sb), (vec![n, 64], vec![n, 64]));
    assert_close("file vs stdin", &da, &db, 0.0, 0.0);
    let e = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let rows = [0, 4095, 4096, 4999, 8191, 8192, 8999];
    let want = e
        .embed_texts(
            &rows
                .iter()
                .map(|&i| (texts[i].clone(), Kind::Query))
                .collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    for (w, &i) in want.iter().zip(&rows) {
        // Batches differ from the in-memory call's; batching never changes an embedding beyond
        // summation order (tests/golden.rs bounds it at 1e-6).
        assert_close(
            &format!("row {i}"),
            &da[i * 64..(i + 1) * 64],
            w,
            1e-6,
            1e-6,
        );
    }

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine\nalso fine\n\xff\xfe broken\n").unwrap();
    let out = dir.path().join("bad.npy");
    expect_error(
        &["embed", "-m", &model, "--input", &m(&bad), "-o", &m(&out)],
        "bad.txt:3: not valid UTF-8",
    );
    assert!(!out.exists());
}

#[test]
fn normalize_and_truncation_notice() {
    let model = m(&tiny_model());
    let long = "word ".repeat(400);
    let o = sgpt(&["embed", "-m", &model, "--normalize", "short", &long]);
    assert!(o.status.success(), "{}", stderr(&o));
    for r in parse_jsonl(&o.stdout) {
        let n: f64 = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
    let err = stderr(&o);
    assert!(
        err.contains("1 of 2 texts") && err.contains("truncated") && err.contains("argument 2"),
        "{err}"
    );
}

#[test]
fn inspect_describes_both_layouts() {
    for (dir, dtype, files) in [(tiny_model(), "F32", 1), (tiny_b_model(), "F16", 2)] {
        let o = sgpt(&["inspect", "--json", "-", &m(&dir)]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["files"].as_array().unwrap().len(), files);
        assert!(v["dtypes"][dtype].as_u64().unwrap() > 0, "{v}");
        let (h, vocab) = (
            v["hidden"].as_u64().unwrap(),
            v["vocab_rows"].as_u64().unwrap(),
        );
        assert_eq!(
            v["parameters"].as_u64().unwrap(),
            vocab * h + v["non_embedding_parameters"].as_u64().unwrap()
        );
        let table = sgpt(&["inspect", &m(&dir)]);
        assert!(String::from_utf8_lossy(&table.stdout).contains("heads n"));
    }
}

// ---- bad input ------------------------------------------------------------------------------

fn embed_with(dir: &Path) -> Vec<String> {
    [
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "hello",
    ]
    .map(String::from)
    .to_vec()
}

fn expect_embed_error(dir: &Path, needle: &str) {
    let args = embed_with(dir);
    expect_error(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
}

#[test]
fn missing_and_malformed_files() {
    expect_error(
        &["embed", "-m", "/nonexistent/model", "hi"],
        "model directory not found",
    );

    let d = copy_model(&tiny_model());
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    expect_embed_error(d.path(), "config.json: invalid JSON");

    let d = copy_model(&tiny_model());
    edit_json(d.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("n_layer");
    });
    expect_embed_error(d.path(), "missing `n_layer` or `num_hidden_layers`");

    let d = copy_model(&tiny_model());
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    expect_embed_error(d.path(), "tokenizer.json");

    let d = copy_model(&tiny_model());
    std::fs::write(d.path().join("tokenizer.json"), "{}").unwrap();
    expect_embed_error(d.path(), "tokenizer.json: tokenizer:");

    let d = copy_model(&tiny_model());
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_embed_error(d.path(), "no model.safetensors");
}

#[test]
fn truncated_or_garbled_weights() {
    let d = copy_model(&tiny_model());
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    expect_embed_error(d.path(), "truncated file");

    std::fs::write(&p, b"\xff\xff\xff\x7f\x00\x00\x00\x00garbage").unwrap();
    expect_embed_error(d.path(), "model.safetensors: not a valid safetensors file");

    std::fs::write(&p, b"").unwrap();
    expect_embed_error(d.path(), "not a valid safetensors file");
}

#[test]
fn missing_misshaped_or_mistyped_tensors() {
    let d = copy_model(&tiny_model());
    rewrite_weights(d.path(), |r| {
        r.retain(|t| t.0 != "h.1.mlp.dense_4h_to_h.bias")
    });
    expect_embed_error(d.path(), "tensor `h.1.mlp.dense_4h_to_h.bias` is missing");

    let d = copy_model(&tiny_model());
    rewrite_weights(d.path(), |r| {
        let t = r
            .iter_mut()
            .find(|t| t.0 == "h.0.self_attention.query_key_value.weight")
            .unwrap();
        t.2 = vec![64, 192]; // transposed
    });
    expect_embed_error(
        d.path(),
        "`h.0.self_attention.query_key_value.weight` has shape [64, 192], expected [192, 64]",
    );

    let d = copy_model(&tiny_model());
    rewrite_weights(d.path(), |r| {
        let t = r.iter_mut().find(|t| t.0 == "ln_f.weight").unwrap();
        t.1 = Dtype::I32;
    });
    expect_embed_error(d.path(), "tensor `ln_f.weight` has dtype I32");

    // config with fewer layers than the checkpoint
    let d = copy_model(&tiny_model());
    edit_json(d.path().join("config.json"), |v| v["n_layer"] = 1.into());
    expect_embed_error(d.path(), "it has block 1 but config.json says n_layer = 1");
}

#[test]
fn tokenizer_must_fit_the_embedding_matrix() {
    let d = copy_model(&tiny_model());
    edit_json(d.path().join("config.json"), |v| {
        v["vocab_size"] = 500.into()
    });
    expect_embed_error(
        d.path(),
        "vocabulary of 1000 tokens does not fit the model's embedding matrix of 500 rows",
    );
}

#[test]
fn pooling_other_than_weighted_mean_is_refused() {
    let d = copy_model(&tiny_model());
    edit_json(d.path().join("1_Pooling/config.json"), |v| {
        v["pooling_mode_weightedmean_tokens"] = false.into();
        v["pooling_mode_mean_tokens"] = true.into();
    });
    expect_embed_error(
        d.path(),
        "pooling modes [\"mean_tokens\"] are not supported",
    );
}

#[test]
fn sharded_index_problems() {
    let d = copy_model(&tiny_b_model());
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    expect_embed_error(d.path(), "model-00002-of-00002.safetensors: No such file");

    let d = copy_model(&tiny_b_model());
    edit_json(d.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["transformer.ln_f.bias"] = "model-00001-of-00002.safetensors".into();
    });
    expect_embed_error(d.path(), "`transformer.ln_f.bias (listed in");

    let d = copy_model(&tiny_b_model());
    std::fs::write(d.path().join("model.safetensors.index.json"), "[]").unwrap();
    expect_embed_error(d.path(), "missing object `weight_map`");
}

/// Messages say a thing once and name what was asked for; the CLI's floats are the shortest
/// f32 text (as the server writes them); an input's trailing blank lines are not texts.
#[test]
fn messages_floats_and_trailing_blank_lines() {
    let model = m(&tiny_model());
    let o = sgpt(&["embed", "-m", "models/nope", "x"]);
    let e = stderr(&o);
    assert_eq!(e.matches("not found").count(), 1, "{e}");
    let o = sgpt(&["embed", "-m", &m(&tiny_model().join("config.json")), "x"]);
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
    expect_error(
        &["embed", "-m", &model, "--device", "cuda:3", "x"],
        "--device cuda:3",
    );
    expect_error(
        &[
            "embed", "-m", &model, "--device", "cpu", "--dtype", "bf16", "x",
        ],
        "the dtype (--dtype) chooses the GPU's type",
    );

    let o = sgpt(&["embed", "-m", &model, "--device", "cpu", "x"]);
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    for x in v["embedding"].as_array().unwrap() {
        // An f32 needs at most 9 significant digits to read back exactly; one widened to f64
        // digits (as before) shows 16 or 17.
        let text = x.to_string();
        let mantissa = text
            .trim_start_matches('-')
            .split(['e', 'E'])
            .next()
            .unwrap();
        let digits = mantissa.replace('.', "");
        let significant = digits.trim_start_matches('0').len();
        assert!(significant <= 9, "{text} is widened");
    }

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "a\nb\n\n\n").unwrap();
    let o = sgpt(&[
        "embed",
        "-m",
        &model,
        "--device",
        "cpu",
        "--input",
        &m(&input),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(parse_jsonl(&o.stdout).len(), 2);
}

/// Requests that cannot run fail at once, before any weights are built; inspect takes -m too.
#[test]
fn bench_and_inspect_fail_fast_and_share_flags() {
    let t = std::time::Instant::now();
    expect_error(
        &[
            "bench",
            "kernels",
            "--shape",
            "bloom-7b1",
            "--device",
            "cpu",
        ],
        "needs --device cuda",
    );
    expect_error(
        &["bench", "--shape", "bloom-7b1", "--device", "cuda"],
        "--device cuda:0: no NVIDIA driver",
    );
    expect_error(
        &[
            "bench",
            "--shape",
            "bloom-7b1",
            "--device",
            "cpu",
            "--json",
            "/nonexistent/dir/b.json",
        ],
        "does not exist",
    );
    // Building bloom-7b1's 28 GB of f32 weights would take minutes: these took none of that.
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
    let model = m(&tiny_model());
    let a = sgpt(&["inspect", &model]);
    let b = sgpt(&["inspect", "-m", &model]);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&b));
    assert_eq!(a.stdout, b.stdout);
}

/// Kernel choices are typed flags: an unknown value is a usage error, a GPU choice with
/// `--device cpu` is refused, and the eval metrics name the engine.
#[test]
fn kernel_choices_are_typed_flags() {
    let model = m(&tiny_model());
    let o = sgpt(&["embed", "-m", &model, "--attention", "v9", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("auto, v1, tc, mma, mma2"),
        "{}",
        stderr(&o)
    );
    let o = sgpt(&["embed", "-m", &model, "--gemm", "cutlass", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = sgpt(&["embed", "-m", &model, "--row-kernels", "wide", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("v1, vec"), "{}", stderr(&o));
    let o = sgpt(&["embed", "-m", &model, "--embedding-table", "disk", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("device, host"), "{}", stderr(&o));
    for flags in [
        &["--attention", "mma"][..],
        &["--attention", "mma2"][..],
        &["--gemm", "skinny"][..],
        &["--cuda-graphs"][..],
        &["--row-kernels", "vec"][..],
        &["--embedding-table", "host"][..],
    ] {
        let mut args = vec!["embed", "-m", &model, "--device", "cpu"];
        args.extend_from_slice(flags);
        args.push("x");
        expect_error(&args, "GPU kernel choices");
    }
    // The defaults run on the CPU as before.
    let o = sgpt(&[
        "embed",
        "-m",
        &model,
        "--device",
        "cpu",
        "--attention",
        "auto",
        "x",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&sgpt(&["embed", "--help"]).stdout).into_owned();
    for flag in [
        "--attention",
        "--gemm",
        "--cuda-graphs",
        "--row-kernels",
        "--embedding-table",
        "--dtype",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn bad_texts_and_flags() {
    let model = m(&tiny_model());
    expect_error(
        &["embed", "-m", &model, ""],
        "1 empty or whitespace-only text(s) at line/argument 1",
    );
    expect_error(&["embed", "-m", &model, "ok", "  \t"], "at line/argument 2");
    let o = sgpt(&["embed", "-m", &model, "--allow-empty", ""]);
    assert!(
        o.status.success() && parse_jsonl(&o.stdout).len() == 1,
        "{}",
        stderr(&o)
    );
    expect_error(&["embed", "-m", &model], "no texts");
    expect_error(
        &["embed", "-m", &model, "--device", "cuda", "x"],
        "sgpt: error: --device cuda:0: no NVIDIA driver",
    );
    let o = sgpt(&["embed", "-m", &model, "--device", "tpu", "x"]);
    assert!(
        o.status.code() == Some(2) && stderr(&o).contains("unknown device"),
        "{}",
        stderr(&o)
    );
    // auto falls back to the CPU and says why, naming the GPU-only flags it ignores
    let o = sgpt(&["embed", "-m", &model, "x"]);
    assert!(
        o.status.success() && stderr(&o).contains("using the CPU: no NVIDIA driver"),
        "{}",
        stderr(&o)
    );
    let o = sgpt(&[
        "embed",
        "-m",
        &model,
        "--dtype",
        "bf16",
        "--cuda-graphs",
        "x",
    ]);
    assert!(
        o.status.success()
            && stderr(&o).contains(
                "; ignoring the GPU-only --dtype bf16 and the GPU kernel choices (attention auto, \
                 gemm cublaslt, cuda graphs on, rows v1, embedding table device)"
            ),
        "{}",
        stderr(&o)
    );
    let o = sgpt(&["embed", "-m", &model, "--kind", "passage", "x"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "clap rejects unknown kinds: {}",
        stderr(&o)
    );

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.jsonl");
    std::fs::write(&f, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    expect_error(
        &["embed", "-m", &model, "--input", &m(&f)],
        "in.jsonl:2: expected a JSON object",
    );
    expect_error(
        &["embed", "-m", &model, "--input", &m(&f), "also an argument"],
        "not both",
    );
    expect_error(
        &["embed", "-m", &model, "--input", "/nonexistent.txt"],
        "reading /nonexistent.txt",
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    expect_error(
        &["embed", "-m", &model, "--input", &m(&empty)],
        "no texts to embed",
    );
    // an output path that cannot be created: error, and nothing left behind
    expect_error(
        &["embed", "-m", &model, "-o", "/nonexistent/dir/out.npy", "x"],
        "/nonexistent/dir",
    );
}

/// The pipelined path (tokenizer thread + engine) keeps input order across its 4096-text chunks
/// and reports truncated texts by their index.
#[test]
fn pipelined_embedding_keeps_order_across_chunks() {
    let e = Embedder::open(&tiny_model(), Device::Cpu).unwrap();
    let mut texts: Vec<(String, Kind)> = (0..4100)
        .map(|i| (format!("text number {i}"), Kind::Query))
        .collect();
    texts[4097].0 = "long ".repeat(400);
    let h = e.hidden();
    let mut rows = vec![Vec::new(); texts.len()];
    let mut cut = Vec::new();
    e.embed_pipelined(&texts, false, &mut |i| cut.push(i), &mut |first, out| {
        for (k, r) in out.chunks(h).enumerate() {
            assert!(
                rows[first + k].is_empty(),
                "row {} written twice",
                first + k
            );
            rows[first + k] = r.to_vec();
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(cut, vec![4097]);
    for i in [0, 4095, 4096, 4097, 4099] {
        let alone = e.embed_texts(&texts[i..i + 1], false).unwrap().remove(0);
        assert_close(&format!("pipelined row {i}"), &rows[i], &alone, 1e-6, 1e-5);
    }
}

#[test]
fn bench_reports_throughput_ceilings_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let model = m(&tiny_model());
    let o = sgpt(&[
        "bench",
        "-m",
        &model,
        "--device",
        "cpu",
        "--texts",
        "8",
        "--latency-reps",
        "2",
        "--corpus-reps",
        "3",
        "--json",
        &m(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // Three corpus passes, the fastest reported.
    let passes: Vec<f64> = v["corpus_pass_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(passes.len(), 3, "{v}");
    let best = passes.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(v["corpus_seconds"].as_f64().unwrap(), best, "{v}");
    for key in [
        "tokens_per_s",
        "mfu",
        "memory_floor_ms",
        "query_latency_over_floor",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()),
            "{key}: {v}"
        );
    }
    assert!(v["ceilings"]["copy_bandwidth_gb_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["texts"], 8);
    assert!(v["latency"]["batch_16"]["p50_ms"].as_f64().is_some());
    // The engine, typed: what ran, in what precision (kernel choices only on the GPU).
    assert_eq!(v["engine"]["kind"], "cpu");
    assert_eq!(v["engine"]["dtype"], "f32");
    assert!(v["engine"].get("kernels").is_none(), "{}", v["engine"]);
    // a baseline file gives a ratio
    let base = dir.path().join("base.json");
    std::fs::write(&base, r#"{"tokens_per_s": 10.0, "query_p50_ms": 1.0}"#).unwrap();
    let o = sgpt(&[
        "bench",
        "-m",
        &model,
        "--device",
        "cpu",
        "--texts",
        "4",
        "--latency-reps",
        "1",
        "--baseline",
        &m(&base),
    ]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("vs baseline"),
        "{}",
        stderr(&o)
    );
    // Single-query latency only, on queries of exactly 21 tokens.
    let o = sgpt(&[
        "bench",
        "-m",
        &model,
        "--device",
        "cpu",
        "--texts",
        "4",
        "--latency-reps",
        "2",
        "--latency-batches",
        "1",
        "--query-tokens",
        "21",
        "--json",
        "-",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["latency"]["batch_01"]["tokens"], 21, "{v}");
    assert!(v["latency"].get("batch_04").is_none(), "{v}");
    expect_error(
        &["bench", "-m", &model, "--latency-batches", "4,16"],
        "must include 1",
    );
    let o = sgpt(&["bench", "-m", &model, "--query-tokens", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not in 3..=4096"), "{}", stderr(&o));
    expect_error(
        &["bench", "kernels", "-m", &model, "--device", "cpu"],
        "needs --device cuda",
    );
    expect_error(
        &["bench", "--shape", "bloom-9z", "--device", "cpu"],
        "unknown shape",
    );
    expect_error(
        &["bench", "--device", "cpu"],
        "give --model DIR or --shape NAME",
    );
}

/// `--json FILE` means the same on inspect, bench and eval: the result as one JSON document in
/// FILE beside the human-readable report on stdout; with `-`, stdout holds the JSON alone.
#[test]
fn json_flag_means_the_same_everywhere() {
    let model = m(&tiny_model());
    let tmp = tempfile::tempdir().unwrap();
    let data = common::root().join("tests/fixtures/beir-synthetic");
    let cache = tmp.path().join("cache");
    let commands: [(&str, Vec<&str>, &str); 3] = [
        ("inspect", vec!["inspect", "-m", &model], "hidden"),
        (
            "bench",
            vec![
                "bench",
                "-m",
                &model,
                "--device",
                "cpu",
                "--texts",
                "8",
                "--latency-reps",
                "1",
            ],
            "tokens_per_s",
        ),
        (
            "eval",
            vec![
                "eval",
                "-m",
                &model,
                "--device",
                "cpu",
                "--data",
                data.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
            ],
            "ndcg@10",
        ),
    ];
    for (name, args, key) in commands {
        let file = tmp.path().join(format!("{name}.json"));
        let mut with_file = args.clone();
        with_file.extend(["--json", file.to_str().unwrap()]);
        let o = sgpt(&with_file);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(
            !table.trim().is_empty() && serde_json::from_str::<serde_json::Value>(&table).is_err(),
            "{name}: expected the human report on stdout, got {table:?}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert!(!v[key].is_null(), "{name}: no {key:?} in {v}");

        let mut to_stdout = args.clone();
        to_stdout.extend(["--json", "-"]);
        let o = sgpt(&to_stdout);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{name}: stdout is not one JSON document ({e})"));
        assert!(!v[key].is_null(), "{name}: no {key:?} in {v}");
    }
}

/// The most common mistakes, each answered by exactly one line on stderr (pinned here word for
/// word: a change to one of these messages is a change users see) and exit status 1.
#[test]
fn common_errors_are_one_pinned_line() {
    let model = m(&tiny_model());
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).display().to_string();
    let no_tokenizer = copy_model(&tiny_model());
    std::fs::remove_file(no_tokenizer.path().join("tokenizer.json")).unwrap();
    let truncated = copy_model(&tiny_model());
    let weights = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..1000]).unwrap();
    std::fs::write(t("blank.txt"), "a\n\nb\n").unwrap();
    std::fs::write(t("bad.jsonl"), "{\"text\": \"a\"}\n{bad\n").unwrap();
    let (nt, tr) = (m(no_tokenizer.path()), m(truncated.path()));
    let config = m(&tiny_model().join("config.json"));
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["embed".into(), "-m".into(), t("nope"), "x".into()],
            format!("{}: model directory not found", t("nope")),
        ),
        (
            vec!["embed".into(), "-m".into(), config.clone(), "x".into()],
            format!("{config}: not a directory: give the model's directory, not a file in it"),
        ),
        (
            vec!["embed".into(), "-m".into(), nt.clone(), "x".into()],
            format!("{nt}/tokenizer.json: No such file or directory (os error 2)"),
        ),
        (
            vec!["inspect".into(), "-m".into(), tr.clone()],
            format!("{tr}/model.safetensors: not a valid safetensors file: invalid header length"),
        ),
        (
            vec!["embed".into(), "-m".into(), model.clone(), "".into()],
            "arguments: 1 empty or whitespace-only text(s) at line/argument 1; pass --allow-empty \
             to embed them as the reference does (brackets only)"
                .into(),
        ),
        (
            vec![
                "embed".into(),
                "-m".into(),
                model.clone(),
                "--input".into(),
                t("blank.txt"),
            ],
            format!(
                "{}: 1 empty or whitespace-only text(s) at line/argument 2; pass --allow-empty \
                 to embed them as the reference does (brackets only)",
                t("blank.txt")
            ),
        ),
        (
            vec![
                "embed".into(),
                "-m".into(),
                model.clone(),
                "--input".into(),
                t("missing.txt"),
            ],
            format!(
                "reading {}: No such file or directory (os error 2)",
                t("missing.txt")
            ),
        ),
        (
            vec![
                "embed".into(),
                "-m".into(),
                model.clone(),
                "-o".into(),
                t("no/dir/x.npy"),
                "x".into(),
            ],
            format!(
                "{}: directory {} does not exist",
                t("no/dir/x.npy"),
                t("no/dir")
            ),
        ),
        (
            vec![
                "embed".into(),
                "-m".into(),
                model.clone(),
                "--input".into(),
                t("bad.jsonl"),
            ],
            format!(
                "{}:2: expected a JSON object with a string \"text\" and optional \"kind\" \
                 (\"query\"|\"document\") and \"title\": key must be a string at line 1 column 2",
                t("bad.jsonl")
            ),
        ),
        (
            vec![
                "embed".into(),
                "-m".into(),
                model.clone(),
                "--device".into(),
                "cpu".into(),
                "--dtype".into(),
                "bf16".into(),
                "x".into(),
            ],
            "the dtype (--dtype) chooses the GPU's type; the CPU backend always computes in f32"
                .into(),
        ),
        (
            vec![
                "eval".into(),
                "-m".into(),
                model.clone(),
                "--data".into(),
                t("nodata"),
            ],
            format!("{}: dataset directory not found", t("nodata")),
        ),
        (
            vec!["serve".into(), "-m".into(), t("nope")],
            format!("{}: model directory not found", t("nope")),
        ),
    ];
    for (args, line) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sgpt(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), format!("sgpt: error: {line}\n"), "{args:?}");
    }
    // The device asked for is named, once, by every command, before any work (the reason
    // depends on the machine; serve fails before it listens).
    let data = common::root().join("tests/fixtures/beir-synthetic");
    for device in ["cuda:7", "cuda:7,8", "cuda:all"] {
        if device == "cuda:all" && sgpt::backend::cuda::device::unavailable_reason(0).is_none() {
            continue; // a GPU is here: cuda:all works
        }
        for cmd in [
            vec!["embed", "-m", &model, "--device", device, "x"],
            vec![
                "eval",
                "-m",
                &model,
                "--device",
                device,
                "--data",
                data.to_str().unwrap(),
            ],
            vec!["serve", "-m", &model, "--device", device, "-p", "0"],
            vec!["bench", "-m", &model, "--device", device],
        ] {
            let o = sgpt(&cmd);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{cmd:?}: {e}");
            let want = format!("sgpt: error: --device {device}: ");
            assert!(
                e.starts_with(&want) && e.lines().count() == 1,
                "{cmd:?}: {e}"
            );
        }
    }
}

/// A model load reports each block as it is loaded, in order, ending at the layer count (what
/// the CLI's load bar shows for a multi-GB checkpoint).
#[test]
fn model_load_reports_progress_per_block() {
    let seen = std::sync::Mutex::new(Vec::new());
    let opts = sgpt::engine::EngineOptions {
        device: Device::Cpu,
        ..Default::default()
    };
    let e = Embedder::open_reporting(&tiny_model(), opts, &|done, all| {
        seen.lock().unwrap().push((done, all))
    })
    .unwrap();
    let layers = e.model.config.layers;
    let want: Vec<(usize, usize)> = (1..=layers).map(|i| (i, layers)).collect();
    assert_eq!(*seen.lock().unwrap(), want);
}
