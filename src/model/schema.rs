//! The BLOOM checkpoint schema, written once: every tensor a `BloomModel` has, with its shape,
//! and the checks a checkpoint must pass before any backend reads it. `ModelDir::open` runs
//! [`check`] (so `embed`, `serve`, `eval` and `inspect` all do), and `sgpt bench` builds its
//! random checkpoints from [`tensors`].

use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::weights::{Checkpoint, DType};

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

/// The four linear layers' weights of block `i`, in forward order (QKV, dense, FC1, FC2): the
/// tensors a checkpoint written by `sgpt quantize` may store as E4M3 codes.
pub fn linear_weights(i: usize) -> [String; 4] {
    [
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ]
    .map(|p| format!("h.{i}.{p}.weight"))
}

/// The name of the per-output-channel scales stored beside E4M3 weights `weight`.
pub fn scale_name(weight: &str) -> String {
    format!("{weight}_scale")
}

/// `name` must not be stored both with and without the `transformer.` prefix.
fn stored_once(ckpt: &Checkpoint, name: &str) -> Result<()> {
    let prefixed = format!("transformer.{name}");
    if ckpt.contains(name) && ckpt.contains(&prefixed) {
        return Err(Error::config(
            &ckpt.dir,
            format!(
                "tensor `{name}` is stored twice, as `{name}` and `{prefixed}`: which one is \
                 meant is ambiguous"
            ),
        ));
    }
    Ok(())
}

/// The blocks whose linear layers are stored as E4M3 codes (0-based, ascending), after
/// [`check`] made sure each block's four agree.
pub fn fp8_blocks_stored(ckpt: &Checkpoint, c: &BloomConfig) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for i in 0..c.layers {
        if ckpt.get_any(&linear_weights(i)[0])?.dtype == DType::F8E4M3 {
            v.push(i);
        }
    }
    Ok(v)
}

/// Checks `ckpt` against the schema for `c`: every tensor present once (stored with or without
/// the `transformer.` prefix, never both), with its shape and a float dtype; no tensor the
/// schema does not know (e.g. a block beyond `n_layer`: the checkpoint belongs to another
/// config). The four linear layers' weights may instead be E4M3 codes with their f32 scales
/// `<name>_scale` [out] (`sgpt quantize`), all four of a block or none. Reads only headers.
pub fn check(ckpt: &Checkpoint, c: &BloomConfig) -> Result<()> {
    let spec = tensors(c);
    for t in &spec {
        stored_once(ckpt, &t.name)?;
        ckpt.get_any(&t.name)?.expect_shape(&t.shape)?;
        if t.role != Role::Matrix || !t.name.starts_with("h.") {
            ckpt.get(&t.name)?; // a float, not codes
        }
    }
    // E4M3 linear layers: each with its F32 scales, and all four of a block or none.
    let mut scales = Vec::new();
    for i in 0..c.layers {
        let names = linear_weights(i);
        let mut fp8 = Vec::new();
        for n in &names {
            let t = ckpt.get_any(n)?;
            if t.dtype == DType::F8E4M3 {
                stored_once(ckpt, &scale_name(n))?;
                let s = ckpt.get_shaped(&scale_name(n), &t.shape[..1])?;
                if s.dtype != DType::F32 {
                    return Err(Error::Dtype {
                        path: s.file,
                        name: s.name,
                        got: s.dtype.name().into(),
                        expected: "F32 (the scales of E4M3 weights)",
                    });
                }
                scales.push(scale_name(n));
                fp8.push(n.as_str());
            }
        }
        if !fp8.is_empty() && fp8.len() < names.len() {
            return Err(Error::config(
                &ckpt.dir,
                format!(
                    "block {i} stores {} as E4M3 codes but not the rest of its linear layers: \
                     all four or none (`sgpt quantize` writes all four)",
                    fp8.join(", ")
                ),
            ));
        }
    }
    let known: std::collections::HashSet<&str> = spec
        .iter()
        .map(|t| t.name.as_str())
        .chain(scales.iter().map(String::as_str))
        .collect();
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
