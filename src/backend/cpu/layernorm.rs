//! LayerNorm over rows of H: `y = (x - mean) / sqrt(var + eps) * w + b`, biased variance
//! (as torch). Two passes with f64 sums so the oracle's own rounding stays far below any
//! tolerance a GPU kernel is held to.

use rayon::prelude::*;

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
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for i in 0..h {
                o[i] = ((r[i] as f64 - mean) * inv) as f32 * w[i] + b[i];
            }
        });
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
