//! `sgpt._sgpt`: the native half of the `sgpt` Python package (python/sgpt/__init__.py is the
//! public face). One class, `Engine`: a model directory opened with the library's
//! `Embedder::open_with`, texts in, a float32 numpy array out through `Embedder::embed_stream`,
//! the same call `sgpt embed` makes, so the vectors are the CLI's bit for bit on the same device.
//!
//! The GIL is released while a model loads and while texts are embedded. Library errors become
//! Python exceptions carrying the library's message (see `to_py`); a panic is caught before it
//! reaches Python and raised as a RuntimeError; Ctrl-C stops a long `embed` between batches.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::exceptions::{
    PyFileNotFoundError, PyNotADirectoryError, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;

use sgpt::backend::cuda::device::GpuDtype;
use sgpt::backend::KernelChoices;
use sgpt::engine::{Device, Embedder, EngineOptions};
use sgpt::model::tokenize::{py_rstrip, Kind};
use sgpt::Error;

/// A library error as the Python exception a caller would catch for it.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::Io { path, err } => {
            if err.kind() == std::io::ErrorKind::NotFound || !path.exists() {
                PyFileNotFoundError::new_err(msg)
            } else if err.kind() == std::io::ErrorKind::PermissionDenied {
                PyPermissionError::new_err(msg)
            } else if path.is_file() && msg.contains("not a directory") {
                PyNotADirectoryError::new_err(msg)
            } else {
                PyOSError::new_err(msg)
            }
        }
        // Bad input or options, and model files that parse but cannot be used.
        Error::Json { .. }
        | Error::Config { .. }
        | Error::Safetensors { .. }
        | Error::MissingTensor { .. }
        | Error::Shape { .. }
        | Error::Dtype { .. }
        | Error::Tokenizer { .. }
        | Error::Input(_)
        | Error::Unsupported(_) => PyValueError::new_err(msg),
        // The engine failed: no usable GPU, a driver, NVRTC or cuBLASLt failure, device out of
        // memory or unusable, NaN/Inf out of the model; and any variant added later.
        _ => PyRuntimeError::new_err(msg),
    }
}

/// A caught panic as a RuntimeError, instead of the `PanicException` PyO3 would raise (a
/// BaseException that `except Exception` does not catch).
fn panic_err(p: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = match sgpt::error::panic_message(&*p) {
        m if m.is_empty() => "unknown panic".to_string(),
        m => m,
    };
    PyRuntimeError::new_err(format!(
        "sgpt: internal error (a bug, please report it): {what}"
    ))
}

/// Runs `f`, turning a panic into a RuntimeError.
fn no_panic<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_err(p)))
}

/// Runs `work` on a worker thread while this thread (the Python caller, GIL released) checks
/// for signals every 50 ms, so Ctrl-C stops a long call: the signal handler's exception
/// (KeyboardInterrupt) sets the flag `work` polls between batches, and is raised once `work`
/// has stopped. Python runs signal handlers in its main thread only, so a call from another
/// thread is not interrupted (as with any blocking call).
fn interruptible<T: Send>(work: impl FnOnce(&AtomicBool) -> PyResult<T> + Send) -> PyResult<T> {
    let cancel = AtomicBool::new(false);
    let caller = std::thread::current();
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let r = no_panic(|| work(&cancel));
            caller.unpark();
            r
        });
        let mut raised = None;
        while !worker.is_finished() {
            std::thread::park_timeout(Duration::from_millis(50));
            if raised.is_none() && !worker.is_finished() {
                if let Err(e) = Python::attach(|py| py.check_signals()) {
                    cancel.store(true, Ordering::Relaxed);
                    raised = Some(e);
                }
            }
        }
        let r = worker.join().unwrap_or_else(|p| Err(panic_err(p)));
        match raised {
            Some(e) => Err(e),
            None => r,
        }
    })
}

/// The engine options from Python's arguments; the library checks them (the CLI's checks and
/// messages) when the engine is built.
fn engine_options(
    device: &str,
    dtype: Option<&str>,
    max_batch_tokens: Option<usize>,
    (attention, gemm, cuda_graphs, rows, table): (&str, &str, bool, &str, &str),
) -> PyResult<EngineOptions> {
    let device = Device::from_str(device).map_err(PyValueError::new_err)?;
    // The CLI's names and message ("unknown dtype …: expected one of f16, bf16, fp8, …").
    let dtype = dtype
        .map(GpuDtype::from_str)
        .transpose()
        .map_err(PyValueError::new_err)?;
    let kernels = KernelChoices {
        attention: attention.parse().map_err(PyValueError::new_err)?,
        gemm: gemm.parse().map_err(PyValueError::new_err)?,
        cuda_graphs,
        rows: rows.parse().map_err(PyValueError::new_err)?,
        table: table.parse().map_err(PyValueError::new_err)?,
    };
    let opts = EngineOptions {
        device,
        dtype,
        max_batch_tokens,
        kernels,
    };
    opts.check().map_err(to_py)?;
    Ok(opts)
}

/// The 0-based indices of empty or whitespace-only texts (after Python's `str.rstrip()`, as the
/// tokenizer sees them), as a ValueError; Ok when there are none.
fn check_empty(texts: &[String]) -> PyResult<()> {
    let empty: Vec<usize> = texts
        .iter()
        .enumerate()
        .filter(|(_, t)| py_rstrip(t).is_empty())
        .map(|(i, _)| i)
        .collect();
    if empty.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = empty.iter().take(10).map(usize::to_string).collect();
    let more = match empty.len() - shown.len() {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Err(PyValueError::new_err(format!(
        "{} empty or whitespace-only text(s) at index {}{more} (0-based); pass allow_empty=True \
         to embed them as the reference does (brackets only)",
        empty.len(),
        shown.join(", ")
    )))
}

fn progress_bar(n: usize, show: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} texts  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// A model directory opened for embedding. Use `sgpt.Model`, which wraps this.
#[pyclass(frozen, module = "sgpt._sgpt")]
struct Engine {
    embedder: Embedder,
    /// Set when `threads` was given: every embedding of this model runs in it.
    pool: Option<rayon::ThreadPool>,
    /// The backend's description as JSON, taken inside the model's pool (so `threads` is its).
    info: String,
}

impl Engine {
    /// Runs `f` in the model's thread pool, or the global one.
    fn in_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (path, device="auto", dtype=None, max_batch_tokens=None, threads=None, attention="auto", gemm="cublaslt", cuda_graphs=false, row_kernels="v1", embedding_table="device"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        dtype: Option<&str>,
        max_batch_tokens: Option<usize>,
        threads: Option<usize>,
        attention: &str,
        gemm: &str,
        cuda_graphs: bool,
        row_kernels: &str,
        embedding_table: &str,
    ) -> PyResult<Self> {
        let opts = engine_options(
            device,
            dtype,
            max_batch_tokens,
            (attention, gemm, cuda_graphs, row_kernels, embedding_table),
        )?;
        if let Some(n) = threads {
            sgpt::engine::options::check_threads(n).map_err(to_py)?;
        }
        py.detach(move || {
            no_panic(|| {
                let pool = threads
                    .map(|n| {
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(n)
                            .thread_name(|i| format!("sgpt-{i}"))
                            .build()
                            .map_err(|e| {
                                PyRuntimeError::new_err(format!(
                                    "setting up a pool of {n} threads: {e}"
                                ))
                            })
                    })
                    .transpose()?;
                let open = || Embedder::open_with(Path::new(&path), opts);
                let embedder = match &pool {
                    Some(p) => p.install(open),
                    None => open(),
                }
                .map_err(to_py)?;
                let describe = || {
                    let mut info = serde_json::to_value(embedder.backend.info())
                        .unwrap_or_else(|_| serde_json::json!({}));
                    info["max_batch_tokens"] = embedder.max_batch_tokens.into();
                    info["notice"] = embedder.notice.clone().into();
                    info.to_string()
                };
                let info = match &pool {
                    Some(p) => p.install(describe),
                    None => describe(),
                };
                Ok(Engine {
                    embedder,
                    pool,
                    info,
                })
            })
        })
    }

    /// Width of an embedding.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.embedder.hidden()
    }

    /// Longest sequence in tokens, brackets included (texts are cut to 3 fewer text tokens).
    #[getter]
    fn max_seq_length(&self) -> usize {
        self.embedder.model.sentence.max_seq_length
    }

    /// The backend's description (kind, device, dtype, threads, kernels, max_batch_tokens,
    /// notice) as JSON.
    #[getter]
    fn info_json(&self) -> String {
        self.info.clone()
    }

    /// Embeds `texts` (all of one kind) with the library's `embed_stream`, the GIL released:
    /// (float32 array [len(texts), hidden], 0-based indices of the texts cut to the limit).
    #[pyo3(signature = (texts, kind="query", normalize=false, show_progress=false, allow_empty=false))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        kind: &str,
        normalize: bool,
        show_progress: bool,
        allow_empty: bool,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Vec<usize>)> {
        let kind = Kind::from_str(kind).map_err(to_py)?;
        if !allow_empty {
            check_empty(&texts)?;
        }
        let n = texts.len();
        let h = self.embedder.hidden();
        let (out, cut) = py.detach(move || {
            interruptible(|cancel| {
                let mut out = Vec::with_capacity(n * h);
                let mut cut = Vec::new();
                if n > 0 {
                    let bar = progress_bar(n, show_progress);
                    let stream = texts.into_iter().map(|t| Ok((t, kind)));
                    self.in_pool(|| {
                        self.embedder.embed_stream(
                            stream,
                            normalize,
                            &mut |i| cut.push(i),
                            &mut |_, e| {
                                if cancel.load(Ordering::Relaxed) {
                                    // Replaced by the KeyboardInterrupt that set `cancel`.
                                    return Err(Error::Input("interrupted".into()));
                                }
                                out.extend_from_slice(e);
                                bar.inc((e.len() / h.max(1)) as u64);
                                Ok(())
                            },
                        )
                    })
                    .map_err(to_py)?;
                    bar.finish_and_clear();
                }
                if out.len() != n * h {
                    return Err(PyRuntimeError::new_err(format!(
                        "sgpt: internal error: {} values for {n} texts of width {h}",
                        out.len()
                    )));
                }
                Ok((out, cut))
            })
        })?;
        let array = Array2::from_shape_vec((n, h), out)
            .map_err(|e| PyRuntimeError::new_err(format!("sgpt: internal error: {e}")))?;
        Ok((array.into_pyarray(py), cut))
    }
}

#[pymodule]
fn _sgpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
