//! What `sgpt eval` writes: the TREC run file, the metrics JSON and the printed table.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::beir::Dataset;
use super::{EvalOptions, EvalOutcome};
use crate::error::{Error, Result};
use crate::io::output::OutputFile;

/// The run's name in the last column of the run file.
pub const RUN_TAG: &str = "sgpt";

/// Writes `qid Q0 docid rank score tag`, the `top_k` best documents per query in rank order.
/// Scores are printed with the shortest decimal that reads back as the same f32, so trec_eval
/// sorts them exactly as they were ranked. Written through [`OutputFile`]: complete or not at all.
pub fn write_run(
    out: OutputFile,
    data: &Dataset,
    outcome: &EvalOutcome,
    top_k: usize,
) -> Result<()> {
    let path = out.path().to_path_buf();
    let io = |e| Error::io(&path, e);
    let mut w = out.writer()?;
    for (q, hits) in data.queries.iter().zip(&outcome.rankings) {
        for (rank, hit) in hits.iter().take(top_k).enumerate() {
            writeln!(
                w,
                "{} Q0 {} {} {} {RUN_TAG}",
                q.id,
                data.corpus.ids[hit.doc as usize],
                rank + 1,
                hit.score
            )
            .map_err(io)?;
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    out.commit()
}

/// Everything a later reader needs to trust or compare the numbers.
pub fn metrics_json(
    data: &Dataset,
    outcome: &EvalOutcome,
    model: &Path,
    opts: &EvalOptions,
) -> Value {
    let m = &outcome.mean;
    let per_query: Map<String, Value> = data
        .queries
        .iter()
        .zip(&outcome.per_query)
        .map(|(q, m)| (q.id.clone(), json!(m)))
        .collect();
    let d = &outcome.documents;
    let t = &outcome.timings;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    json!({
        "ndcg@10": m.ndcg_10,
        "recall@100": m.recall_100,
        "map@100": m.map_100,
        "mrr@10": m.mrr_10,
        "model": model.display().to_string(),
        "data": data.dir.display().to_string(),
        "split": data.split,
        "backend": outcome.engine.to_string(),
        "engine": outcome.engine,
        "scorer": outcome.scorer,
        "sgpt_version": env!("CARGO_PKG_VERSION"),
        "unix_time": super::unix_time(),
        "top_k": opts.top_k,
        "counts": {
            "documents": data.corpus.ids.len(),
            "queries_in_file": data.queries_in_file,
            "queries_evaluated": data.queries.len(),
            "queries_without_relevant": data.queries_without_relevant(),
            "queries_with_own_id_in_corpus": data.queries.iter()
                .filter(|q| data.corpus.index.contains_key(&q.id)).count(),
            "judgment_lines": data.judgment_lines,
            "duplicate_judgments": data.duplicate_judgments,
            "judged_documents_not_in_corpus": data.unknown_docs.len(),
        },
        "embedding": {
            "queries": outcome.queries,
            "documents": outcome.documents,
        },
        "timings_s": t,
        "throughput": {
            "documents_per_s": rate(d.embedded, d.seconds),
            "tokens_per_s": rate(d.tokens_embedded, d.seconds),
        },
        "per_query": per_query,
    })
}

/// The table printed at the end of a run.
pub fn table(data: &Dataset, outcome: &EvalOutcome) -> String {
    let m = &outcome.mean;
    let d = &outcome.documents;
    let t = &outcome.timings;
    let mut s = format!(
        "{} (split {}): {} queries ({} without a relevant document), {} documents\n",
        data.dir.display(),
        data.split,
        data.queries.len(),
        data.queries_without_relevant(),
        data.corpus.ids.len()
    );
    for (name, v) in [
        ("NDCG@10", m.ndcg_10),
        ("Recall@100", m.recall_100),
        ("MAP@100", m.map_100),
        ("MRR@10", m.mrr_10),
    ] {
        s += &format!("  {name:<11} {v:.5}\n");
    }
    let embed = if d.embedded > 0 {
        format!(
            "{} documents embedded in {:.2} s ({:.1} documents/s, {:.0} tokens/s), {} from the cache",
            d.embedded,
            d.seconds,
            d.embedded as f64 / d.seconds.max(1e-9),
            d.tokens_embedded as f64 / d.seconds.max(1e-9),
            d.from_cache
        )
    } else {
        format!("all {} documents from the cache", d.from_cache)
    };
    s += &format!(
        "  {embed}; search {:.1} ms ({}); total {:.3} s\n",
        t.search_s * 1e3,
        outcome.scorer,
        t.total_s
    );
    s
}
