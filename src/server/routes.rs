//! The HTTP surface: routes, middleware (metrics, API key) and handlers. Each embedding
//! handler reads its body within the limits (`read_body`), only then takes a concurrency
//! permit, sequences the checks of `api.rs`, tokenizes (off the async runtime unless the texts
//! are short), and waits for its rows from the batcher.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::Embedder;
use crate::model::tokenize::Kind;
use crate::server::api::{self, EncodingFormat, OpenAiRequest, OpenAiResponse, TeiRequest};
use crate::server::batcher::BatchError;
use crate::server::errors::{check_json_content_type, Aborted, ApiError, ErrorKind, Style};
use crate::server::{AppState, Engine, ServeOptions};

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let embedding = Router::new()
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/embed", post(tei_embed))
        // The key before anything is read; the body limits and the permit are the handlers'.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .merge(embedding)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Route label for metrics: the known routes, or "other" (bounded label cardinality).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/embeddings" => "/v1/embeddings",
        "/embed" => "/embed",
        "/health" => "/health",
        "/info" => "/info",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        _ => "other",
    }
}

async fn track(State(st): St, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let t0 = Instant::now();
    let r = next.run(req).await;
    if r.extensions().get::<Aborted>().is_some() {
        st.metrics.aborted.inc();
        return r;
    }
    st.metrics
        .requests
        .with_label_values(&[route, r.status().as_str()])
        .inc();
    st.metrics
        .request_duration
        .with_label_values(&[route])
        .observe(t0.elapsed().as_secs_f64());
    r
}

/// Byte-wise comparison whose time does not depend on where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_api_key(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if !given.is_some_and(|t| same_secret(t.as_bytes(), key.as_bytes())) {
            let msg = if given.is_some() {
                "wrong API key"
            } else {
                "this server needs an API key: send `Authorization: Bearer <key>`"
            };
            return ApiError::new(ErrorKind::Unauthorized, msg)
                .into_response(Style::for_path(req.uri().path()));
        }
    }
    next.run(req).await
}

/// Decrements the in-flight gauge however the request ends (a dropped connection included).
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// A concurrency permit, held until the response is built.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlight,
}

/// A concurrency permit or 429 at once (never a wait).
fn take_slot(st: &Arc<AppState>) -> Result<Slot, ApiError> {
    let permit = st.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "the server is busy: {} requests are being served (--max-concurrent-requests); \
                 retry later",
                st.opts.max_concurrent_requests
            ),
        )
    })?;
    st.metrics.in_flight.inc();
    Ok(Slot {
        _permit: permit,
        _in_flight: InFlight(st.clone()),
    })
}

fn ready(st: &AppState) -> Result<Arc<Engine>, ApiError> {
    match st.engine.get() {
        None => Err(ApiError::new(
            ErrorKind::Unhealthy,
            "the model is loading; retry when GET /health answers 200",
        )),
        Some(e) => match e.batcher.health() {
            Ok(()) => Ok(e.clone()),
            Err(why) => Err(ApiError::new(ErrorKind::Unhealthy, why)),
        },
    }
}

async fn health(State(st): St) -> Response {
    match ready(&st) {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(Style::Tei),
    }
}

async fn info(State(st): St) -> Response {
    match ready(&st) {
        Ok(e) => {
            let mut info = e.info.clone();
            // Live per-device counters and state (`--device cuda:all`).
            let replicas = e.embedder.backend.replica_stats();
            if !replicas.is_empty() {
                info["replicas"] = json!(replicas);
            }
            Json(info).into_response()
        }
        Err(e) => e.into_response(Style::Tei),
    }
}

/// OpenAI's model list: clients and tools call it to discover what the server serves. Open like
/// /info (it tells nothing /info does not); the one model is the served model name.
async fn models(State(st): St) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": st.opts.model_name, "object": "model", "created": 0, "owned_by": "sgpt"}],
    }))
    .into_response()
}

async fn metrics(State(st): St) -> Response {
    let replicas = st
        .engine
        .get()
        .map(|e| e.embedder.backend.replica_stats())
        .unwrap_or_default();
    match st.metrics.render_with(&replicas) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::new(ErrorKind::Backend, format!("rendering metrics: {e}"))
            .into_response(Style::Tei),
    }
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no route {path}: the routes are POST /v1/embeddings, POST /embed, GET /health, \
             GET /info, GET /metrics"
        ),
    )
    .into_response(Style::for_path(&path))
}

async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{} is not allowed on {path}", req.method()),
    )
    .into_response(Style::for_path(&path))
}

/// Request-body bytes counted in the global budget, given back when dropped.
struct BodyBytes(Option<OwnedSemaphorePermit>);

/// Reads a JSON body within the limits, before any concurrency permit is taken: a declared
/// `Content-Length` over the payload limit is 413 at once, unread; the whole body must come
/// within the body timeout (408) and the payload limit (413), and its bytes must fit the
/// budget of body bytes held by all requests (429 at once, never a wait: waiting requests
/// holding part of the budget could block each other until they all time out).
async fn read_body(
    st: &AppState,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<(Bytes, BodyBytes), ApiError> {
    check_json_content_type(headers)?;
    let limit = st.opts.payload_limit;
    let too_large = || {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes (--payload-limit)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + st.opts.body_timeout;
    let mut buf = Vec::new();
    let mut held = BodyBytes(None);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    ErrorKind::BodyTimeout,
                    format!(
                        "the request body did not arrive within {} s (--body-timeout-secs)",
                        st.opts.body_timeout.as_secs_f64()
                    ),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(body_error(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            return Err(too_large());
        }
        let n = u32::try_from(data.len()).map_err(|_| too_large())?;
        let permit = st
            .body_bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                ApiError::new(
                    ErrorKind::Overloaded,
                    format!(
                        "the server is busy: it holds {} bytes of request bodies \
                         (--max-body-bytes-in-flight); retry later",
                        st.opts.max_body_bytes_in_flight
                    ),
                )
            })?;
        match &mut held.0 {
            Some(p) => p.merge(permit),
            None => held.0 = Some(permit),
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

/// A body that broke off: malformed framing (a bad chunk: 400), or, the usual case, a client
/// that closed the connection mid-body (aborted, counted apart).
fn body_error(e: axum::Error) -> ApiError {
    let inner = e.into_inner();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            ) {
                return ApiError::new(
                    ErrorKind::InvalidJson,
                    format!("could not read the request body: {inner}"),
                );
            }
        }
        source = s.source();
    }
    ApiError::new(
        ErrorKind::Aborted,
        format!("the client closed the connection before the body was complete: {inner}"),
    )
}

async fn openai_embeddings(State(st): St, req: Request) -> Response {
    match openai_inner(&st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(Style::OpenAi),
    }
}

async fn openai_inner(st: &Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let (bytes, _held) = read_body(st, &parts.headers, body).await?;
    let _slot = take_slot(st)?;
    let read = Instant::now();
    let req: OpenAiRequest = api::parse_body(&bytes)?;
    let texts = api::texts(req.input, "input", st.opts.max_client_batch_size)?;
    let engine = ready(st)?;
    let dims = api::dimensions(req.dimensions, engine.embedder.hidden())?;
    let kind = api::kind(req.input_type, st.opts.default_kind);
    let parsed = Instant::now();
    let e = embed(st, &engine, texts, kind, st.opts.auto_truncate, dims, true).await?;
    let model = req.model.unwrap_or_else(|| st.opts.model_name.clone());
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let r = Json(OpenAiResponse::new(e.vectors, format, model, e.tokens)).into_response();
    observe_stages(st, [start, read, parsed, e.tokenized], e.engine_done);
    Ok(r)
}

/// `sgpt_request_stage_seconds` of an answered request: `read`, `parse` and `tokenize` from
/// the handler's instants (start, body read, parsed, tokenized), `respond` from the engine's
/// end to now (`queue` and `engine` are the batcher's).
fn observe_stages(st: &AppState, t: [Instant; 4], engine_done: Instant) {
    let s = &st.metrics.stages;
    let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
    s.read.observe(secs(t[0], t[1]));
    s.parse.observe(secs(t[1], t[2]));
    s.tokenize.observe(secs(t[2], t[3]));
    s.respond.observe(secs(engine_done, Instant::now()));
}

async fn tei_embed(State(st): St, req: Request) -> Response {
    match tei_inner(&st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(Style::Tei),
    }
}

async fn tei_inner(st: &Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let (bytes, _held) = read_body(st, &parts.headers, body).await?;
    let _slot = take_slot(st)?;
    let read = Instant::now();
    let req: TeiRequest = api::parse_body(&bytes)?;
    if req.truncation_direction == Some(api::TruncationDirection::Left) {
        return Err(ApiError::new(
            ErrorKind::InvalidValue,
            "`truncation_direction` Left is not supported: SGPT cuts long texts on the right, \
             as the reference does",
        )
        .with_param("truncation_direction"));
    }
    let texts = api::texts(req.inputs, "inputs", st.opts.max_client_batch_size)?;
    let engine = ready(st)?;
    let dims = api::dimensions(req.dimensions, engine.embedder.hidden())?;
    let kind = api::kind(req.input_type, st.opts.default_kind);
    let truncate = req.truncate.unwrap_or(st.opts.auto_truncate);
    let parsed = Instant::now();
    let e = embed(st, &engine, texts, kind, truncate, dims, req.normalize).await?;
    let r = Json(e.vectors).into_response();
    observe_stages(st, [start, read, parsed, e.tokenized], e.engine_done);
    Ok(r)
}

/// What [`embed`] gives back.
struct Embedding {
    vectors: Vec<Vec<f32>>,
    /// Tokens embedded (brackets included, after truncation).
    tokens: usize,
    /// When every text was tokenized and checked, and when the engine finished them.
    tokenized: Instant,
    engine_done: Instant,
}

/// Requests whose texts have at most this many bytes in all are tokenized on the request's own
/// task. About 0.5 µs a byte with BLOOM's tokenizer on this project's 2-core machine, so at
/// most ~0.1 ms on an async worker: a short query or a few.
const INLINE_TOKENIZE_BYTES: usize = 256;

/// Tokenizes (on the request's task if short, else on the blocking pool), checks lengths,
/// queues, and finishes the rows.
async fn embed(
    st: &AppState,
    engine: &Arc<Engine>,
    texts: Vec<String>,
    kind: Kind,
    truncate: bool,
    dims: usize,
    normalize: bool,
) -> Result<Embedding, ApiError> {
    let text_bytes: usize = texts.iter().map(String::len).sum();
    let e = engine.clone();
    let tokenize = move || {
        texts
            .iter()
            .map(|t| e.embedder.model.tokenizer.encode(t, kind))
            .collect::<crate::Result<Vec<_>>>()
    };
    // A short request is tokenized here: that takes tens of microseconds, less than the two
    // thread hand-offs of the blocking pool; a longer one could hold this async worker (and
    // every connection on it) for milliseconds, so it goes to the blocking pool.
    let encoded = if text_bytes <= INLINE_TOKENIZE_BYTES {
        // A panic in the tokenizer is a 500, as it is from the blocking pool.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(tokenize)).map_err(|p| {
            ApiError::new(
                ErrorKind::Backend,
                format!(
                    "tokenization panicked: {}",
                    crate::error::panic_message(&*p)
                ),
            )
        })?
    } else {
        tokio::task::spawn_blocking(tokenize)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Backend, format!("tokenization task: {e}")))?
    }
    .map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("tokenization: {e}")))?;

    let max = engine.embedder.model.tokenizer.max_text_tokens();
    if !truncate {
        if let Some(i) = encoded.iter().position(|e| e.truncated) {
            return Err(ApiError::new(
                ErrorKind::TooLong,
                format!(
                    "text {i} has more than {max} tokens; the model takes at most {max} \
                     (max_seq_length {} minus 3). Shorten it, or let the server cut it \
                     (`truncate: true` on /embed; without --no-auto-truncate everywhere)",
                    max + 3
                ),
            )
            .with_param("input"));
        }
    }
    let cut = encoded.iter().filter(|e| e.truncated).count();
    st.metrics.truncated.inc_by(cut as u64);
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();
    let tokenized = Instant::now();

    let done = engine
        .batcher
        .embed_timed(encoded.into_iter().map(|e| e.ids).collect())
        .await
        .map_err(|e| match e {
            BatchError::QueueFull => ApiError::new(ErrorKind::Overloaded, e.to_string()),
            BatchError::Stopped | BatchError::Broken(_) => {
                ApiError::new(ErrorKind::Unhealthy, e.to_string())
            }
            BatchError::OutOfMemory(_) => ApiError::new(ErrorKind::OutOfMemory, e.to_string()),
            BatchError::Failed(_) => ApiError::new(ErrorKind::Backend, e.to_string()),
        })?;
    let h = engine.embedder.hidden();
    Ok(Embedding {
        vectors: api::finish(&done.rows, h, dims, normalize),
        tokens,
        tokenized,
        engine_done: done.engine_done,
    })
}

/// `GET /info`: what is served and how, computed once at start-up.
pub fn info_json(e: &Embedder, opts: &ServeOptions) -> serde_json::Value {
    let m = &e.model;
    let mut dtypes: Vec<&'static str> = m
        .checkpoint
        .names()
        .iter()
        .filter_map(|n| m.checkpoint.get_any(n).ok().map(|t| t.dtype.name()))
        .collect();
    dtypes.sort_unstable();
    dtypes.dedup();
    json!({
        "model_id": opts.model_name,
        "model_dir": m.dir.display().to_string(),
        "model_type": "embedding",
        "pooling": "weightedmean",
        "dimensions": e.hidden(),
        "layers": m.config.layers,
        "heads": m.config.heads,
        "max_input_length": m.sentence.max_seq_length - 1,
        "max_text_tokens": m.tokenizer.max_text_tokens(),
        "weights_dtype": dtypes.join("+"),
        "backend": e.backend.describe(),
        "engine": e.backend.info(),
        "device": opts.device,
        "max_batch_tokens": e.max_batch_tokens,
        "max_client_batch_size": opts.max_client_batch_size,
        "max_concurrent_requests": opts.max_concurrent_requests,
        "payload_limit": opts.payload_limit,
        "max_body_bytes_in_flight": opts.max_body_bytes_in_flight,
        "max_connections": opts.max_connections,
        "header_timeout_secs": opts.header_timeout.as_secs_f64(),
        "body_timeout_secs": opts.body_timeout.as_secs_f64(),
        "idle_timeout_secs": opts.idle_timeout.as_secs_f64(),
        "shutdown_timeout_secs": opts.shutdown_timeout.as_secs_f64(),
        "auto_truncate": opts.auto_truncate,
        "default_input_type": opts.default_kind,
        "api_key_required": opts.api_key.is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(route_label("/embed"), "/embed");
        assert_eq!(route_label("/embed/x"), "other");
        assert_eq!(route_label("/v1/embeddings"), "/v1/embeddings");
    }
}
