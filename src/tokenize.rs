//! Tokenization with SGPT's "special brackets" (SPEC.md): a query is `[` + tokens + `]`, a
//! document `{` + tokens + `}`; no BOS/EOS; trailing whitespace removed first (Python's
//! `str.rstrip()`); the text is cut on the right to `max_seq_length - 3` tokens.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// Queries and documents are marked with different brackets, so the kind must be explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Query,
    Document,
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "query" => Ok(Kind::Query),
            "document" => Ok(Kind::Document),
            other => Err(Error::Input(format!(
                "unknown kind {other:?}: expected \"query\" or \"document\""
            ))),
        }
    }
}

/// One tokenized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, brackets included.
    pub ids: Vec<u32>,
    /// Text tokens before truncation (without brackets).
    pub text_tokens: usize,
    pub truncated: bool,
}

pub struct SpecbTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// `[`, `]` for queries.
    query: (u32, u32),
    /// `{`, `}` for documents.
    document: (u32, u32),
    max_text_tokens: usize,
}

impl SpecbTokenizer {
    /// Loads `tokenizer.json`; `vocab_rows` is the embedding matrix's row count, which every id
    /// the tokenizer can produce must fit.
    pub fn from_file(path: &Path, max_seq_length: usize, vocab_rows: usize) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let err = |msg: String| Error::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let size = inner.get_vocab_size(true);
        if size > vocab_rows {
            return Err(err(format!(
                "vocabulary of {size} tokens does not fit the model's embedding matrix of {vocab_rows} \
                 rows: tokenizer and weights do not belong together"
            )));
        }
        let first = |s: &str| -> Result<u32> {
            let enc = inner.encode(s, false).map_err(|e| err(e.to_string()))?;
            enc.get_ids()
                .first()
                .copied()
                .ok_or_else(|| err(format!("{s:?} encodes to no token")))
        };
        if max_seq_length < 4 {
            return Err(err(format!("max_seq_length {max_seq_length} is too small")));
        }
        Ok(SpecbTokenizer {
            query: (first("[")?, first("]")?),
            document: (first("{")?, first("}")?),
            inner,
            path: path.to_path_buf(),
            max_text_tokens: max_seq_length - 3,
        })
    }

    /// Most text tokens kept (brackets excluded).
    pub fn max_text_tokens(&self) -> usize {
        self.max_text_tokens
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn brackets(&self, kind: Kind) -> (u32, u32) {
        match kind {
            Kind::Query => self.query,
            Kind::Document => self.document,
        }
    }

    pub fn encode(&self, text: &str, kind: Kind) -> Result<Encoded> {
        let text = py_rstrip(text);
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })?;
        let toks = enc.get_ids();
        let keep = toks.len().min(self.max_text_tokens);
        let (open, close) = self.brackets(kind);
        let mut ids = Vec::with_capacity(keep + 2);
        ids.push(open);
        ids.extend_from_slice(&toks[..keep]);
        ids.push(close);
        Ok(Encoded {
            ids,
            text_tokens: toks.len(),
            truncated: toks.len() > keep,
        })
    }
}

/// Python's `str.rstrip()` with no argument: Rust's `char::is_whitespace` plus U+001C..U+001F,
/// which Python also counts as whitespace (they are Unicode "B"/"S" separators).
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// A document with a title is embedded as `title + " " + text` (SGPT's BEIR code).
pub fn join_title(title: Option<&str>, text: &str) -> String {
    match title {
        Some(t) if !t.is_empty() => format!("{t} {text}"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rstrip_matches_python() {
        assert_eq!(py_rstrip("  a b \t\n\u{3000}\u{1f}"), "  a b");
        assert_eq!(py_rstrip("\u{200b}"), "\u{200b}"); // zero-width space is not whitespace
        assert_eq!(py_rstrip(" \u{a0}\u{85}"), "");
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("query".parse::<Kind>().unwrap(), Kind::Query);
        assert_eq!("document".parse::<Kind>().unwrap(), Kind::Document);
        assert!("doc".parse::<Kind>().is_err());
    }
}
