//! The BLOOM checkpoint schema, written once: every tensor a `BloomModel` has, with its shape,
//! and the checks a checkpoint must pass before any backend reads it. `ModelDir::open` runs
//! [`check`] (so `embed`, `serve`, `eval` and `inspect` all do), and `sgpt bench` builds its
//! random checkpoints from [`tensors`].

use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::weights::Checkpoint;

/// What a tensor is, for code that fills or inspects weights by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A weight matrix or the embedding table.
    Matrix,
    /// A layernorm's scale.
    NormWeight,
    /// A bias (of a linear layer or a layernorm).
    Bias,
}

/// One tensor of the schema; `name` without the `transformer.` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

/// The tensors of one block, relative to `h.{i}.`.
fn block_tensors(h: usize) -> [(&'static str, Vec<usize>, Role); 12] {
    let f = 4 * h;
    use Role::*;
    [
        ("input_layernorm.weight", vec![h], NormWeight),
        ("input_layernorm.bias", vec![h], Bias),
        (
            "self_attention.query_key_value.weight",
            vec![3 * h, h],
            Matrix,
        ),
        ("self_attention.query_key_value.bias", vec![3 * h], Bias),
        ("self_attention.dense.weight", vec![h, h], Matrix),
        ("self_attention.dense.bias", vec![h], Bias),
        ("post_attention_layernorm.weight", vec![h], NormWeight),
        ("post_attention_layernorm.bias", vec![h], Bias),
        ("mlp.dense_h_to_4h.weight", vec![f, h], Matrix),
        ("mlp.dense_h_to_4h.bias", vec![f], Bias),
        ("mlp.dense_4h_to_h.weight", vec![h, f], Matrix),
        ("mlp.dense_4h_to_h.bias", vec![h], Bias),
    ]
}

/// Every tensor of a `BloomModel` with `c`'s dimensions, in forward order.
pub fn tensors(c: &BloomConfig) -> Vec<TensorSpec> {
    let h = c.hidden;
    let spec = |name: String, shape: Vec<usize>, role| TensorSpec { name, shape, role };
    let mut v = vec![
        spec(
            "word_embeddings.weight".into(),
            vec![c.vocab, h],
            Role::Matrix,
        ),
        spec(
            "word_embeddings_layernorm.weight".into(),
            vec![h],
            Role::NormWeight,
        ),
        spec("word_embeddings_layernorm.bias".into(), vec![h], Role::Bias),
    ];
    for i in 0..c.layers {
        for (n, s, r) in block_tensors(h) {
            v.push(spec(format!("h.{i}.{n}"), s, r));
        }
    }
    v.push(spec("ln_f.weight".into(), vec![h], Role::NormWeight));
    v.push(spec("ln_f.bias".into(), vec![h], Role::Bias));
    v
}

/// Stored names the engine never reads and that are legitimately there.
fn ignored(name: &str) -> bool {
    name.starts_with("lm_head.")
}

/// Checks `ckpt` against the schema for `c`: every tensor present once (stored with or without
/// the `transformer.` prefix, never both), with its shape and a float dtype; no tensor the
/// schema does not know (e.g. a block beyond `n_layer`: the checkpoint belongs to another
/// config). Reads only headers.
pub fn check(ckpt: &Checkpoint, c: &BloomConfig) -> Result<()> {
    let spec = tensors(c);
    for t in &spec {
        let prefixed = format!("transformer.{}", t.name);
        if ckpt.contains(&t.name) && ckpt.contains(&prefixed) {
            return Err(Error::config(
                &ckpt.dir,
                format!(
                    "tensor `{}` is stored twice, as `{}` and `{prefixed}`: which one is meant \
                     is ambiguous",
                    t.name, t.name
                ),
            ));
        }
        ckpt.get_shaped(&t.name, &t.shape)?;
    }
    let known: std::collections::HashSet<&str> = spec.iter().map(|t| t.name.as_str()).collect();
    let mut unknown: Vec<&str> = ckpt
        .stored_names()
        .filter(|n| !ignored(n))
        .filter(|n| !known.contains(n.strip_prefix("transformer.").unwrap_or(n)))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        let block = first
            .strip_prefix("transformer.")
            .unwrap_or(first)
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let why = match block {
            Some(i) if i >= c.layers => format!(
                "it has block {i} but config.json says n_layer = {}: checkpoint and config do \
                 not belong together",
                c.layers
            ),
            _ => "not a BLOOM tensor: is this a BLOOM checkpoint?".to_string(),
        };
        return Err(Error::config(
            &ckpt.dir,
            format!(
                "unexpected tensor `{first}` ({} unexpected in all): {why}",
                unknown.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_560m_has_the_published_parameter_count() {
        let c = crate::bench::shape("bloom-560m").unwrap();
        let params: usize = tensors(&c)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        // 559,214,592 parameters in bigscience/bloom-560m's BloomModel.
        assert_eq!(params, 559_214_592);
        assert_eq!(params - c.vocab * c.hidden, c.non_embedding_params());
    }
}
