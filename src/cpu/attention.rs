//! Causal ALiBi self-attention over packed sequences (SPEC.md).
//!
//! qkv: [T, 3·H], BLOOM's fused layout interleaved per head: for token t, head h, part p
//! (0 q, 1 k, 2 v) and 0 ≤ e < d the value is at column `h·3d + p·d + e`.
//! For query i and key j ≤ i of the same sequence (positions local to the sequence):
//! `s_ij = q_i·k_j / sqrt(d) + slope_h·j`, softmax over j in f32, `ctx_i = Σ_j p_ij v_j`.
//! out: [T, H] with head h in columns h·d..(h+1)·d (what the dense projection expects).

use rayon::prelude::*;

/// ALiBi slopes as transformers' `build_alibi_tensor` computes them (f32 base raised to integer
/// powers), including the interleaved extra slopes when n is not a power of two.
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    assert!(n > 0);
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros()); // largest power of two ≤ n
    let pow = |base: f64, k: i32| ((base as f32) as f64).powi(k) as f32;
    let base = 2f64.powf(-8.0 / p as f64);
    let mut s: Vec<f32> = (1..=p as i32).map(|k| pow(base, k)).collect();
    let extra = 2f64.powf(-4.0 / p as f64);
    s.extend((1..).step_by(2).take(n - p).map(|k| pow(extra, k)));
    s
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the compiler can vectorize without reassociating.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// See the module comment for layouts. `heads` = n, `slopes` has n entries.
pub fn alibi_attention(
    qkv: &[f32],
    cu_seqlens: &[usize],
    heads: usize,
    slopes: &[f32],
    out: &mut [f32],
) {
    let t_total = *cu_seqlens.last().unwrap_or(&0);
    let h = out.len() / t_total.max(1);
    let d = h / heads;
    assert!(qkv.len() == t_total * 3 * h && out.len() == t_total * h && slopes.len() == heads);
    let scale = 1.0 / (d as f32).sqrt();
    let jobs: Vec<(usize, usize)> = (0..cu_seqlens.len() - 1)
        .flat_map(|s| (0..heads).map(move |hd| (s, hd)))
        .collect();
    // Each (sequence, head) is independent; results are scattered into `out` afterwards.
    let results: Vec<Vec<f32>> = jobs
        .par_iter()
        .map(|&(s, hd)| {
            let (start, n) = (cu_seqlens[s], cu_seqlens[s + 1] - cu_seqlens[s]);
            let col = |t: usize, part: usize| {
                let o = (start + t) * 3 * h + hd * 3 * d + part * d;
                &qkv[o..o + d]
            };
            let mut ctx = vec![0f32; n * d];
            let mut p = vec![0f32; n];
            for i in 0..n {
                let q = col(i, 0);
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p[..=i].iter_mut().enumerate() {
                    *pj = dot(q, col(j, 1)) * scale + slopes[hd] * j as f32;
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in &mut p[..=i] {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let c = &mut ctx[i * d..(i + 1) * d];
                for (j, &pj) in p[..=i].iter().enumerate() {
                    let w = pj / sum;
                    c.iter_mut().zip(col(j, 2)).for_each(|(c, v)| *c += w * v);
                }
            }
            ctx
        })
        .collect();
    for (&(s, hd), ctx) in jobs.iter().zip(&results) {
        for (i, c) in ctx.chunks_exact(d).enumerate() {
            let row = (cu_seqlens[s] + i) * h;
            out[row + hd * d..row + (hd + 1) * d].copy_from_slice(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_follow_the_spec() {
        // 32 heads: 2^(-(h+1)/4); 16: 2^(-(h+1)/2)
        for (n, step) in [(32usize, 4.0f64), (16, 2.0)] {
            for (h, s) in alibi_slopes(n).iter().enumerate() {
                let want = 2f64.powf(-((h + 1) as f64) / step);
                assert!((*s as f64 - want).abs() < 1e-6 * want, "n={n} h={h}");
            }
        }
        // 6 heads: p = 4 → 2^(-2k) for k = 1..4, then 2^(-k) for k = 1, 3
        let s6 = alibi_slopes(6);
        let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        assert_eq!(s6, want);
    }

    #[test]
    fn single_token_attends_to_itself() {
        // one sequence of one token: ctx = v exactly
        let (heads, d) = (2, 3);
        let qkv: Vec<f32> = (0..3 * heads * d).map(|i| i as f32).collect();
        let mut out = vec![0.0; heads * d];
        alibi_attention(&qkv, &[0, 1], heads, &alibi_slopes(heads), &mut out);
        assert_eq!(out, vec![6.0, 7.0, 8.0, 15.0, 16.0, 17.0]);
    }
}
