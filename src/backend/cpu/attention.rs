//! Causal ALiBi self-attention over packed sequences (docs/semantics.md).
//!
//! qkv: [T, 3·H], BLOOM's fused layout interleaved per head: for token t, head h, part p
//! (0 q, 1 k, 2 v) and 0 ≤ e < d the value is at column `h·3d + p·d + e`.
//! For query i and key j ≤ i of the same sequence (positions local to the sequence):
//! `s_ij = q_i·k_j / sqrt(d) + slope_h·j`, softmax over j in f32, `ctx_i = Σ_j p_ij v_j`.
//! out: [T, H] with head h in columns h·d..(h+1)·d (what the dense projection expects).

use rayon::prelude::*;

use super::gemm::{matmul, Parallelism};
use super::vmath;

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

/// Query rows per block: scores for a block of queries against all keys up to its last row,
/// so the causal upper triangle is (mostly) never computed.
const BLOCK: usize = 64;

/// See the module comment for layouts. `heads` = n, `slopes` has n entries.
///
/// The work is cut into (sequence, block of ≤ 64 query rows) tasks, every head inside one task:
/// a task owns its rows of `out` (consecutive, disjoint from every other task's), writes them in
/// place, and reuses one score buffer per thread, so a batch allocates nothing per task and no
/// result is copied afterwards. `tests::naive` is the definition it is checked against.
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
    // (start of the sequence, first query row, end row), in token order, with the rows of `out`
    // each one owns.
    let mut tasks: Vec<(usize, usize, usize, &mut [f32])> = Vec::new();
    let mut rest = out;
    for s in 0..cu_seqlens.len() - 1 {
        let (start, n) = (cu_seqlens[s], cu_seqlens[s + 1] - cu_seqlens[s]);
        for i0 in (0..n).step_by(BLOCK) {
            let i1 = (i0 + BLOCK).min(n);
            let (rows, tail) = std::mem::take(&mut rest).split_at_mut((i1 - i0) * h);
            rest = tail;
            tasks.push((start, i0, i1, rows));
        }
    }
    let run = |p: &mut Vec<f32>, (start, i0, i1, dst): (usize, usize, usize, &mut [f32])| {
        let rows = i1 - i0;
        p.resize(rows * i1, 0.0); // [rows of the block, keys 0..i1]
        for hd in 0..heads {
            // Q, K, V of this head: [n, d] each, row stride 3H inside `qkv`.
            let base = start * 3 * h + hd * 3 * d;
            let (q, k, v) = (&qkv[base..], &qkv[base + d..], &qkv[base + 2 * d..]);
            // SAFETY: rows i0..i1 and keys 0..i1 of a sequence inside `qkv` (asserted
            // length T·3H); p holds rows·i1 values; all in bounds, no overlap.
            unsafe {
                matmul(
                    (rows, i1, d),
                    p.as_mut_ptr(),
                    i1,
                    q[i0 * 3 * h..].as_ptr(),
                    (3 * h, 1),
                    k.as_ptr(),
                    (1, 3 * h),
                    false,
                    Parallelism::None,
                );
            }
            let slope = slopes[hd];
            for (r, row) in p.chunks_mut(i1).enumerate() {
                softmax_causal_row(row, i0 + r, scale, slope);
            }
            // SAFETY: dst is this task's rows × H; head hd's context goes to columns
            // hd·d..(hd+1)·d of each (row stride H); V rows 0..i1 of this sequence; p as above.
            unsafe {
                matmul(
                    (rows, d, i1),
                    dst[hd * d..].as_mut_ptr(),
                    h,
                    p.as_ptr(),
                    (i1, 1),
                    v.as_ptr(),
                    (3 * h, 1),
                    false,
                    Parallelism::None,
                );
            }
        }
    };
    // A task costs rows · keys · H multiply-adds, twice; below ~1M in all (a short query) the
    // hand-off to other threads costs more than it saves.
    let work: usize = tasks.iter().map(|t| (t.2 - t.1) * t.2 * h).sum();
    if work < 1 << 20 {
        let mut p = Vec::new();
        tasks.into_iter().for_each(|task| run(&mut p, task));
    } else {
        tasks.into_par_iter().for_each_init(Vec::new, run);
    }
}

/// One row of scores for query i (keys 0..row.len()): ALiBi bias, softmax over keys 0..=i in
/// f32, zeros for the later keys (causal).
#[inline]
fn softmax_causal_row(row: &mut [f32], i: usize, scale: f32, slope: f32) {
    let (live, later) = row.split_at_mut(i + 1);
    vmath::with_simd(|| {
        let mut max = f32::NEG_INFINITY;
        for (j, sj) in live.iter_mut().enumerate() {
            *sj = *sj * scale + slope * j as f32;
            max = max.max(*sj);
        }
        let mut sum = 0f32;
        for sj in live.iter_mut() {
            *sj = vmath::exp(*sj - max);
            sum += *sj;
        }
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|sj| *sj *= inv);
    });
    later.fill(0.0);
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

    /// The definition, one score at a time: what the blocked version must equal.
    fn naive(qkv: &[f32], cu: &[usize], heads: usize, slopes: &[f32], h: usize) -> Vec<f32> {
        let d = h / heads;
        let mut out = vec![0f32; (cu.last().unwrap()) * h];
        for s in 0..cu.len() - 1 {
            for hd in 0..heads {
                let at = |t: usize, part: usize, e: usize| {
                    qkv[(cu[s] + t) * 3 * h + hd * 3 * d + part * d + e]
                };
                for i in 0..cu[s + 1] - cu[s] {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| at(i, 0, e) as f64 * at(j, 1, e) as f64)
                                .sum();
                            dot / (d as f64).sqrt() + slopes[hd] as f64 * j as f64
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - max).exp()).sum();
                    for e in 0..d {
                        let c: f64 = (0..=i)
                            .map(|j| (sc[j] - max).exp() / z * at(j, 2, e) as f64)
                            .sum();
                        out[(cu[s] + i) * h + hd * d + e] = c as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocked_equals_naive_on_ragged_batches() {
        // lengths cross the 64-row block edge (1, 63, 64, 65, 130); 6 heads (not a power of 2)
        let (heads, d) = (6, 8);
        let h = heads * d;
        let cu = [0, 1, 64, 128, 193, 323];
        let t = *cu.last().unwrap();
        let mut state = 12345u32;
        let qkv: Vec<f32> = (0..t * 3 * h)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        let slopes = alibi_slopes(heads);
        let mut out = vec![f32::NAN; t * h]; // poisoned: every element must be written
        alibi_attention(&qkv, &cu, heads, &slopes, &mut out);
        let want = naive(&qkv, &cu, heads, &slopes, h);
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                "element {i}: {g} vs {w}"
            );
        }
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
