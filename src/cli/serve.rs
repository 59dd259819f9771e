//! `sgpt serve`: the flags of the HTTP server and its start (the server is [`sgpt::server`]).

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{file_name, setup, Common, KindArg};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on: an IP address or `localhost`. The default, 127.0.0.1, takes
    /// connections from this machine only; 0.0.0.0 (or ::) exposes the server to the network
    /// (then also set --api-key).
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_host)]
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
    /// Also spelled --kind, as `sgpt embed` spells it.
    #[arg(long, visible_alias = "kind", value_enum, default_value = "query")]
    default_input_type: KindArg,
    /// Model name echoed in OpenAI responses when a request gives none, and shown by /info
    /// (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds a new connection has to send its first request's headers; then it is closed.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_HEADER_TIMEOUT.as_secs())]
    header_timeout_secs: u64,
    /// Seconds a request has to send its whole body once its headers are in (else 408); a
    /// client that reads nothing of its response for as long is disconnected.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_BODY_TIMEOUT.as_secs())]
    body_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request's headers; then it is
    /// closed.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,
    /// Most open connections; one more is closed at once (counted in
    /// sgpt_refused_connections_total). Keep `ulimit -n` above it.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// On SIGTERM/SIGINT, seconds to let the requests in flight finish; then the remaining
    /// connections are closed and the server exits with status 1.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    shutdown_timeout_secs: u64,
    /// Most bytes of request bodies held by all requests together; a body that would go over
    /// is refused with 429. At least --payload-limit.
    #[arg(long, default_value_t = sgpt::server::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)]
    max_body_bytes_in_flight: usize,
    /// No notices or load progress on stderr (the listening address and errors are still
    /// printed).
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    use sgpt::server::{serve, shutdown_signal, ServeOptions};
    use std::time::Duration;

    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| file_name(&a.common.model));
    let mut opts = ServeOptions::new(if name.is_empty() {
        "sgpt".to_string()
    } else {
        name
    });
    opts.device = a.common.engine.device.to_string();
    opts.max_client_batch_size = a.max_client_batch_size;
    opts.max_concurrent_requests = a.max_concurrent_requests;
    opts.payload_limit = a.payload_limit;
    opts.auto_truncate = !a.no_auto_truncate;
    opts.api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("SGPT_API_KEY").ok());
    opts.default_kind = a.default_input_type.into();
    opts.header_timeout = Duration::from_secs(a.header_timeout_secs);
    opts.body_timeout = Duration::from_secs(a.body_timeout_secs);
    opts.idle_timeout = Duration::from_secs(a.idle_timeout_secs);
    opts.max_connections = a.max_connections;
    opts.shutdown_timeout = Duration::from_secs(a.shutdown_timeout_secs);
    opts.max_body_bytes_in_flight = a.max_body_bytes_in_flight;
    if let Err(msg) = opts.validate() {
        bail!("{msg}");
    }
    // Checked before binding, so a bad model directory or device fails at once (loading
    // comes later).
    if !a.common.model.is_dir() {
        bail!("{}: model directory not found", a.common.model.display());
    }
    a.common.engine.device.check_available()?;

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
    let (common, quiet) = (a.common, a.quiet);
    let result = rt.block_on(serve(
        listener,
        opts,
        move || setup(&common, quiet).map_err(|e| sgpt::Error::Input(format!("{e:#}"))),
        shutdown_signal(),
    ));
    // A model load still running after a shutdown signal is not waited for.
    rt.shutdown_background();
    result.map_err(anyhow::Error::from)
}

/// An IP address, or `localhost` as 127.0.0.1 (not resolved: /etc/hosts may map it elsewhere).
fn parse_host(s: &str) -> Result<std::net::IpAddr, String> {
    if s.eq_ignore_ascii_case("localhost") {
        return Ok(std::net::Ipv4Addr::LOCALHOST.into());
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not an IP address or localhost (e.g. 127.0.0.1, 0.0.0.0, ::)")
    })
}
