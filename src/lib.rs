//! sgpt: an inference engine for SGPT-BLOOM sentence embeddings.
//!
//! Layers, each depending only on those above it (docs/architecture.md):
//! - [`model`]: a model directory: config, tokenizer with SGPT's brackets, memory-mapped
//!   weights, the BLOOM checkpoint schema.
//! - [`backend`]: the `Backend` seam (trait, typed info, kernel choices, packed batches) and
//!   its two implementations: the CPU forward (readable; the oracle) and the CUDA forward.
//! - [`engine`]: engine options and `build_backend`, the embedding pipeline (`Embedder`).
//! - [`io`]: texts in (lines, JSONL), embeddings out (JSONL, .npy), output files that are
//!   complete or absent.
//! - [`eval`]: retrieval quality on BEIR-format data (`sgpt eval`).
//! - [`server`]: `sgpt serve`, the HTTP server with dynamic batching.
//! - [`hash`]: the one hash (FNV-1a) for cache keys and checksums.
//! - [`seeded`]: deterministic inputs for tests and benches.
//! - [`bench`]: random checkpoints at named shapes, synthetic corpora, ceilings (`sgpt bench`).

pub mod backend;
pub mod bench;
pub mod engine;
pub mod error;
pub mod eval;
pub mod hash;
pub mod io;
pub mod model;
pub mod quantize;
pub mod seeded;
pub mod server;

pub use error::{Error, Result};
