//! The `sgpt` command line: `embed`, `inspect`, `bench`, `serve`.

mod cli_bench;

use std::io::{IsTerminal, Seek};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sgpt::backend::{AttentionKernel, GemmKernel, KernelChoices};
use sgpt::cuda::device::GpuDtype;
use sgpt::io::{check_empty, EmbeddingWriter, EmptyTexts, InputFormat, InputReader, InputText};
use sgpt::model::{Device, Embedder, EngineOptions, ModelDir};
use sgpt::output::OutputFile;
use sgpt::tokenize::Kind;
use sgpt::weights::DType;

mod eval_cli;

#[derive(Parser)]
#[command(name = "sgpt", version, about = "SGPT-BLOOM sentence embeddings")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embed texts (arguments, a file or stdin) and write one vector per input, in input order.
    Embed(EmbedArgs),
    /// Describe a model directory: configuration, tensors, dtypes, sizes, files.
    Inspect(InspectArgs),
    /// Measure embedding throughput and single-query latency.
    Bench(BenchArgs),
    /// Retrieval quality on a dataset in BEIR layout: NDCG@10, Recall@100, MAP@100, MRR@10
    /// (trec_eval's definitions), a TREC run file; embeddings cached so a rerun resumes.
    Eval(eval_cli::EvalArgs),
    /// Serve embeddings over HTTP: OpenAI's POST /v1/embeddings and text-embeddings-inference's
    /// POST /embed, with dynamic batching; GET /health, /info, /metrics.
    Serve(ServeArgs),
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
    /// Where to run: auto (the GPU when usable, else the CPU, saying why), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Activation and weight type on the GPU [default: f16]; the CPU always computes in f32,
    /// so giving it with --device cpu is an error.
    #[arg(long, value_enum)]
    dtype: Option<GpuDtype>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Most tokens in one packed batch [default: 2048 on the CPU, 16384 on the GPU].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// GPU attention kernel: auto (measured rule: v1 below 128 tokens, tc from 128), v1, tc,
    /// or mma (on trial: never run on a GPU yet).
    #[arg(long, value_enum, default_value = "auto")]
    attention: AttentionKernel,
    /// GPU GEMM path: cublaslt, or skinny for batches of at most 16 tokens (on trial: never run
    /// on a GPU yet).
    #[arg(long, value_enum, default_value = "cublaslt")]
    gemm: GemmKernel,
    /// Capture and replay CUDA graphs for batches of up to 128 tokens (on trial).
    #[arg(long)]
    cuda_graphs: bool,
}

impl EngineArgs {
    /// The GPU type asked for, f16 when none was.
    pub(crate) fn gpu_dtype(&self) -> GpuDtype {
        self.dtype.unwrap_or(GpuDtype::F16)
    }

    /// Applies --threads (once per process) and checks the budget; the engine options.
    fn apply(&self) -> Result<EngineOptions> {
        if let Some(n) = self.threads {
            // Thousands of threads take minutes to start and only slow the GEMMs down.
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            let max = (4 * cores).max(4);
            if n == 0 || n > max {
                bail!("--threads must be between 1 and {max} (4 × the {cores} cores here)");
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("setting up the thread pool")?;
        }
        if self.max_batch_tokens == Some(0) {
            bail!("--max-batch-tokens must be positive");
        }
        if self.device == Device::Cpu && self.dtype.is_some() {
            bail!("--dtype chooses the GPU's type; the CPU backend always computes in f32");
        }
        Ok(EngineOptions {
            device: self.device,
            dtype: self.gpu_dtype(),
            max_batch_tokens: self.max_batch_tokens,
            kernels: KernelChoices {
                attention: self.attention,
                gemm: self.gemm,
                cuda_graphs: self.cuda_graphs,
            },
        })
    }
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    common: Common,
    /// Texts to embed (alternative to --input).
    texts: Vec<String>,
    /// Read texts from FILE ("-" for stdin): plain lines, or JSONL objects with "text" and
    /// optional "kind" ("query"|"document") and "title" (joined as "title text").
    #[arg(long, short)]
    input: Option<String>,
    /// How to read --input.
    #[arg(long, value_enum, default_value = "auto")]
    format: InputFormat,
    /// Kind of every text without its own "kind": queries get [ ], documents { }.
    #[arg(long, value_enum, default_value = "query")]
    kind: KindArg,
    /// Write to FILE instead of stdout: JSONL ({"embedding": [...]} per line), or a float32
    /// .npy matrix [texts, hidden] when FILE ends in .npy.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Scale embeddings to unit length (the reference does not; cosine similarity is unchanged).
    #[arg(long)]
    normalize: bool,
    /// Embed empty or whitespace-only texts (as the bare brackets) instead of refusing them.
    #[arg(long)]
    allow_empty: bool,
    /// No progress bar or notices on stderr.
    #[arg(long, short)]
    quiet: bool,
}

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

#[derive(Args)]
struct InspectArgs {
    /// Model directory (or -m/--model DIR, as every other command takes it).
    #[arg(value_name = "DIR", required_unless_present = "model_flag")]
    dir: Option<PathBuf>,
    #[arg(
        long = "model",
        short = 'm',
        value_name = "DIR",
        conflicts_with = "dir"
    )]
    model_flag: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// What to measure: the whole engine on a corpus, or each GPU kernel at the model's shapes.
    #[arg(value_enum, default_value = "corpus")]
    what: BenchWhat,
    /// Model directory (or use --shape for random weights).
    #[arg(long, short, conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// Random weights at a named BLOOM shape: bloom-560m, bloom-1b1, bloom-1b7, bloom-3b, bloom-7b1.
    #[arg(long)]
    shape: Option<String>,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    /// Token-id sequences to embed, JSONL (one JSON array of ids per line, brackets included),
    /// so another engine can be timed on exactly the same input. Default: a synthetic corpus.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Size of the synthetic corpus.
    #[arg(long, default_value_t = 256)]
    texts: usize,
    /// Repetitions of each latency measurement.
    #[arg(long, default_value_t = 20)]
    latency_reps: usize,
    /// A baseline's results (JSON with "tokens_per_s" and optionally "query_p50_ms", e.g. from
    /// tools/bench_torch_gpu.py) to print our ratio against.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// `bench kernels`: sequences × tokens per sequence of the timed batch.
    #[arg(long, default_value_t = 16)]
    seqs: usize,
    #[arg(long, default_value_t = 300)]
    seq_len: usize,
    /// Also write the results as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress messages on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BenchWhat {
    /// Corpus throughput, latency, ceilings, MFU.
    Corpus,
    /// Each GPU kernel and GEMM at the model's shapes.
    Kernels,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on. The default, 127.0.0.1, takes connections from this machine only;
    /// 0.0.0.0 (or ::) exposes the server to the network (then also set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// TCP port; 0 picks a free one (the address is printed on stderr).
    #[arg(long, short, default_value_t = 8080)]
    port: u16,
    /// Most texts in one request; more is refused with 413.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_CLIENT_BATCH_SIZE)]
    max_client_batch_size: usize,
    /// Most embedding requests served at once (queued or running); one more is refused at once
    /// with 429, never left waiting.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_CONCURRENT_REQUESTS)]
    max_concurrent_requests: usize,
    /// Most bytes in one request body; a larger body is refused with 413.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_PAYLOAD_LIMIT)]
    payload_limit: usize,
    /// Refuse texts over the model's limit (422) instead of cutting them on the right as the
    /// reference does. /embed's "truncate" overrides this per request.
    #[arg(long)]
    no_auto_truncate: bool,
    /// Require `Authorization: Bearer KEY` on the embedding routes (401 without it); /health,
    /// /info and /metrics stay open for probes and scrapers. Default: the SGPT_API_KEY
    /// environment variable, which keeps the key out of the process list; unset: no key.
    #[arg(long)]
    api_key: Option<String>,
    /// Kind of the texts of a request that has no "input_type": query ([ ]) or document ({ }).
    #[arg(long, value_enum, default_value = "query")]
    default_input_type: KindArg,
    /// Model name echoed in OpenAI responses when a request gives none, and shown by /info
    /// (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds a new connection has to send its first request's headers; then it is closed.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_HEADER_TIMEOUT.as_secs())]
    header_timeout_secs: u64,
    /// Seconds a request has to send its whole body once its headers are in (else 408); a
    /// client that reads nothing of its response for as long is disconnected.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_BODY_TIMEOUT.as_secs())]
    body_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request's headers; then it is
    /// closed.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,
    /// Most open connections; one more is closed at once (counted in
    /// sgpt_refused_connections_total). Keep `ulimit -n` above it.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// On SIGTERM/SIGINT, seconds to let the requests in flight finish; then the remaining
    /// connections are closed and the server exits with status 1.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    shutdown_timeout_secs: u64,
    /// Most bytes of request bodies held by all requests together; a body that would go over
    /// is refused with 429. At least --payload-limit.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)]
    max_body_bytes_in_flight: usize,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Embed(a) => embed(a),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Bench(a) => cli_bench::run(a),
        Cmd::Eval(a) => eval_cli::eval(a),
        Cmd::Serve(a) => serve(a),
    };
    if let Err(e) = r {
        eprintln!("sgpt: error: {e:#}");
        std::process::exit(1);
    }
}

fn setup(c: &Common, quiet: bool) -> Result<Embedder> {
    let e = Embedder::open_with(&c.model, c.engine.apply()?)?;
    if !quiet {
        for line in e.notice.iter().cloned().chain(e.backend.load_summary()) {
            eprintln!("sgpt: {line}");
        }
    }
    Ok(e)
}

fn embed(a: EmbedArgs) -> Result<()> {
    let default_kind = Kind::from(a.kind);
    match (&a.input, a.texts.is_empty()) {
        (Some(_), false) => bail!("give texts as arguments or with --input, not both"),
        (None, true) => {
            bail!("no texts: give them as arguments or with --input FILE (- for stdin)")
        }
        (None, false) => {
            let inputs: Vec<InputText> = a
                .texts
                .iter()
                .enumerate()
                .map(|(i, t)| InputText {
                    text: t.clone(),
                    kind: default_kind,
                    line: i + 1,
                })
                .collect();
            if !a.allow_empty {
                check_empty(&inputs, "arguments")?;
            }
            let n = inputs.len();
            let stream = inputs.into_iter().map(|t| Ok((t.text, t.kind)));
            embed_inputs(&a, "arguments", n, stream)
        }
        (Some(f), true) => {
            // Streamed twice: once to check every line (bad JSON, empty texts) and count them
            // before the model loads and anything is written, once to embed; neither pass holds
            // more than a chunk. Standard input is spooled to an unnamed temporary file first.
            let (mut file, name) = if f == "-" {
                let mut tmp =
                    tempfile::tempfile().context("creating a temporary file for stdin")?;
                std::io::copy(&mut std::io::stdin().lock(), &mut tmp).context("reading stdin")?;
                (tmp, "<stdin>".to_string())
            } else {
                let file = std::fs::File::open(f).with_context(|| format!("reading {f}"))?;
                (file, f.clone())
            };
            let reader = |file: &mut std::fs::File| -> Result<_> {
                file.rewind().with_context(|| format!("reading {name}"))?;
                let r = std::io::BufReader::with_capacity(1 << 20, file.try_clone()?);
                Ok(InputReader::new(r, &name, a.format, default_kind)?)
            };
            let mut empty = EmptyTexts::default();
            let mut n = 0;
            for t in reader(&mut file)? {
                empty.add(&t?);
                n += 1;
            }
            if !a.allow_empty {
                empty.check(&name)?;
            }
            let stream = reader(&mut file)?.map(|t| t.map(|t| (t.text, t.kind)));
            embed_inputs(&a, &name, n, stream)
        }
    }
}

/// Embeds `n` texts from `stream` (already checked) into the output; text `i` is line or
/// argument `i + 1` of `source`.
fn embed_inputs<I>(a: &EmbedArgs, source: &str, n: usize, stream: I) -> Result<()>
where
    I: Iterator<Item = sgpt::Result<(String, Kind)>> + Send,
{
    if n == 0 {
        bail!("{source}: no texts to embed");
    }
    // Checked and opened before the model loads; complete or absent (sgpt::output).
    sgpt::output::remove_temps_on_signal()?;
    let out = a.output.as_deref().map(OutputFile::create).transpose()?;
    let embedder = setup(&a.common, a.quiet)?;
    let mut writer = EmbeddingWriter::create(out, n, embedder.hidden())?;
    let bar = progress_bar(n as u64, a.quiet);
    let h = embedder.hidden();
    let mut cut = Vec::new();
    embedder.embed_stream(stream, a.normalize, &mut |i| cut.push(i), &mut |_, e| {
        writer.write(e)?;
        bar.inc((e.len() / h) as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    writer.finish()?;
    if !a.quiet {
        report_truncation(n, &cut, embedder.model.tokenizer.max_text_tokens());
    }
    Ok(())
}

/// Truncation follows the reference, but silently losing text would surprise: say so.
fn report_truncation(n: usize, cut: &[usize], max: usize) {
    if cut.is_empty() {
        return;
    }
    let lines: Vec<String> = cut.iter().take(10).map(|&i| (i + 1).to_string()).collect();
    let more = if cut.len() > 10 {
        format!(" and {} more", cut.len() - 10)
    } else {
        String::new()
    };
    eprintln!(
        "sgpt: note: {} of {} texts were longer than {max} tokens and were truncated on the right, \
         as the reference does (line/argument {}{more})",
        cut.len(),
        n,
        lines.join(", ")
    );
}

fn progress_bar(n: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() || n < 64 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} texts  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Every check `embed` runs (config, tokenizer, schema: names, shapes, dtypes, layer count,
/// duplicates) via `ModelDir::open`, then a scan of every weight for NaN/Inf; exit 1 on any.
fn inspect(a: InspectArgs) -> Result<()> {
    let dir = a.dir.or(a.model_flag).context("give the model directory")?;
    let m = ModelDir::open(&dir)?;
    let mut bad = Vec::new();
    for n in m.checkpoint.names() {
        let k = m.checkpoint.get(n)?.count_non_finite();
        if k > 0 {
            bad.push(format!("`{n}` ({k} values)"));
        }
    }
    if !bad.is_empty() {
        let more = bad.len().saturating_sub(10);
        bail!(
            "{}: {} tensor(s) hold NaN or Inf: {}{}; every embedding would be garbage",
            m.dir.display(),
            bad.len(),
            bad[..bad.len().min(10)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    let c = &m.config;
    let names = m.checkpoint.names();
    let mut params = 0usize;
    let mut dtypes = std::collections::BTreeMap::<DType, usize>::new();
    for n in &names {
        let t = m.checkpoint.get(n)?;
        params += t.numel();
        *dtypes.entry(t.dtype).or_default() += 1;
    }
    let files: Vec<(String, u64)> = m
        .checkpoint
        .files
        .iter()
        .map(|f| (file_name(&f.path), f.len_bytes() as u64))
        .collect();
    let (qo, qc) = m.tokenizer.brackets(Kind::Query);
    let (doc_o, doc_c) = m.tokenizer.brackets(Kind::Document);
    let info = serde_json::json!({
        "model": m.dir.display().to_string(),
        "hidden": c.hidden, "layers": c.layers, "heads": c.heads, "head_dim": c.head_dim(),
        "vocab_rows": c.vocab, "tokenizer_vocab": m.tokenizer.vocab_size(),
        "layer_norm_epsilon": c.eps, "max_seq_length": m.sentence.max_seq_length,
        "pooling": "weightedmean",
        "bracket_ids": {"query": [qo, qc], "document": [doc_o, doc_c]},
        "tensors": names.len(), "parameters": params,
        "non_embedding_parameters": c.non_embedding_params(),
        "dtypes": dtypes.iter().map(|(d, n)| (d.name().to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
        "bytes": m.checkpoint.total_bytes(),
        "files": files.iter().map(|(f, b)| serde_json::json!({"file": f, "bytes": b})).collect::<Vec<_>>(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model            {}", m.dir.display());
    println!("hidden H         {}", c.hidden);
    println!("layers L         {}", c.layers);
    println!("heads n          {} (head dim {})", c.heads, c.head_dim());
    println!(
        "vocab            {} embedding rows, {} tokenizer tokens",
        c.vocab,
        m.tokenizer.vocab_size()
    );
    println!("layernorm eps    {:e}", c.eps);
    println!(
        "max_seq_length   {} ({} text tokens + brackets)",
        m.sentence.max_seq_length,
        m.tokenizer.max_text_tokens()
    );
    println!("pooling          weighted mean");
    println!("brackets         query [{qo} … {qc}], document [{doc_o} … {doc_c}]");
    println!("tensors          {} (lm_head ignored)", names.len());
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(d, n)| format!("{} × {n}", d.name()))
        .collect();
    println!("dtypes           {}", dt.join(", "));
    println!(
        "parameters       {} ({} outside the embedding)",
        human(params as f64, ""),
        human(c.non_embedding_params() as f64, "")
    );
    println!(
        "bytes            {}",
        human(m.checkpoint.total_bytes() as f64, "B")
    );
    for (f, b) in files {
        println!("  {f:<40} {}", human(b as f64, "B"));
    }
    Ok(())
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

fn serve(a: ServeArgs) -> Result<()> {
    use sgpt::server::{serve, shutdown_signal, ServeOptions};
    use std::time::Duration;

    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| file_name(&a.common.model));
    let mut opts = ServeOptions::new(if name.is_empty() {
        "sgpt".to_string()
    } else {
        name
    });
    opts.device = a.common.engine.device.to_string();
    opts.max_client_batch_size = a.max_client_batch_size;
    opts.max_concurrent_requests = a.max_concurrent_requests;
    opts.payload_limit = a.payload_limit;
    opts.auto_truncate = !a.no_auto_truncate;
    opts.api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("SGPT_API_KEY").ok());
    opts.default_kind = a.default_input_type.into();
    opts.header_timeout = Duration::from_secs(a.header_timeout_secs);
    opts.body_timeout = Duration::from_secs(a.body_timeout_secs);
    opts.idle_timeout = Duration::from_secs(a.idle_timeout_secs);
    opts.max_connections = a.max_connections;
    opts.shutdown_timeout = Duration::from_secs(a.shutdown_timeout_secs);
    opts.max_body_bytes_in_flight = a.max_body_bytes_in_flight;
    if let Err(msg) = opts.validate() {
        bail!("{msg}");
    }
    // Checked before binding, so a bad model directory fails at once (loading comes later).
    if !a.common.model.is_dir() {
        bail!("{}: model directory not found", a.common.model.display());
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = std::net::SocketAddr::new(a.host, a.port);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    eprintln!("sgpt: listening on http://{local} (loading the model; GET /health says when ready)");
    let common = a.common;
    let result = rt.block_on(serve(
        listener,
        opts,
        move || setup(&common, false).map_err(|e| sgpt::Error::Input(format!("{e:#}"))),
        shutdown_signal(),
    ));
    // A model load still running after a shutdown signal is not waited for.
    rt.shutdown_background();
    result.map_err(anyhow::Error::from)
}
