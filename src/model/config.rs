//! Model directory configuration: `config.json` (BLOOM, old or new key spellings),
//! `sentence_bert_config.json` (max_seq_length) and `1_Pooling/config.json` (must be weighted mean).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// BLOOM dimensions, as read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BloomConfig {
    /// H: hidden size.
    pub hidden: usize,
    /// L: number of transformer blocks.
    pub layers: usize,
    /// n: attention heads.
    pub heads: usize,
    /// V: rows of the embedding matrix (may exceed the tokenizer's vocabulary).
    pub vocab: usize,
    pub eps: f32,
}

impl BloomConfig {
    /// d: head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Parameters besides the embedding matrix: what a forward streams from memory (6.04 G for
    /// bloom-7b1, docs/semantics.md).
    pub fn non_embedding_params(&self) -> usize {
        let h = self.hidden;
        // per block: 2 layernorms, QKV, dense, two MLP matrices, with biases
        let per_block =
            4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h);
        self.layers * per_block + 4 * h // + embedding and final layernorms
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json(path)?;
        Self::from_json(&v, path)
    }

    /// Accepts both spellings BLOOM configs were published with: `n_embed`|`hidden_size`,
    /// `n_layer`|`num_hidden_layers`, `n_head`|`num_attention_heads`. If both are present they
    /// must agree.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::config(path, "expected a JSON object"));
        }
        if let Some(mt) = v.get("model_type").and_then(Value::as_str) {
            if mt != "bloom" {
                return Err(Error::config(
                    path,
                    format!("model_type is \"{mt}\", only \"bloom\" is supported"),
                ));
            }
        }
        let dim = |keys: &[&str]| -> Result<usize> {
            let mut found: Option<(usize, &str)> = None;
            for &k in keys {
                let Some(x) = v.get(k) else { continue };
                let n = x.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    Error::config(path, format!("`{k}` must be a positive integer, got {x}"))
                })? as usize;
                if let Some((m, k0)) = found {
                    if m != n {
                        return Err(Error::config(
                            path,
                            format!("`{k0}` = {m} and `{k}` = {n} disagree"),
                        ));
                    }
                }
                found = Some((n, k));
            }
            found
                .map(|(n, _)| n)
                .ok_or_else(|| Error::config(path, format!("missing `{}`", keys.join("` or `"))))
        };
        let hidden = dim(&["hidden_size", "n_embed"])?;
        let layers = dim(&["n_layer", "num_hidden_layers"])?;
        let heads = dim(&["n_head", "num_attention_heads"])?;
        let vocab = dim(&["vocab_size"])?;
        let eps = match v.get("layer_norm_epsilon") {
            None => 1e-5,
            Some(x) => x
                .as_f64()
                .filter(|e| *e > 0.0)
                .ok_or_else(|| Error::config(path, format!("bad layer_norm_epsilon {x}")))?
                as f32,
        };
        // Flags that change the forward and that the engine does not implement: refused, never
        // silently ignored. (Dropout, caching and tensor-parallel flags do not change inference.)
        if v.get("apply_residual_connection_post_layernorm") == Some(&Value::Bool(true)) {
            return Err(Error::Unsupported(format!(
                "{}: apply_residual_connection_post_layernorm = true is not supported (no \
                 published BLOOM checkpoint uses it; the engine takes the residual before the \
                 layernorm)",
                path.display()
            )));
        }
        if hidden % heads != 0 {
            return Err(Error::config(
                path,
                format!("hidden size {hidden} is not divisible by {heads} heads"),
            ));
        }
        Ok(BloomConfig {
            hidden,
            layers,
            heads,
            vocab,
            eps,
        })
    }
}

/// `sentence_bert_config.json` + `1_Pooling/config.json`: how texts become one vector.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// Longest sequence in tokens, brackets included minus one (see docs/semantics.md: 300 → 297 text tokens).
    pub max_seq_length: usize,
}

pub const DEFAULT_MAX_SEQ_LENGTH: usize = 300;

impl SentenceConfig {
    pub fn from_dir(dir: &Path, hidden: usize) -> Result<Self> {
        let st = dir.join("sentence_bert_config.json");
        let max_seq_length = if st.exists() {
            let v = read_json(&st)?;
            match v.get("max_seq_length") {
                None | Some(Value::Null) => DEFAULT_MAX_SEQ_LENGTH,
                Some(x) => x.as_u64().filter(|&n| n >= 4).ok_or_else(|| {
                    Error::config(
                        &st,
                        format!("max_seq_length must be an integer ≥ 4, got {x}"),
                    )
                })? as usize,
            }
        } else {
            DEFAULT_MAX_SEQ_LENGTH
        };
        let modules = dir.join("modules.json");
        if modules.exists() {
            check_modules(&read_json(&modules)?, &modules)?;
        }
        let pooling = dir.join("1_Pooling").join("config.json");
        if pooling.exists() {
            check_pooling(&read_json(&pooling)?, &pooling, hidden)?;
        }
        Ok(SentenceConfig { max_seq_length })
    }
}

/// sentence-transformers' module list: SGPT is a Transformer followed by Pooling. Any other
/// module (Normalize, Dense, …) would change the vectors the reference returns, so it is refused
/// rather than skipped.
fn check_modules(v: &Value, path: &Path) -> Result<()> {
    let list = v
        .as_array()
        .ok_or_else(|| Error::config(path, "expected a JSON array of modules"))?;
    let types: Vec<&str> = list
        .iter()
        .map(|m| m.get("type").and_then(Value::as_str).unwrap_or("<no type>"))
        .collect();
    let short: Vec<&str> = types
        .iter()
        .map(|t| t.rsplit('.').next().unwrap_or(t))
        .collect();
    match short.as_slice() {
        ["Transformer", "Pooling"] => Ok(()),
        [.., "Normalize"] if short.len() == 3 && short[..2] == ["Transformer", "Pooling"] => {
            Err(Error::Unsupported(format!(
                "{}: the model ends in a Normalize module, which sgpt does not apply implicitly; \
                 remove it from modules.json and ask for unit vectors explicitly (`--normalize`, \
                 or `normalize: true` on the server's /embed)",
                path.display()
            )))
        }
        _ => Err(Error::Unsupported(format!(
            "{}: modules {types:?} are not supported; SGPT models are a Transformer followed \
             by weighted-mean Pooling",
            path.display()
        ))),
    }
}

/// SGPT uses weighted-mean pooling; any other mode would silently give different vectors.
fn check_pooling(v: &Value, path: &Path, hidden: usize) -> Result<()> {
    if let Some(dim) = v.get("word_embedding_dimension").and_then(Value::as_u64) {
        if dim as usize != hidden {
            return Err(Error::config(
                path,
                format!("word_embedding_dimension {dim} does not match the model's hidden size {hidden}"),
            ));
        }
    }
    // Newer sentence-transformers may write a single `pooling_mode` string.
    if let Some(mode) = v.get("pooling_mode").and_then(Value::as_str) {
        return if mode == "weightedmean" {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{}: pooling mode \"{mode}\" is not supported; SGPT models use \"weightedmean\"",
                path.display()
            )))
        };
    }
    let obj = v
        .as_object()
        .ok_or_else(|| Error::config(path, "expected a JSON object"))?;
    let enabled: Vec<&str> = obj
        .iter()
        .filter(|(k, x)| k.starts_with("pooling_mode_") && x.as_bool() == Some(true))
        .map(|(k, _)| k.trim_start_matches("pooling_mode_"))
        .collect();
    if enabled == ["weightedmean_tokens"] {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "{}: pooling modes {enabled:?} are not supported; SGPT models use weighted mean only \
             (pooling_mode_weightedmean_tokens)",
            path.display()
        )))
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut crate::model::weights::open_regular(path)?, &mut text)
        .map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|err| Error::Json {
        path: PathBuf::from(path),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn old_and_new_spellings_agree() {
        let p = Path::new("config.json");
        let new = json!({"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 10});
        let old = json!({"n_embed": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10});
        assert_eq!(
            BloomConfig::from_json(&new, p).unwrap(),
            BloomConfig::from_json(&old, p).unwrap()
        );
        let clash =
            json!({"hidden_size": 64, "n_embed": 32, "n_layer": 2, "n_head": 4, "vocab_size": 10});
        let e = BloomConfig::from_json(&clash, p).unwrap_err().to_string();
        assert!(e.contains("disagree"), "{e}");
        let bad = json!({"hidden_size": 65, "n_layer": 2, "n_head": 4, "vocab_size": 10});
        assert!(BloomConfig::from_json(&bad, p)
            .unwrap_err()
            .to_string()
            .contains("divisible"));
        let missing = json!({"hidden_size": 64, "n_head": 4, "vocab_size": 10});
        assert!(BloomConfig::from_json(&missing, p)
            .unwrap_err()
            .to_string()
            .contains("n_layer"));
    }

    #[test]
    fn unsupported_flags_and_modules_are_refused() {
        let p = Path::new("config.json");
        let post = json!({"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 10,
                          "apply_residual_connection_post_layernorm": true});
        let e = BloomConfig::from_json(&post, p).unwrap_err().to_string();
        assert!(
            e.contains("apply_residual_connection_post_layernorm"),
            "{e}"
        );
        let off = json!({"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 10,
                         "apply_residual_connection_post_layernorm": false});
        BloomConfig::from_json(&off, p).unwrap();

        let m = Path::new("modules.json");
        let st = |t: &str| json!({"type": format!("sentence_transformers.models.{t}")});
        check_modules(&json!([st("Transformer"), st("Pooling")]), m).unwrap();
        let e = check_modules(
            &json!([st("Transformer"), st("Pooling"), st("Normalize")]),
            m,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Normalize") && e.contains("--normalize"), "{e}");
        let e = check_modules(&json!([st("Transformer"), st("Pooling"), st("Dense")]), m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Dense"), "{e}");
        assert!(check_modules(&json!({"type": "x"}), m).is_err());
    }

    #[test]
    fn pooling_modes() {
        let p = Path::new("1_Pooling/config.json");
        let ok = json!({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": false,
                        "pooling_mode_weightedmean_tokens": true});
        check_pooling(&ok, p, 8).unwrap();
        let mean =
            json!({"pooling_mode_mean_tokens": true, "pooling_mode_weightedmean_tokens": false});
        assert!(check_pooling(&mean, p, 8)
            .unwrap_err()
            .to_string()
            .contains("mean_tokens"));
        assert!(check_pooling(&json!({"pooling_mode": "cls"}), p, 8).is_err());
        check_pooling(&json!({"pooling_mode": "weightedmean"}), p, 8).unwrap();
        assert!(check_pooling(&ok, p, 16).is_err());
    }
}
