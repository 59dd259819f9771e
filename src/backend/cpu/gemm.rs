//! The one call into the `gemm` crate: every CPU matrix product (the linear layers, attention's
//! score and context products, eval's exact search) goes through [`matmul`].
//!
//! Two measured choices (docs/bench.md, "CPU speed"): the crate's AVX-512 kernels are compiled in
//! (its `x86-v4` feature; picked at run time only on CPUs that have AVX-512F, else its AVX2 + FMA
//! ones), and a multi-threaded product is split by output columns into one single-threaded
//! product per thread, each packing its own share of `rhs`, instead of the crate's own threading.
//! Together they halved the corpus projections' time at hidden 2048 on an AVX-512 Xeon
//! (docs/bench/cpu-sizes-2026-12-02-2.md vs -3.md); the split alone made 2048-token products
//! 4–16% faster than the crate's threading, and was even with it, within the noise, at 128 and
//! 512 tokens (`cargo bench --bench cpu_ops -- cpu_gemm_threads`,
//! docs/bench/cpu-gemm-threads-2026-12-02.txt).

/// How the threads of one product are used.
pub use gemm::Parallelism;

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` (or `dst += …` when `accumulate`), each operand given by
/// pointer and (row, column) strides in elements; `dst`'s column stride is 1.
///
/// # Safety
/// Every element `ptr + r·rs + c·cs` inside the stated shape must be in bounds of its buffer;
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    let threads = match parallelism {
        Parallelism::Rayon(t) => t.max(1),
        _ => 1,
    };
    // The split is used only where it changes no bit of the result: with more than 64 rows and
    // at least 48 columns per range the crate takes its packed kernel for every range, whose
    // k blocking depends on k and the caches alone, so each element is the same sum as in one
    // call (test: `split_is_bit_identical_to_one_call`). Fewer rows take the crate's small-size
    // kernels, chosen by shape, and gain nothing from the split (each range packs its own W).
    const MIN_ROWS: usize = 65;
    const MIN_COLS_PER_THREAD: usize = 64;
    if threads > 1 && m >= MIN_ROWS && n >= threads * MIN_COLS_PER_THREAD && k > 0 {
        // Range i is columns [edge(i), edge(i + 1)): boundaries at multiples of 16 (the AVX-512
        // f32 width) near i·n/threads, so every range holds ≥ 64 - 16 columns.
        let edge = |i: usize| {
            if i == threads {
                n
            } else {
                (i * n / threads) / 16 * 16
            }
        };
        // Raw pointers are not Send; each task rebuilds its own from these addresses.
        let (d, l, r) = (dst as usize, lhs as usize, rhs as usize);
        rayon::scope(|s| {
            for i in 0..threads {
                let (c0, cols) = (edge(i), edge(i + 1) - edge(i));
                s.spawn(move |_| {
                    // SAFETY: columns c0..c0+cols of dst and of rhs lie inside the shapes the
                    // caller vouched for; the ranges of different tasks are disjoint, so no two
                    // tasks write the same dst element, and lhs and rhs are only read. With
                    // Parallelism::None this call is the single crate call below.
                    unsafe {
                        matmul(
                            (m, cols, k),
                            (d as *mut f32).add(c0),
                            dst_rs,
                            l as *const f32,
                            (lhs_rs, lhs_cs),
                            (r as *const f32).add(c0 * rhs_cs),
                            (rhs_rs, rhs_cs),
                            accumulate,
                            Parallelism::None,
                        )
                    }
                });
            }
        });
        return;
    }
    // gemm computes dst = alpha·dst + beta·lhs·rhs, reading dst only when asked to.
    let alpha = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        alpha,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `matmul` on x [m, k] and `rhs` in either layout the engine uses (Wᵀ read from W [n, k],
    /// strides (1, k); or row-major [k, n], strides (n, 1)), onto `init`.
    fn run(
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        rhs: &[f32],
        (rs, cs): (usize, usize),
        init: &[f32],
        accumulate: bool,
        par: Parallelism,
    ) -> Vec<f32> {
        assert!(lhs.len() == m * k && rhs.len() == n * k && init.len() == m * n);
        let mut dst = init.to_vec();
        // SAFETY: every buffer is exactly the size its shape and strides address.
        unsafe {
            matmul(
                (m, n, k),
                dst.as_mut_ptr(),
                n,
                lhs.as_ptr(),
                (k, 1),
                rhs.as_ptr(),
                (rs, cs),
                accumulate,
                par,
            );
        }
        dst
    }

    /// The split promises the very bits of one call (so the thread count never changes an
    /// embedding): rows below and above its limit, column counts that leave ragged ranges for 2, 3 and 5
    /// threads, k over one k block and not a multiple of it, both rhs layouts, accumulation.
    #[test]
    fn split_is_bit_identical_to_one_call() {
        for (m, n, k) in [
            (1, 321, 1000),
            (40, 321, 1000),
            (65, 321, 1000),
            (130, 200, 1537),
        ] {
            let lhs = crate::seeded::uniform(m * k, 1, 1.0);
            let rhs = crate::seeded::uniform(n * k, 2, 1.0);
            let init = crate::seeded::uniform(m * n, 3, 1.0);
            for strides in [(1, k), (n, 1)] {
                for accumulate in [false, true] {
                    let one = run(
                        (m, n, k),
                        &lhs,
                        &rhs,
                        strides,
                        &init,
                        accumulate,
                        Parallelism::None,
                    );
                    for t in [2, 3, 5] {
                        let split = run(
                            (m, n, k),
                            &lhs,
                            &rhs,
                            strides,
                            &init,
                            accumulate,
                            Parallelism::Rayon(t),
                        );
                        let diff = one
                            .iter()
                            .zip(&split)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert!(
                            diff.is_none(),
                            "({m}, {n}, {k}), {t} threads, rhs strides {strides:?}, accumulate \
                             {accumulate}: first differing element {diff:?}"
                        );
                    }
                }
            }
        }
    }

    /// The column split (2 and 3 threads, a ragged last range) and the one-call product against
    /// f64 loops, for both layouts of rhs the engine uses (Wᵀ read from W, and plain row-major)
    /// and with accumulation. Tolerance 1e-5 relative: f32 sums of 150 products of values ≤ 1.
    #[test]
    fn split_and_whole_match_f64_loops() {
        let (m, n, k) = (70, 203, 150);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
        // (rhs row stride, column stride): [n, k] read as its transpose, or [k, n] row-major.
        for (rs, cs) in [(1, k), (n, 1)] {
            for par in [
                Parallelism::None,
                Parallelism::Rayon(2),
                Parallelism::Rayon(3),
            ] {
                for accumulate in [false, true] {
                    let dst = run((m, n, k), &lhs, &rhs, (rs, cs), &init, accumulate, par);
                    let mut worst = (0.0f64, 0, 0);
                    for r in 0..m {
                        for c in 0..n {
                            let dot: f64 = (0..k)
                                .map(|i| lhs[r * k + i] as f64 * rhs[i * rs + c * cs] as f64)
                                .sum();
                            let want = dot
                                + if accumulate {
                                    init[r * n + c] as f64
                                } else {
                                    0.0
                                };
                            let err = (dst[r * n + c] as f64 - want).abs() / (1.0 + want.abs());
                            if err > worst.0 {
                                worst = (err, r, c);
                            }
                        }
                    }
                    assert!(
                        worst.0 < 1e-5,
                        "{par:?}, accumulate {accumulate}, rhs strides ({rs}, {cs}): worst \
                         relative error {:.2e} at ({}, {})",
                        worst.0,
                        worst.1,
                        worst.2
                    );
                }
            }
        }
    }
}
