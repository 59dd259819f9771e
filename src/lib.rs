//! sgpt: an inference engine for SGPT-BLOOM sentence embeddings.
//!
//! Layers, each depending only on those above it (docs/architecture.md):
//! - [`model`]: a model directory: config, tokenizer with SGPT's brackets, memory-mapped
//!   weights, the BLOOM checkpoint schema.
//! - [`backends`]: the CPU forward (readable; the oracle) and the CUDA forward (kernels/).
//! - [`engine`]: the `Backend` seam, engine options, packed batches, the embedding pipeline.
//! - [`io`]: texts in (lines, JSONL), embeddings out (JSONL, .npy), output files that are
//!   complete or absent.
//! - [`eval`]: retrieval quality on BEIR-format data (`sgpt eval`).
//! - [`server`]: `sgpt serve`, the HTTP server with dynamic batching.
//! - [`bench`]: random checkpoints at named shapes, synthetic corpora, ceilings (`sgpt bench`).

pub mod backends;
pub mod bench;
pub mod engine;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod server;

pub use error::{Error, Result};

// The paths of the layout before `model/`, `engine/` and `backends/`, kept while the Python
// binding moves over; not used inside the crate.
#[doc(hidden)]
pub use backends::{cpu, cuda};
#[doc(hidden)]
pub use engine::{backend, batch};
#[doc(hidden)]
pub use io::output;
#[doc(hidden)]
pub use model::{config, schema, tokenize, weights};
