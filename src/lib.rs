//! sgpt: an inference engine for SGPT-BLOOM sentence embeddings.
//!
//! - [`backend`]: the engine seam (`Backend`, its typed info, the GPU kernel choices).
//! - [`weights`]: memory-mapped safetensors checkpoints (sharded or not, f32/f16/bf16).
//! - [`schema`]: every tensor of a BLOOM checkpoint and the checks it must pass.
//! - [`tokenize`]: BLOOM's tokenizer with SGPT's special brackets.
//! - [`batch`]: packed batches (`cu_seqlens`, no padding).
//! - [`cpu`]: the readable CPU forward, oracle for the GPU kernels.
//! - [`model`]: a model directory + backend → embeddings.
//! - [`output`]: output files that are complete or absent, never a replaced device or link.
//! - [`eval`]: retrieval quality on BEIR-format data (`sgpt eval`).
//! - [`server`]: `sgpt serve`, the HTTP server with dynamic batching.

pub mod backend;
pub mod batch;
pub mod bench;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod output;
pub mod schema;
pub mod server;
pub mod tokenize;
pub mod weights;

pub use error::{Error, Result};
