//! `sgpt serve`: an HTTP embedding server (axum/tokio) with dynamic batching.
//!
//! - [`routes`]: the HTTP surface: `POST /v1/embeddings` (OpenAI), `POST /embed`
//!   (text-embeddings-inference), `GET /health`, `/info`, `/metrics`; API key and concurrency
//!   limit as middleware.
//! - [`api`]: both request/response dialects and the input checks.
//! - [`batcher`]: the bounded queue and the one engine worker thread that packs batches.
//! - [`metrics`]: Prometheus counters and histograms.
//! - [`errors`]: every refusal as JSON, in TEI's or OpenAI's shape.
//!
//! Life of a request: middleware (metrics, API key, concurrency permit or 429) → body read
//! (payload limit) and parsed → texts checked → tokenized on tokio's blocking pool → queued →
//! packed with other requests' texts by the worker → `Backend::embed` → rows back to the
//! request → cut to `dimensions`, normalized, encoded.
//!
//! The server only sees the engine through [`crate::model::Backend`], so it serves whichever
//! backend `Embedder::open` built.

pub mod api;
pub mod batcher;
pub mod errors;
pub mod metrics;
pub mod routes;

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use crate::batch::PackedBatch;
use crate::model::Embedder;
use crate::tokenize::Kind;
use batcher::Batcher;
use metrics::Metrics;

/// TEI's defaults, so a client tuned for TEI behaves the same here.
pub const DEFAULT_MAX_CLIENT_BATCH_SIZE: usize = 32;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
pub const DEFAULT_PAYLOAD_LIMIT: usize = 2_000_000;

/// The operator's settings (the `sgpt serve` flags; README "`sgpt serve`").
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Echoed as `model` when a request names none; shown by `/info`.
    pub model_name: String,
    /// The `--device` asked for (shown by `/info` beside the backend's own description).
    pub device: String,
    /// Most texts in one request.
    pub max_client_batch_size: usize,
    /// Most embedding requests served at once; one more gets 429 at once.
    pub max_concurrent_requests: usize,
    /// Most bytes in one request body.
    pub payload_limit: usize,
    /// Cut texts over the model's limit (the reference's behaviour) instead of refusing them.
    pub auto_truncate: bool,
    /// Required as `Authorization: Bearer <key>` on the embedding routes.
    pub api_key: Option<String>,
    /// Kind of the texts of a request without `input_type`.
    pub default_kind: Kind,
}

impl ServeOptions {
    pub fn new(model_name: impl Into<String>) -> Self {
        ServeOptions {
            model_name: model_name.into(),
            device: "auto".into(),
            max_client_batch_size: DEFAULT_MAX_CLIENT_BATCH_SIZE,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            payload_limit: DEFAULT_PAYLOAD_LIMIT,
            auto_truncate: true,
            api_key: None,
            default_kind: Kind::Query,
        }
    }

    /// Refuses settings that would make the server useless or unsafe.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_client_batch_size == 0 {
            return Err("--max-client-batch-size must be positive".into());
        }
        if self.max_concurrent_requests == 0
            || self.max_concurrent_requests > Semaphore::MAX_PERMITS
        {
            return Err(format!(
                "--max-concurrent-requests must be between 1 and {}",
                Semaphore::MAX_PERMITS
            ));
        }
        if self.payload_limit == 0 {
            return Err("--payload-limit must be positive".into());
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err("the API key must not be empty".into());
        }
        Ok(())
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the model: {0}")]
    Load(#[from] crate::Error),
    #[error("warm-up: {0}")]
    Warmup(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The loaded model and its worker.
pub struct Engine {
    pub embedder: Arc<Embedder>,
    pub batcher: Batcher,
    /// The body of `GET /info`.
    pub info: serde_json::Value,
}

/// Shared by every handler.
pub struct AppState {
    pub opts: ServeOptions,
    /// Set once the model is loaded and warmed up.
    pub engine: OnceLock<Arc<Engine>>,
    pub metrics: Arc<Metrics>,
    pub permits: Arc<Semaphore>,
}

/// Serves on `listener` until `shutdown` resolves, then stops taking connections, lets the
/// requests in flight finish, drains the engine queue and returns. `load` runs on a blocking
/// thread while the server already answers (`/health` says 503 until it and a warm-up batch
/// are done); if it fails, the server stops and returns its error.
pub async fn serve<L, S>(
    listener: TcpListener,
    opts: ServeOptions,
    load: L,
    shutdown: S,
) -> Result<(), ServeError>
where
    L: FnOnce() -> crate::Result<Embedder> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let metrics = Arc::new(Metrics::new()?);
    let state = Arc::new(AppState {
        permits: Arc::new(Semaphore::new(opts.max_concurrent_requests)),
        opts,
        engine: OnceLock::new(),
        metrics,
    });

    let (fail_tx, fail_rx) = oneshot::channel::<ServeError>();
    let st = state.clone();
    tokio::spawn(async move {
        match start_engine(load, &st).await {
            Ok(engine) => {
                let _ = st.engine.set(engine);
                st.metrics.ready.set(1);
            }
            Err(e) => {
                let _ = fail_tx.send(e);
            }
        }
    });

    let failure: Arc<Mutex<Option<ServeError>>> = Arc::new(Mutex::new(None));
    let f = failure.clone();
    let stop = async move {
        let failed = async move {
            match fail_rx.await {
                Ok(e) => {
                    if let Ok(mut slot) = f.lock() {
                        *slot = Some(e);
                    }
                }
                // The engine started: only `shutdown` ends the server.
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = shutdown => {
                eprintln!("sgpt: shutting down: no new connections; finishing the requests in flight");
            }
            _ = failed => {}
        }
    };
    axum::serve(listener, routes::router(state.clone()))
        .with_graceful_shutdown(stop)
        .await?;

    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    if let Some(engine) = state.engine.get().cloned() {
        // Every request has been answered; close the queue and join the worker.
        tokio::task::spawn_blocking(move || engine.batcher.close())
            .await
            .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
    }
    eprintln!("sgpt: stopped");
    Ok(())
}

/// SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Loads the model, runs one short query through the backend (touching every weight page, or
/// whatever a GPU backend does on its first call), starts the worker.
async fn start_engine<L>(load: L, st: &AppState) -> Result<Arc<Engine>, ServeError>
where
    L: FnOnce() -> crate::Result<Embedder> + Send + 'static,
{
    let t0 = Instant::now();
    let embedder = tokio::task::spawn_blocking(move || -> Result<Embedder, ServeError> {
        let e = load()?;
        let warm = e
            .model
            .tokenizer
            .encode("What is the capital of France?", Kind::Query)?;
        let out = e.backend.embed(&PackedBatch::from_seqs(&[&warm.ids[..]]))?;
        if out.len() != e.hidden() || out.iter().any(|v| !v.is_finite()) {
            return Err(ServeError::Warmup(format!(
                "the warm-up query gave {} values ({} not finite) instead of {} finite ones",
                out.len(),
                out.iter().filter(|v| !v.is_finite()).count(),
                e.hidden()
            )));
        }
        Ok(e)
    })
    .await
    .map_err(|e| ServeError::Warmup(e.to_string()))??;
    let embedder = Arc::new(embedder);
    let info = routes::info_json(&embedder, &st.opts);
    let e = embedder.clone();
    let batcher = Batcher::start(
        Box::new(move |b: &PackedBatch| e.embed_batch(b)),
        embedder.hidden(),
        embedder.max_batch_tokens,
        st.opts.max_concurrent_requests,
        st.metrics.clone(),
    )?;
    eprintln!(
        "sgpt: ready: {} ({}, H={}) loaded and warmed up in {:.2} s",
        embedder.model.dir.display(),
        embedder.backend.describe(),
        embedder.hidden(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Arc::new(Engine {
        embedder,
        batcher,
        info,
    }))
}
