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

use crate::error::Error;

/// CUDA driver errors after which the context is unusable: every later call fails the same way
/// (CUDA's "sticky" errors), or the memory can no longer be trusted.
const FATAL: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ASSERT",
];

/// A failed CUDA call as an [`Error`] that keeps its kind, so the server can tell an out of
/// memory (fail the batch, go on) from a fatal error (take the replica out). `e` is cudarc's
/// error (`DriverError(CUDA_ERROR_..., "...")`, `CublasError(CUBLAS_STATUS_...)`), whose Debug
/// form names the status.
pub(crate) fn error(what: &str, e: impl std::fmt::Debug) -> Error {
    let msg = format!("{what}: {e:?}");
    if msg.contains("CUDA_ERROR_OUT_OF_MEMORY") || msg.contains("CUBLAS_STATUS_ALLOC_FAILED") {
        Error::DeviceOutOfMemory(msg)
    } else if FATAL.iter().any(|f| msg.contains(f)) {
        Error::DeviceFatal(msg)
    } else {
        Error::Cuda(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    /// On the status itself: `DriverError`'s Debug asks the driver for a description, which
    /// needs a CUDA library (absent on CI's machines); the status's name is the part matched.
    #[test]
    fn device_errors_keep_their_kind() {
        let kind = |r: CUresult| match error("x", r) {
            Error::DeviceOutOfMemory(_) => "oom",
            Error::DeviceFatal(_) => "fatal",
            Error::Cuda(_) => "other",
            e => panic!("{e}"),
        };
        assert_eq!(kind(CUresult::CUDA_ERROR_OUT_OF_MEMORY), "oom");
        assert_eq!(kind(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS), "fatal");
        assert_eq!(kind(CUresult::CUDA_ERROR_LAUNCH_FAILED), "fatal");
        assert_eq!(kind(CUresult::CUDA_ERROR_INVALID_VALUE), "other");
    }
}
