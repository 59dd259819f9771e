//! FP8 (E4M3) arithmetic and the CPU emulation of the FP8 GEMMs (docs/fp8.md): the oracle of a
//! future GPU FP8 path and the way its accuracy is measured without a GPU.
//!
//! **E4M3** (OCP FP8 "E4M3FN", CUDA's `__nv_fp8_e4m3`): 1 sign bit, 4 exponent bits (bias 7),
//! 3 mantissa bits. Code `S.EEEE.MMM` is `±(1 + M/8)·2^(E−7)` for E ≥ 1 and `±(M/8)·2^−6` for
//! E = 0 (subnormals, down to 2^−9); there are no infinities, `S.1111.111` is NaN, so the largest
//! finite value is `S.1111.110` = ±448.
//!
//! **Rounding** f32 → E4M3 ([`to_e4m3`]): to nearest, ties to even (the code with M even), with
//! subnormals; finite values beyond ±448 and ±Inf **saturate** to ±448; NaN stays NaN. That is
//! `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` and what cuBLASLt writes for FP8
//! outputs. Saturation matters here: the scale of a row is `amax/448`, and `amax / scale` may
//! come out a rounding step above 448, which must become 448, not NaN.
//!
//! **Scales** ([`scale_for`]): a tensor (or row) with largest magnitude `amax` is stored as
//! `q = e4m3(x / s)` with `s = amax / 448` (f32 division, correctly rounded), so its largest
//! element lands on ±448 and `x ≈ q·s`. Weights get one scale per output channel (row of
//! W [out, in]), computed once at load; GEMM inputs get one per token (row of x [T, in]) or one
//! per tensor, computed just before the GEMM ([`ActScale`]). An all-zero row gets the smallest
//! normal f32 as its scale (its codes are all 0); NaN or Inf in a row makes that GEMM's
//! outputs NaN, which the engine's finite check reports.
//!
//! **The GEMM** ([`Fp8Linear`]): `y[t,o] = (Σ_k qx[t,k]·qw[o,k]) · (sx[t]·sw[o]) + b[o]`, the
//! sum over the E4M3 values themselves, accumulated in f32, the two scales applied after (as in
//! cuBLASLt's epilogue). The emulation decodes both operands to f32 and runs the ordinary f32
//! GEMM on them. That is exact for the products: an E4M3 value has at most 4 significant bits,
//! so a product has at most 8 (f32 holds 24) and lies between 2^−18 and 448² (far inside f32's
//! range). Only the f32 accumulation rounds, as on the GPU with f32 accumulation; the order of
//! the sum may differ. (Folding the scales into the operands first, `(qx·sx)·(qw·sw)`, would
//! round each operand to 24 bits again: close, but not the same arithmetic.)

use std::sync::LazyLock;

use rayon::prelude::*;

use super::linear::{linear, LinearKernel};
use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::schema::{fp8_blocks_stored, scale_name};
use crate::model::weights::{Checkpoint, DType};

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest normal E4M3 value, 2^−6; below it the grid is uniform in steps of 2^−9.
const MIN_NORMAL: f32 = 1.0 / 64.0;

/// f32 → E4M3 code: nearest, ties to even, subnormals kept, ±448 beyond the range (±Inf too),
/// NaN → 0x7F. See the module comment.
pub fn to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < MIN_NORMAL {
        // Multiples of 2^−9: the code is the multiple itself (8 is 2^−6, the smallest normal,
        // whose code is also 8). a·512 is exact: scaling by a power of two.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // a is a normal f32 in [2^−6, 448): its binary exponent e is in −6..=8.
    let e = ((a.to_bits() >> 23) as i32) - 127;
    let frac = a * f32::from_bits(((127 - e) as u32) << 23); // a / 2^e in [1, 2), exact
    let m = ((frac - 1.0) * 8.0).round_ties_even() as u8; // 0..=8, exact up to the rounding
    let (e, m) = if m == 8 { (e + 1, 0) } else { (e, m) };
    // e ≤ 8 and, at e = 8, m ≤ 6: a < 448 rounds to at most 448.
    sign | (((e + 7) as u8) << 3) | m
}

/// Every code's value (NaN for 0x7F and 0xFF).
static DECODE: LazyLock<[f32; 256]> = LazyLock::new(|| {
    std::array::from_fn(|c| {
        let (e, m) = ((c >> 3) & 0xF, (c & 7) as f32);
        let mag = match e {
            15 if m == 7.0 => f32::NAN,
            0 => m / 512.0,
            _ => (8.0 + m) * 2f32.powi(e as i32 - 10),
        };
        if c & 0x80 != 0 {
            -mag
        } else {
            mag
        }
    })
});

/// E4M3 code → its value (exact in f32).
#[inline]
pub fn from_e4m3(c: u8) -> f32 {
    DECODE[c as usize]
}

/// The scale of a tensor or row whose largest magnitude is `amax`: `amax / 448`, at least the
/// smallest normal f32 (so an all-zero row divides by something and gets codes 0).
#[inline]
pub fn scale_for(amax: f32) -> f32 {
    (amax / E4M3_MAX).max(f32::MIN_POSITIVE)
}

/// Largest |x| (NaN ignored; a NaN element still becomes a NaN code).
fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Rounds `x` to E4M3 codes with scale `s`.
fn encode_with(x: &[f32], s: f32, out: &mut [u8]) {
    out.iter_mut()
        .zip(x)
        .for_each(|(q, &v)| *q = to_e4m3(v / s));
}

/// How the scales of a GEMM's input (activations) are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ActScale {
    /// One scale per token (row of x [T, in]): what the emulation uses (docs/fp8-accuracy.md).
    #[default]
    PerToken,
    /// One scale for the whole [T, in] input.
    PerTensor,
}

/// Which blocks run their four linear layers in FP8; the others keep the engine's full
/// precision (f32 on the CPU, f16 on a GPU). One rule for the CPU emulation, the GPU loader,
/// the device-memory count and the accuracy study, so all four mean the same blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Blocks {
    /// Every block (`--dtype fp8`).
    All,
    /// The blocks of odd 0-based index, 1, 3, 5, … (`--dtype fp8-alternate`; block 0 stays at
    /// full precision): the variant that reached cosine 0.999 to f32 on the bloom-560m
    /// stand-in (docs/fp8-accuracy.md, which measured this choice of blocks).
    Alternate,
}

impl Fp8Blocks {
    /// Whether block `l` (0-based) runs its linear layers in FP8.
    pub fn covers(self, l: usize) -> bool {
        match self {
            Fp8Blocks::All => true,
            Fp8Blocks::Alternate => !l.is_multiple_of(2),
        }
    }

    /// How many of `layers` blocks run in FP8.
    pub fn count(self, layers: usize) -> usize {
        (0..layers).filter(|&l| self.covers(l)).count()
    }

    /// Which blocks, in words.
    pub fn which(self) -> &'static str {
        match self {
            Fp8Blocks::All => "every block",
            Fp8Blocks::Alternate => "every other block",
        }
    }

    /// The engine's name for it, the `--dtype` that asks for it.
    pub fn dtype_name(self) -> &'static str {
        match self {
            Fp8Blocks::All => "fp8",
            Fp8Blocks::Alternate => "fp8-alternate",
        }
    }
}

/// Which blocks a checkpoint written by `sgpt quantize` stores in E4M3 (None: a float
/// checkpoint); an error naming the blocks when they are neither every block nor every other
/// one (no engine dtype runs such a mix).
pub fn stored_blocks(ckpt: &Checkpoint, cfg: &BloomConfig) -> Result<Option<Fp8Blocks>> {
    let stored = fp8_blocks_stored(ckpt, cfg)?;
    if stored.is_empty() {
        return Ok(None);
    }
    for b in [Fp8Blocks::All, Fp8Blocks::Alternate] {
        if stored == (0..cfg.layers).filter(|&l| b.covers(l)).collect::<Vec<_>>() {
            return Ok(Some(b));
        }
    }
    Err(Error::config(
        &ckpt.dir,
        format!(
            "the linear layers of blocks {stored:?} (of {}) are stored as E4M3 codes: neither \
             every block (--dtype fp8) nor every other one from block 1 (--dtype fp8-alternate)",
            cfg.layers
        ),
    ))
}

/// The error for a checkpoint whose stored E4M3 blocks `b` another dtype was asked of.
pub fn stored_fp8_needs(dir: &std::path::Path, b: Fp8Blocks) -> Error {
    let which = b.which();
    Error::Input(format!(
        "{} stores the linear layers of {which} as E4M3 codes (written by `sgpt quantize --dtype \
         {d}`): run it with --dtype {d}, or without --dtype",
        dir.display(),
        d = b.dtype_name()
    ))
}

/// The stored E4M3 weight `name` [out, in] and its scales [out], as `sgpt quantize` wrote them
/// (the checkpoint passed [`crate::model::schema::check`]), or None when it is stored as floats.
pub fn stored_weight(ckpt: &Checkpoint, name: &str) -> Result<Option<(Vec<u8>, Vec<f32>)>> {
    let t = ckpt.get_any(name)?;
    if t.dtype != DType::F8E4M3 {
        return Ok(None);
    }
    let s = ckpt.get_shaped(&scale_name(name), &t.shape[..1])?.to_f32();
    check_scales(&ckpt.dir, &scale_name(name), &s)?;
    Ok(Some((t.bytes().to_vec(), s.to_vec())))
}

/// Stored scales must be what [`scale_for`] gives: finite and at least the smallest normal f32
/// (a zero, negative or subnormal one would make a finite but wrong vector, never an error).
pub fn check_scales(dir: &std::path::Path, name: &str, s: &[f32]) -> Result<()> {
    match s
        .iter()
        .position(|&v| !(v.is_finite() && v >= f32::MIN_POSITIVE))
    {
        None => Ok(()),
        Some(r) => Err(Error::config(
            dir,
            format!(
                "`{name}` row {r} is {}: E4M3 scales are finite and at least {:e}",
                s[r],
                f32::MIN_POSITIVE
            ),
        )),
    }
}

/// One scale per row of x [rows, n]: a weight's per-output-channel scales ([`Fp8Linear::new`]),
/// or a GEMM input's per-token ones.
pub fn row_scales(x: &[f32], n: usize) -> Vec<f32> {
    x.par_chunks(n).map(|r| scale_for(amax(r))).collect()
}

/// Codes [rows, n] and scales of `x` [rows, n], one scale per row or one for all (then
/// repeated for every row).
pub fn quantize(x: &[f32], n: usize, how: ActScale) -> (Vec<u8>, Vec<f32>) {
    assert!(n > 0 && x.len().is_multiple_of(n));
    let rows = x.len() / n;
    let mut codes = vec![0u8; x.len()];
    let scales: Vec<f32> = match how {
        ActScale::PerToken => row_scales(x, n),
        ActScale::PerTensor => {
            let m = x.par_chunks(n).map(amax).reduce(|| 0.0, f32::max);
            vec![scale_for(m); rows]
        }
    };
    codes
        .par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .zip(&scales)
        .for_each(|((q, r), &s)| encode_with(r, s, q));
    (codes, scales)
}

/// Values of codes (exact in f32).
pub fn decode_codes(codes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; codes.len()];
    v.par_chunks_mut(1 << 16)
        .zip(codes.par_chunks(1 << 16))
        .for_each(|(v, c)| v.iter_mut().zip(c).for_each(|(v, &c)| *v = from_e4m3(c)));
    v
}

/// A linear layer's weight W [out, in] in E4M3, one scale per output channel, and how its
/// input is scaled: the FP8 GEMM of the emulation (module comment).
pub struct Fp8Linear {
    codes: Vec<u8>,   // [out, in]
    scales: Vec<f32>, // [out]
    n_in: usize,
    act: ActScale,
}

impl Fp8Linear {
    /// Quantizes W [n_out, in] (once, at load).
    pub fn new(w: &[f32], n_out: usize, act: ActScale) -> Self {
        assert!(n_out > 0 && w.len().is_multiple_of(n_out));
        let n_in = w.len() / n_out;
        let (codes, scales) = quantize(w, n_in, ActScale::PerToken); // a row = an output channel
        Fp8Linear {
            codes,
            scales,
            n_in,
            act,
        }
    }

    /// A layer from codes [out, in] and per-channel scales [out] already computed (a checkpoint
    /// written by `sgpt quantize`): the same layer as [`Fp8Linear::new`] of the weights they
    /// came from.
    pub fn from_parts(codes: Vec<u8>, scales: Vec<f32>, act: ActScale) -> Self {
        assert!(!scales.is_empty() && codes.len().is_multiple_of(scales.len()));
        let n_in = codes.len() / scales.len();
        Fp8Linear {
            codes,
            scales,
            n_in,
            act,
        }
    }

    /// The codes [out, in] and per-channel scales [out].
    pub fn parts(&self) -> (&[u8], &[f32]) {
        (&self.codes, &self.scales)
    }
}

/// One output of the FP8 GEMM from its unscaled sum: `acc·(sx·sw) + b`, each operation rounded
/// in f32 in that order (the GPU's epilogues use the same order, bit for bit).
#[inline(always)]
pub fn epilogue(acc: f32, sx: f32, sw: f32, b: f32) -> f32 {
    acc * (sx * sw) + b
}

impl LinearKernel for Fp8Linear {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let (n_out, n_in) = (self.scales.len(), self.n_in);
        assert!(b.len() == n_out && x.len().is_multiple_of(n_in));
        let t = x.len() / n_in;
        assert!(out.len() == t * n_out);
        if t == 0 {
            return;
        }
        // The FP8 operands, decoded: the same values the tensor cores would multiply.
        let (xq, sx) = quantize(x, n_in, self.act);
        let (xq, wq) = (decode_codes(&xq), decode_codes(&self.codes));
        // Σ_k qx·qw: exact products, f32 accumulation (module comment).
        let mut acc = vec![0f32; t * n_out];
        linear(&xq, &wq, &vec![0f32; n_out], &mut acc, false);
        // The epilogue: scales, bias, and the residual when accumulating.
        out.par_chunks_mut(n_out)
            .zip(acc.par_chunks(n_out))
            .zip(&sx)
            .for_each(|((o, a), &s)| {
                for j in 0..n_out {
                    let y = epilogue(a[j], s, self.scales[j], b[j]);
                    o[j] = if accumulate { o[j] + y } else { y };
                }
            });
    }
}

#[cfg(test)]
mod tests {
    //! The rounding is checked against an independent rule: the codes' values written out from
    //! the format's definition in f64, and a brute-force search for the nearest one.
    use super::*;

    /// The value of a code from the E4M3 definition, in f64 (None for NaN codes).
    fn value(c: u8) -> Option<f64> {
        let s = if c >= 128 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((c >> 3) & 15), f64::from(c & 7));
        if e == 15 && m == 7.0 {
            return None;
        }
        let mag = if e == 0 {
            m / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        };
        Some(s * mag)
    }

    /// The expected code of `x`: of the finite codes with x's sign, the nearest to x, and of two
    /// equally near the one whose last bit is 0. Beyond ±448 (±Inf too) the nearest finite code
    /// is ±448, since every other is smaller; said directly because f64 distances to a huge x
    /// all round to the same value.
    fn nearest(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 128u8 } else { 0 };
        if x.abs() > 448.0 {
            return sign | 0x7E;
        }
        let x = f64::from(x);
        let mut best: Option<(f64, u8)> = None;
        for c in (0u8..128).map(|c| c | sign) {
            let Some(v) = value(c) else { continue };
            let d = (v - x).abs();
            best = match best {
                Some((bd, bc)) if bd < d || (bd == d && bc & 1 == 0) => Some((bd, bc)),
                _ => Some((d, c)),
            };
        }
        best.unwrap().1
    }

    fn finite_positive() -> Vec<f64> {
        (0u8..0x7F).map(|c| value(c).unwrap()).collect()
    }

    #[test]
    fn decoding_matches_the_definition_and_the_spec_anchors() {
        for c in 0..=255u8 {
            match value(c) {
                None => assert!(from_e4m3(c).is_nan(), "{c:#x}"),
                Some(v) => assert_eq!(f64::from(from_e4m3(c)), v, "{c:#x}"),
            }
        }
        // Values the OCP FP8 spec lists for E4M3.
        assert_eq!(from_e4m3(0x7E), 448.0);
        assert_eq!(from_e4m3(0x08), 2f32.powi(-6));
        assert_eq!(from_e4m3(0x07), 0.875 * 2f32.powi(-6));
        assert_eq!(from_e4m3(0x01), 2f32.powi(-9));
        assert_eq!(from_e4m3(0x38), 1.0);
        assert!(from_e4m3(0x7F).is_nan() && from_e4m3(0xFF).is_nan());
        assert_eq!(from_e4m3(0xFE), -448.0);
        let v = finite_positive();
        assert!(v.windows(2).all(|w| w[0] < w[1]), "codes 0..0x7E increase");
    }

    #[test]
    fn rounding_is_nearest_ties_to_even_with_saturation() {
        let v = finite_positive();
        let mut xs: Vec<f32> = Vec::new();
        for w in v.windows(2) {
            let mid = ((w[0] + w[1]) / 2.0) as f32; // ≤ 5 significant bits: exact in f32
            assert_eq!(f64::from(mid), (w[0] + w[1]) / 2.0);
            xs.extend([
                w[0] as f32,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ]);
        }
        // Saturation, the boundary of the range, f32 subnormals, zeros, Inf.
        xs.extend([
            447.99,
            448.0,
            448.01,
            463.99,
            464.0,
            464.01,
            479.0,
            480.0,
            481.0,
            500.0,
            1e30,
            f32::MAX,
            2f32.powi(-10),
            3.0 * 2f32.powi(-10),
            1e-45,
            1e-40,
            1e-20,
            0.0,
            f32::INFINITY,
        ]);
        // Log-uniform over the whole range and beyond (seeded).
        let u = crate::seeded::uniform(40_000, 7, 1.0);
        xs.extend(
            u.chunks(2)
                .map(|p| (p[0] * 2.0).signum() * 2f32.powf(p[1] * 13.0 - 3.0)),
        );
        let negated: Vec<f32> = xs.iter().map(|x| -x).collect();
        xs.extend(negated);
        let mut ties = 0;
        for &x in &xs {
            let want = nearest(x);
            assert_eq!(to_e4m3(x), want, "x = {x:e} ({:#010x})", x.to_bits());
            ties += usize::from(
                value(want).is_some_and(|w| (w - f64::from(x)).abs() > 0.0)
                    && v.windows(2)
                        .any(|p| f64::from(x.abs()) * 2.0 == p[0] + p[1]),
            );
        }
        assert!(ties > 200, "the ties were exercised ({ties})");
        // Where ties must go, spelled out: between 1.0 (M=0) and 1.125 (M=1) to 1.0; between
        // 1.125 and 1.25 (M=2) to 1.25; between 0 and 2^−9 to 0; 2^−6 (M=0) over 0.875·2^−6.
        assert_eq!(from_e4m3(to_e4m3(1.0625)), 1.0);
        assert_eq!(from_e4m3(to_e4m3(1.1875)), 1.25);
        assert_eq!(from_e4m3(to_e4m3(2f32.powi(-10))), 0.0);
        assert_eq!(from_e4m3(to_e4m3(0.9375 * 2f32.powi(-6))), 2f32.powi(-6));
        assert_eq!(to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert!(from_e4m3(to_e4m3(f32::NAN)).is_nan());
        assert!(from_e4m3(to_e4m3(-f32::NAN)).is_nan());
        // Round trip of every finite code.
        for c in (0..=255u8).filter(|&c| value(c).is_some()) {
            assert_eq!(to_e4m3(from_e4m3(c)), c, "{c:#x}");
        }
    }

    #[test]
    fn scales_put_each_rows_largest_element_on_448() {
        let n = 37;
        let mut x = crate::seeded::uniform(5 * n, 3, 2.0);
        x[2 * n..3 * n].fill(0.0); // an all-zero row
        x[3 * n + 5] = -1e4; // a row with one outlier
        let (codes, s) = quantize(&x, n, ActScale::PerToken);
        for r in 0..5 {
            let row = &x[r * n..(r + 1) * n];
            let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let q: Vec<f32> = codes[r * n..(r + 1) * n]
                .iter()
                .map(|&c| from_e4m3(c))
                .collect();
            if m == 0.0 {
                assert!(q.iter().all(|&v| v == 0.0));
                continue;
            }
            assert_eq!(s[r], m / 448.0);
            assert_eq!(q.iter().fold(0f32, |a, v| a.max(v.abs())), 448.0);
            for (&xv, &qv) in row.iter().zip(&q) {
                // Within half a step of E4M3's grid: 2^−4 relative for normals, 2^−10·s absolute
                // for subnormals.
                let err = (qv * s[r] - xv).abs();
                assert!(
                    err <= xv.abs() / 16.0 + s[r] / 1024.0,
                    "{xv} → {}",
                    qv * s[r]
                );
            }
        }
        let (_, st) = quantize(&x, n, ActScale::PerTensor);
        assert!(st.iter().all(|&v| v == 1e4 / 448.0), "{st:?}");
    }

    /// The emulated GEMM against loops in f64 over the nearest-code rounding above.
    #[test]
    fn fp8_linear_matches_a_direct_computation() {
        let (t, n_in, n_out) = (6, 70, 9);
        let mut x = crate::seeded::uniform(t * n_in, 11, 3.0);
        x[n_in + 4] = 90.0; // an outlier channel in token 1
        let w = crate::seeded::uniform(n_out * n_in, 12, 0.05);
        let b = crate::seeded::uniform(n_out, 13, 0.1);
        let q = |v: &[f32], s: f32| -> Vec<f64> {
            v.iter().map(|&e| value(nearest(e / s)).unwrap()).collect()
        };
        let amax = |v: &[f32]| v.iter().fold(0f32, |m, e| m.max(e.abs()));
        for act in [ActScale::PerToken, ActScale::PerTensor] {
            let lin = Fp8Linear::new(&w, n_out, act);
            let mut got = crate::seeded::uniform(t * n_out, 14, 1.0);
            let before = got.clone();
            lin.forward(&x, &b, &mut got, true);
            let tensor_s = amax(&x) / 448.0;
            let mut worst_vs_f32 = 0f64;
            for r in 0..t {
                let xr = &x[r * n_in..(r + 1) * n_in];
                let sx = match act {
                    ActScale::PerToken => amax(xr) / 448.0,
                    ActScale::PerTensor => tensor_s,
                };
                let qx = q(xr, sx);
                for o in 0..n_out {
                    let wr = &w[o * n_in..(o + 1) * n_in];
                    let sw = amax(wr) / 448.0;
                    let dot: f64 = qx.iter().zip(q(wr, sw)).map(|(a, b)| a * b).sum();
                    let want = f64::from(before[r * n_out + o])
                        + dot * f64::from(sx) * f64::from(sw)
                        + f64::from(b[o]);
                    let g = f64::from(got[r * n_out + o]);
                    assert!(
                        (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{act:?} {r},{o}: {g} vs {want}"
                    );
                    let exact: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let plain = f64::from(before[r * n_out + o]) + exact + f64::from(b[o]);
                    worst_vs_f32 = worst_vs_f32.max((g - plain).abs());
                }
            }
            // And it is not the f32 product: the tolerance above is far below FP8's error.
            assert!(worst_vs_f32 > 1e-3, "{act:?}: {worst_vs_f32}");
        }
    }

    /// `fp8-alternate` puts blocks 1, 3, 5, … in FP8, never block 0; `fp8` every block.
    #[test]
    fn fp8_blocks_rule() {
        let picked = |b: Fp8Blocks| (0..7).filter(|&l| b.covers(l)).collect::<Vec<_>>();
        assert_eq!(picked(Fp8Blocks::Alternate), [1, 3, 5]);
        assert_eq!(picked(Fp8Blocks::All), [0, 1, 2, 3, 4, 5, 6]);
        // bloom-7b1 (30 blocks), bloom-560m (24), sgpt-tiny (2), one block, an odd count.
        for (l, alt) in [(30, 15), (24, 12), (2, 1), (1, 0), (5, 2)] {
            assert_eq!(Fp8Blocks::Alternate.count(l), alt, "{l}");
            assert_eq!(Fp8Blocks::All.count(l), l);
        }
    }
}
