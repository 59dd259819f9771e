//! LayerNorm over rows of H: `y = (x - mean) / sqrt(var + eps) * w + b`, biased variance
//! (as torch). Two passes with f64 sums so the oracle's own rounding stays far below any
//! tolerance a GPU kernel is held to; each sum runs in eight independent lanes so that it
//! vectorizes (one chain of f64 adds was what this op spent its time waiting on).

use rayon::prelude::*;

use super::vmath::with_simd;

/// x, out: [rows, H]; w, b: [H].
pub fn layernorm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    assert!(b.len() == h && x.len() == out.len() && x.len().is_multiple_of(h));
    // at least ~16k values per task: a few short rows are not worth a hand-off
    let min_rows = (1 << 14) / h.max(1) + 1;
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(min_rows)
        .for_each(|(o, r)| {
            with_simd(|| {
                let mean = lane_sum(r, |v| v) / h as f64;
                let var = lane_sum(r, |v| (v - mean) * (v - mean)) / h as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for (((o, &r), &w), &b) in o.iter_mut().zip(r).zip(w).zip(b) {
                    *o = ((r as f64 - mean) * inv) as f32 * w + b;
                }
            })
        });
}

/// Σ f(x_i) in f64: lane l sums the i ≡ l mod 8 terms, then the lanes and the tail are added.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    let lanes = chunks.fold([0f64; 8], |mut l, c| {
        l.iter_mut().zip(c).for_each(|(l, &v)| *l += f(v as f64));
        l
    });
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_each_row() {
        let x = [1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, 5.0];
        let mut y = [0.0; 8];
        layernorm(&x, &[1.0; 4], &[0.0; 4], 1e-5, &mut y);
        for row in y.chunks(4) {
            let mean: f32 = row.iter().sum::<f32>() / 4.0;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{row:?}");
        }
        layernorm(&x, &[2.0; 4], &[1.0; 4], 1e-5, &mut y);
        assert!((y[0] - (1.0 + 2.0 * -1.3416355)).abs() < 1e-4, "{}", y[0]);
    }
}
