//! What a model directory holds: `config.json` and the sentence-transformers files
//! ([`config`]), the tokenizer with SGPT's brackets ([`tokenize`]), memory-mapped weights
//! ([`weights`]), the BLOOM checkpoint schema and its checks ([`schema`]), and the directory
//! opened as a whole ([`dir`]).

pub mod config;
pub mod dir;
pub mod schema;
pub mod tokenize;
pub mod weights;

pub use dir::ModelDir;
