//! `sgpt serve`: an HTTP embedding server (axum routes on hyper's HTTP/1, tokio) with dynamic
//! batching.
//!
//! - [`routes`]: the HTTP surface: `POST /v1/embeddings` (OpenAI), `POST /embed`
//!   (text-embeddings-inference), `GET /health`, `/info`, `/metrics`; the API key as
//!   middleware, the body limits and the concurrency permit in the handlers.
//! - this module: the accept loop (connection bound, timeouts, shutdown deadline).
//! - [`api`]: both request/response dialects and the input checks.
//! - [`batcher`]: the bounded queue and the packer thread that packs batches (and runs them,
//!   with one replica).
//! - [`metrics`]: Prometheus counters and histograms.
//! - [`errors`]: every refusal as JSON, in TEI's or OpenAI's shape.
//!
//! Life of a connection: accepted while fewer than `--max-connections` are open (else closed
//! at once and counted); its first request's headers must be in within `--header-timeout-secs`,
//! each later one's within `--idle-timeout-secs` of the previous response (hyper's header
//! timer, which starts when it begins waiting for a request); a response the client reads
//! nothing of for `--body-timeout-secs` closes it; on shutdown it is closed once its request
//! in flight is answered, or at the `--shutdown-timeout-secs` deadline.
//!
//! Life of a request: middleware (metrics, API key) → `Content-Type` checked → a declared
//! `Content-Length` over the payload limit is 413 at once → body read within
//! `--body-timeout-secs` (408), the payload limit (413) and the global budget of body bytes
//! held in flight (429) → only then a concurrency permit (or 429), so stalled uploads cannot
//! starve real requests → parsed → texts checked → tokenized (on the request's task when the
//! texts are short, else on tokio's blocking pool) → queued → packed with other requests'
//! texts by the worker → `Backend::embed` → rows back to the request → cut to `dimensions`,
//! normalized, encoded. Each stage's time is in `sgpt_request_stage_seconds` ([`metrics`]). A client that closes mid-body is
//! counted in `sgpt_aborted_requests_total`, not as an answered request.
//!
//! A panic or fatal device error in a forward marks the engine broken ([`batcher`]): `/health`
//! and the embedding routes answer 503 with the reason until the process is restarted (by the
//! operator or orchestrator); a device out of memory fails its batch with 503 and the server
//! goes on.
//!
//! The server only sees the engine through [`crate::backend::Backend`], so it serves whichever
//! backend `Embedder::open` built.

pub mod api;
pub mod batcher;
pub mod errors;
pub mod metrics;
pub mod routes;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::backend::batch::PackedBatch;
use crate::engine::Embedder;
use crate::model::tokenize::Kind;
use batcher::Batcher;
use metrics::Metrics;

/// TEI's defaults, so a client tuned for TEI behaves the same here.
pub const DEFAULT_MAX_CLIENT_BATCH_SIZE: usize = 32;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
pub const DEFAULT_PAYLOAD_LIMIT: usize = 2_000_000;
/// Slow clients and idle sockets (README, "Limits and timeouts"): long enough for any real
/// client on a slow link, short enough that a few hundred stalled sockets free themselves.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A full 2 MB body at 70 kB/s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Above common client pools' idle times (e.g. 15-30 s), below typical load balancers' 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Twice the default concurrent requests, leaving room for idle kept-alive clients; each
/// costs a task and at most a 64 KiB read buffer (`ulimit -n` must be above it).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Under Kubernetes' default 30 s grace period, so the server ends on its own terms first.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);
/// 32 bodies at the default payload limit; many thousands of ordinary queries.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 64 << 20;
/// hyper's per-connection read buffer cap (its default is ~400 KiB): bounds what each open
/// connection can hold, and the size of a request's headers.
const MAX_CONNECTION_BUFFER: usize = 64 << 10;

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
    /// A new connection's first request headers must arrive within this.
    pub header_timeout: Duration,
    /// A request body must arrive within this of the handler starting to read it (else 408);
    /// a response write that makes no progress for this long closes the connection.
    pub body_timeout: Duration,
    /// A kept-alive connection's next request headers must arrive within this.
    pub idle_timeout: Duration,
    /// Most open connections; one more is closed at once.
    pub max_connections: usize,
    /// After a shutdown signal, requests in flight get this long before their connections are
    /// closed.
    pub shutdown_timeout: Duration,
    /// Most request-body bytes held by all requests together; a body that would go over gets
    /// 429.
    pub max_body_bytes_in_flight: usize,
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
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
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
        for (t, flag) in [
            (self.header_timeout, "--header-timeout-secs"),
            (self.body_timeout, "--body-timeout-secs"),
            (self.idle_timeout, "--idle-timeout-secs"),
            (self.shutdown_timeout, "--shutdown-timeout-secs"),
        ] {
            if t.is_zero() {
                return Err(format!("{flag} must be positive"));
            }
        }
        if self.max_connections == 0 || self.max_connections > Semaphore::MAX_PERMITS {
            return Err(format!(
                "--max-connections must be between 1 and {}",
                Semaphore::MAX_PERMITS
            ));
        }
        if self.max_body_bytes_in_flight < self.payload_limit
            || self.max_body_bytes_in_flight > Semaphore::MAX_PERMITS
        {
            return Err(format!(
                "--max-body-bytes-in-flight must be between --payload-limit ({}) and {}",
                self.payload_limit,
                Semaphore::MAX_PERMITS
            ));
        }
        Ok(())
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // The cause is the error's source, so a chain printer (anyhow's `{:#}`) says it once.
    #[error("loading the model")]
    Load(#[from] crate::Error),
    #[error("warm-up: {0}")]
    Warmup(String),
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The shutdown deadline passed with connections still open; they were closed.
    #[error(
        "shutdown deadline ({secs} s, --shutdown-timeout-secs) passed with {open} connection(s) \
         still open; closed them, their requests unanswered"
    )]
    ShutdownDeadline { secs: u64, open: usize },
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
    /// Concurrency permits: taken once a request's body is read.
    pub permits: Arc<Semaphore>,
    /// One permit per request-body byte held (`max_body_bytes_in_flight`).
    pub body_bytes: Arc<Semaphore>,
}

/// Serves on `listener` until `shutdown` resolves, then stops taking connections, lets the
/// requests in flight finish (closing what is still open after `shutdown_timeout`, then
/// returning [`ServeError::ShutdownDeadline`]), drains the engine queue and returns. `load`
/// runs on a blocking thread while the server already answers (`/health` says 503 until it
/// and a warm-up batch are done); if it fails, the server stops and returns its error.
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
        body_bytes: Arc::new(Semaphore::new(opts.max_body_bytes_in_flight)),
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
    let unfinished = accept_loop(listener, &state, stop).await;

    if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    if let Some(engine) = state.engine.get().cloned() {
        // Every request has been answered (or its connection closed at the deadline); close
        // the queue and join the worker.
        tokio::task::spawn_blocking(move || engine.batcher.close())
            .await
            .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
    }
    if unfinished > 0 {
        return Err(ServeError::ShutdownDeadline {
            secs: state.opts.shutdown_timeout.as_secs(),
            open: unfinished,
        });
    }
    eprintln!("sgpt: stopped");
    Ok(())
}

/// Accepts connections until `stop` resolves, each served by hyper on a task of its own; then
/// closes the listener and shuts the connections down gracefully, for at most
/// `shutdown_timeout`. Returns how many connections had to be closed at the deadline.
async fn accept_loop(
    listener: TcpListener,
    st: &Arc<AppState>,
    stop: impl Future<Output = ()>,
) -> usize {
    let app = routes::router(st.clone());
    let open = Arc::new(Semaphore::new(st.opts.max_connections));
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // hyper starts this clock whenever it waits for a request head: on a kept-alive
        // connection that is the idle time plus the head; the first head is bounded below.
        .header_read_timeout(st.opts.idle_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER);
    tokio::pin!(stop);
    let mut last_warning = None;
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            // Reap finished connections so the set holds only open ones.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: wait for some to be freed, don't spin,
                    // and say so once in a while, not 20 times a second.
                    if last_warning.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
                        eprintln!(
                            "sgpt: warning: accepting a connection: {e} (is `ulimit -n` above \
                             --max-connections?)"
                        );
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            // Closed at once rather than left in the backlog: the client learns now and can
            // go to another replica; the count shows the bound was hit.
            st.metrics.refused_connections.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let seen = Arc::new(Notify::new());
        let app = app.clone();
        let s = seen.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            s.notify_one();
            app.clone().oneshot(req)
        });
        let stream = WriteStall::new(stream, st.opts.body_timeout);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let first_head = st.opts.header_timeout;
        let metrics = st.metrics.clone();
        metrics.open_connections.inc();
        tasks.spawn(async move {
            let slowloris = async {
                if tokio::time::timeout(first_head, seen.notified())
                    .await
                    .is_ok()
                {
                    std::future::pending::<()>().await;
                }
            };
            // Dropping the connection closes the socket.
            tokio::select! {
                _ = conn => {}
                _ = slowloris => {}
            }
            metrics.open_connections.dec();
            drop(slot);
        });
    }
    drop(listener);
    let deadline = st.opts.shutdown_timeout;
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_ok()
    {
        return 0;
    }
    let unfinished = st.opts.max_connections - open.available_permits();
    tasks.shutdown().await;
    unfinished
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
        // Once per replica: a replica set deals consecutive batches to each in turn.
        for _ in 0..e.backend.concurrency() {
            let out = e.backend.embed(&PackedBatch::from_seqs(&[&warm.ids[..]]))?;
            if out.len() != e.hidden() || out.iter().any(|v| !v.is_finite()) {
                return Err(ServeError::Warmup(format!(
                    "the warm-up query gave {} values ({} not finite) instead of {} finite ones",
                    out.len(),
                    out.iter().filter(|v| !v.is_finite()).count(),
                    e.hidden()
                )));
            }
        }
        Ok(e)
    })
    .await
    .map_err(|e| ServeError::Warmup(e.to_string()))??;
    let embedder = Arc::new(embedder);
    let info = routes::info_json(&embedder, &st.opts);
    // One runner per replica, all embedding through the one engine (which deals the batches).
    let runners = (0..embedder.backend.concurrency())
        .map(|_| {
            let e = embedder.clone();
            Box::new(move |b: &PackedBatch| e.embed_batch(b)) as batcher::EmbedFn
        })
        .collect();
    let batcher = Batcher::start_many(
        runners,
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

/// A socket whose writes fail once they have made no progress for `limit`: a client that stops
/// reading its response cannot hold its connection (and a `--max-connections` slot) forever.
struct WriteStall<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write first finds the socket full; cleared by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            stalled: None,
        }
    }

    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?} (--body-timeout-secs)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, r)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that reads nothing fails the write after the limit; one that reads slowly,
    /// but within the limit each time, gets everything.
    #[tokio::test]
    async fn writes_fail_only_after_a_stall_of_the_limit() {
        let limit = Duration::from_millis(300);
        let (server, _client) = tokio::io::duplex(64);
        let mut w = WriteStall::new(server, limit);
        w.write_all(&[1; 64]).await.unwrap();
        let t0 = Instant::now();
        let e = w.write_all(&[1; 8]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= limit, "{:?}", t0.elapsed());

        let (server, mut client) = tokio::io::duplex(64);
        let mut w = WriteStall::new(server, limit);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 32];
            while got.len() < 512 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = client.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got.len()
        });
        w.write_all(&[2; 512])
            .await
            .expect("a slow reader is not cut off");
        assert_eq!(reader.await.unwrap(), 512);
    }
}
