//! Finding a usable GPU without panicking: cudarc panics when libcuda, libnvrtc or libcublasLt
//! cannot be loaded, so each is checked before first use.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::backend::cpu::fp8::Fp8Blocks;
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
    /// fp8 in every other block (1, 3, 5, …), the other blocks' linear layers as without fp8
    /// (f16 on a GPU, f32 on the CPU): the variant that reached cosine 0.999 to f32 on the
    /// bloom-560m stand-in (docs/fp8.md).
    // The blocks: `Fp8Blocks::Alternate`.
    Fp8Alternate,
}

impl GpuDtype {
    pub fn name(self) -> &'static str {
        match self {
            GpuDtype::F16 => "f16",
            GpuDtype::Bf16 => "bf16",
            GpuDtype::Fp8 => "fp8",
            GpuDtype::Fp8Alternate => "fp8-alternate",
        }
    }

    /// The blocks in FP8, or None for a 16-bit dtype. The FP8 dtypes are the ones the CPU
    /// emulates and a GPU needs compute capability ≥ 8.9 for.
    pub fn fp8_blocks(self) -> Option<Fp8Blocks> {
        match self {
            GpuDtype::F16 | GpuDtype::Bf16 => None,
            GpuDtype::Fp8 => Some(Fp8Blocks::All),
            GpuDtype::Fp8Alternate => Some(Fp8Blocks::Alternate),
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
