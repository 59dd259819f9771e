//! BLOOM's GELU, tanh form with its truncated constant (docs/semantics.md):
//! `0.5·x·(1 + tanh(0.79788456·x·(1 + 0.044715·x²)))`.

use rayon::prelude::*;

use super::vmath;

/// The constant is BLOOM's literal 0.79788456 (sqrt(2/π) truncated), kept as written. The
/// definition, one value at a time: the oracle of [`gelu_inplace`] and of the GPU kernels.
#[inline]
#[allow(clippy::excessive_precision)]
pub fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + (0.797_884_56 * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// [`gelu`] rewritten so that a loop over a slice vectorizes: `0.5·(1 + tanh(u)) = 1/(1 + e^(-2u))`,
/// with [`vmath::exp`] in place of libm's scalar `tanh`. Within 1e-6·max(1, |x|) of [`gelu`]
/// (tested below).
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn gelu_fast(x: f32) -> f32 {
    let u = 0.797_884_56 * x * (1.0 + 0.044715 * x * x);
    x / (1.0 + vmath::exp(-2.0 * u))
}

/// Values per task: below this a slice is done on the calling thread (no hand-off).
const PER_TASK: usize = 1 << 15;

pub fn gelu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(PER_TASK)
        .for_each(|c| vmath::with_simd(|| c.iter_mut().for_each(|v| *v = gelu_fast(*v))));
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::excessive_precision)] // values as torch printed them
    fn known_values() {
        // torch: BloomGelu()(tensor([-3., -1., 0., 1., 3.]))
        let want = [-0.003637433, -0.158807993, 0.0, 0.841192007, 2.996362686];
        for (x, w) in [-3.0f32, -1.0, 0.0, 1.0, 3.0].iter().zip(want) {
            assert!(
                (super::gelu(*x) - w).abs() < 1e-6,
                "gelu({x}) = {}",
                super::gelu(*x)
            );
            assert!((super::gelu_fast(*x) - w).abs() < 1e-6, "gelu_fast({x})");
        }
    }

    #[test]
    fn fast_form_equals_the_definition() {
        // every 1e-3 over [-12, 12], plus far tails
        let mut x: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect();
        x.extend([-1e4, -100.0, -30.0, 30.0, 100.0, 1e4]);
        let mut y = x.clone();
        super::gelu_inplace(&mut y);
        for (&x, &y) in x.iter().zip(&y) {
            let want = super::gelu(x);
            assert!(
                (y - want).abs() <= 1e-6 * want.abs().max(1.0),
                "x = {x}: {y} vs {want}"
            );
        }
    }
}
