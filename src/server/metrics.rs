//! Prometheus metrics of one server, in its own registry (no process-wide globals), rendered
//! as text by `GET /metrics`. The list (also in docs/serve.md):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `sgpt_requests_total{route,status}` | counter | answered requests, by route and HTTP status |
//! | `sgpt_request_duration_seconds{route}` | histogram | time from request to response |
//! | `sgpt_requests_in_flight` | gauge | embedding requests being served now |
//! | `sgpt_queue_depth` | gauge | tokenized texts waiting for the engine |
//! | `sgpt_batch_sequences` | histogram | texts per packed batch |
//! | `sgpt_batch_tokens` | histogram | tokens per packed batch |
//! | `sgpt_batch_duration_seconds` | histogram | engine time per batch (`Backend::embed`) |
//! | `sgpt_request_stage_seconds{stage}` | histogram | where an answered embedding request's time went, by stage (below) |
//! | `sgpt_texts_total` | counter | texts embedded |
//! | `sgpt_tokens_total` | counter | tokens embedded, brackets included |
//! | `sgpt_truncated_texts_total` | counter | texts cut to the model's limit |
//! | `sgpt_ready` | gauge | 1 once the model is loaded and warmed up; 0 again if the engine breaks |
//! | `sgpt_aborted_requests_total` | counter | requests whose client closed the connection mid-body (not in `sgpt_requests_total`) |
//! | `sgpt_open_connections` | gauge | connections open now |
//! | `sgpt_refused_connections_total` | counter | connections closed at once because `--max-connections` were open |
//! | `sgpt_replica_{batches,texts,tokens,failed_batches}_total{device}` | counter | per replica, with `--device cuda:all` or a list |
//! | `sgpt_replica_busy_seconds{device}` | gauge | per replica: seconds in the forward |
//! | `sgpt_replica_in_service{device}` | gauge | per replica: 1, or 0 once taken out of service |
//!
//! The stages of `sgpt_request_stage_seconds`, one observation each per answered embedding
//! request, in order (together they are the handler's time; the rest of
//! `sgpt_request_duration_seconds` is routing and middleware):
//!
//! | stage | from → to |
//! |---|---|
//! | `read` | handler start → body read |
//! | `parse` | body read → JSON parsed, texts and options checked |
//! | `tokenize` | → every text tokenized and length-checked |
//! | `queue` | → the forward of its first batch starts (hand-offs and waiting for the engine) |
//! | `engine` | → the forward of its last batch ends |
//! | `respond` | → response body built (hand-off back to the request's task, cut, normalize, encode) |

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::replicas::ReplicaStats;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub queue_depth: IntGauge,
    pub batch_sequences: Histogram,
    pub batch_tokens: Histogram,
    pub batch_duration: Histogram,
    pub texts: IntCounter,
    pub tokens: IntCounter,
    pub truncated: IntCounter,
    pub ready: IntGauge,
    pub aborted: IntCounter,
    pub open_connections: IntGauge,
    pub refused_connections: IntCounter,
    pub stages: Stages,
}

/// The stages of `sgpt_request_stage_seconds`, each resolved once so observing one takes no
/// label lookup (the vector's lock) on the request path.
pub struct Stages {
    pub read: Histogram,
    pub parse: Histogram,
    pub tokenize: Histogram,
    pub queue: Histogram,
    pub engine: Histogram,
    pub respond: Histogram,
}

impl Stages {
    pub const NAMES: [&'static str; 6] =
        ["read", "parse", "tokenize", "queue", "engine", "respond"];
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        // 0.5 ms … 65 s: a tiny model's query on a GPU up to a full 7b1 batch on a CPU.
        let seconds = exponential_buckets(0.0005, 2.0, 18)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "sgpt_requests_total",
                "Answered requests by route and status",
            ),
            &["route", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sgpt_request_duration_seconds",
                "Time from request to response",
            )
            .buckets(seconds.clone()),
            &["route"],
        )?;
        let in_flight =
            IntGauge::new("sgpt_requests_in_flight", "Embedding requests being served")?;
        let queue_depth =
            IntGauge::new("sgpt_queue_depth", "Tokenized texts waiting for the engine")?;
        let batch_sequences = Histogram::with_opts(
            HistogramOpts::new("sgpt_batch_sequences", "Texts per packed batch")
                .buckets(exponential_buckets(1.0, 2.0, 12)?),
        )?;
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new("sgpt_batch_tokens", "Tokens per packed batch")
                .buckets(exponential_buckets(4.0, 2.0, 14)?),
        )?;
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sgpt_batch_duration_seconds",
                "Engine time per packed batch",
            )
            .buckets(seconds),
        )?;
        let texts = IntCounter::new("sgpt_texts_total", "Texts embedded")?;
        let tokens = IntCounter::new("sgpt_tokens_total", "Tokens embedded, brackets included")?;
        let truncated = IntCounter::new(
            "sgpt_truncated_texts_total",
            "Texts cut to the model's length limit",
        )?;
        let ready = IntGauge::new("sgpt_ready", "1 once the model is loaded and warmed up")?;
        let aborted = IntCounter::new(
            "sgpt_aborted_requests_total",
            "Requests whose client closed the connection before the body was complete",
        )?;
        let open_connections = IntGauge::new("sgpt_open_connections", "Connections open now")?;
        let refused_connections = IntCounter::new(
            "sgpt_refused_connections_total",
            "Connections closed at once because --max-connections were open",
        )?;
        // 10 µs … 84 s: stages of a tiny model's query are tens of microseconds.
        let stage = HistogramVec::new(
            HistogramOpts::new(
                "sgpt_request_stage_seconds",
                "Time of each stage of an answered embedding request",
            )
            .buckets(exponential_buckets(1e-5, 2.0, 24)?),
            &["stage"],
        )?;
        let st = |name: &str| stage.with_label_values(&[name]);
        let stages = Stages {
            read: st("read"),
            parse: st("parse"),
            tokenize: st("tokenize"),
            queue: st("queue"),
            engine: st("engine"),
            respond: st("respond"),
        };
        registry.register(Box::new(stage))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_sequences.clone()))?;
        registry.register(Box::new(batch_tokens.clone()))?;
        registry.register(Box::new(batch_duration.clone()))?;
        registry.register(Box::new(texts.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(truncated.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(aborted.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        registry.register(Box::new(refused_connections.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            in_flight,
            queue_depth,
            batch_sequences,
            batch_tokens,
            batch_duration,
            texts,
            tokens,
            truncated,
            ready,
            aborted,
            open_connections,
            refused_connections,
            stages,
        })
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> prometheus::Result<String> {
        self.render_with(&[])
    }

    /// The metrics, plus each replica's counters labelled by device (`--device cuda:all`):
    /// read from the replica set at scrape time into a registry of their own.
    pub fn render_with(&self, replicas: &[ReplicaStats]) -> prometheus::Result<String> {
        let mut families = self.registry.gather();
        if !replicas.is_empty() {
            let per_device = Registry::new();
            let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), &["device"])?;
                per_device.register(Box::new(c.clone()))?;
                Ok(c)
            };
            let batches = counter("sgpt_replica_batches_total", "Batches run by each replica")?;
            let texts = counter("sgpt_replica_texts_total", "Texts embedded by each replica")?;
            let tokens = counter(
                "sgpt_replica_tokens_total",
                "Tokens embedded by each replica",
            )?;
            let failed = counter(
                "sgpt_replica_failed_batches_total",
                "Batches that failed on each replica",
            )?;
            let busy = prometheus::GaugeVec::new(
                Opts::new(
                    "sgpt_replica_busy_seconds",
                    "Seconds each replica has spent in the forward",
                ),
                &["device"],
            )?;
            let up = IntGaugeVec::new(
                Opts::new(
                    "sgpt_replica_in_service",
                    "1 while the replica takes batches, 0 once taken out of service",
                ),
                &["device"],
            )?;
            per_device.register(Box::new(busy.clone()))?;
            per_device.register(Box::new(up.clone()))?;
            for r in replicas {
                let d = [r.device.as_str()];
                batches.with_label_values(&d).inc_by(r.batches);
                texts.with_label_values(&d).inc_by(r.texts);
                tokens.with_label_values(&d).inc_by(r.tokens);
                failed.with_label_values(&d).inc_by(r.failed_batches);
                busy.with_label_values(&d).set(r.busy_seconds);
                up.with_label_values(&d).set(i64::from(r.in_service));
            }
            families.extend(per_device.gather());
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&families, &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["/embed", "200"]).inc();
        m.request_duration
            .with_label_values(&["/embed"])
            .observe(0.01);
        let text = m.render().unwrap();
        for name in [
            "sgpt_requests_total{route=\"/embed\",status=\"200\"} 1",
            "sgpt_request_duration_seconds_bucket",
            "sgpt_requests_in_flight 0",
            "sgpt_queue_depth 0",
            "sgpt_batch_sequences_count 0",
            "sgpt_batch_tokens_count 0",
            "sgpt_batch_duration_seconds_count 0",
            "sgpt_texts_total 0",
            "sgpt_tokens_total 0",
            "sgpt_truncated_texts_total 0",
            "sgpt_ready 0",
            "sgpt_aborted_requests_total 0",
            "sgpt_open_connections 0",
            "sgpt_refused_connections_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        // Every stage is exported from the start, with no observation yet.
        for stage in Stages::NAMES {
            let name = format!("sgpt_request_stage_seconds_count{{stage=\"{stage}\"}} 0");
            assert!(text.contains(&name), "{name} missing from:\n{text}");
        }
    }
}
