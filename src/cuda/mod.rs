//! The CUDA backend: hand-written kernels (`kernels/`) compiled by NVRTC at start-up, GEMMs in
//! cuBLASLt, all through cudarc with dynamic loading — the same binary runs where no CUDA is
//! installed, and every entry point checks for the libraries before touching them (cudarc
//! panics when they are missing).

pub mod bench;
pub mod device;
pub mod gemm;
pub mod kernels;
pub mod model;
pub mod nvrtc;
pub mod ops;
