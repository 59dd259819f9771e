//! The score tiles of `sgpt eval` on the GPU: cuBLASLt in full f32 (CUBLAS_COMPUTE_32F, no
//! TF32, so the ranking matches the CPU's up to summation order). Query and document blocks go
//! up, the [Qb, Db] tile comes back, and the heaps stay on the host ([`super::search`]).
//! Device buffers grow to the largest tile seen and are reused.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::backend::cuda::gemm::Gemm;
use crate::error::{Error, Result};
use crate::eval::search::TileProduct;

pub struct GpuProduct {
    stream: Arc<CudaStream>,
    gemm: Gemm,
    queries: CudaSlice<f32>,
    docs: CudaSlice<f32>,
    tile: CudaSlice<f32>,
    device: String,
}

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("similarity search {what}: {e:?}"))
}

impl GpuProduct {
    /// Works in `ctx`, the engine's own context (`Backend::cuda_context`).
    pub fn new(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<Self> {
        let stream = ctx.default_stream();
        let one = || stream.alloc_zeros::<f32>(1).map_err(|e| err("alloc", e));
        Ok(GpuProduct {
            gemm: Gemm::new(stream.clone())?,
            queries: one()?,
            docs: one()?,
            tile: one()?,
            device: ctx.name().unwrap_or_else(|_| "GPU".into()),
            stream,
        })
    }

    fn fit(stream: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        if buf.len() < n {
            *buf = stream.alloc_zeros::<f32>(n).map_err(|e| err("alloc", e))?;
        }
        Ok(())
    }
}

impl TileProduct for GpuProduct {
    fn product(&mut self, lhs: &[f32], docs: &[f32], h: usize, out: &mut [f32]) -> Result<()> {
        let (qn, n) = (lhs.len() / h, docs.len() / h);
        if out.len() != qn * n {
            return Err(Error::Input("search tile has the wrong size".into()));
        }
        let s = &self.stream;
        Self::fit(s, &mut self.queries, lhs.len())?;
        Self::fit(s, &mut self.docs, docs.len())?;
        Self::fit(s, &mut self.tile, out.len())?;
        s.memcpy_htod(lhs, &mut self.queries.slice_mut(..lhs.len()))
            .map_err(|e| err("upload", e))?;
        s.memcpy_htod(docs, &mut self.docs.slice_mut(..docs.len()))
            .map_err(|e| err("upload", e))?;
        // tile[qn, n] = queries[qn, H] · docs[n, H]ᵀ: a linear layer with docs as the weights.
        self.gemm
            .linear::<f32>(&self.queries, &self.docs, None, &mut self.tile, qn, h, n)?;
        s.memcpy_dtoh(&self.tile.slice(..out.len()), out)
            .map_err(|e| err("download", e))
    }

    fn describe(&self) -> String {
        format!("cuda exact (cuBLASLt f32, {})", self.device)
    }
}
