//! The `sgpt` command line: `embed`, `inspect`, `bench`, `serve`.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sgpt::batch::PackedBatch;
use sgpt::io::{check_empty, parse_inputs, EmbeddingWriter, InputFormat, InputText};
use sgpt::model::{Device, Embedder, ModelDir, DEFAULT_MAX_BATCH_TOKENS};
use sgpt::tokenize::{Encoded, Kind};
use sgpt::weights::DType;

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
    /// Serve embeddings over HTTP: OpenAI's POST /v1/embeddings and text-embeddings-inference's
    /// POST /embed, with dynamic batching; GET /health, /info, /metrics.
    Serve(ServeArgs),
}

#[derive(Args)]
struct Common {
    /// Model directory: config.json, tokenizer.json, model.safetensors (or an index + shards).
    #[arg(long, short)]
    model: PathBuf,
    /// Where to run: auto picks the GPU when usable, else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Most tokens in one packed batch.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
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
    /// Model directory.
    model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Token-id sequences to embed, JSONL (one JSON array of ids per line, brackets included),
    /// so another engine can be timed on exactly the same input. Default: a synthetic corpus.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Size of the synthetic corpus.
    #[arg(long, default_value_t = 256)]
    texts: usize,
    /// Repetitions of the single-query latency measurement.
    #[arg(long, default_value_t = 20)]
    latency_reps: usize,
    /// Also write the results as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
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
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Embed(a) => embed(a),
        Cmd::Inspect(a) => inspect(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Serve(a) => serve(a),
    };
    if let Err(e) = r {
        eprintln!("sgpt: error: {e:#}");
        std::process::exit(1);
    }
}

fn setup(c: &Common) -> Result<Embedder> {
    if let Some(n) = c.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    if c.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be positive");
    }
    let mut e = Embedder::open(&c.model, c.device)?;
    e.max_batch_tokens = c.max_batch_tokens;
    Ok(e)
}

fn embed(a: EmbedArgs) -> Result<()> {
    let default_kind = Kind::from(a.kind);
    let (inputs, source): (Vec<InputText>, String) = match (&a.input, a.texts.is_empty()) {
        (Some(_), false) => bail!("give texts as arguments or with --input, not both"),
        (None, true) => {
            bail!("no texts: give them as arguments or with --input FILE (- for stdin)")
        }
        (None, false) => (
            a.texts
                .iter()
                .enumerate()
                .map(|(i, t)| InputText {
                    text: t.clone(),
                    kind: default_kind,
                    line: i + 1,
                })
                .collect(),
            "arguments".into(),
        ),
        (Some(f), true) => {
            let mut content = String::new();
            if f == "-" {
                std::io::stdin()
                    .read_to_string(&mut content)
                    .context("reading stdin")?;
            } else {
                content = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
            }
            let name = if f == "-" {
                "<stdin>".to_string()
            } else {
                f.clone()
            };
            (parse_inputs(&content, &name, a.format, default_kind)?, name)
        }
    };
    if inputs.is_empty() {
        bail!("{source}: no texts to embed");
    }
    if !a.allow_empty {
        check_empty(&inputs, &source)?;
    }
    let embedder = setup(&a.common)?;
    let texts: Vec<(String, Kind)> = inputs.iter().map(|t| (t.text.clone(), t.kind)).collect();
    let encoded = embedder.encode(&texts)?;
    if !a.quiet {
        report_truncation(
            &inputs,
            &encoded,
            embedder.model.tokenizer.max_text_tokens(),
        );
    }

    let mut writer = EmbeddingWriter::create(a.output.as_deref(), inputs.len(), embedder.hidden())?;
    let bar = progress_bar(inputs.len() as u64, a.quiet);
    let h = embedder.hidden();
    embedder.embed_encoded(&encoded, a.normalize, &mut |_, e| {
        writer.write(e)?;
        bar.inc((e.len() / h) as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    writer.finish()?;
    Ok(())
}

/// Truncation follows the reference, but silently losing text would surprise: say so.
fn report_truncation(inputs: &[InputText], encoded: &[Encoded], max: usize) {
    let cut: Vec<&InputText> = inputs
        .iter()
        .zip(encoded)
        .filter(|(_, e)| e.truncated)
        .map(|(i, _)| i)
        .collect();
    if cut.is_empty() {
        return;
    }
    let lines: Vec<String> = cut.iter().take(10).map(|t| t.line.to_string()).collect();
    let more = if cut.len() > 10 {
        format!(" and {} more", cut.len() - 10)
    } else {
        String::new()
    };
    eprintln!(
        "sgpt: note: {} of {} texts were longer than {max} tokens and were truncated on the right, \
         as the reference does (line/argument {}{more})",
        cut.len(),
        inputs.len(),
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

fn inspect(a: InspectArgs) -> Result<()> {
    let m = ModelDir::open(&a.model)?;
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

/// Deterministic synthetic corpus: ~30% short queries (8–14 tokens), the rest passages around
/// 80 tokens with a tail up to the model's limit. Ids are drawn from the tokenizer's range.
fn synthetic_corpus(
    n: usize,
    vocab: u32,
    max_len: usize,
    brackets: [(u32, u32); 2],
) -> Vec<Vec<u32>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let query = next() % 10 < 3;
            let len = if query {
                8 + (next() % 7) as usize
            } else {
                // sum of three uniforms on [0, 53]: mean ≈ 80, occasionally doubled for the tail
                let base = (0..3).map(|_| (next() % 54) as usize).sum::<usize>();
                if next() % 8 == 0 {
                    base * 2 + 80
                } else {
                    base
                }
            }
            .clamp(1, max_len);
            let (o, c) = brackets[if query { 0 } else { 1 }];
            let mut ids = vec![o];
            ids.extend((0..len).map(|_| 4 + (next() % (vocab as u64 - 4)) as u32));
            ids.push(c);
            ids
        })
        .collect()
}

fn bench(a: BenchArgs) -> Result<()> {
    let embedder = setup(&a.common)?;
    let tok = &embedder.model.tokenizer;
    let seqs: Vec<Vec<u32>> = match &a.ids {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            text.lines()
                .enumerate()
                .map(|(i, l)| {
                    serde_json::from_str(l).with_context(|| {
                        format!("{}:{}: expected a JSON array of ids", p.display(), i + 1)
                    })
                })
                .collect::<Result<_>>()?
        }
        None => synthetic_corpus(
            a.texts,
            tok.vocab_size() as u32,
            tok.max_text_tokens(),
            [tok.brackets(Kind::Query), tok.brackets(Kind::Document)],
        ),
    };
    if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
        bail!("the benchmark corpus must have at least one non-empty sequence");
    }
    let encoded: Vec<Encoded> = seqs
        .iter()
        .map(|ids| Encoded {
            ids: ids.clone(),
            text_tokens: ids.len(),
            truncated: false,
        })
        .collect();
    let tokens: usize = seqs.iter().map(Vec::len).sum();

    // Warm-up: one batch touches every weight page (cold mmap reads are not what we measure).
    embedder
        .backend
        .embed(&PackedBatch::from_seqs(&seqs[..1]))?;
    let t0 = Instant::now();
    embedder.embed_encoded(&encoded, false, &mut |_, _| Ok(()))?;
    let corpus_s = t0.elapsed().as_secs_f64();

    // Single short query, alone in its batch: the latency a service sees.
    let query = synthetic_corpus(
        1,
        tok.vocab_size() as u32,
        10,
        [tok.brackets(Kind::Query); 2],
    )
    .remove(0);
    let q = PackedBatch::from_seqs(&[&query[..]]);
    let mut lat: Vec<Duration> = (0..a.latency_reps.max(1))
        .map(|_| {
            let t = Instant::now();
            embedder.backend.embed(&q).map(|_| t.elapsed())
        })
        .collect::<sgpt::Result<_>>()?;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;

    let report = serde_json::json!({
        "backend": embedder.backend.describe(),
        "model": embedder.model.dir.display().to_string(),
        "hidden": embedder.hidden(), "layers": embedder.model.config.layers,
        "texts": seqs.len(), "tokens": tokens, "max_batch_tokens": embedder.max_batch_tokens,
        "corpus_seconds": corpus_s,
        "tokens_per_s": tokens as f64 / corpus_s,
        "texts_per_s": seqs.len() as f64 / corpus_s,
        "query_tokens": query.len(),
        "query_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "reps": lat.len()},
    });
    println!(
        "backend          {}",
        report["backend"].as_str().unwrap_or_default()
    );
    println!(
        "corpus           {} texts, {tokens} tokens in {corpus_s:.2} s",
        seqs.len()
    );
    println!(
        "throughput       {:.1} tokens/s, {:.2} texts/s",
        tokens as f64 / corpus_s,
        seqs.len() as f64 / corpus_s
    );
    println!(
        "query latency    p50 {:.2} ms, p99 {:.2} ms ({} tokens, {} reps)",
        pct(0.5),
        pct(0.99),
        query.len(),
        lat.len()
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    use sgpt::server::{serve, shutdown_signal, ServeOptions};

    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| file_name(&a.common.model));
    let mut opts = ServeOptions::new(if name.is_empty() {
        "sgpt".to_string()
    } else {
        name
    });
    opts.device = format!("{:?}", a.common.device).to_lowercase();
    opts.max_client_batch_size = a.max_client_batch_size;
    opts.max_concurrent_requests = a.max_concurrent_requests;
    opts.payload_limit = a.payload_limit;
    opts.auto_truncate = !a.no_auto_truncate;
    opts.api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("SGPT_API_KEY").ok());
    opts.default_kind = a.default_input_type.into();
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
        move || setup(&common).map_err(|e| sgpt::Error::Input(format!("{e:#}"))),
        shutdown_signal(),
    ));
    // A model load still running after a shutdown signal is not waited for.
    rt.shutdown_background();
    result.map_err(anyhow::Error::from)
}
