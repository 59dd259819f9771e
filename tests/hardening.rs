//! The CLI under hostile input (issue 11): outputs that never destroy what they replace, bounded
//! memory for huge texts, no non-finite vector returned, no silent misreading of a model
//! directory, and `inspect` running every check `embed` runs. Each test reproduces a defect an
//! attack run found.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{edit_json, rewrite_weights, tiny_model};
use safetensors::Dtype;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sgpt"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn m() -> String {
    tiny_model().to_str().unwrap().to_string()
}

/// Expects exit 1, no panic, `needle` in stderr.
fn expect_fail(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn copy_model() -> tempfile::TempDir {
    common::copy_model(&tiny_model())
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running (a hang).
fn wait_bounded(mut child: std::process::Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("{what}: still running after {limit:?}");
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial"))
        .collect()
}

// ---- outputs ---------------------------------------------------------------------------------

#[test]
fn output_through_a_symlink_replaces_its_target_and_keeps_the_link() {
    let d = tempfile::tempdir().unwrap();
    let real = d.path().join("real.jsonl");
    std::fs::write(&real, "old\n").unwrap();
    let link = d.path().join("link.jsonl");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = run(&[
        "embed",
        "-m",
        &m(),
        "--device",
        "cpu",
        "-o",
        link.to_str().unwrap(),
        "hi",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&real)
        .unwrap()
        .starts_with("{\"embedding\""));
    assert!(partials(d.path()).is_empty());
}

#[test]
fn output_to_a_fifo_is_streamed_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("out.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let child = bin()
        .args([
            "embed",
            "-m",
            &m(),
            "--device",
            "cpu",
            "-o",
            fifo.to_str().unwrap(),
            "a",
            "b",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_bounded(child, Duration::from_secs(60), "embed -o FIFO");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(reader.join().unwrap().lines().count(), 2);
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(partials(d.path()).is_empty());
}

#[test]
fn a_bad_output_path_fails_before_the_model_loads() {
    let d = tempfile::tempdir().unwrap();
    // The model path is bogus: the output error must come first, naming the output.
    let o = run(&[
        "embed",
        "-m",
        "/nonexistent",
        "-o",
        d.path().to_str().unwrap(),
        "hi",
    ]);
    expect_fail(&o, "is a directory");
    let missing = d.path().join("no/such/dir/out.npy");
    let o = run(&[
        "embed",
        "-m",
        "/nonexistent",
        "-o",
        missing.to_str().unwrap(),
        "hi",
    ]);
    expect_fail(&o, "does not exist");
    assert!(partials(d.path()).is_empty());
}

/// Two runs writing the same path at once: each writes its own temp file, so the result is one
/// run's complete output (here: the same rows in both, so any mix would show as extra lines or
/// a torn line), and both exit 0.
#[test]
fn concurrent_runs_to_one_output_never_mix() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.txt");
    let texts: Vec<String> = (0..3000)
        .map(|i| format!("text number {i} of the run"))
        .collect();
    std::fs::write(&input, texts.join("\n")).unwrap();
    let out = d.path().join("out.jsonl");
    for _ in 0..2 {
        let spawn = || {
            bin()
                .args(["embed", "-m", &m(), "--device", "cpu", "-q", "--input"])
                .arg(&input)
                .arg("-o")
                .arg(&out)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        for c in [a, b] {
            let o = wait_bounded(c, Duration::from_secs(120), "concurrent embed");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got.lines().count(), texts.len(), "rows of both runs mixed");
        assert!(got
            .lines()
            .all(|l| l.starts_with("{\"embedding\":[") && l.ends_with("]}")));
        assert!(partials(d.path()).is_empty());
    }
}

/// SIGINT or SIGTERM in the middle of a run: the previous output is untouched and no temp file
/// is left behind.
#[test]
fn a_signal_mid_run_leaves_the_old_output_and_no_temp_file() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.txt");
    let line = "a sentence long enough to take the tiny model some time to embed ".repeat(4);
    std::fs::write(&input, format!("{line}\n").repeat(400_000)).unwrap();
    let out = d.path().join("out.npy");
    for sig in ["INT", "TERM"] {
        std::fs::write(&out, "previous output").unwrap();
        let child = bin()
            .args(["embed", "-m", &m(), "--device", "cpu", "-q", "--input"])
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while partials(d.path()).is_empty() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!partials(d.path()).is_empty(), "no temp file appeared");
        std::thread::sleep(Duration::from_millis(300));
        let st = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let o = wait_bounded(child, Duration::from_secs(30), "embed after a signal");
        assert_eq!(
            o.status.code(),
            Some(130),
            "SIG{sig}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous output");
        assert!(
            partials(d.path()).is_empty(),
            "SIG{sig} left {:?}",
            partials(d.path())
        );
    }
}

// ---- input -----------------------------------------------------------------------------------

#[test]
fn a_malformed_first_jsonl_line_is_an_error_not_plain_text() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"a\",}\n{\"text\": \"b\"}\n").unwrap();
    let o = run(&[
        "embed",
        "-m",
        &m(),
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
    ]);
    expect_fail(&o, "in.jsonl:1");
    assert!(o.stdout.is_empty());
}

/// A 50 MB line embeds in bounded memory: under an address-space limit far below what
/// tokenizing it whole takes (≈ 160 bytes per input byte: 8 GB), it succeeds and says it cut
/// the text. The limit leaves room for the binary, thread stacks and allocator arenas.
#[test]
fn a_50_mb_line_embeds_in_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("huge.txt");
    let mut text = "words in a very long document, ".repeat(50 << 20 >> 5);
    text.push('\n');
    text.push_str("a short one\n");
    std::fs::write(&input, &text).unwrap();
    drop(text);
    let cmd = format!(
        "ulimit -v 1500000 && exec '{}' embed -m '{}' --device cpu --threads 2 --input '{}'",
        env!("CARGO_BIN_EXE_sgpt"),
        m(),
        input.display()
    );
    let child = Command::new("sh")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_bounded(child, Duration::from_secs(120), "embed of a 50 MB line");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    assert!(err.contains("1 of 2 texts were longer"), "{err}");
}

#[test]
fn thread_counts_are_bounded() {
    for n in ["0", "100000"] {
        let o = run(&["embed", "-m", &m(), "--device", "cpu", "--threads", n, "hi"]);
        expect_fail(&o, "threads (--threads) must be between 1 and");
    }
}

// ---- model directories -----------------------------------------------------------------------

/// NaN in one weight: `embed` fails naming the texts and writes no output; `inspect` names the
/// tensor. (Before: `{"embedding":[null,…]}` and exit 0.)
#[test]
fn non_finite_weights_never_become_an_embedding() {
    let d = copy_model();
    rewrite_weights(d.path(), |r| {
        let t = r
            .iter_mut()
            .find(|t| t.0 == "h.1.mlp.dense_4h_to_h.weight")
            .unwrap();
        assert_eq!(t.1, Dtype::F32);
        t.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let model = d.path().to_str().unwrap();
    let out = d.path().join("out.npy");
    let o = run(&[
        "embed",
        "-m",
        model,
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
        "a",
        "b",
    ]);
    expect_fail(&o, "NaN or Inf for 2 text(s) (0-based: 0, 1)");
    assert!(!out.exists());
    assert!(partials(d.path()).is_empty());
    let o = run(&["inspect", model]);
    expect_fail(&o, "`h.1.mlp.dense_4h_to_h.weight` (1 values)");
}

/// `inspect` exits 1 on everything `embed` refuses (before: exit 0 on each of these).
#[test]
fn inspect_runs_every_check_embed_runs() {
    type Edit = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing tensor",
            Box::new(|d| rewrite_weights(d, |r| r.retain(|t| t.0 != "ln_f.bias"))),
            "tensor `ln_f.bias` is missing",
        ),
        (
            "transposed shape",
            Box::new(|d| {
                rewrite_weights(d, |r| {
                    let t = r
                        .iter_mut()
                        .find(|t| t.0 == "h.0.mlp.dense_h_to_4h.weight")
                        .unwrap();
                    t.2.reverse();
                })
            }),
            "`h.0.mlp.dense_h_to_4h.weight` has shape",
        ),
        (
            "extra layer",
            Box::new(|d| edit_json(d.join("config.json"), |v| v["n_layer"] = 1.into())),
            "it has block 1 but config.json says n_layer = 1",
        ),
        (
            "duplicate with and without prefix",
            Box::new(|d| {
                rewrite_weights(d, |r| {
                    let t = r.iter().find(|t| t.0 == "ln_f.weight").unwrap().clone();
                    r.push(("transformer.ln_f.weight".into(), t.1, t.2, t.3));
                })
            }),
            "stored twice",
        ),
        (
            "unknown tensor",
            Box::new(|d| {
                rewrite_weights(d, |r| {
                    r.push((
                        "h.0.rotary.inv_freq".into(),
                        Dtype::F32,
                        vec![1],
                        vec![0; 4],
                    ))
                })
            }),
            "unexpected tensor `h.0.rotary.inv_freq`",
        ),
        (
            "empty weight map",
            Box::new(|d| {
                std::fs::remove_file(d.join("model.safetensors")).unwrap();
                std::fs::write(
                    d.join("model.safetensors.index.json"),
                    r#"{"weight_map": {}}"#,
                )
                .unwrap();
            }),
            "is missing",
        ),
        (
            "post-layernorm residual flag",
            Box::new(|d| {
                edit_json(d.join("config.json"), |v| {
                    v["apply_residual_connection_post_layernorm"] = true.into()
                })
            }),
            "apply_residual_connection_post_layernorm",
        ),
        (
            "Normalize module",
            Box::new(|d| {
                edit_json(d.join("modules.json"), |v| {
                    v.as_array_mut().unwrap().push(serde_json::json!({
                        "idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"
                    }))
                })
            }),
            "Normalize module",
        ),
    ];
    for (what, edit, needle) in cases {
        let d = copy_model();
        edit(d.path());
        let model = d.path().to_str().unwrap();
        for args in [
            vec!["inspect", model],
            vec!["embed", "-m", model, "--device", "cpu", "x"],
        ] {
            let o = run(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{what}: {args:?}: {err}");
            assert!(
                err.contains(needle),
                "{what}: {args:?}: expected {needle:?} in {err}"
            );
        }
    }
}

/// A FIFO where a weight file should be used to block the load forever; now it is refused.
#[test]
fn a_fifo_in_place_of_a_model_file_is_refused_not_waited_on() {
    for file in ["model.safetensors", "config.json"] {
        let d = copy_model();
        let p = d.path().join(file);
        std::fs::remove_file(&p).unwrap();
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
        let child = bin()
            .args(["inspect", d.path().to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let o = wait_bounded(child, Duration::from_secs(30), "inspect with a FIFO");
        expect_fail(&o, "not a regular file");
    }
}

// ---- eval ------------------------------------------------------------------------------------

fn eval_fixture() -> String {
    common::root()
        .join("tests/fixtures/beir-synthetic")
        .to_str()
        .unwrap()
        .to_string()
}

/// `sgpt eval` with non-finite weights fails instead of ranking by NaN scores, and writes
/// neither its run nor its metrics file.
#[test]
fn eval_refuses_non_finite_embeddings() {
    let d = copy_model();
    rewrite_weights(d.path(), |r| {
        let t = r.iter_mut().find(|t| t.0 == "ln_f.bias").unwrap();
        t.3[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let (run_file, metrics) = (d.path().join("run.trec"), d.path().join("m.json"));
    let cache = d.path().join("cache");
    let o = run(&[
        "eval",
        "-m",
        d.path().to_str().unwrap(),
        "--data",
        &eval_fixture(),
        "--device",
        "cpu",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--run",
        run_file.to_str().unwrap(),
        "--json",
        metrics.to_str().unwrap(),
        "-q",
    ]);
    expect_fail(&o, "NaN or Inf");
    assert!(!run_file.exists() && !metrics.exists());
    assert!(partials(d.path()).is_empty());
}

/// A run or metrics path that cannot be written fails before any embedding (it used to fail
/// after the whole evaluation).
#[test]
fn eval_output_paths_are_checked_first() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("missing/run.trec");
    let o = run(&[
        "eval",
        "-m",
        "/nonexistent",
        "--data",
        &eval_fixture(),
        "--run",
        bad.to_str().unwrap(),
    ]);
    expect_fail(&o, "does not exist");
    let o = run(&[
        "eval",
        "-m",
        "/nonexistent",
        "--data",
        &eval_fixture(),
        "--json",
        d.path().to_str().unwrap(),
    ]);
    expect_fail(&o, "is a directory");
}

// ---- found by the attack run after the fixes --------------------------------------------------

/// `-o /dev/stdout` writes through the process's stdout: into a shell's `>>` redirection after
/// what is already there (it used to follow /proc/self/fd/1 to the file and replace it, losing
/// the earlier content), and into a pipe (it used to fail).
#[test]
fn output_to_dev_stdout_goes_through_the_stream() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("log.txt");
    std::fs::write(&log, "previous\n").unwrap();
    let sh = format!(
        "{{ echo before; '{}' embed -m '{}' --device cpu -q -o /dev/stdout a b; echo \"after $?\"; }} >> '{}'",
        env!("CARGO_BIN_EXE_sgpt"),
        m(),
        log.display()
    );
    assert!(Command::new("sh")
        .args(["-c", &sh])
        .status()
        .unwrap()
        .success());
    let got = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 5, "{got}");
    assert_eq!(
        (lines[0], lines[1], lines[4]),
        ("previous", "before", "after 0")
    );
    assert!(lines[2].starts_with("{\"embedding\":[") && lines[3].starts_with("{\"embedding\":["));
    assert!(partials(d.path()).is_empty());

    let sh = format!(
        "'{}' embed -m '{}' --device cpu -q -o /dev/stdout a b | wc -l",
        env!("CARGO_BIN_EXE_sgpt"),
        m()
    );
    let o = Command::new("sh").args(["-c", &sh]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "2",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A JSONL file written with a UTF-8 byte-order mark is JSONL (it used to be read as plain text,
/// BOM and braces embedded, exit 0).
#[test]
fn a_jsonl_file_with_a_byte_order_mark_is_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("bom.jsonl");
    std::fs::write(&input, "\u{feff}{\"text\": \"a\"}\n").unwrap();
    let o = run(&[
        "embed",
        "-m",
        &m(),
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plain = run(&["embed", "-m", &m(), "--device", "cpu", "a"]);
    assert_eq!(o.stdout, plain.stdout);
}
