//! `sgpt bench`: corpus throughput and latency against the ceilings measured in the same run
//! (copy bandwidth, GEMM rate), and `sgpt bench kernels` (GPU). Every number printed is measured
//! here; ratios are against numbers measured in this run or a baseline file the user names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{progress_bar, report, EngineArgs, JsonOut, LoadBar, TEXTS};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use sgpt::backend::batch::PackedBatch;
use sgpt::backend::cpu::model::OpTimes;
use sgpt::backend::cpu::CpuModel;
use sgpt::backend::cuda::device::GpuDtype;
use sgpt::bench::{
    cpu_copy_bandwidth, cpu_gemm_rate, forward_flops, random_checkpoint, shape, synthetic_corpus,
};
use sgpt::engine::{build_backend, BuiltBackend};
use sgpt::model::config::BloomConfig;
use sgpt::model::tokenize::Kind;
use sgpt::model::weights::{Checkpoint, DType};
use sgpt::model::ModelDir;

/// Bracket ids used for random-weight shapes (any ids below the vocabulary do for timing).
const RANDOM_BRACKETS: [(u32, u32); 2] = [(62, 64), (94, 96)];

struct Setup {
    cfg: BloomConfig,
    ckpt: Checkpoint,
    vocab_for_corpus: u32,
    brackets: [(u32, u32); 2],
    max_text_tokens: usize,
    label: String,
}

fn setup(a: &BenchArgs) -> Result<Setup> {
    match (&a.model, &a.shape) {
        (Some(dir), None) => {
            let m = ModelDir::open(dir)?;
            Ok(Setup {
                vocab_for_corpus: m.tokenizer.vocab_size() as u32,
                brackets: [
                    m.tokenizer.brackets(Kind::Query),
                    m.tokenizer.brackets(Kind::Document),
                ],
                max_text_tokens: m.tokenizer.max_text_tokens(),
                label: dir.display().to_string(),
                cfg: m.config,
                ckpt: m.checkpoint,
            })
        }
        (None, Some(name)) => {
            let cfg = shape(name)?;
            // The CPU reads f32 in place; the GPU uploads and converts, f16 halves the build.
            let on_gpu = a.engine.device != sgpt::engine::Device::Cpu
                && sgpt::backend::cuda::device::unavailable_reason(0).is_none();
            let dtype = if on_gpu { DType::F16 } else { DType::F32 };
            let t = Instant::now();
            let ckpt = random_checkpoint(&cfg, dtype, 1)?;
            if !a.quiet {
                eprintln!(
                    "sgpt: random {name} weights ({}) built in {:.1} s",
                    dtype.name(),
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(Setup {
                cfg,
                ckpt,
                vocab_for_corpus: 250_000,
                brackets: RANDOM_BRACKETS,
                max_text_tokens: 297,
                label: format!("random {name}"),
            })
        }
        _ => bail!("give --model DIR or --shape NAME"),
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let opts = a.engine.apply()?; // the thread pool first: building random weights uses it
                                  // Requests that cannot run fail before gigabytes of random weights are built.
    use sgpt::engine::Device;
    let no_gpu = match opts.device {
        Device::Cpu => true,
        Device::Auto => sgpt::backend::cuda::device::unavailable_reason(0).is_some(),
        Device::Cuda(_) | Device::CudaAll | Device::CudaList(_) => false,
    };
    if a.what == BenchWhat::Kernels && no_gpu {
        bail!("`sgpt bench kernels` times the GPU kernels and needs --device cuda; `cargo bench` measures the CPU ops");
    }
    opts.device.check_available()?;
    a.json.check()?;
    if !a.latency_batches.contains(&1) {
        bail!("--latency-batches must include 1 (the single-query latency every report has)");
    }
    if a.shape.is_some() && !a.quiet {
        eprintln!(
            "sgpt: building random {} weights in memory, then timing {} texts (this takes a while on a CPU)…",
            a.shape.as_deref().unwrap_or_default(),
            a.texts
        );
    }
    let st = setup(&a)?;
    let bar = LoadBar::new(a.quiet);
    let built = build_backend(&st.ckpt, &st.cfg, opts, st.max_text_tokens + 3, &|d, n| {
        bar.step(d, n)
    })?;
    bar.done();
    if !a.quiet {
        for line in built
            .notice
            .iter()
            .cloned()
            .chain(built.backend.load_summary())
        {
            eprintln!("sgpt: {line}");
        }
    }
    match a.what {
        BenchWhat::Corpus => corpus(&a, &st, &built),
        BenchWhat::Kernels => kernels(&a, &st, &built),
    }
}

fn percentile_ms(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize] * 1e3
}

/// The share of `cfg`'s blocks whose linear layers run in FP8 under `dtype` (the blocks are all
/// the same size, so also the share of the GEMM FLOPs and of the linear layers' weights).
fn fp8_block_share(dtype: GpuDtype, cfg: &BloomConfig) -> f64 {
    let fp8 = dtype.fp8_blocks().map_or(0, |b| b.count(cfg.layers));
    fp8 as f64 / cfg.layers.max(1) as f64
}

fn corpus(a: &BenchArgs, st: &Setup, b: &BuiltBackend) -> Result<()> {
    let seqs: Vec<Vec<u32>> = match &a.ids {
        Some(p) => read_ids(p)?,
        None => synthetic_corpus(
            a.texts,
            st.vocab_for_corpus.min(st.cfg.vocab as u32),
            st.max_text_tokens,
            st.brackets,
        ),
    };
    if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
        bail!("the benchmark corpus must have at least one non-empty sequence");
    }
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let tokens: usize = lengths.iter().sum();
    let backend = &b.backend;
    let show = a.json.human();

    // Warm-up: one batch touches every weight page and, on the GPU, plans the GEMMs.
    // Once per replica (`--device cuda:all` deals consecutive batches to each in turn).
    for _ in 0..backend.concurrency() {
        backend.embed(&PackedBatch::from_seqs(&seqs[..1]))?;
    }
    // The bar costs an atomic add per batch, nothing next to a batch's forward. A replica set
    // (`--device cuda:all`) runs as many batches at once as it has replicas, as `embed` does.
    let reps = a.corpus_reps.max(1);
    let bar = progress_bar(reps as u64 * seqs.len() as u64, a.quiet, TEXTS);
    let plans = sgpt::backend::batch::plan_batches(&lengths, b.max_batch_tokens);
    let run = |i: usize| backend.embed(&PackedBatch::from_seqs(&seqs[plans[i].clone()]));
    // Best of `reps` passes: on a shared machine the fastest pass is the one least disturbed.
    let mut passes = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        match backend.concurrency().min(plans.len()) {
            0 | 1 => {
                for (i, range) in plans.iter().enumerate() {
                    run(i)?;
                    bar.inc(range.len() as u64);
                }
            }
            lanes => sgpt::engine::embedder::in_order(plans.len(), lanes, &run, &mut |i, _| {
                bar.inc(plans[i].len() as u64);
                Ok(())
            })?,
        }
        passes.push(t0.elapsed().as_secs_f64());
    }
    let corpus_s = passes.iter().copied().fold(f64::INFINITY, f64::min);
    bar.finish_and_clear();

    // Latency of small batches of short queries (12 tokens with brackets, or --query-tokens),
    // one batch at a time.
    let vocab = st.vocab_for_corpus.min(st.cfg.vocab as u32);
    let query = match a.query_tokens {
        None => synthetic_corpus(64, vocab, 10, [st.brackets[0]; 2]),
        Some(n) => synthetic_corpus(64, vocab, n as usize, [st.brackets[0]; 2])
            .iter()
            .map(|q| exactly(q, n as usize))
            .collect(),
    };
    let mut latency = serde_json::Map::new();
    let mut query_p50 = 0.0;
    for &n in &a.latency_batches {
        let batch = PackedBatch::from_seqs(&query[..n].iter().map(|q| &q[..]).collect::<Vec<_>>());
        backend.embed(&batch)?;
        let mut v: Vec<f64> = (0..a.latency_reps.max(1))
            .map(|_| {
                let t = Instant::now();
                backend.embed(&batch).map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<sgpt::Result<_>>()?;
        let (p50, p99) = (percentile_ms(&mut v, 0.5), percentile_ms(&mut v, 0.99));
        if n == 1 {
            query_p50 = p50;
        }
        latency.insert(
            format!("batch_{n:02}"),
            json!({"p50_ms": p50, "p99_ms": p99, "tokens": batch.num_tokens()}),
        );
    }

    // Ceilings, measured now on this machine.
    let ctx = b.backend.cuda_context();
    let (h, on_gpu) = (st.cfg.hidden, ctx.is_some());
    let (copy_bw, gemm_rate, mem_used, weight_bytes_per_param) = match ctx {
        Some(ctx) => {
            let s = ctx.default_stream();
            use sgpt::backend::cuda::bench as cb;
            let fp8_share = fp8_block_share(a.engine.gpu_dtype(), &st.cfg);
            let gemm = match a.engine.gpu_dtype() {
                GpuDtype::F16 => cb::gemm_rate::<half::f16>(&s, 16384, h, 4 * h)?,
                GpuDtype::Bf16 => cb::gemm_rate::<half::bf16>(&s, 16384, h, 4 * h)?,
                // The E4M3 product alone: the ceiling of the four GEMMs that run in FP8.
                GpuDtype::Fp8 => cb::fp8_gemm_rate(&s, 16384, h, 4 * h)?,
                // fp8_share of the FLOPs at the FP8 rate, the rest at f16's: the rate of that
                // mix, each FLOP taking 1/rate of its kind (the ceiling if each GEMM ran at its
                // own).
                GpuDtype::Fp8Alternate => {
                    let fp8 = cb::fp8_gemm_rate(&s, 16384, h, 4 * h)?;
                    let f16 = cb::gemm_rate::<half::f16>(&s, 16384, h, 4 * h)?;
                    1.0 / (fp8_share / fp8 + (1.0 - fp8_share) / f16)
                }
            };
            // Bytes per weight of the four linear layers, per block: 1 in an FP8 block, 2 in a
            // 16-bit one (the scales and biases of FP8's are < 0.3% more, left out of the
            // floor).
            let per_param = fp8_share + 2.0 * (1.0 - fp8_share);
            (
                sgpt::backend::cuda::bench::copy_bandwidth(&s)?,
                gemm,
                sgpt::backend::cuda::bench::memory_used(&ctx)? as f64,
                per_param,
            )
        }
        None => (
            cpu_copy_bandwidth(),
            cpu_gemm_rate(1024, h, 4 * h),
            peak_rss_bytes().unwrap_or(0.0),
            4.0,
        ),
    };
    let flops = forward_flops(&st.cfg, &lengths);
    let achieved = flops / corpus_s;
    let weight_bytes = st.cfg.non_embedding_params() as f64 * weight_bytes_per_param;
    let floor_ms = weight_bytes / copy_bw * 1e3;

    let mut report = json!({
        "backend": backend.describe(),
        "engine": backend.info(),
        "model": st.label,
        "hidden": h, "layers": st.cfg.layers, "heads": st.cfg.heads,
        "texts": seqs.len(), "tokens": tokens, "max_batch_tokens": b.max_batch_tokens,
        "corpus_seconds": corpus_s,
        "corpus_pass_seconds": passes,
        "tokens_per_s": tokens as f64 / corpus_s,
        "texts_per_s": seqs.len() as f64 / corpus_s,
        "latency": latency,
        "ceilings": {"copy_bandwidth_gb_s": copy_bw / 1e9, "gemm_tflop_s": gemm_rate / 1e12,
                     "gemm_dtype": if on_gpu { a.engine.gpu_dtype().name() } else { "f32" }},
        "achieved_tflop_s": achieved / 1e12,
        "mfu": achieved / gemm_rate,
        "weight_bytes_per_forward": weight_bytes,
        "memory_floor_ms": floor_ms,
        "query_latency_over_floor": query_p50 / floor_ms,
        (if on_gpu { "device_memory_used_bytes" } else { "peak_rss_bytes" }): mem_used,
    });

    report!(show, "backend            {}", backend.describe());
    report!(
        show,
        "model              {} (H {h}, L {}, n {})",
        st.label,
        st.cfg.layers,
        st.cfg.heads
    );
    report!(
        show,
        "corpus             {} texts, {tokens} tokens in {corpus_s:.3} s{}",
        seqs.len(),
        if reps > 1 {
            format!(" (best of {reps} passes)")
        } else {
            String::new()
        }
    );
    report!(
        show,
        "throughput         {:.1} tokens/s, {:.2} texts/s",
        tokens as f64 / corpus_s,
        seqs.len() as f64 / corpus_s
    );
    for (k, v) in report["latency"].as_object().into_iter().flatten() {
        report!(
            show,
            "latency {k:<10} p50 {:.2} ms, p99 {:.2} ms ({} tokens)",
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["tokens"]
        );
    }
    report!(
        show,
        "ceilings           copy {:.1} GB/s, GEMM {:.2} TFLOP/s{} (measured now)",
        copy_bw / 1e9,
        gemm_rate / 1e12,
        match a.engine.gpu_dtype() {
            GpuDtype::Fp8 if on_gpu => " in FP8",
            GpuDtype::Fp8Alternate if on_gpu => " for FP8 and f16 blocks alternating",
            _ => "",
        }
    );
    report!(
        show,
        "MFU                {:.1}% ({:.2} TFLOP/s achieved)",
        100.0 * achieved / gemm_rate,
        achieved / 1e12
    );
    report!(
        show,
        "query vs floor     {:.2}× the memory floor of {floor_ms:.2} ms ({:.2} GB of weights)",
        query_p50 / floor_ms,
        weight_bytes / 1e9
    );
    report!(
        show,
        "{}      {:.2} GB",
        if on_gpu {
            "device memory"
        } else {
            "peak RSS     "
        },
        mem_used / 1e9
    );
    if let Some(p) = &a.baseline {
        let base: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", p.display()))?;
        let bt = base["tokens_per_s"]
            .as_f64()
            .with_context(|| format!("{}: no \"tokens_per_s\"", p.display()))?;
        let ratio = tokens as f64 / corpus_s / bt;
        report!(
            show,
            "vs baseline        {ratio:.2}× its throughput ({bt:.1} tokens/s, {})",
            p.display()
        );
        report["baseline"] =
            json!({"file": p.display().to_string(), "tokens_per_s": bt, "throughput_ratio": ratio});
        if let Some(bq) = base["query_p50_ms"].as_f64() {
            report!(
                show,
                "                   {:.2}× its single-query p50 latency ({bq:.2} ms)",
                query_p50 / bq
            );
            report["baseline"]["query_p50_ms"] = json!(bq);
            report["baseline"]["latency_ratio"] = json!(query_p50 / bq);
        }
    }
    if a.op_times {
        report["op_times"] = op_times(a, st, &seqs, &lengths, b.max_batch_tokens, &query[0])?;
    }
    a.json.write(&report)
}

fn kernels(a: &BenchArgs, st: &Setup, b: &BuiltBackend) -> Result<()> {
    let Some(ctx) = b.backend.cuda_context() else {
        bail!("`sgpt bench kernels` times the GPU kernels and needs a GPU; `cargo bench` measures the CPU ops");
    };
    let k = sgpt::backend::cuda::ops::Kernels::load(
        &ctx,
        sgpt::backend::cuda::nvrtc::default_cache_dir().as_deref(),
    )?;
    let s = ctx.default_stream();
    let h = st.cfg.hidden;
    let show = a.json.human();
    let copy_bw = sgpt::backend::cuda::bench::copy_bandwidth(&s)?;
    use sgpt::backend::cuda::bench as cb;
    let (seqs, len) = (a.seqs, a.seq_len);
    // fp8: the f16 ops (activations stay f16) and the FP8 path's, whose products are measured
    // against the FP8 GEMM ceiling.
    let (gemm_rate, fp8_rate, times) = match a.engine.gpu_dtype() {
        GpuDtype::F16 => (
            cb::gemm_rate::<half::f16>(&s, 16384, h, 4 * h)?,
            None,
            cb::kernel_times::<half::f16>(&ctx, &k, &st.cfg, seqs, len, false)?,
        ),
        GpuDtype::Bf16 => (
            cb::gemm_rate::<half::bf16>(&s, 16384, h, 4 * h)?,
            None,
            cb::kernel_times::<half::bf16>(&ctx, &k, &st.cfg, seqs, len, false)?,
        ),
        // fp8-alternate runs the same ops (some blocks each way): the same table.
        GpuDtype::Fp8 | GpuDtype::Fp8Alternate => (
            cb::gemm_rate::<half::f16>(&s, 16384, h, 4 * h)?,
            Some(cb::fp8_gemm_rate(&s, 16384, h, 4 * h)?),
            cb::kernel_times::<half::f16>(&ctx, &k, &st.cfg, seqs, len, true)?,
        ),
    };
    report!(
        show,
        "{} at {} ({} sequences × {} tokens), {}",
        ctx.name().unwrap_or_default(),
        st.label,
        a.seqs,
        a.seq_len,
        a.engine.gpu_dtype().name()
    );
    report!(
        show,
        "ceilings: copy {:.1} GB/s, GEMM {:.1} TFLOP/s{} (measured now)",
        copy_bw / 1e9,
        gemm_rate / 1e12,
        fp8_rate.map_or(String::new(), |r| format!(
            " (f16), {:.1} TFLOP/s (FP8)",
            r / 1e12
        ))
    );
    report!(
        show,
        "{:<22} {:>9} {:>10} {:>10} {:>9}",
        "op",
        "ms",
        "GB/s",
        "TFLOP/s",
        "ceiling"
    );
    let mut rows = Vec::new();
    for t in &times {
        let (gbs, tfs) = (t.bytes / (t.ms / 1e3) / 1e9, t.flops / (t.ms / 1e3) / 1e12);
        // GEMMs and attention against the GEMM rate (the FP8 products against FP8's); the
        // rest against copy bandwidth.
        let rate = match fp8_rate {
            Some(r) if t.name.starts_with("fp8_gemm") => r,
            _ => gemm_rate,
        };
        let frac = if t.flops > 0.0 {
            t.flops / (t.ms / 1e3) / rate
        } else {
            t.bytes / (t.ms / 1e3) / copy_bw
        };
        report!(
            show,
            "{:<22} {:>9.4} {:>10.1} {:>10.2} {:>8.1}%",
            t.name,
            t.ms,
            gbs,
            tfs,
            100.0 * frac
        );
        rows.push(json!({"op": t.name, "ms": t.ms, "gb_s": gbs, "tflop_s": tfs, "fraction_of_ceiling": frac}));
    }
    let report = json!({"device": ctx.name().unwrap_or_default(), "model": st.label, "dtype": a.engine.gpu_dtype().name(),
        "seqs": a.seqs, "seq_len": a.seq_len, "copy_bandwidth_gb_s": copy_bw / 1e9, "gemm_tflop_s": gemm_rate / 1e12,
        "fp8_gemm_tflop_s": fp8_rate.map(|r| r / 1e12), "ops": rows});
    a.json.write(&report)
}

/// `--op-times`: the corpus (same batches) and the single query through a CPU model of the same
/// checkpoint with [`CpuModel::embed_profiled`]; seconds per op over the corpus, ms per op per
/// query (mean of the latency reps).
fn op_times(
    a: &BenchArgs,
    st: &Setup,
    seqs: &[Vec<u32>],
    lengths: &[usize],
    max_batch_tokens: usize,
    query: &[u32],
) -> Result<serde_json::Value> {
    if a.engine.device != sgpt::engine::Device::Cpu {
        bail!("--op-times times the CPU forward: give --device cpu");
    }
    // The model the engine runs: the f32 forward, or its FP8 emulation with --dtype fp8 or
    // fp8-alternate.
    let stored = sgpt::backend::cpu::fp8::stored_blocks(&st.ckpt, &st.cfg)?; // sgpt quantize
    let cpu = match a.engine.dtype.and_then(GpuDtype::fp8_blocks).or(stored) {
        Some(blocks) => CpuModel::load_fp8(
            &st.ckpt,
            &st.cfg,
            sgpt::backend::cpu::fp8::ActScale::PerToken,
            blocks,
            &|_, _| {},
        )?,
        None => CpuModel::load(&st.ckpt, &st.cfg)?,
    };
    let mut corpus = OpTimes::default();
    for range in sgpt::backend::batch::plan_batches(lengths, max_batch_tokens) {
        cpu.embed_profiled(&PackedBatch::from_seqs(&seqs[range]), &mut corpus)?;
    }
    let batch = PackedBatch::from_seqs(&[query]);
    cpu.embed_profiled(&batch, &mut OpTimes::default())?; // warm-up
    let mut q = OpTimes::default();
    let reps = a.latency_reps.max(1);
    for _ in 0..reps {
        cpu.embed_profiled(&batch, &mut q)?;
    }
    let show = a.json.human();
    report!(show, "op times           corpus s (share) | one query ms");
    let (ct, qt) = (corpus.total(), q.total());
    let mut rows = serde_json::Map::new();
    for ((name, c), (_, qs)) in corpus.ops().into_iter().zip(q.ops()) {
        let q_ms = qs / reps as f64 * 1e3;
        report!(
            show,
            "  {name:<16} {c:8.3} ({:4.1}%) | {q_ms:7.3}",
            100.0 * c / ct
        );
        rows.insert(name.into(), json!({"corpus_s": c, "query_ms": q_ms}));
    }
    report!(
        show,
        "  {:<16} {ct:8.3}         | {:7.3}",
        "total",
        qt / reps as f64 * 1e3
    );
    Ok(
        json!({"ops": rows, "corpus_s": ct, "query_ms": qt / reps as f64 * 1e3,
              "query_tokens": query.len(), "query_reps": reps}),
    )
}

fn read_ids(p: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: expected a JSON array of token ids",
                    p.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// `seq` (`[open, ids.., close]`) with its inner ids repeated or cut to `n` tokens in all:
/// queries of one length, for a latency comparable with a server's measured mean.
fn exactly(seq: &[u32], n: usize) -> Vec<u32> {
    let (open, close) = (seq[0], seq[seq.len() - 1]);
    let inner = &seq[1..seq.len() - 1];
    let mut ids = Vec::with_capacity(n);
    ids.push(open);
    ids.extend(inner.iter().cycle().take(n - 2));
    ids.push(close);
    ids
}

/// Peak resident memory of this process (Linux: VmHWM), in bytes.
fn peak_rss_bytes() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|kb| kb * 1024.0)
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
    /// Tokens of every query in the latency measurements, brackets included (default:
    /// synthetic queries of at most 12).
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=4096))]
    query_tokens: Option<u64>,
    /// Batch sizes (queries per batch) of the latency measurements; 1 must be one of them.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    latency_batches: Vec<usize>,
    /// Passes over the corpus; the fastest is reported (all in the JSON's
    /// `corpus_pass_seconds`). More than one steadies the figure on a shared machine.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    corpus_reps: usize,
    /// Repetitions of each latency measurement.
    #[arg(long, default_value_t = 20)]
    latency_reps: usize,
    /// CPU: after the timed runs, run the corpus and the single query again through the CPU
    /// forward with a clock between ops, and report the seconds per op (where the time goes).
    #[arg(long)]
    op_times: bool,
    /// A baseline's results (JSON with "tokens_per_s" and optionally "query_p50_ms", e.g. from
    /// tools/bench_torch_gpu.py) to print our ratio against.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// `bench kernels`: sequences × tokens per sequence of the timed batch.
    #[arg(long, default_value_t = 16)]
    seqs: usize,
    #[arg(long, default_value_t = 300)]
    seq_len: usize,
    #[command(flatten)]
    json: JsonOut,
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
