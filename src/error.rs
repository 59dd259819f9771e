//! The library's one error type. Every variant names the file (and tensor) it is about, so a
//! user can tell which part of a model directory or input is wrong without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
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
    #[error("{path}: tensor `{name}` has dtype {got}, expected F32, F16 or BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        got: String,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// The CUDA driver, NVRTC or cuBLASLt failed, or no usable GPU is present.
    #[error("cuda: {0}")]
    Cuda(String),
    /// Bad user input (texts, flags, batch contents).
    #[error("{0}")]
    Input(String),
    /// A request the engine understands but does not (yet) support.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
