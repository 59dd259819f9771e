//! BLOOM's GELU, tanh form with its truncated constant (docs/semantics.md):
//! `0.5·x·(1 + tanh(0.79788456·x·(1 + 0.044715·x²)))`.

use rayon::prelude::*;

/// The constant is BLOOM's literal 0.79788456 (sqrt(2/π) truncated), kept as written.
#[inline]
#[allow(clippy::excessive_precision)]
pub fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + (0.797_884_56 * x * (1.0 + 0.044715 * x * x)).tanh())
}

pub fn gelu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(4096)
        .for_each(|c| c.iter_mut().for_each(|v| *v = gelu(*v)));
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
        }
    }
}
