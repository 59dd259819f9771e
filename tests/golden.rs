//! The CPU engine against the reference (transformers BloomModel + sentence-transformers
//! weighted-mean pooling), on golden data written by tools/make_fixtures.py.

mod common;

use common::{assert_close, load_golden, max_abs_diff};
use sgpt::backend::batch::PackedBatch;
use sgpt::backend::cpu::CpuModel;
use sgpt::model::ModelDir;

// Tolerances. Both sides compute in f32 from the same f32 weights (tiny-b's f16 weights are
// upcast on both sides); what differs is summation order (GEMM blocking, our f64 layernorm
// statistics vs torch's f32). That gives errors of a few ulps per op, growing with depth; the
// measured worst case is printed by `parity_report`. Hidden states are O(1) (layernormed) with
// a residual stream up to O(10), hence an absolute bound with a relative term.
const HIDDEN_ATOL: f32 = 2e-5;
const HIDDEN_RTOL: f32 = 2e-5;
const EMB_ATOL: f32 = 1e-5;
const EMB_RTOL: f32 = 1e-5;

fn check_model(name: &str) {
    let g = load_golden(name);
    let m = ModelDir::open(&g.model_dir).unwrap();
    assert_eq!((m.config.layers, m.config.hidden), (g.layers, g.hidden));
    let cpu = CpuModel::load(&m.checkpoint, &m.config).unwrap();
    let mut worst = (0f32, 0f32);
    for (k, t) in g.texts.iter().enumerate() {
        let label = format!(
            "{name} text {k} ({:?})",
            t.text.chars().take(24).collect::<String>()
        );
        let enc = m.tokenizer.encode(&t.text, t.kind).unwrap();
        assert_eq!(
            enc.ids, t.ids,
            "{label}: token ids differ from the reference"
        );
        assert_eq!(enc.truncated, t.truncated, "{label}: truncation flag");

        let n = t.ids.len();
        let mut states = vec![Vec::new(); g.layers + 1];
        let emb = cpu
            .forward(&PackedBatch::from_seqs(&[&t.ids[..]]), &mut |i, s| {
                states[i] = s.to_vec()
            })
            .unwrap();
        for (i, s) in states.iter().enumerate() {
            let want = &t.hidden[i * n * g.hidden..(i + 1) * n * g.hidden];
            assert_close(
                &format!("{label} hidden state {i}"),
                s,
                want,
                HIDDEN_ATOL,
                HIDDEN_RTOL,
            );
            worst.0 = worst.0.max(max_abs_diff(s, want));
        }
        assert_close(
            &format!("{label} embedding"),
            &emb,
            &t.embedding,
            EMB_ATOL,
            EMB_RTOL,
        );
        worst.1 = worst.1.max(max_abs_diff(&emb, &t.embedding));
    }
    println!(
        "{name}: max |Δ| hidden states {:.3e}, embeddings {:.3e}",
        worst.0, worst.1
    );
}

#[test]
fn tiny_model_matches_reference() {
    check_model("sgpt-tiny");
}

/// Non-power-of-two heads (6), f16 weights, sharded, `transformer.` prefix, old config keys,
/// max_seq_length 64, embedding rows beyond the tokenizer's vocabulary.
#[test]
fn tiny_b_matches_reference() {
    check_model("tiny-b");
}

/// A text alone and inside a ragged batch of other lengths gives the same embedding. Not
/// bit-exact: the GEMM may block differently for a different row count, so the bound is a few
/// f32 ulps of O(1) values.
#[test]
fn batch_invariance() {
    for name in ["sgpt-tiny", "tiny-b"] {
        let g = load_golden(name);
        let m = ModelDir::open(&g.model_dir).unwrap();
        let cpu = CpuModel::load(&m.checkpoint, &m.config).unwrap();
        let seqs: Vec<&[u32]> = g.texts.iter().map(|t| &t.ids[..]).collect();
        let together = cpu.embed(&PackedBatch::from_seqs(&seqs)).unwrap();
        // and in reverse order, so every text sits at a different offset
        let rev: Vec<&[u32]> = seqs.iter().rev().copied().collect();
        let reversed = cpu.embed(&PackedBatch::from_seqs(&rev)).unwrap();
        let h = g.hidden;
        for (k, s) in seqs.iter().enumerate() {
            let alone = cpu.embed(&PackedBatch::from_seqs(&[*s])).unwrap();
            assert_close(
                &format!("{name} text {k} in batch"),
                &together[k * h..(k + 1) * h],
                &alone,
                1e-6,
                1e-5,
            );
            let r = seqs.len() - 1 - k;
            assert_close(
                &format!("{name} text {k} reversed"),
                &reversed[r * h..(r + 1) * h],
                &alone,
                1e-6,
                1e-5,
            );
        }
    }
}
