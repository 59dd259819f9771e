//! The HTTP surface: routes, middleware (metrics, API key, concurrency limit) and handlers.
//! Each handler sequences the checks of `api.rs`, tokenizes off the async runtime, and waits
//! for its rows from the batcher.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::model::Embedder;
use crate::server::api::{self, EncodingFormat, OpenAiRequest, OpenAiResponse, TeiRequest};
use crate::server::batcher::BatchError;
use crate::server::errors::{check_json_content_type, ApiError, ErrorKind, Style};
use crate::server::{AppState, Engine, ServeOptions};
use crate::tokenize::Kind;

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let embedding = Router::new()
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/embed", post(tei_embed))
        // The last layer added runs first: key, then permit, then the body is read.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .layer(DefaultBodyLimit::max(state.opts.payload_limit));
    Router::new()
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
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
        _ => "other",
    }
}

async fn track(State(st): St, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let t0 = Instant::now();
    let r = next.run(req).await;
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

async fn limit_concurrency(State(st): St, req: Request, next: Next) -> Response {
    let Ok(_permit) = st.permits.clone().try_acquire_owned() else {
        return ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "the server is busy: {} requests are being served (--max-concurrent-requests); \
                 retry later",
                st.opts.max_concurrent_requests
            ),
        )
        .into_response(Style::for_path(req.uri().path()));
    };
    st.metrics.in_flight.inc();
    let _guard = InFlight(st.clone());
    next.run(req).await
}

fn ready(st: &AppState) -> Result<Arc<Engine>, ApiError> {
    match st.engine.get() {
        None => Err(ApiError::new(
            ErrorKind::Unhealthy,
            "the model is loading; retry when GET /health answers 200",
        )),
        Some(e) if !e.batcher.is_alive() => Err(ApiError::new(
            ErrorKind::Unhealthy,
            "the engine worker has stopped",
        )),
        Some(e) => Ok(e.clone()),
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
        Ok(e) => Json(e.info.clone()).into_response(),
        Err(e) => e.into_response(Style::Tei),
    }
}

async fn metrics(State(st): St) -> Response {
    match st.metrics.render() {
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

/// The checks every body goes through before its fields are looked at.
fn read_body<T: serde::de::DeserializeOwned>(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    check_json_content_type(headers)?;
    let bytes = body.map_err(|r| ApiError::from_body_rejection(&r, st.opts.payload_limit))?;
    api::parse_body(&bytes)
}

async fn openai_embeddings(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match openai_inner(&st, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(Style::OpenAi),
    }
}

async fn openai_inner(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: OpenAiRequest = read_body(st, headers, body)?;
    let texts = api::texts(req.input, "input", st.opts.max_client_batch_size)?;
    let engine = ready(st)?;
    let dims = api::dimensions(req.dimensions, engine.embedder.hidden())?;
    let kind = api::kind(req.input_type, st.opts.default_kind);
    let (vectors, tokens) =
        embed(st, &engine, texts, kind, st.opts.auto_truncate, dims, true).await?;
    let model = req.model.unwrap_or_else(|| st.opts.model_name.clone());
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    Ok(Json(OpenAiResponse::new(vectors, format, model, tokens)).into_response())
}

async fn tei_embed(
    State(st): St,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match tei_inner(&st, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(Style::Tei),
    }
}

async fn tei_inner(
    st: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: TeiRequest = read_body(st, headers, body)?;
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
    let (vectors, _) = embed(st, &engine, texts, kind, truncate, dims, req.normalize).await?;
    Ok(Json(vectors).into_response())
}

/// Tokenizes (blocking pool), checks lengths, queues, and finishes the rows. Returns the
/// vectors and the number of tokens embedded (brackets included, after truncation).
async fn embed(
    st: &AppState,
    engine: &Arc<Engine>,
    texts: Vec<String>,
    kind: Kind,
    truncate: bool,
    dims: usize,
    normalize: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let e = engine.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| e.embedder.model.tokenizer.encode(t, kind))
            .collect::<crate::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("tokenization task: {e}")))?
    .map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("tokenization: {e}")))?;

    let max = engine.embedder.model.tokenizer.max_text_tokens();
    if !truncate {
        if let Some((i, enc)) = encoded.iter().enumerate().find(|(_, e)| e.truncated) {
            return Err(ApiError::new(
                ErrorKind::TooLong,
                format!(
                    "text {i} has {} tokens; the model takes at most {max} (max_seq_length {} \
                     minus 3). Shorten it, or let the server cut it (`truncate: true` on /embed; \
                     without --no-auto-truncate everywhere)",
                    enc.text_tokens,
                    max + 3
                ),
            )
            .with_param("input"));
        }
    }
    let cut = encoded.iter().filter(|e| e.truncated).count();
    st.metrics.truncated.inc_by(cut as u64);
    let tokens: usize = encoded.iter().map(|e| e.ids.len()).sum();

    let raw = engine
        .batcher
        .embed(encoded.into_iter().map(|e| e.ids).collect())
        .await
        .map_err(|e| match e {
            BatchError::QueueFull => ApiError::new(ErrorKind::Overloaded, e.to_string()),
            BatchError::Stopped => ApiError::new(ErrorKind::Unhealthy, e.to_string()),
            BatchError::Failed(_) => ApiError::new(ErrorKind::Backend, e.to_string()),
        })?;
    let h = engine.embedder.hidden();
    Ok((api::finish(&raw, h, dims, normalize), tokens))
}

/// `GET /info`: what is served and how, computed once at start-up.
pub fn info_json(e: &Embedder, opts: &ServeOptions) -> serde_json::Value {
    let m = &e.model;
    let mut dtypes: Vec<&'static str> = m
        .checkpoint
        .names()
        .iter()
        .filter_map(|n| m.checkpoint.get(n).ok().map(|t| t.dtype.name()))
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
        "device": opts.device,
        "max_batch_tokens": e.max_batch_tokens,
        "max_client_batch_size": opts.max_client_batch_size,
        "max_concurrent_requests": opts.max_concurrent_requests,
        "payload_limit": opts.payload_limit,
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
