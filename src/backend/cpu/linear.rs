//! Linear layers `y = x·Wᵀ + b` with W stored `[out, in]` as in the checkpoint. The product runs
//! in the `gemm` crate through [`super::gemm::matmul`] (packed, SIMD, multi-threaded), or for a
//! batch of at most [`skinny::MAX_ROWS`] tokens in [`skinny`] (W streamed once); W is read in
//! place, never transposed.

use rayon::prelude::*;

use super::gemm::{matmul, Parallelism};
use super::skinny;
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
    if t <= skinny::MAX_ROWS {
        skinny::matmul_acc(x, w, n_out, out);
    } else {
        gemm_acc(x, w, n_out, out);
    }
}

/// `out[t, n] += Σ_k x[t, k]·w[n, k]` (x `[T, K]`, w `[N, K]`, out `[T, N]`) in the `gemm` crate:
/// [`linear`]'s product above [`skinny::MAX_ROWS`] tokens. Panics if the lengths do not fit.
pub fn gemm_acc(x: &[f32], w: &[f32], n_out: usize, out: &mut [f32]) {
    let n_in = w.len().checked_div(n_out).unwrap_or(0);
    let t = x.len().checked_div(n_in).unwrap_or(0);
    assert!(w.len() == n_out * n_in && x.len() == t * n_in && out.len() == t * n_out);
    if t == 0 || n_out == 0 {
        return;
    }
    // SAFETY: the assert above bounds every access: dst is T×out row-major (row stride out,
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

    /// Both products: the skinny one (5 tokens) and the `gemm` crate's (above its limit).
    #[test]
    fn matches_naive_loops() {
        for t in [5, skinny::MAX_ROWS + 3] {
            matches_naive_loops_at(t);
        }
    }

    fn matches_naive_loops_at(t: usize) {
        let (n_in, n_out) = (7, 3);
        let x: Vec<f32> = (0..t * n_in).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n_out * n_in).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let mut y = vec![1.0; t * n_out];
        linear(&x, &w, &b, &mut y, true);
        for r in 0..t {
            for o in 0..n_out {
                let dot: f32 = (0..n_in).map(|k| x[r * n_in + k] * w[o * n_in + k]).sum();
                let want = 1.0 + dot + b[o];
                assert!(
                    (y[r * n_out + o] - want).abs() < 1e-5,
                    "T {t}, row {r}, out {o}"
                );
            }
        }
        linear(&x, &w, &b, &mut y, false);
        let dot: f32 = (0..n_in).map(|k| x[k] * w[k]).sum();
        assert!((y[0] - (dot + b[0])).abs() < 1e-5);
    }
}
