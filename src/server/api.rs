//! The two request/response dialects and the checks they share: OpenAI's `/v1/embeddings` and
//! text-embeddings-inference's `/embed`. Pure functions of the request (no I/O), so each rule
//! is unit-tested here and the handlers in `routes.rs` only sequence them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::cpu::pooling::l2_normalize;
use crate::model::tokenize::{py_rstrip, Kind};
use crate::server::errors::{ApiError, ErrorKind};

/// `POST /v1/embeddings` (OpenAI). Unknown fields are ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
pub struct OpenAiRequest {
    /// A string or a list of strings.
    pub input: Value,
    /// Echoed in the response; any name is accepted (one model is served).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Keep the first `dimensions` values and re-normalize (Matryoshka-style truncation).
    #[serde(default)]
    pub dimensions: Option<i64>,
    /// Accepted for compatibility and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
    /// Extension: `"query"` (default, `[ ]` brackets) or `"document"` (`{ }`).
    #[serde(default)]
    pub input_type: Option<Kind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    /// Base64 of the little-endian float32 bytes, as OpenAI sends it.
    Base64,
}

/// `POST /embed` (text-embeddings-inference).
#[derive(Debug, Deserialize)]
pub struct TeiRequest {
    /// A string or a list of strings.
    pub inputs: Value,
    /// Unit length (TEI's default); `false` gives the reference's raw pooled vectors.
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Cut texts over the limit (default: the server's `--no-auto-truncate` setting).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Only `Right` (SGPT truncates on the right).
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    #[serde(default)]
    pub input_type: Option<Kind>,
    #[serde(default)]
    pub dimensions: Option<i64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TruncationDirection {
    #[serde(alias = "left", alias = "LEFT")]
    Left,
    #[serde(alias = "right", alias = "RIGHT")]
    Right,
}

/// Parses a body with the field path of any type error (for OpenAI's `param`).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(ApiError::from_json_error)?;
    de.end().map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidJson,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    Ok(v)
}

/// The texts of `input`/`inputs`: one string or a non-empty list of strings, at most `max` of
/// them, none empty after Python's `rstrip()` (the reference strips trailing whitespace).
pub fn texts(value: Value, field: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let items = match value {
        Value::String(s) => vec![Value::String(s)],
        Value::Array(items) => items,
        other => {
            return Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!(
                    "`{field}` must be a string or a list of strings, got {}",
                    json_type(&other)
                ),
            )
            .with_param(field))
        }
    };
    if items.is_empty() {
        return Err(ApiError::new(
            ErrorKind::Empty,
            format!("`{field}` is an empty list: give at least one text"),
        )
        .with_param(field));
    }
    if items.len() > max {
        return Err(ApiError::new(
            ErrorKind::TooManyInputs,
            format!(
                "`{field}` has {} texts; this server takes at most {max} per request \
                 (--max-client-batch-size): split the request",
                items.len()
            ),
        )
        .with_param(field));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) if py_rstrip(&s).is_empty() => Err(ApiError::new(
                ErrorKind::Empty,
                format!("`{field}[{i}]` is empty or only whitespace: there is nothing to embed"),
            )
            .with_param(format!("{field}[{i}]"))),
            Value::String(s) => Ok(s),
            Value::Number(_) | Value::Array(_) => Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!(
                    "`{field}[{i}]` is a token id or a list of token ids: token-id inputs are not \
                     supported, send text (the server tokenizes with the model's own tokenizer \
                     and adds SGPT's query/document brackets)"
                ),
            )
            .with_param(format!("{field}[{i}]"))),
            other => Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!("`{field}[{i}]` must be a string, got {}", json_type(&other)),
            )
            .with_param(format!("{field}[{i}]"))),
        })
        .collect()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `dimensions` checked against the model's hidden size H: 1..=H, or all H when absent.
pub fn dimensions(requested: Option<i64>, hidden: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(hidden),
        Some(d) if d >= 1 && d as u64 <= hidden as u64 => Ok(d as usize),
        Some(d) => Err(ApiError::new(
            ErrorKind::InvalidValue,
            format!("`dimensions` must be between 1 and {hidden} (the model's size), got {d}"),
        )
        .with_param("dimensions")),
    }
}

/// Rows of `raw` ([n, H]) cut to their first `dims` values, each scaled to unit length when
/// `normalize` (after the cut, so a shortened vector is unit length too). The scaling is
/// `cpu::pooling::l2_normalize`, the one `sgpt embed --normalize` uses.
pub fn finish(raw: &[f32], hidden: usize, dims: usize, normalize: bool) -> Vec<Vec<f32>> {
    raw.chunks_exact(hidden)
        .map(|row| {
            let mut v = row[..dims].to_vec();
            if normalize {
                l2_normalize(&mut v, dims);
            }
            v
        })
        .collect()
}

/// OpenAI's base64 encoding: the float32 values' little-endian bytes.
pub fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The kind of every text of a request: its `input_type`, or the server's default.
pub fn kind(requested: Option<Kind>, default: Kind) -> Kind {
    requested.unwrap_or(default)
}

#[derive(Debug, Serialize)]
pub struct OpenAiResponse {
    pub object: &'static str,
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    pub object: &'static str,
    pub embedding: EmbeddingValue,
    pub index: usize,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

/// Tokens actually embedded: every kept token, both brackets included.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

impl OpenAiResponse {
    pub fn new(
        vectors: Vec<Vec<f32>>,
        format: EncodingFormat,
        model: String,
        tokens: usize,
    ) -> Self {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| OpenAiEmbedding {
                object: "embedding",
                embedding: match format {
                    EncodingFormat::Float => EmbeddingValue::Float(v),
                    EncodingFormat::Base64 => EmbeddingValue::Base64(base64_f32(&v)),
                },
                index,
            })
            .collect();
        OpenAiResponse {
            object: "list",
            data,
            model,
            usage: Usage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_are_validated() {
        assert_eq!(texts(json!("a"), "input", 2).unwrap(), vec!["a"]);
        assert_eq!(
            texts(json!(["a", " b"]), "input", 2).unwrap(),
            vec!["a", " b"]
        );
        let e = texts(json!([]), "input", 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Empty);
        let e = texts(json!(["a", "b", "c"]), "inputs", 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooManyInputs);
        assert!(e.message.contains("at most 2"), "{}", e.message);
        let e = texts(json!(["a", " \n"]), "input", 2).unwrap_err();
        assert_eq!(
            (e.kind, e.param.as_deref()),
            (ErrorKind::Empty, Some("input[1]"))
        );
        assert_eq!(
            texts(json!(""), "input", 2).unwrap_err().kind,
            ErrorKind::Empty
        );
        let e = texts(json!([[1, 2, 3]]), "input", 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidValue);
        assert!(e.message.contains("token-id inputs are not supported"));
        assert_eq!(
            texts(json!([1, 2]), "input", 2).unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        assert_eq!(
            texts(json!({"a": 1}), "input", 2).unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        assert_eq!(
            texts(json!(["a", null]), "input", 2).unwrap_err().kind,
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn dimensions_are_bounded() {
        assert_eq!(dimensions(None, 64).unwrap(), 64);
        assert_eq!(dimensions(Some(1), 64).unwrap(), 1);
        assert_eq!(dimensions(Some(64), 64).unwrap(), 64);
        for bad in [0, -1, 65] {
            assert_eq!(
                dimensions(Some(bad), 64).unwrap_err().kind,
                ErrorKind::InvalidValue
            );
        }
    }

    #[test]
    fn finish_cuts_then_normalizes() {
        let raw = [3.0, 4.0, 12.0, 0.0, 0.0, 5.0];
        assert_eq!(
            finish(&raw, 3, 3, false),
            vec![vec![3.0, 4.0, 12.0], vec![0.0, 0.0, 5.0]]
        );
        let unit = finish(&raw, 3, 2, true);
        assert_eq!(unit, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000 → bytes 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn bodies_parse() {
        let r: OpenAiRequest = parse_body(
            br#"{"input": ["a"], "model": "m", "encoding_format": "base64", "dimensions": 8,
                 "user": "u", "input_type": "document", "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(r.encoding_format, Some(EncodingFormat::Base64));
        assert_eq!(r.input_type, Some(Kind::Document));
        let e = parse_body::<OpenAiRequest>(br#"{"input": "a", "encoding_format": "f16"}"#)
            .unwrap_err();
        assert_eq!(
            (e.kind, e.param.as_deref()),
            (ErrorKind::InvalidValue, Some("encoding_format"))
        );
        let e = parse_body::<OpenAiRequest>(br#"{"input": "a"} x"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidJson);
        let t: TeiRequest = parse_body(br#"{"inputs": "a"}"#).unwrap();
        assert!(t.normalize && t.truncate.is_none());
        let t: TeiRequest =
            parse_body(br#"{"inputs": "a", "truncation_direction": "Right"}"#).unwrap();
        assert_eq!(t.truncation_direction, Some(TruncationDirection::Right));
    }
}
