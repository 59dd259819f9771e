//! Helpers of tests/server.rs: a blocking HTTP/1.1 client for loopback, the `sgpt serve`
//! binary as a child process, the server in-process, and a backend that can be held shut.
//! Every wait here is bounded (a hung server fails the test, it never hangs CI).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sgpt::backend::batch::PackedBatch;
use sgpt::backend::cpu::CpuModel;
use sgpt::backend::Backend;
use sgpt::engine::{Embedder, DEFAULT_MAX_BATCH_TOKENS};
use sgpt::model::ModelDir;
use sgpt::server::{serve, ServeError, ServeOptions};

pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), response read to EOF.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // A server may answer (413) before reading all of a large body: keep going to the answer.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A raw loopback connection, for clients that misbehave on purpose.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connecting");
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads until the server closes the connection (EOF or reset), for at most `limit`: what it
/// sent and after how long it closed, or None if it was still open at `limit`.
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = limit.checked_sub(t0.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some((got, t0.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some((got, t0.elapsed())),
        }
    }
}

/// Whether the server still holds the connection open (nothing to read, no EOF, right now).
pub fn still_open(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let open = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

/// Sends the head of a `POST path` declaring `content_length` bytes of JSON, and `sent` of them.
pub fn partial_post(addr: SocketAddr, path: &str, content_length: usize, sent: &[u8]) -> TcpStream {
    let mut s = connect(addr);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {content_length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(sent).unwrap();
    s
}

/// Polls a metric until it reaches `want` (bounded); returns its last value.
pub fn wait_metric(addr: SocketAddr, sample: &str, want: f64) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = metric(addr, sample);
        if v == want || t0.elapsed() > Duration::from_secs(20) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// POST with `Content-Type: application/json` (and the key when given).
pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value, key: Option<&str>) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut h = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    request(addr, "POST", path, &h, body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Polls `GET /health` until 200.
pub fn wait_healthy(addr: SocketAddr) {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = request(addr, "GET", "/health", &[], b"") {
            if r.status == 200 {
                return;
            }
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "server at {addr} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a Prometheus sample, e.g. `sgpt_requests_in_flight` or
/// `sgpt_requests_total{route="/embed",status="200"}` (0 when absent).
pub fn metric(addr: SocketAddr, sample: &str) -> f64 {
    sample_of(&get(addr, "/metrics").text(), sample)
}

/// A sample from one scrape's text.
pub fn sample_of(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == sample).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `sgpt serve` as a child process on an ephemeral loopback port.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `sgpt serve --model models/sgpt-tiny --port 0 ARGS` and waits for /health 200.
    pub fn start(args: &[&str]) -> Self {
        let s = Self::spawn(&root().join("models/sgpt-tiny"), args);
        wait_healthy(s.addr);
        s
    }

    /// Starts it and returns once the address is printed (the model may still be loading).
    pub fn spawn(model: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sgpt"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--port", "0", "--threads", "2"])
            .args(args)
            .env_remove("SGPT_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sgpt serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr pipe");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(TIMEOUT) {
            Ok(a) => a.parse().expect("printed address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sgpt serve printed no address; stderr:\n{}",
                    stderr.lock().unwrap()
                )
            }
        };
        ServerProcess {
            child,
            addr,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("running kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                // give the stderr reader a moment to take the last lines
                std::thread::sleep(Duration::from_millis(50));
                return s;
            }
            assert!(
                t0.elapsed() < TIMEOUT,
                "sgpt serve did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The server inside the test process, on its own runtime thread.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl InProcess {
    pub fn start<L>(opts: ServeOptions, load: L) -> Self
    where
        L: FnOnce() -> sgpt::Result<Embedder> + Send + 'static,
    {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = addr_tx.send(listener.local_addr()?);
                serve(listener, opts, load, async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx.recv_timeout(TIMEOUT).expect("server address");
        InProcess {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Shuts down and returns what `serve` returned (bounded wait).
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        let t = self.thread.take().expect("running");
        let t0 = Instant::now();
        while !t.is_finished() {
            assert!(t0.elapsed() < TIMEOUT, "serve did not return");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("server thread panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// A CPU backend that can be held shut: while closed, `embed` waits (counting itself in
/// `waiting`) until it is opened again.
#[derive(Clone, Default)]
pub struct Gate {
    closed: Arc<(Mutex<bool>, Condvar)>,
    pub waiting: Arc<AtomicUsize>,
    pub batches: Arc<AtomicUsize>,
}

impl Gate {
    pub fn close(&self) {
        *self.closed.0.lock().unwrap() = true;
    }
    pub fn open(&self) {
        *self.closed.0.lock().unwrap() = false;
        self.closed.1.notify_all();
    }
    /// Waits (bounded) until `n` batches are held at the gate.
    pub fn wait_waiting(&self, n: usize) {
        let t0 = Instant::now();
        while self.waiting.load(Ordering::SeqCst) < n {
            assert!(t0.elapsed() < TIMEOUT, "no batch reached the engine");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub struct GatedBackend {
    pub inner: CpuModel,
    pub gate: Gate,
}

impl Backend for GatedBackend {
    fn embed(&self, batch: &PackedBatch) -> sgpt::Result<Vec<f32>> {
        self.gate.batches.fetch_add(1, Ordering::SeqCst);
        let (lock, cv) = &*self.gate.closed;
        let mut closed = lock.lock().unwrap();
        if *closed {
            self.gate.waiting.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            while *closed && t0.elapsed() < TIMEOUT {
                closed = cv
                    .wait_timeout(closed, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        drop(closed);
        self.inner.embed(batch)
    }
    fn info(&self) -> sgpt::backend::BackendInfo {
        self.inner.info()
    }
}

/// The tiny model with a gated CPU backend.
pub fn gated_embedder(gate: Gate) -> sgpt::Result<Embedder> {
    let model = ModelDir::open(&root().join("models/sgpt-tiny"))?;
    let inner = CpuModel::load(&model.checkpoint, &model.config)?;
    Ok(Embedder {
        model,
        backend: Box::new(GatedBackend { inner, gate }),
        max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
        notice: None,
    })
}

/// What [`FaultyBackend`] does to its next batch (then it behaves again).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Fault {
    None,
    /// NaN in the output.
    Nan,
    /// The device is out of memory.
    OutOfMemory,
    /// A sticky device error.
    Fatal,
    Panic,
}

/// A CPU backend that fails its next batch as told: the engine faults the server must survive.
pub struct FaultyBackend {
    pub inner: CpuModel,
    pub next: Arc<std::sync::atomic::AtomicU8>,
}

impl Backend for FaultyBackend {
    fn embed(&self, batch: &PackedBatch) -> sgpt::Result<Vec<f32>> {
        let fault = self.next.swap(Fault::None as u8, Ordering::SeqCst);
        let mut out = self.inner.embed(batch)?;
        match fault {
            f if f == Fault::Nan as u8 => out[0] = f32::NAN,
            f if f == Fault::OutOfMemory as u8 => {
                return Err(sgpt::Error::DeviceOutOfMemory(
                    "alloc: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
                ))
            }
            f if f == Fault::Fatal as u8 => {
                return Err(sgpt::Error::DeviceFatal(
                    "launch: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")"
                        .into(),
                ))
            }
            f if f == Fault::Panic as u8 => panic!("injected panic in the forward"),
            _ => {}
        }
        Ok(out)
    }
    fn info(&self) -> sgpt::backend::BackendInfo {
        self.inner.info()
    }
}

/// The tiny model with a backend that fails as `next` says.
pub fn faulty_embedder(next: Arc<std::sync::atomic::AtomicU8>) -> sgpt::Result<Embedder> {
    let model = ModelDir::open(&root().join("models/sgpt-tiny"))?;
    let inner = CpuModel::load(&model.checkpoint, &model.config)?;
    Ok(Embedder {
        model,
        backend: Box::new(FaultyBackend { inner, next }),
        max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
        notice: None,
    })
}
