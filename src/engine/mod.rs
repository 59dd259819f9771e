//! The engine: how a backend is built from options and a checkpoint ([`options`]), and the
//! embedding pipeline over it ([`embedder`]). Depends on `model` and `backend`; nothing in
//! those depends on it.

pub mod embedder;
pub mod options;

pub use embedder::{check_finite, Embedder};
pub use options::{
    build_backend, BuiltBackend, Device, EngineOptions, DEFAULT_GPU_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
};
