//! Finding a usable GPU without panicking: cudarc panics when libcuda, libnvrtc or libcublasLt
//! cannot be loaded, so each is checked before first use.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// Element type of activations and weights on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuDtype {
    /// IEEE half precision (the default; what BLOOM checkpoints ship as).
    F16,
    /// bfloat16: f32's range with fewer mantissa bits.
    Bf16,
    /// The four GEMMs of each block in E4M3 with per-channel weight and per-token activation
    /// scales (docs/fp8.md): on a GPU (compute capability ≥ 8.9) with f16 activations, or as
    /// the CPU emulation with `--device cpu`.
    Fp8,
}

impl GpuDtype {
    pub fn name(self) -> &'static str {
        match self {
            GpuDtype::F16 => "f16",
            GpuDtype::Bf16 => "bf16",
            GpuDtype::Fp8 => "fp8",
        }
    }
}

impl std::str::FromStr for GpuDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::backend::parse_choice(s, "dtype")
    }
}

/// Why there is no GPU, in one line, or None when one is usable.
pub fn unavailable_reason(ordinal: usize) -> Option<String> {
    // SAFETY: these only try to dlopen the libraries by name.
    let (driver, nvrtc, blaslt) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
        )
    };
    if !driver {
        return Some("no NVIDIA driver (libcuda.so not found)".into());
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => return Some(format!("the CUDA driver failed to count devices: {e:?}")),
    };
    if count <= ordinal {
        return Some(format!(
            "no CUDA device {ordinal} ({count} device(s) present)"
        ));
    }
    if !nvrtc {
        return Some("libnvrtc.so not found (needed to compile the kernels; add CUDA's lib64 to LD_LIBRARY_PATH)".into());
    }
    if !blaslt {
        return Some("libcublasLt.so not found (add CUDA's lib64 to LD_LIBRARY_PATH)".into());
    }
    None
}

/// Opens device `ordinal`, or says why it cannot.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    if let Some(why) = unavailable_reason(ordinal) {
        return Err(Error::DeviceUnavailable(format!(
            "--device cuda:{ordinal}: {why}"
        )));
    }
    CudaContext::new(ordinal).map_err(|e| Error::Cuda(format!("opening device {ordinal}: {e:?}")))
}
