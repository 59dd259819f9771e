//! GEMMs through cuBLASLt: `y[T, out] = x[T, in]·Wᵀ (+ b)` in f16/bf16 with f32 accumulation and
//! the bias fused in the epilogue. Descriptors, layouts and the chosen algorithm are made once
//! per shape and kept (cudarc's safe wrapper rebuilds them and re-runs the heuristic on every
//! call); only the bias pointer is set per call.
//!
//! Row-major to cuBLAS' column-major: row-major y[T, out] is column-major yᵀ [out, T], so we ask
//! for C[out, T] = op(A)·B with A = W stored [out, in] row-major = column-major [in, out], used
//! transposed (transa), and B = x row-major [T, in] = column-major [in, T]. The bias has one
//! entry per row of C, i.e. per output feature.
//!
//! The FP8 product ([`Gemm::fp8_product`], `--dtype fp8`, docs/fp8.md) is the same call with E4M3
//! A and B — the "TN" layout cuBLASLt's FP8 kernels require is exactly this one — f32 C/D,
//! f32 compute with fast accumulation off, and scalar scales of 1: the per-row scales are applied
//! afterwards by `kernels/fp8_epilogue.cu`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{Error, Result};

/// Element types cuBLASLt multiplies here (f32 accumulation in every case).
pub trait GemmElem:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Send + Sync + 'static
{
    const BLAS_TYPE: sys::cudaDataType;
}

impl GemmElem for half::f16 {
    const BLAS_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16F;
}

impl GemmElem for half::bf16 {
    const BLAS_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

/// Full f32 (CUBLAS_COMPUTE_32F, no TF32): the exact similarity search of `sgpt eval`.
impl GemmElem for f32 {
    const BLAS_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// Most shapes kept planned at once.
const MAX_PLANS: usize = 512;

/// cuBLASLt's recommended workspace on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    crate::backend::cuda::error(&format!("cuBLASLt {what}"), e)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    /// Type of A and B; C and D are the same type, except f32 for E4M3 inputs.
    dtype: sys::cudaDataType,
    tokens: usize,
    n_in: usize,
    n_out: usize,
    bias: bool,
}

#[derive(Clone, Copy)]
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    /// A device f32 of 1.0: the A and B scales of the FP8 plans (see `make_plan`).
    one: CudaSlice<f32>,
    plans: HashMap<Shape, Plan>,
}

// SAFETY: the handle and descriptors are plain cuBLASLt objects that may be used from any
// thread, one at a time; `Gemm` is only reached through `&mut` (the model's Mutex).
unsafe impl Send for Gemm {}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = result::create_handle().map_err(|e| err("create", e))?;
        // SAFETY: a plain device allocation; cuBLASLt only uses it as scratch.
        let workspace =
            unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(|e| err("workspace", e))?;
        let one = stream.clone_htod(&[1f32]).map_err(|e| err("scale", e))?;
        Ok(Gemm {
            handle,
            stream,
            workspace,
            one,
            plans: HashMap::new(),
        })
    }

    /// Number of distinct shapes planned so far.
    pub fn plans(&self) -> usize {
        self.plans.len()
    }

    fn plan(&mut self, shape: Shape) -> Result<&Plan> {
        if !self.plans.contains_key(&shape) {
            // Token counts vary batch to batch: keep the cache bounded (re-planning is cheap).
            if self.plans.len() >= MAX_PLANS {
                self.clear();
            }
            let p = self.make_plan(shape)?;
            self.plans.insert(shape, p);
        }
        Ok(&self.plans[&shape])
    }

    fn make_plan(&self, s: Shape) -> Result<Plan> {
        let (m, n, k) = (s.n_out as u64, s.tokens as u64, s.n_in as u64);
        let fp8 = s.dtype == sys::cudaDataType::CUDA_R_8F_E4M3;
        let out_type = if fp8 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            s.dtype
        };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("matmul desc", e))?;
        // Whatever is created from here on is destroyed if a later step fails (a shape with no
        // algorithm is retried by every batch of that shape: nothing may leak per try).
        let mut made = Unfinished {
            desc: Some(desc),
            layouts: Vec::new(),
        };
        let set = |attr, ptr: *const c_void, size| {
            // SAFETY: `ptr` points at a live value of `size` bytes of the attribute's type.
            unsafe { result::set_matmul_desc_attribute(desc, attr, ptr, size) }
                .map_err(|e| err("desc attribute", e))
        };
        // cublasOperation_t as a 32-bit int: 1 = transposed, 0 = not.
        let (trans, no_trans) = (1i32, 0i32);
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans as *const i32).cast(),
            size_of::<i32>(),
        )?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            (&no_trans as *const i32).cast(),
            size_of::<i32>(),
        )?;
        if fp8 {
            // Off: Hopper's fast FP8 accumulation keeps fewer bits than the f32 sum the CPU
            // emulation computes (docs/fp8.md). The attribute is an int8_t.
            let fast_accum = 0i8;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                (&fast_accum as *const i8).cast(),
                size_of::<i8>(),
            )?;
            // Scales of 1 given explicitly: cuBLASLt documents a null scale pointer as 1, but
            // PyTorch's FP8 GEMMs always set them, the better-trodden path on every version.
            let (one, _g) = self.one.device_ptr(&self.stream);
            for attr in [
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            ] {
                set(attr, (&one as *const u64).cast(), size_of::<u64>())?;
            }
        }
        let epilogue = if s.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
            size_of::<sys::cublasLtEpilogue_t>(),
        )?;
        if s.bias {
            // A valid (not yet real) pointer so the heuristic sees a bias epilogue; set per call.
            let (p, _g) = self.workspace.device_ptr(&self.stream);
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&p as *const u64).cast(),
                size_of::<u64>(),
            )?;
        }
        let mut layout = |ty, rows, cols, ld| {
            let l =
                result::create_matrix_layout(ty, rows, cols, ld).map_err(|e| err("layout", e))?;
            made.layouts.push(l);
            Ok::<_, Error>(l)
        };
        let a = layout(s.dtype, k, m, k as i64)?; // W: column-major [in, out]
        let b = layout(s.dtype, k, n, k as i64)?; // x: column-major [in, T]
        let c = layout(out_type, m, n, m as i64)?; // y: column-major [out, T]
        let pref = result::create_matmul_pref().map_err(|e| err("preference", e))?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: pointer to a live usize, as the attribute expects; then all descriptors were
        // created above and are alive.
        let heuristic = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const usize).cast(),
                size_of::<usize>(),
            )
            .map_err(|e| err("preference attribute", e))
            .and_then(|()| {
                result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref).map_err(
                    |e| {
                        let what = format!(
                            "no algorithm for {:?} [{}×{}]·[{}×{}]ᵀ",
                            s.dtype, s.tokens, s.n_in, s.n_out, s.n_in
                        );
                        err(&what, e)
                    },
                )
            })
        };
        // SAFETY: created above, no longer needed (whether or not the calls above failed).
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        let heuristic = heuristic?;
        made.desc = None; // the plan owns them now
        made.layouts.clear();
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: heuristic.algo,
        })
    }

    /// y[T, out] = x[T, in]·Wᵀ (+ bias), W [out, in] row-major, all of type T. Buffers may be
    /// longer than the shapes need (reused scratch); only their leading elements are used.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<T: GemmElem>(
        &mut self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
        y: &mut CudaSlice<T>,
        tokens: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        if x.len() < tokens * n_in
            || w.len() < n_in * n_out
            || y.len() < tokens * n_out
            || bias.is_some_and(|b| b.len() != n_out)
        {
            return Err(Error::Cuda(format!(
                "gemm: buffer sizes do not fit [{tokens}×{n_in}]·[{n_out}×{n_in}]ᵀ"
            )));
        }
        let shape = Shape {
            dtype: T::BLAS_TYPE,
            tokens,
            n_in,
            n_out,
            bias: bias.is_some(),
        };
        let (handle, ws_len) = (self.handle, WORKSPACE_BYTES);
        let stream = self.stream.clone();
        let plan = *self.plan(shape)?;
        if let Some(b) = bias {
            let (p, _g) = b.device_ptr(&stream);
            // SAFETY: a live device pointer of n_out elements, as the epilogue reads.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&p as *const u64).cast(),
                    size_of::<u64>(),
                )
            }
            .map_err(|e| err("bias pointer", e))?;
        }
        let (wp, _g1) = w.device_ptr(&stream);
        let (xp, _g2) = x.device_ptr(&stream);
        let (yp, _g3) = y.device_ptr_mut(&stream);
        let (wsp, _g4) = self.workspace.device_ptr_mut(&stream);
        // SAFETY: sizes checked above match the layouts of this plan; all pointers are live
        // device allocations on `stream`'s context.
        unsafe { run(handle, &plan, [wp, xp, yp, wsp], ws_len, &stream) }
            .map_err(|e| err("matmul", e))
    }
}

/// cublasLtMatmul of `plan`: D = A·B with alpha 1 and beta 0, C and D the same buffer;
/// `[a, b, d, ws]` are the device pointers of A, B, D and the workspace, on `stream`.
///
/// # Safety
/// The pointers are live device allocations on `stream`'s context at least as large as the
/// plan's layouts say, the workspace one of `ws_len` bytes.
unsafe fn run(
    handle: sys::cublasLtHandle_t,
    plan: &Plan,
    [a, b, d, ws]: [u64; 4],
    ws_len: usize,
    stream: &CudaStream,
) -> std::result::Result<(), cudarc::cublaslt::result::CublasError> {
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: as the caller promises; alpha and beta are f32, the plans' scale type.
    unsafe {
        result::matmul(
            handle,
            plan.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            a as *const c_void,
            plan.a,
            b as *const c_void,
            plan.b,
            d as *const c_void,
            plan.c,
            d as *mut c_void,
            plan.c,
            &plan.algo,
            ws as *mut c_void,
            ws_len,
            stream.cu_stream() as sys::cudaStream_t,
        )
    }
}

impl Gemm {
    /// The FP8 product: acc[T, out] = Σ_k qx[t, k]·qw[o, k] in f32, over E4M3 codes qx [T, in]
    /// (`kernels/fp8_quantize.cu`) and qw [out, in] row-major — the sums before any scale, which
    /// reach K·448² (≈ 3.3e9 at K = 16384: f32, not f16). cuBLASLt's FP8 kernels need
    /// compute capability ≥ 8.9 and 16-byte aligned operands with leading dimensions that are
    /// multiples of 16: here n_in and n_out multiples of 16 (checked), and whole allocations
    /// (cudaMalloc aligns them to 256 bytes). Buffers may be longer than the shapes need.
    pub fn fp8_product(
        &mut self,
        xq: &CudaSlice<u8>,
        wq: &CudaSlice<u8>,
        acc: &mut CudaSlice<f32>,
        tokens: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        check_fp8_shape(tokens, n_in, n_out)?;
        if xq.len() < tokens * n_in || wq.len() < n_in * n_out || acc.len() < tokens * n_out {
            return Err(Error::Cuda(format!(
                "fp8 gemm: buffer sizes do not fit [{tokens}×{n_in}]·[{n_out}×{n_in}]ᵀ"
            )));
        }
        let shape = Shape {
            dtype: sys::cudaDataType::CUDA_R_8F_E4M3,
            tokens,
            n_in,
            n_out,
            bias: false,
        };
        let (handle, ws_len) = (self.handle, WORKSPACE_BYTES);
        let stream = self.stream.clone();
        let plan = *self.plan(shape)?;
        let (wp, _g1) = wq.device_ptr(&stream);
        let (xp, _g2) = xq.device_ptr(&stream);
        let (ap, _g3) = acc.device_ptr_mut(&stream);
        let (wsp, _g4) = self.workspace.device_ptr_mut(&stream);
        // SAFETY: sizes checked above match the layouts of this plan (E4M3 A and B, f32 C and
        // D); all pointers are live device allocations on `stream`'s context (the plan's scale
        // pointers too: `self.one`).
        unsafe { run(handle, &plan, [wp, xp, ap, wsp], ws_len, &stream) }
            .map_err(|e| err("fp8 matmul", e))
    }

    /// Destroys every plan (their descriptors are no longer in use: calls are stream-ordered and
    /// cuBLASLt reads descriptors at enqueue time).
    fn clear(&mut self) {
        // SAFETY: every object was created by this struct and is destroyed once.
        unsafe {
            for (_, p) in self.plans.drain() {
                let _ = result::destroy_matrix_layout(p.a);
                let _ = result::destroy_matrix_layout(p.b);
                let _ = result::destroy_matrix_layout(p.c);
                let _ = result::destroy_matmul_desc(p.desc);
            }
        }
    }
}

/// The descriptor and layouts of a plan being made: destroyed on drop unless taken.
struct Unfinished {
    desc: Option<sys::cublasLtMatmulDesc_t>,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        // SAFETY: created by `make_plan`, not handed to a plan, destroyed once.
        unsafe {
            for l in self.layouts.drain(..) {
                let _ = result::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc.take() {
                let _ = result::destroy_matmul_desc(d);
            }
        }
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.clear();
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// The shapes cuBLASLt's FP8 GEMM takes here: at least one token, and n_in and n_out positive
/// multiples of 16 (its leading dimensions must be; docs/fp8.md). Every BLOOM width is.
pub fn check_fp8_shape(tokens: usize, n_in: usize, n_out: usize) -> Result<()> {
    if tokens == 0
        || n_in == 0
        || n_out == 0
        || !n_in.is_multiple_of(16)
        || !n_out.is_multiple_of(16)
    {
        return Err(Error::Unsupported(format!(
            "the FP8 GEMM needs input and output widths that are multiples of 16, got \
             [{tokens}×{n_in}]·[{n_out}×{n_in}]ᵀ"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fp8_shapes_are_multiples_of_16() {
        use super::check_fp8_shape as c;
        assert!(c(12, 4096, 12288).is_ok() && c(1, 16384, 4096).is_ok() && c(7, 64, 192).is_ok());
        assert!(c(0, 64, 64).is_err() && c(3, 72, 64).is_err() && c(3, 64, 40).is_err());
        let e = c(3, 64, 8).unwrap_err().to_string();
        assert!(
            e.contains("multiples of 16") && e.contains("[3×64]·[8×64]ᵀ"),
            "{e}"
        );
    }
}
