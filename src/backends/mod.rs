//! The two implementations of [`crate::engine::Backend`]: the readable CPU forward, which is
//! also the oracle of every GPU test ([`cpu`]), and the CUDA forward with hand-written kernels
//! ([`cuda`]). Each depends on `model` (weights, config, schema) and on the engine's seam only.

pub mod cpu;
pub mod cuda;
