//! The library's one error type. Every variant names the file (and tensor) it is about, so a
//! user can tell which part of a model directory or input is wrong without a debugger.

use std::path::PathBuf;

// The messages already hold their cause, so no variant reports a `source()`: anyhow's `{:#}`
// would print the cause a second time ("x: not found: not found").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {err}")]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    /// A configuration file parses but says something the engine cannot use.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A safetensors file whose header or length is wrong (e.g. truncated).
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {got}, expected {expected}")]
    Dtype {
        path: PathBuf,
        name: String,
        got: String,
        expected: &'static str,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// The CUDA driver, NVRTC or cuBLASLt failed, or no usable GPU is present.
    #[error("cuda: {0}")]
    Cuda(String),
    /// The device asked for cannot be used here (no driver, no such device); the message
    /// names it.
    #[error("{0}")]
    DeviceUnavailable(String),
    /// The device ran out of memory: this call failed, the device is still usable.
    #[error("cuda: out of memory: {0}")]
    DeviceOutOfMemory(String),
    /// A sticky device error (illegal address, launch failure, ...) or a forward that panicked
    /// mid-way: the context is unusable until the process restarts.
    #[error("cuda: fatal error, the device context is unusable until restart: {0}")]
    DeviceFatal(String),
    /// Bad user input (texts, flags, batch contents).
    #[error("{0}")]
    Input(String),
    /// The backend produced NaN or Inf (e.g. a checkpoint with non-finite weights): never
    /// returned as an embedding. `seqs`: the failing texts, 0-based, in the caller's order.
    #[error("the model produced NaN or Inf for {} text(s) (0-based: {}); no embedding is returned for them. Check the weights with `sgpt inspect`", seqs.len(), crate::error::list_some(seqs, seqs.len()))]
    NonFinite { seqs: Vec<usize> },
    /// A request the engine understands but does not (yet) support.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The message of a caught panic (`catch_unwind`'s payload), empty when it is not text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// The first (at most ten) of `total` things, comma-separated, with "and N more" for the rest:
/// how every message names a long list (texts, lines, tensors).
pub fn list_some<T: std::fmt::Display>(first: &[T], total: usize) -> String {
    let shown: Vec<String> = first.iter().take(10).map(T::to_string).collect();
    let more = total.saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
