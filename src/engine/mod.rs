//! The engine: the seam every backend implements ([`backend`]), how one is built
//! ([`options`]), packed batches ([`batch`]) and the embedding pipeline ([`embedder`]).
//! Depends on `model` and `backends`; nothing below it depends on it except through the
//! [`Backend`] trait.

pub mod backend;
pub mod batch;
pub mod embedder;
pub mod options;

pub use backend::{AttentionKernel, Backend, BackendInfo, GemmKernel, KernelChoices};
pub use batch::PackedBatch;
pub use embedder::{check_finite, Embedder};
pub use options::{
    build_backend, BuiltBackend, Device, EngineOptions, DEFAULT_GPU_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
};
