//! The `sgpt` command line: one file per subcommand, the flags they share here.

mod bench;
mod embed;
mod eval;
mod inspect;
mod quantize;
mod serve;

use std::cell::OnceCell;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sgpt::backend::cuda::device::GpuDtype;
use sgpt::backend::{AttentionKernel, EmbeddingTable, GemmKernel, KernelChoices, RowKernel};
use sgpt::engine::{Device, Embedder, EngineOptions};
use sgpt::model::tokenize::Kind;

#[derive(Parser)]
#[command(name = "sgpt", version, about = "SGPT-BLOOM sentence embeddings")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embed texts (arguments, a file or stdin) and write one vector per input, in input order.
    Embed(embed::EmbedArgs),
    /// Describe a model directory: configuration, tensors, dtypes, sizes, files.
    Inspect(inspect::InspectArgs),
    /// Measure embedding throughput and single-query latency.
    Bench(bench::BenchArgs),
    /// Retrieval quality on a dataset in BEIR layout: NDCG@10, Recall@100, MAP@100, MRR@10
    /// (trec_eval's definitions), a TREC run file; embeddings cached so a rerun resumes.
    Eval(eval::EvalArgs),
    /// Serve embeddings over HTTP: OpenAI's POST /v1/embeddings and text-embeddings-inference's
    /// POST /embed, with dynamic batching; GET /health, /info, /metrics.
    Serve(serve::ServeArgs),
    /// Write a copy of a model with its linear layers stored in FP8 (E4M3, a scale per output
    /// channel), which --dtype fp8 (or fp8-alternate) then loads as stored.
    Quantize(quantize::QuantizeArgs),
}

#[derive(Args)]
struct Common {
    /// Model directory: config.json, tokenizer.json, model.safetensors (or an index + shards).
    #[arg(long, short)]
    model: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
}

/// How the engine runs (shared by every command that embeds).
#[derive(Args, Clone, Copy)]
pub(crate) struct EngineArgs {
    /// Where to run: auto (the GPU when usable, else the CPU, saying why), cpu, cuda, cuda:N,
    /// or one engine replica per GPU: cuda:all, or a list such as cuda:0,2.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Activation and weight type on the GPU [default: f16]; the CPU computes in f32, so f16
    /// or bf16 with --device cpu is an error. fp8: the four GEMMs of each block in E4M3 — on a
    /// GPU of compute capability 8.9 or newer with f16 activations (not yet run on a GPU), or
    /// as the CPU emulation with --device cpu (docs/fp8.md); fp8-alternate: the same in every
    /// other block (1, 3, 5, …), the rest as without fp8.
    #[arg(long, value_enum)]
    dtype: Option<GpuDtype>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Most tokens in one packed batch [default: 2048 on the CPU, 16384 on the GPU].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// GPU attention kernel: auto (measured rule: v1 below 128 tokens, tc from 128), v1, tc,
    /// or mma and mma2 (versions 3 and 4, on trial: never run on a GPU yet).
    #[arg(long, value_enum, default_value = "auto")]
    attention: AttentionKernel,
    /// GPU GEMM path: cublaslt, or skinny for batches of at most 16 tokens (on trial: never run
    /// on a GPU yet).
    #[arg(long, value_enum, default_value = "cublaslt")]
    gemm: GemmKernel,
    /// Capture and replay CUDA graphs for batches of up to 128 tokens (on trial).
    #[arg(long)]
    cuda_graphs: bool,
    /// GPU row kernels (layernorms, bias + GELU, final norm and pooling): v1, or vec
    /// (registers and 16-byte accesses, on trial: never run on a GPU yet).
    #[arg(long, value_enum, default_value = "v1")]
    row_kernels: RowKernel,
    /// Where the GPU keeps the embedding table: device, or host (page-locked host memory the
    /// embedding kernel reads each token's row from over the bus: 2 GB less device memory at
    /// bloom-7b1, the same vectors; on trial: never run on a GPU yet).
    #[arg(long, value_enum, default_value = "device")]
    embedding_table: EmbeddingTable,
}

impl EngineArgs {
    /// The GPU type asked for, f16 when none was.
    pub(crate) fn gpu_dtype(&self) -> GpuDtype {
        self.dtype.unwrap_or(GpuDtype::F16)
    }

    /// Applies --threads (once per process) and checks the budget; the engine options.
    fn apply(&self) -> Result<EngineOptions> {
        let opts = EngineOptions {
            device: self.device,
            dtype: self.dtype,
            max_batch_tokens: self.max_batch_tokens,
            kernels: KernelChoices {
                attention: self.attention,
                gemm: self.gemm,
                cuda_graphs: self.cuda_graphs,
                rows: self.row_kernels,
                table: self.embedding_table,
            },
        };
        // All checks first, so a bad flag fails before anything (a thread pool) is set up.
        opts.check()?;
        if let Some(n) = self.threads {
            sgpt::engine::options::check_threads(n)?;
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("setting up the thread pool")?;
        }
        Ok(opts)
    }
}

/// `--json FILE`, the same on every command that reports a result (inspect, bench, eval).
#[derive(Args, Clone)]
pub(crate) struct JsonOut {
    /// Also write the result as one JSON document to FILE; `-` puts it on stdout in place of
    /// the human-readable report.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

impl JsonOut {
    /// Whether the human-readable report goes to stdout (not when the JSON takes it).
    pub(crate) fn human(&self) -> bool {
        self.json.as_deref() != Some(Path::new("-"))
    }

    /// Fails now, before any work, if FILE cannot be written; it is written only at the end.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.json {
            Some(p) => Ok(sgpt::io::output::check(p)?),
            None => Ok(()),
        }
    }

    /// Writes the result (pretty-printed, one trailing newline), complete or not at all.
    pub(crate) fn write(&self, v: &serde_json::Value) -> Result<()> {
        if let Some(p) = &self.json {
            let text = serde_json::to_string_pretty(v)? + "\n";
            sgpt::io::output::write_file(p, text.as_bytes())?;
        }
        Ok(())
    }
}

/// `println!` when the human-readable report is on (see [`JsonOut::human`]).
macro_rules! report {
    ($on:expr, $($arg:tt)*) => {
        if $on {
            println!($($arg)*);
        }
    };
}
pub(crate) use report;

#[derive(Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Query,
    Document,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Kind {
        match k {
            KindArg::Query => Kind::Query,
            KindArg::Document => Kind::Document,
        }
    }
}

pub fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Embed(a) => embed::run(a),
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Eval(a) => eval::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Quantize(a) => quantize::run(a),
    };
    if let Err(e) = r {
        eprintln!("sgpt: error: {e:#}");
        std::process::exit(1);
    }
}

fn setup(c: &Common, quiet: bool) -> Result<Embedder> {
    let opts = c.engine.apply()?;
    let bar = LoadBar::new(quiet);
    let e = Embedder::open_reporting(&c.model, opts, &|done, all| bar.step(done, all))?;
    bar.done();
    if !quiet {
        for line in e.notice.iter().cloned().chain(e.backend.load_summary()) {
            eprintln!("sgpt: {line}");
        }
    }
    Ok(e)
}

/// Progress of a model load (blocks read or uploaded), on a terminal and without --quiet, from
/// one second in: a small model loads without a flash of bar, a multi-GB one is not silent.
pub(crate) struct LoadBar {
    on: bool,
    started: Instant,
    bar: OnceCell<ProgressBar>,
}

impl LoadBar {
    pub(crate) fn new(quiet: bool) -> Self {
        LoadBar {
            on: !quiet && std::io::stderr().is_terminal(),
            started: Instant::now(),
            bar: OnceCell::new(),
        }
    }

    pub(crate) fn step(&self, done: usize, all: usize) {
        if !self.on || (self.bar.get().is_none() && self.started.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        let bar = self.bar.get_or_init(|| {
            let bar = ProgressBar::with_draw_target(Some(all as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "loading weights {bar:40} {pos}/{len} blocks  {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        bar.set_position(done as u64);
    }

    pub(crate) fn done(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

/// Bar templates: a count of texts, or of bytes.
const TEXTS: &str = "{bar:40} {pos}/{len} texts  {per_sec}  eta {eta}";
const BYTES: &str = "{bar:40} {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}";

/// A bar over `n` units on a terminal; hidden with --quiet, when piped, or for small `n`.
fn progress_bar(n: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() || n < 64 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn human(x: f64, unit: &str) -> String {
    let (v, p) = match x {
        x if x >= 1e9 => (x / 1e9, "G"),
        x if x >= 1e6 => (x / 1e6, "M"),
        x if x >= 1e3 => (x / 1e3, "k"),
        x => (x, ""),
    };
    format!("{v:.2} {p}{unit}")
}
