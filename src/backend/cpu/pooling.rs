//! Weighted-mean pooling (docs/semantics.md): `e = Σ_j j·h_j / Σ_j j` with j = 1..n the position inside
//! the sequence. Weights never depend on the batch, so batching cannot change an embedding.

use rayon::prelude::*;

/// h: [T, H]; out: [S, H].
pub fn weighted_mean_pool(h: &[f32], cu_seqlens: &[usize], out: &mut [f32]) {
    let s_count = cu_seqlens.len() - 1;
    let hid = out.len() / s_count.max(1);
    assert!(out.len() == s_count * hid && h.len() == cu_seqlens[s_count] * hid);
    out.par_chunks_mut(hid.max(1))
        .enumerate()
        .with_min_len(8)
        .for_each(|(s, o)| {
            let mut acc = vec![0f64; hid];
            let n = cu_seqlens[s + 1] - cu_seqlens[s];
            for j in 0..n {
                let w = (j + 1) as f64;
                let row = &h[(cu_seqlens[s] + j) * hid..(cu_seqlens[s] + j + 1) * hid];
                acc.iter_mut()
                    .zip(row)
                    .for_each(|(a, &v)| *a += w * v as f64);
            }
            let total = (n * (n + 1) / 2) as f64;
            o.iter_mut()
                .zip(&acc)
                .for_each(|(o, a)| *o = (a / total) as f32);
        });
}

/// Scales each row of `x` ([rows, H]) to unit L2 norm; an all-zero row stays zero.
pub fn l2_normalize(x: &mut [f32], hidden: usize) {
    for row in x.chunks_mut(hidden) {
        let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_positions() {
        // seq 0: rows [1,0],[0,1] → (1·[1,0] + 2·[0,1]) / 3; seq 1: one row → itself
        let h = [1.0, 0.0, 0.0, 1.0, 5.0, -5.0];
        let mut out = [0.0; 4];
        weighted_mean_pool(&h, &[0, 2, 3], &mut out);
        assert_eq!(out, [1.0 / 3.0, 2.0 / 3.0, 5.0, -5.0]);
        let mut v = [3.0, 4.0, 0.0, 0.0];
        l2_normalize(&mut v, 2);
        assert_eq!(v, [0.6, 0.8, 0.0, 0.0]);
    }
}
