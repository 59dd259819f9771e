//! `sgpt eval`: retrieval quality on a dataset in BEIR layout, so the model card's BEIR table
//! can be reproduced with this engine.
//!
//! The pipeline, top to bottom in [`evaluate`]:
//! 1. [`beir`]: read corpus, queries and qrels (every malformed line named by file:line).
//! 2. Embed the judged queries as queries, then the corpus as documents, in shards through
//!    [`cache`]: each shard is on disk before the next starts, so an interrupted run resumes
//!    from the last complete shard.
//! 3. [`search`]: each document shard, as it is computed or read back, goes into a streaming
//!    exact cosine top-k (blocked GEMM + per-query heaps).
//! 4. [`metrics`]: NDCG@10, Recall@100, MAP@100, MRR@10 with trec_eval's definitions, per
//!    query, averaged over the judged queries as BEIR does. [`report`] writes the TREC run file
//!    and the JSON.

pub mod beir;
pub mod cache;
pub mod metrics;
pub mod report;
pub mod search;
pub mod search_gpu;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::backend::cpu::pooling::l2_normalize;
use crate::engine::embedder::Chunks;
use crate::engine::Embedder;
use crate::error::{Error, Result};
use crate::model::tokenize::Kind;
use crate::model::ModelDir;

use crate::hash::Fnv;
use beir::Dataset;
use cache::ShardCache;
use metrics::Metrics;
use search::{BlockedScorer, CpuScorer, Hit, Scorer, SearchPlan, DOC_BLOCK, QUERY_BLOCK};

/// Documents retrieved per query for the metrics: Recall@100 and MAP@100 need 100.
pub const METRICS_DEPTH: usize = 100;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Documents per query in the run file; the search keeps max(top_k, 100).
    pub top_k: usize,
    /// Caches go in `cache_root/documents-<hash>` and `cache_root/queries-<hash>`.
    pub cache_root: PathBuf,
    /// Most rows per shard; also the unit of tokenization (shards start at multiples of it).
    pub shard_rows: usize,
    /// A shard is also closed when it has been open this long (at the next batch boundary).
    pub shard_seconds: f64,
    /// Test hook: sleep this long after each shard is written (to kill a run between shards).
    pub pause_after_shard: Duration,
}

/// What happens, for a progress display. `what` is "queries" or "documents".
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A line for the operator.
    Note(String),
    /// Embedding starts: `total` rows, `cached` of them already in the cache.
    Start {
        what: &'static str,
        total: usize,
        cached: usize,
    },
    /// `rows` more rows (and `tokens` tokens) embedded.
    Embedded {
        what: &'static str,
        rows: usize,
        tokens: usize,
    },
    /// Rows `start..end` are safely on disk.
    Shard {
        what: &'static str,
        start: usize,
        end: usize,
    },
    /// All rows of `what` are available.
    Done { what: &'static str },
}

/// Work counters of one embedding phase.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EmbedCounts {
    pub total: usize,
    /// Rows read back from the cache.
    pub from_cache: usize,
    /// Rows computed by this run.
    pub embedded: usize,
    /// Tokens (brackets included) of the rows computed by this run.
    pub tokens_embedded: usize,
    /// Of the rows computed by this run, those cut to the model's length limit.
    pub truncated: usize,
    pub shards_written: usize,
    pub cache_dir: String,
    /// Seconds spent embedding (tokenizing, forward passes, writing shards); cache reads and
    /// the search are not included.
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    pub embed_queries_s: f64,
    pub embed_documents_s: f64,
    pub read_cache_s: f64,
    pub search_s: f64,
    pub metrics_s: f64,
    pub total_s: f64,
}

pub struct EvalOutcome {
    /// Per evaluated query (in [`Dataset::queries`] order): its max(top_k, 100) best documents.
    pub rankings: Vec<Vec<Hit>>,
    pub per_query: Vec<Metrics>,
    pub mean: Metrics,
    pub queries: EmbedCounts,
    pub documents: EmbedCounts,
    pub timings: Timings,
    /// The engine that embedded (typed; also written to the metrics JSON).
    pub engine: crate::backend::BackendInfo,
    pub scorer: String,
}

/// What identifies a model's embeddings: configuration and tokenizer contents, the sequence
/// limit, and each weight file's name, size and modification time (hashing tens of GB on every
/// run would cost minutes; a rewritten file gets a new mtime).
pub fn model_identity(m: &ModelDir) -> Result<Value> {
    let hash_file = |name: &str| -> Result<Value> {
        let p = m.dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => {
                let mut f = Fnv::default();
                f.write(&b);
                Ok(Value::String(f.hex()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
            Err(e) => Err(Error::io(p, e)),
        }
    };
    let mut files = Vec::new();
    for f in &m.checkpoint.files {
        let meta = std::fs::metadata(&f.path).map_err(|e| Error::io(&f.path, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push(json!({
            "file": f.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "bytes": meta.len(),
            "mtime_ns": mtime.to_string(),
        }));
    }
    Ok(json!({
        "config.json": hash_file("config.json")?,
        "tokenizer.json": hash_file("tokenizer.json")?,
        "max_seq_length": m.sentence.max_seq_length,
        "weights": files,
    }))
}

/// Hash of (id, text) of every row, in order.
fn texts_identity(ids: &[&str], texts: &[&str]) -> Value {
    let mut f = Fnv::default();
    for (id, t) in ids.iter().zip(texts) {
        f.write_str(id);
        f.write_str(t);
    }
    json!({"rows": ids.len(), "fnv1a64": f.hex()})
}

/// Embeds `texts` as `kind` through the shard cache named `what`, calling `on_block` with every
/// block of rows (cached or new), in row order.
#[allow(clippy::too_many_arguments)]
fn embed_cached(
    embedder: &Embedder,
    what: &'static str,
    ids: &[&str],
    texts: &[&str],
    kind: Kind,
    model_id: &Value,
    opts: &EvalOptions,
    on_block: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    on_event: &mut dyn FnMut(Event),
) -> Result<(EmbedCounts, Duration)> {
    let h = embedder.hidden();
    let identity = json!({
        "sgpt": env!("CARGO_PKG_VERSION"),
        "model": model_id,
        // Backend kind, device, dtype and kernel choices: vectors of different engines are
        // never mixed.
        "backend": embedder.backend.info().identity(),
        "kind": kind,
        "texts": texts_identity(ids, texts),
    });
    let (mut cache, report) = ShardCache::open(&opts.cache_root, what, identity, h)?;
    let dir = cache.dir().display().to_string();
    if let Some(why) = &report.reset {
        on_event(Event::Note(format!(
            "{what} cache {dir}: {why}; starting over"
        )));
    }
    if report.dropped_shards > 0 || !report.removed_files.is_empty() {
        on_event(Event::Note(format!(
            "{what} cache {dir}: discarded {} incomplete shard file(s) and {} damaged shard(s)",
            report.removed_files.len(),
            report.dropped_shards
        )));
    }
    let check = |first: usize, e: &[f32]| -> Result<()> {
        match e.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::Unsupported(format!(
                "the model produced a non-finite embedding for {what} id {:?}",
                ids[first + i / h]
            ))),
        }
    };

    // 1. What the cache holds.
    let mut read_time = Duration::ZERO;
    let mut i = 0;
    while i < cache.shards().len() {
        let (start, rows) = (cache.shards()[i].start, cache.shards()[i].rows);
        if start + rows > texts.len() {
            // Only a hand-edited manifest can list rows past the texts its key describes.
            cache.truncate(i)?;
            on_event(Event::Note(format!(
                "{what} cache {dir}: shards past row {} ignored; recomputing from row {start}",
                texts.len()
            )));
            break;
        }
        let t_read = Instant::now();
        let shard = cache.read(i)?;
        read_time += t_read.elapsed();
        match shard {
            Some(data) => {
                check(start, &data)?;
                on_block(start, &data)?;
                i += 1;
            }
            None => on_event(Event::Note(format!(
                "{what} cache {dir}: shard at row {start} is damaged; recomputing from there"
            ))),
        }
    }
    let cached = cache.rows();
    let mut counts = EmbedCounts {
        total: texts.len(),
        from_cache: cached,
        cache_dir: dir,
        ..Default::default()
    };
    on_event(Event::Start {
        what,
        total: texts.len(),
        cached,
    });

    // 2. The rest, through the engine's pipeline (the next chunk tokenized while this one is
    // embedded); a shard closes at each chunk's end or after shard_seconds, on a batch end.
    let t_embed = Instant::now();
    let step = opts.shard_rows.max(1);
    let pos = cached;
    let mut buf: Vec<f32> = Vec::new();
    let mut buf_start = pos;
    let mut opened = Instant::now();
    let mut block_time = Duration::ZERO;
    let total = texts.len();
    let rest = texts[pos..].iter().map(|t| Ok((t.to_string(), kind)));
    // Chunks end at multiples of shard_rows (counted from the corpus' first row): a resumed
    // run starts at a shard end, which is a batch end of the uninterrupted run, so it packs the
    // same batches from there.
    let chunks = Chunks {
        end: &|s| ((pos + s) / step + 1) * step - pos,
        max_bytes: None,
    };
    embedder.embed_stream_with(rest, false, chunks, &mut |b| {
        let rows = b.seqs.len();
        let start = pos + b.first;
        check(start, b.vectors)?;
        buf.extend_from_slice(b.vectors);
        let tokens: usize = b.seqs.iter().map(|x| x.ids.len()).sum();
        counts.embedded += rows;
        counts.tokens_embedded += tokens;
        counts.truncated += b.seqs.iter().filter(|e| e.truncated).count();
        on_event(Event::Embedded { what, rows, tokens });
        let end = start + rows;
        let chunk_done = end % step == 0 || end == total;
        if chunk_done || opened.elapsed().as_secs_f64() >= opts.shard_seconds {
            cache.append(buf_start, &buf)?;
            counts.shards_written += 1;
            on_event(Event::Shard {
                what,
                start: buf_start,
                end,
            });
            let t_block = Instant::now();
            on_block(buf_start, &buf)?;
            block_time += t_block.elapsed();
            buf.clear();
            buf_start = end;
            opened = Instant::now();
            if !opts.pause_after_shard.is_zero() {
                std::thread::sleep(opts.pause_after_shard);
            }
        }
        Ok(())
    })?;
    // The caller's work on each block (scoring) is not embedding time.
    counts.seconds = t_embed.elapsed().saturating_sub(block_time).as_secs_f64();
    on_event(Event::Done { what });
    Ok((counts, read_time))
}

/// Runs the whole evaluation; see the module comment.
pub fn evaluate(
    embedder: &Embedder,
    data: &Dataset,
    opts: &EvalOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<EvalOutcome> {
    let t_total = Instant::now();
    if opts.top_k == 0 {
        return Err(Error::Input("--top-k must be at least 1".into()));
    }
    let h = embedder.hidden();
    let model_id = model_identity(&embedder.model)?;
    let mut timings = Timings::default();

    // Queries: few and short, but cached the same way (a 7b1 forward on a CPU is slow).
    let q_ids: Vec<&str> = data.queries.iter().map(|q| q.id.as_str()).collect();
    let q_texts: Vec<&str> = data.queries.iter().map(|q| q.text.as_str()).collect();
    let mut queries = Vec::with_capacity(q_ids.len() * h);
    let (q_counts, q_read) = embed_cached(
        embedder,
        "queries",
        &q_ids,
        &q_texts,
        Kind::Query,
        &model_id,
        opts,
        &mut |_, e| {
            queries.extend_from_slice(e);
            Ok(())
        },
        on_event,
    )?;
    timings.embed_queries_s = q_counts.seconds;
    l2_normalize(&mut queries, h);

    let corpus = &data.corpus;
    let plan = SearchPlan {
        k: opts.top_k.max(METRICS_DEPTH),
        tie_rank: search::tie_ranks(&corpus.ids),
        exclude: data
            .queries
            .iter()
            .map(|q| corpus.index.get(&q.id).copied())
            .collect(),
    };
    // Exact search where the embeddings were made: the GPU when the engine runs there.
    let mut scorer: Box<dyn Scorer> = match embedder.backend.cuda_context() {
        Some(ctx) => Box::new(BlockedScorer::with_product(
            search_gpu::GpuProduct::new(&ctx)?,
            queries,
            h,
            plan,
            QUERY_BLOCK,
            DOC_BLOCK,
        )?),
        None => Box::new(CpuScorer::new(queries, h, plan)?),
    };
    let scorer_name = scorer.describe();

    let d_ids: Vec<&str> = corpus.ids.iter().map(String::as_str).collect();
    let d_texts: Vec<&str> = corpus.texts.iter().map(String::as_str).collect();
    let mut search_time = Duration::ZERO;
    let (d_counts, d_read) = embed_cached(
        embedder,
        "documents",
        &d_ids,
        &d_texts,
        Kind::Document,
        &model_id,
        opts,
        &mut |first, e| {
            let t = Instant::now();
            let mut unit = e.to_vec();
            l2_normalize(&mut unit, h);
            scorer.add_documents(first, &unit)?;
            search_time += t.elapsed();
            Ok(())
        },
        on_event,
    )?;
    timings.embed_documents_s = d_counts.seconds;
    let t = Instant::now();
    let rankings = scorer.finish()?;
    search_time += t.elapsed();
    timings.search_s = search_time.as_secs_f64();
    timings.read_cache_s = (q_read + d_read).as_secs_f64();

    let t = Instant::now();
    let per_query: Vec<Metrics> = data
        .queries
        .iter()
        .zip(&rankings)
        .map(|(q, hits)| {
            let ranked: Vec<i64> = hits
                .iter()
                .take(METRICS_DEPTH)
                .map(|hit| {
                    let id = &corpus.ids[hit.doc as usize];
                    q.judgments.get(id).copied().unwrap_or(0)
                })
                .collect();
            let judged: Vec<i64> = q.judgments.values().copied().collect();
            Metrics::of_query(&ranked, &judged)
        })
        .collect();
    let mean = Metrics::mean(&per_query);
    timings.metrics_s = t.elapsed().as_secs_f64();
    timings.total_s = t_total.elapsed().as_secs_f64();
    Ok(EvalOutcome {
        rankings,
        per_query,
        mean,
        queries: q_counts,
        documents: d_counts,
        timings,
        engine: embedder.backend.info(),
        scorer: scorer_name,
    })
}

/// Seconds since the epoch, for the report.
pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
