//! `sgpt eval`: the command-line side of [`sgpt::eval`] (flags, progress, output files).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use sgpt::eval::beir::Dataset;
use sgpt::eval::{evaluate, report, EvalOptions, Event};
use sgpt::io::output::OutputFile;

use super::{setup, Common};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Dataset directory in BEIR layout: corpus.jsonl ({"_id", "title", "text"} per line),
    /// queries.jsonl ({"_id", "text"}), qrels/<SPLIT>.tsv (a header line, then
    /// query-id, corpus-id, integer score, tab-separated). Only queries with judgments are
    /// evaluated.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Which qrels/<SPLIT>.tsv to evaluate.
    #[arg(long, value_name = "SPLIT", default_value = "test")]
    split: String,
    /// Write the ranking to FILE as a TREC run: `qid Q0 docid rank score sgpt`, the --top-k
    /// best documents per query.
    #[arg(long, value_name = "FILE")]
    run: Option<PathBuf>,
    /// Write the metrics to FILE as JSON ("ndcg@10", "recall@100", "map@100", "mrr@10", plus
    /// counts, timings and per-query values); `-` puts them on stdout in place of the table.
    /// (Formerly --metrics, still accepted.)
    #[arg(long, value_name = "FILE", alias = "metrics")]
    json: Option<PathBuf>,
    /// Where embeddings are cached, in shards written as they are computed, so an interrupted
    /// run resumes where it stopped and a repeated run embeds nothing (default: DATA/.sgpt-cache).
    /// Safe to delete; one subdirectory per (model files, texts, backend).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Documents per query in the run file. The metrics always use the top 100.
    #[arg(long, value_name = "K", default_value_t = 100)]
    top_k: usize,
    /// Most documents per cache shard (the most work an interruption can lose, and the memory
    /// one shard takes: documents × hidden × 4 bytes).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    shard_docs: usize,
    /// Also close a shard once it has been open this many seconds, so a slow run loses at
    /// most about this much work when interrupted.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    shard_seconds: f64,
    /// No progress bar or notices on stderr (the result is still printed on stdout).
    #[arg(long, short)]
    quiet: bool,
}

/// Test hook: pause after each written shard, so a test can kill the run between shards.
const PAUSE_ENV: &str = "SGPT_EVAL_PAUSE_AFTER_SHARD_MS";

pub fn run(a: EvalArgs) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if a.shard_docs == 0 {
        bail!("--shard-docs must be at least 1");
    }
    if a.shard_seconds.is_nan() || a.shard_seconds <= 0.0 {
        bail!("--shard-seconds must be positive");
    }
    let pause = match std::env::var(PAUSE_ENV) {
        Ok(v) => Duration::from_millis(v.parse().with_context(|| format!("{PAUSE_ENV}={v}"))?),
        Err(_) => Duration::ZERO,
    };
    a.common.engine.device.check_available()?;
    // Output files are checked and opened before any work, so a bad path fails at once; each
    // is put in place only when complete (sgpt::io::output).
    sgpt::io::output::remove_temps_on_signal()?;
    let run_out = a.run.as_deref().map(OutputFile::create).transpose()?;
    let metrics_out = a.json.as_deref().map(OutputFile::create).transpose()?;
    let data = Dataset::load(&a.data, &a.split)?;
    if a.run.is_some() {
        data.check_ids_for_run_file()?;
    }
    if !a.quiet {
        warn_about_qrels(&data);
    }
    let embedder = setup(&a.common, a.quiet)?;
    let opts = EvalOptions {
        top_k: a.top_k,
        cache_root: a
            .cache_dir
            .clone()
            .unwrap_or_else(|| a.data.join(".sgpt-cache")),
        shard_rows: a.shard_docs,
        shard_seconds: a.shard_seconds,
        pause_after_shard: pause,
    };
    let mut progress = Progress::new(a.quiet);
    let outcome = evaluate(&embedder, &data, &opts, &mut |e| progress.event(e))?;
    progress.clear();

    if let Some(out) = run_out {
        report::write_run(out, &data, &outcome, a.top_k)?;
    }
    if let Some(out) = metrics_out {
        let json = report::metrics_json(&data, &outcome, &a.common.model, &opts);
        out.write_all_and_commit((serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
    }
    if a.json.as_deref() != Some(std::path::Path::new("-")) {
        print!("{}", report::table(&data, &outcome));
    }
    Ok(())
}

fn warn_about_qrels(data: &Dataset) {
    let qrels = data.qrels_path.display();
    if let Some(first) = data.unknown_docs.first() {
        eprintln!(
            "sgpt: warning: {qrels}: {} judgment(s) name documents that are not in corpus.jsonl \
             (first at line {}: query {:?}, document {:?}); as in BEIR they are kept and count \
             as relevant documents that are never retrieved",
            data.unknown_docs.len(),
            first.line,
            first.query_id,
            first.doc_id
        );
    }
    if data.duplicate_judgments > 0 {
        eprintln!(
            "sgpt: warning: {qrels}: {} repeated (query, document) judgment(s); the last one \
             wins, as in BEIR",
            data.duplicate_judgments
        );
    }
}

/// A progress bar on a terminal; otherwise one line per written shard (for logs).
struct Progress {
    quiet: bool,
    terminal: bool,
    bar: Option<ProgressBar>,
    started: Instant,
    done: usize,
    todo: usize,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Progress {
            quiet,
            terminal: std::io::stderr().is_terminal(),
            bar: None,
            started: Instant::now(),
            done: 0,
            todo: 0,
        }
    }

    fn clear(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    fn event(&mut self, e: Event) {
        if self.quiet {
            return;
        }
        match e {
            Event::Note(s) => eprintln!("sgpt: note: {s}"),
            Event::Start {
                what,
                total,
                cached,
            } => {
                eprintln!(
                    "sgpt: {what}: {total}, {cached} from the cache, {} to embed",
                    total - cached
                );
                self.started = Instant::now();
                self.done = 0;
                self.todo = total - cached;
                if self.terminal && total > cached {
                    let bar = ProgressBar::with_draw_target(
                        Some(total as u64),
                        ProgressDrawTarget::stderr(),
                    )
                    .with_position(cached as u64);
                    bar.set_style(
                        ProgressStyle::with_template(&format!(
                            "{what} {{bar:40}} {{pos}}/{{len}}  {{rate}} {what}/s  eta {{eta}}"
                        ))
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .with_key(
                            "rate",
                            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                                let _ = write!(w, "{:.1}", s.per_sec());
                            },
                        ),
                    );
                    bar.reset_eta();
                    self.bar = Some(bar);
                }
            }
            Event::Embedded { rows, .. } => {
                self.done += rows;
                if let Some(b) = &self.bar {
                    b.inc(rows as u64);
                }
            }
            Event::Shard { what, end, .. } => {
                if self.bar.is_none() {
                    let s = self.started.elapsed().as_secs_f64();
                    let rate = self.done as f64 / s.max(1e-9);
                    let left = (self.todo - self.done.min(self.todo)) as f64 / rate.max(1e-9);
                    eprintln!(
                        "sgpt: {what}: {end} on disk ({rate:.1} {what}/s, eta {:.0} s)",
                        left
                    );
                }
            }
            Event::Done { .. } => self.clear(),
        }
    }
}
