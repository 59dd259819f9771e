//! Linear layers `y = x·Wᵀ + b` with W stored `[out, in]` as in the checkpoint. The product runs
//! in the `gemm` crate through [`super::gemm::matmul`] (packed, SIMD, multi-threaded); W is read
//! through strides, never transposed.

use rayon::prelude::*;

use super::gemm::{matmul, Parallelism};
use crate::model::weights::F32Buf;

/// One linear layer of a block, `y = x·Wᵀ + b` with its weight inside: the seam where the FP8
/// emulation ([`super::fp8::Fp8Linear`]) replaces the f32 product, and where its reference test
/// plugs in its own.
pub trait LinearKernel: Send + Sync {
    /// out[T, out] = x[T, in]·Wᵀ + b, or out += x·Wᵀ + b when `accumulate`; `b` has `out`
    /// entries.
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool);
}

/// The f32 weight [out, in] as loaded: [`linear`].
impl LinearKernel for F32Buf {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        linear(x, self, b, out, accumulate)
    }
}

/// out[T, out] = x[T, in]·Wᵀ + b, or with `accumulate` out += x·Wᵀ + b (the residual add fused
/// into the GEMM: BLOOM's `x + dense(ctx)` and `x + mlp(m)`).
pub fn linear(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
    let n_out = b.len();
    let n_in = w.len() / n_out;
    let t = x.len() / n_in;
    assert!(w.len() == n_out * n_in && x.len() == t * n_in && out.len() == t * n_out);
    let min_rows = (1 << 14) / n_out + 1; // ≥ ~16k values per task: a few rows stay on this thread
    let rows = out.par_chunks_mut(n_out).with_min_len(min_rows);
    rows.for_each(|row| {
        if accumulate {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        } else {
            row.copy_from_slice(b);
        }
    });
    if t == 0 {
        return;
    }
    // SAFETY: the asserts above bound every access: dst is T×out row-major (row stride out,
    // column stride 1), lhs T×in row-major, rhs = Wᵀ (in×out) read from W [out,in] with row
    // stride 1 and column stride in. The three buffers do not overlap (&mut vs &).
    unsafe {
        matmul(
            (t, n_out, n_in),
            out.as_mut_ptr(),
            n_out,
            x.as_ptr(),
            (n_in, 1),
            w.as_ptr(),
            (1, n_in),
            true,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_loops() {
        let (t, n_in, n_out) = (5, 7, 3);
        let x: Vec<f32> = (0..t * n_in).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n_out * n_in).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let mut y = vec![1.0; t * n_out];
        linear(&x, &w, &b, &mut y, true);
        for r in 0..t {
            for o in 0..n_out {
                let dot: f32 = (0..n_in).map(|k| x[r * n_in + k] * w[o * n_in + k]).sum();
                let want = 1.0 + dot + b[o];
                assert!((y[r * n_out + o] - want).abs() < 1e-5);
            }
        }
        linear(&x, &w, &b, &mut y, false);
        let dot: f32 = (0..n_in).map(|k| x[k] * w[k]).sum();
        assert!((y[0] - (dot + b[0])).abs() < 1e-5);
    }
}
