//! `sgpt inspect`: a model directory described, after every check `embed` runs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use sgpt::model::tokenize::Kind;
use sgpt::model::weights::DType;
use sgpt::model::ModelDir;

use super::{file_name, human, progress_bar, report, JsonOut, BYTES};

#[derive(Args)]
pub struct InspectArgs {
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
    #[command(flatten)]
    json: JsonOut,
    /// No progress bar for the scan of the weights on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// Every check `embed` runs (config, tokenizer, schema: names, shapes, dtypes, layer count,
/// duplicates) via `ModelDir::open`, then a scan of every weight for NaN/Inf; exit 1 on any.
pub fn run(a: InspectArgs) -> Result<()> {
    let dir = a.dir.or(a.model_flag).context("give the model directory")?;
    a.json.check()?;
    let m = ModelDir::open(&dir)?;
    let mut bad = Vec::new();
    let names = m.checkpoint.names();
    // Reading every weight of a multi-GB checkpoint takes a while from a cold disk.
    let total = m.checkpoint.total_bytes() as u64;
    let bar = progress_bar(total, a.quiet || total < 1 << 28, BYTES);
    for n in &names {
        let t = m.checkpoint.get_any(n)?; // E4M3 codes too (sgpt quantize): NaN codes count
        let k = t.count_non_finite();
        if k > 0 {
            bad.push(format!("`{n}` ({k} values)"));
        }
        bar.inc(t.bytes().len() as u64);
    }
    bar.finish_and_clear();
    if !bad.is_empty() {
        bail!(
            "{}: {} tensor(s) hold NaN or Inf: {}; any text whose forward touches them gets no embedding",
            m.dir.display(),
            bad.len(),
            sgpt::error::list_some(&bad, bad.len())
        );
    }
    // A checkpoint written by `sgpt quantize`: which dtype runs it (an error for a block pattern
    // none does), and scales that can be used.
    let stored = sgpt::backend::cpu::fp8::stored_blocks(&m.checkpoint, &m.config)?;
    for n in names.iter().filter(|n| n.ends_with(".weight_scale")) {
        let s = m.checkpoint.get(n)?.to_f32();
        sgpt::backend::cpu::fp8::check_scales(&m.dir, n, &s)?;
    }
    let c = &m.config;
    let mut params = 0usize;
    let mut dtypes = std::collections::BTreeMap::<DType, usize>::new();
    for n in &names {
        let t = m.checkpoint.get_any(n)?;
        if !n.ends_with(".weight_scale") {
            params += t.numel(); // E4M3 weights count as parameters, their scales do not
        }
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
        "stored_fp8": stored.map(|b| b.dtype_name()),
        "non_embedding_parameters": c.non_embedding_params(),
        "dtypes": dtypes.iter().map(|(d, n)| (d.name().to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
        "bytes": m.checkpoint.total_bytes(),
        "files": files.iter().map(|(f, b)| serde_json::json!({"file": f, "bytes": b})).collect::<Vec<_>>(),
    });
    let show = a.json.human();
    report!(show, "model            {}", m.dir.display());
    report!(show, "hidden H         {}", c.hidden);
    report!(show, "layers L         {}", c.layers);
    report!(
        show,
        "heads n          {} (head dim {})",
        c.heads,
        c.head_dim()
    );
    report!(
        show,
        "vocab            {} embedding rows, {} tokenizer tokens",
        c.vocab,
        m.tokenizer.vocab_size()
    );
    report!(show, "layernorm eps    {:e}", c.eps);
    report!(
        show,
        "max_seq_length   {} ({} text tokens + brackets)",
        m.sentence.max_seq_length,
        m.tokenizer.max_text_tokens()
    );
    report!(show, "pooling          weighted mean");
    report!(
        show,
        "brackets         query [{qo} … {qc}], document [{doc_o} … {doc_c}]"
    );
    report!(show, "tensors          {} (lm_head ignored)", names.len());
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(d, n)| format!("{} × {n}", d.name()))
        .collect();
    report!(show, "dtypes           {}", dt.join(", "));
    if let Some(b) = stored {
        report!(
            show,
            "stored fp8       linear layers of {} in E4M3 (sgpt quantize): runs as --dtype {}",
            b.which(),
            b.dtype_name()
        );
    }
    report!(
        show,
        "parameters       {} ({} outside the embedding)",
        human(params as f64, ""),
        human(c.non_embedding_params() as f64, "")
    );
    report!(
        show,
        "bytes            {}",
        human(m.checkpoint.total_bytes() as f64, "B")
    );
    for (f, b) in files {
        report!(show, "  {f:<40} {}", human(b as f64, "B"));
    }
    a.json.write(&info)
}
