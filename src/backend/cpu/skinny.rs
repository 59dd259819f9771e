//! The product of a linear layer when the batch has only a few tokens (one short query):
//! `out[t, n] += Σ_k x[t, k]·W[n, k]` for T ≤ [`MAX_ROWS`], W stored `[out, in]`.
//!
//! Why not the `gemm` crate: with a dozen rows the product is bound by streaming W from memory
//! once (each weight is used T times), and a general GEMM spends that stream packing W into
//! panels it then reads again. Here each thread takes a run of W's rows and reads each row once,
//! straight from the checkpoint's buffer, against all T rows of x (which stay in cache).
//!
//! Arithmetic: each `out[t, n]` is one dot product over k in a fixed order (lane l of the SIMD
//! vector sums the k ≡ l mod lanes terms, then the lanes pairwise and the k tail), whatever T is
//! and whichever rows share a tile, so on one machine a token's result does not depend on what
//! else is in the batch while T ≤ [`MAX_ROWS`]. Three paths: AVX-512 (16 lanes), AVX2 + FMA (8
//! lanes), and a portable twin without intrinsics that sums in the AVX2 order without FMA; a
//! machine uses the widest it has, so results differ between machines by f32 rounding.

use rayon::prelude::*;

/// The largest batch (in tokens) that [`crate::backend::cpu::linear::linear`] sends here: up to
/// 48 rows this product took less time than the `gemm` crate at hidden 2048 in every run (fc1
/// and fc2, AVX-512, 2 cores; at 48 rows 0.55–0.88×: docs/bench/cpu-linear-small-2026-12-02-2.txt);
/// at 64 the runs disagree (0.73–1.16×).
/// `cargo bench --bench cpu_ops -- cpu_linear_small` times both.
pub const MAX_ROWS: usize = 48;

/// W rows per parallel task: 64 rows of 2048–8192 inputs are 0.5–2 MB of weights, enough to
/// make the hand-off cheap, and N / 64 tasks spread over the cores.
const ROWS_PER_TASK: usize = 64;

/// `out[t, n] += Σ_k x[t, k]·w[n, k]`: x is `[T, K]`, w `[N, K]`, out `[T, N]`, all row-major,
/// with N = `n_out`; T is read from the lengths, so K and N must be > 0 (as in every linear
/// layer). Panics if the lengths do not fit these shapes.
pub fn matmul_acc(x: &[f32], w: &[f32], n_out: usize, out: &mut [f32]) {
    product(x, w, n_out, out, Use::Best)
}

/// Which code computes the dot products: the widest path the CPU has, or (for the tests, which
/// run every path the CPU has) a given one.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))] // all but `Best` are built by the tests
enum Use {
    Best,
    Portable,
    #[cfg(target_arch = "x86_64")]
    Simd(simd::Path),
}

/// [`matmul_acc`] on the path `how`.
fn product(x: &[f32], w: &[f32], n_out: usize, out: &mut [f32], how: Use) {
    let k = w.len().checked_div(n_out).unwrap_or(0);
    let t = x.len().checked_div(k).unwrap_or(0);
    assert!(w.len() == n_out * k && x.len() == t * k && out.len() == t * n_out);
    if t == 0 || n_out == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let path = match how {
        Use::Best => simd::supported().first().copied(),
        Use::Simd(path) => Some(path),
        Use::Portable => None,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(path) = path {
        let blocks = simd::pack(x, t, k, path.lanes());
        // SAFETY: the path is one this CPU has, `blocks` is x packed for it, and `spread` passes
        // whole rows of w with their share of y.
        let dots = |w: &[f32], y: &mut [f32]| unsafe { path.dots(x, &blocks, t, k, w, y) };
        return spread(t, k, w, n_out, out, dots);
    }
    let _ = how; // only read on x86_64
    spread(t, k, w, n_out, out, |w, y| portable_dots(x, t, k, w, y));
}

/// Runs `dots(w rows, y)` over runs of [`ROWS_PER_TASK`] rows of w in parallel, each filling
/// `y[n·T + t]` for its rows, then adds the transposed results into `out`.
fn spread(
    t: usize,
    k: usize,
    w: &[f32],
    n_out: usize,
    out: &mut [f32],
    dots: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    // yt[n, t]: the results transposed, so that each task writes one contiguous run.
    let mut yt = vec![0f32; n_out * t];
    yt.par_chunks_mut(ROWS_PER_TASK * t)
        .enumerate()
        .for_each(|(i, y)| {
            let n0 = i * ROWS_PER_TASK;
            let rows = y.len() / t;
            dots(&w[n0 * k..(n0 + rows) * k], y);
        });
    for (r, row) in out.chunks_exact_mut(n_out).enumerate() {
        for (n, o) in row.iter_mut().enumerate() {
            *o += yt[n * t + r];
        }
    }
}

/// `y[n·T + t] = Σ_k x[t, k]·w[n, k]` for every row n of `w` and t of `x`, without SIMD
/// intrinsics, in the AVX2 path's summation order (mul then add, no FMA).
fn portable_dots(x: &[f32], t: usize, k: usize, w: &[f32], y: &mut [f32]) {
    let k8 = k / 8 * 8;
    for (wn, yn) in w.chunks_exact(k).zip(y.chunks_exact_mut(t)) {
        for (xr, out) in x.chunks_exact(k).zip(yn.iter_mut()) {
            let mut lanes = [0f32; 8];
            for (xc, wc) in xr[..k8].chunks_exact(8).zip(wn[..k8].chunks_exact(8)) {
                for ((l, a), b) in lanes.iter_mut().zip(xc).zip(wc) {
                    *l += a * b;
                }
            }
            *out = reduce_lanes(lanes) + tail(&xr[k8..], &wn[k8..]);
        }
    }
}

/// The eight lanes summed pairwise in the order the AVX2 path uses: (l, l+4), then (l, l+2),
/// then (0, 1).
fn reduce_lanes(l: [f32; 8]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// The k mod 8 last terms, in order.
fn tail(x: &[f32], w: &[f32]) -> f32 {
    x.iter().zip(w).fold(0.0, |s, (a, b)| s + a * b)
}

/// The SIMD product, written once over a vector type ([`Simd`]) and compiled twice: for AVX-512
/// (16 lanes, 32 registers) and for AVX2 + FMA (8 lanes, 16 registers).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// k is walked in blocks of this many values so that a block of x (T rows, T KB) and of the
    /// W rows of a tile stays in L1 (16 KB at T = 12) while every group of x rows passes over
    /// it; towards T = 48 the x block (48 KB) outgrows a 32–48 KB L1 and is partly served from
    /// L2 — measured still faster than the packed GEMM there (see MAX_ROWS).
    const KB: usize = 256;

    #[derive(Clone, Copy, Debug)]
    pub enum Path {
        Avx512,
        Avx2,
    }

    /// The paths this CPU runs, widest first.
    pub fn supported() -> Vec<Path> {
        let avx512 = is_x86_feature_detected!("avx512f");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        [(avx512, Path::Avx512), (avx2, Path::Avx2)]
            .into_iter()
            .filter_map(|(has, path)| has.then_some(path))
            .collect()
    }

    impl Path {
        pub fn lanes(self) -> usize {
            match self {
                Path::Avx512 => 16,
                Path::Avx2 => 8,
            }
        }

        /// # Safety
        /// The path must be one of [`supported`]; `x.len() == t·k`,
        /// `blocks == pack(x, t, k, self.lanes())`, `w.len() == N·k`, `y.len() == N·t`.
        pub unsafe fn dots(
            self,
            x: &[f32],
            blocks: &[f32],
            t: usize,
            k: usize,
            w: &[f32],
            y: &mut [f32],
        ) {
            match self {
                Path::Avx512 => dots_avx512(x, blocks, t, k, w, y),
                Path::Avx2 => dots_avx2(x, blocks, t, k, w, y),
            }
        }
    }

    /// x's first k − k mod `lanes` columns regrouped by blocks of [`KB`]: block b holds rows
    /// 0..T of columns b·KB.., each row contiguous. Rows of x lie K floats apart, a multiple of
    /// 4 KB for BLOOM's K, so unpacked they all fell into the same few L1 sets and evicted each
    /// other.
    pub fn pack(x: &[f32], t: usize, k: usize, lanes: usize) -> Vec<f32> {
        let kl = k / lanes * lanes;
        let mut blocks = Vec::with_capacity(t * kl);
        for kb in (0..kl).step_by(KB) {
            for row in x.chunks_exact(k) {
                blocks.extend_from_slice(&row[kb..(kb + KB).min(kl)]);
            }
        }
        blocks
    }

    /// What the product needs of a vector type.
    trait Simd {
        type V: Copy;
        const LANES: usize;
        /// Tile: C rows of W against R rows of x, C·R accumulators in registers.
        const C: usize;
        const R: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        /// The lanes folded to eight: lane l + lane l + 8 for 16 lanes.
        unsafe fn eight(v: Self::V) -> [f32; 8];
    }

    struct Avx512;
    struct Avx2;

    /// 4 W rows × 4 x rows: 16 accumulators, 4 weight vectors and 1 input vector of 32
    /// registers; 8 loads per 16 FMAs.
    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        const C: usize = 4;
        const R: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn eight(v: __m512) -> [f32; 8] {
            let mut l = [0f32; 16];
            _mm512_storeu_ps(l.as_mut_ptr(), v);
            std::array::from_fn(|i| l[i] + l[i + 8])
        }
    }

    /// 4 W rows × 2 x rows: 8 accumulators, 4 weight vectors and 1 input vector of 16
    /// registers; 6 loads per 8 FMAs.
    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        const C: usize = 4;
        const R: usize = 2;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn eight(v: __m256) -> [f32; 8] {
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), v);
            l
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dots_avx512(x: &[f32], blocks: &[f32], t: usize, k: usize, w: &[f32], y: &mut [f32]) {
        dots::<Avx512, 4, 4>(x, blocks, t, k, w, y)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2(x: &[f32], blocks: &[f32], t: usize, k: usize, w: &[f32], y: &mut [f32]) {
        dots::<Avx2, 4, 2>(x, blocks, t, k, w, y)
    }

    /// `y[n·T + t] = Σ_k x[t, k]·w[n, k]` for every row n of `w` and t of `x`; C and R repeat
    /// S's tile (array lengths must be literal generics).
    ///
    /// # Safety
    /// S's instructions must be available (inlined into the `#[target_feature]` functions
    /// above); the lengths as in [`Path::dots`].
    #[inline(always)]
    unsafe fn dots<S: Simd, const C: usize, const R: usize>(
        x: &[f32],
        blocks: &[f32],
        t: usize,
        k: usize,
        w: &[f32],
        y: &mut [f32],
    ) {
        debug_assert!(C == S::C && R == S::R);
        let n = w.len() / k;
        let kl = k / S::LANES * S::LANES;
        assert!(x.len() == t * k && blocks.len() == t * kl && w.len() == n * k && y.len() == n * t);
        // acc[i·C + j]: the lane sums of x row i against W row n0 + j, kept between k blocks
        // (storing them does not change the order of any addition).
        let mut acc = vec![S::zero(); t * C];
        let mut n0 = 0;
        while n0 < n {
            let nr = C.min(n - n0);
            acc.fill(S::zero());
            for kb in (0..kl).step_by(KB) {
                let len = KB.min(kl - kb);
                let mut t0 = 0;
                while t0 < t {
                    let tr = R.min(t - t0);
                    // SAFETY: block kb of `blocks` starts at kb·T and holds T rows of len values;
                    // rows n0..n0+nr of w exist, each k long, and kb + len ≤ k; the tile uses
                    // acc[(t0 + i)·C + j] for i < tr, j < nr.
                    let xp = blocks.as_ptr().add(kb * t + t0 * len);
                    let wp = |j: usize| w.as_ptr().add((n0 + j) * k + kb);
                    let ap = acc.as_mut_ptr().add(t0 * C);
                    let s = (len, k);
                    // plain loops, not closures: a closure would not inherit the caller's
                    // target features, and the intrinsics in it would become calls
                    match (nr == C, tr == R) {
                        (true, true) => tile::<S, C, R, C>(xp, wp(0), s, ap),
                        (true, false) => {
                            for i in 0..tr {
                                tile::<S, C, 1, C>(xp.add(i * len), wp(0), s, ap.add(i * C));
                            }
                        }
                        // a partial block of W rows is done one row at a time
                        (false, true) => {
                            for j in 0..nr {
                                tile::<S, 1, R, C>(xp, wp(j), s, ap.add(j));
                            }
                        }
                        (false, false) => {
                            for j in 0..nr {
                                for i in 0..tr {
                                    let a = ap.add(i * C + j);
                                    tile::<S, 1, 1, C>(xp.add(i * len), wp(j), s, a);
                                }
                            }
                        }
                    }
                    t0 += tr;
                }
            }
            for j in 0..nr {
                let wr = &w[(n0 + j) * k..(n0 + j + 1) * k];
                for (i, xr) in x.chunks_exact(k).enumerate() {
                    let lanes = S::eight(acc[i * C + j]);
                    y[(n0 + j) * t + i] =
                        super::reduce_lanes(lanes) + super::tail(&xr[kl..], &wr[kl..]);
                }
            }
            n0 += nr;
        }
    }

    /// acc[i·A + j] += the lane products of x row i and W row j over `len` values (a multiple
    /// of the lanes), for i < R and j < C; x's rows lie `len` apart, w's `k` apart.
    ///
    /// # Safety
    /// S's instructions available; x has R rows and w C rows of `len` values at those strides
    /// from the given pointers; acc is valid at every i·A + j.
    #[inline(always)]
    unsafe fn tile<S: Simd, const C: usize, const R: usize, const A: usize>(
        x: *const f32,
        w: *const f32,
        (len, k): (usize, usize),
        acc: *mut S::V,
    ) {
        let mut a = [[S::zero(); C]; R];
        for (i, ai) in a.iter_mut().enumerate() {
            for (j, aij) in ai.iter_mut().enumerate() {
                *aij = *acc.add(i * A + j);
            }
        }
        let mut kk = 0;
        while kk < len {
            let mut wv = [S::zero(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = S::load(w.add(j * k + kk));
            }
            for (i, ai) in a.iter_mut().enumerate() {
                let xv = S::load(x.add(i * len + kk));
                for (aij, &wj) in ai.iter_mut().zip(&wv) {
                    *aij = S::fmadd(xv, wj, *aij);
                }
            }
            kk += S::LANES;
        }
        for (i, ai) in a.iter().enumerate() {
            for (j, &aij) in ai.iter().enumerate() {
                *acc.add(i * A + j) = aij;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], n_out: usize) -> Vec<f64> {
        let k = w.len() / n_out;
        let t = x.len() / k;
        let mut y = vec![0f64; t * n_out];
        for r in 0..t {
            for n in 0..n_out {
                y[r * n_out + n] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[n * k + i] as f64)
                    .sum();
            }
        }
        y
    }

    /// Every path this CPU runs, the portable twin first.
    fn every_use() -> Vec<Use> {
        #[allow(unused_mut)]
        let mut uses = vec![Use::Portable];
        #[cfg(target_arch = "x86_64")]
        uses.extend(simd::supported().into_iter().map(Use::Simd));
        uses
    }

    /// On every path: every tile shape and tail, T 1..=MAX_ROWS (odd and even), N not a multiple of 4 nor of the
    /// task size, K with and without a remainder mod 8, within one k block and over several
    /// (the last one partial). Tolerance: K f32 products summed in f32 against an f64
    /// reference, ≤ 1e-5 relative to Σ|x·w| (K·2^-24 ≈ 6e-5 is the worst case at K = 1030; the
    /// lanes' pairwise sums stay far below it), while one wrong term is ~1e-3 of it.
    #[test]
    fn matches_f64_loops_on_every_tile_shape() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (2, 130, 64),
            (16, 67, 203),
            (11, 9, 8),
            (5, 9, 603),
            (16, 5, 1030),
            (MAX_ROWS, 7, 300),
        ];
        for ((t, n, k), how) in shapes
            .into_iter()
            .flat_map(|s| every_use().into_iter().map(move |u| (s, u)))
        {
            let x = crate::seeded::uniform(t * k, 1, 1.0);
            let w = crate::seeded::uniform(n * k, 2, 1.0);
            let mut out = vec![0.5f32; t * n];
            product(&x, &w, n, &mut out, how);
            let want = naive(&x, &w, n);
            let mut worst = (0f64, 0);
            for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                let scale: f64 = (0..k)
                    .map(|j| (x[i / n * k + j] as f64 * w[i % n * k + j] as f64).abs())
                    .sum();
                // 6e-8: the f32 rounding of adding the product to the 0.5 already in `out`
                let err = (((g as f64 - 0.5) - e).abs() - 6e-8).max(0.0) / scale.max(1e-30);
                if err > worst.0 {
                    worst = (err, i);
                }
            }
            assert!(
                worst.0 <= 1e-5,
                "{how:?}, T {t} N {n} K {k}: worst element {} off by {:e} relative (got {}, want {})",
                worst.1,
                worst.0,
                out[worst.1] - 0.5,
                want[worst.1]
            );
        }
    }

    /// On every path, a row's result is the same whatever the other rows are and however many
    /// there are (the batch invariance the module promises), bit for bit.
    #[test]
    fn a_row_does_not_depend_on_its_neighbours() {
        let (n, k) = (37, 700);
        let w = crate::seeded::uniform(n * k, 3, 1.0);
        let x = crate::seeded::uniform(MAX_ROWS * k, 4, 1.0);
        for how in every_use() {
            let mut alone = vec![0f32; n];
            product(&x[5 * k..6 * k], &w, n, &mut alone, how);
            for t in [6, 7, MAX_ROWS] {
                let mut all = vec![0f32; t * n];
                product(&x[..t * k], &w, n, &mut all, how);
                assert_eq!(&all[5 * n..6 * n], &alone[..], "{how:?}, T = {t}");
            }
        }
    }

    /// Each SIMD path and the portable twin agree to f32 rounding (FMA rounds once where the
    /// twin rounds twice; AVX-512 pairs its lanes first). Values in [-1, 1], so Σ|x·w| ≤ K and
    /// the two differ by a few of its f32 ulps (~K·6e-8): 1e-5·K leaves ample room and still
    /// catches one wrong or missing term (~0.25).
    #[test]
    fn simd_paths_agree_with_the_portable_twin() {
        let (t, n, k) = (5, 9, 300);
        let x = crate::seeded::uniform(t * k, 5, 1.0);
        let w = crate::seeded::uniform(n * k, 6, 1.0);
        let mut twin = vec![0f32; n * t];
        product(&x, &w, n, &mut twin, Use::Portable);
        for how in every_use() {
            let mut got = vec![0f32; n * t];
            product(&x, &w, n, &mut got, how);
            for (i, (p, q)) in got.iter().zip(&twin).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5 * k as f32,
                    "{how:?}, element {i}: {p} vs {q}"
                );
            }
        }
    }
}
