//! The CPU twin of every GPU op, written to be read: it is the oracle the CUDA kernels are tested
//! against and the inference path on machines without a GPU. Accumulation is f32 or wider.
//! Dimension letters: T tokens in the packed batch, H hidden, n heads, d head dim, S sequences.

pub mod attention;
pub mod fp8;
pub mod gelu;
pub mod gemm;
pub mod layernorm;
pub mod linear;
pub mod model;
pub mod pooling;
pub mod skinny;
pub mod vmath;

pub use model::CpuModel;
