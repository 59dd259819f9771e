//! Inputs and outputs of `sgpt embed`: texts from plain lines or JSONL, embeddings to JSONL or a
//! float32 `.npy` matrix. Output files are written beside the target and renamed into place
//! only when complete, so an interrupted run never leaves a plausible-looking partial file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tokenize::{join_title, Kind};

/// One text to embed, with where it came from (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct InputText {
    pub text: String,
    pub kind: Kind,
    /// 1-based line in the input (or argument position).
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// JSONL if the first non-blank line is a JSON object, else plain lines.
    Auto,
    /// One text per line.
    Lines,
    /// One JSON object per line: {"text": ..., "kind": "query"|"document", "title": ...}.
    Jsonl,
}

#[derive(Deserialize)]
struct JsonInput {
    text: String,
    #[serde(default)]
    kind: Option<Kind>,
    #[serde(default)]
    title: Option<String>,
}

/// Parses `content` (from `source`, named in errors). Every line is one input: a blank line is
/// an error in JSONL, and an empty text in plain lines (caught by [`check_empty`]).
pub fn parse_inputs(
    content: &str,
    source: &str,
    format: InputFormat,
    default_kind: Kind,
) -> Result<Vec<InputText>> {
    let jsonl = match format {
        InputFormat::Jsonl => true,
        InputFormat::Lines => false,
        InputFormat::Auto => content
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).is_ok()
            }),
    };
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if !jsonl {
            out.push(InputText {
                text: line.to_string(),
                kind: default_kind,
                line: line_no,
            });
            continue;
        }
        let obj: JsonInput = serde_json::from_str(line).map_err(|e| {
            Error::Input(format!(
                "{source}:{line_no}: expected a JSON object with a string \"text\" and optional \
                 \"kind\" (\"query\"|\"document\") and \"title\": {e}"
            ))
        })?;
        let kind = obj.kind.unwrap_or(default_kind);
        out.push(InputText {
            text: join_title(obj.title.as_deref(), &obj.text),
            kind,
            line: line_no,
        });
    }
    Ok(out)
}

/// Empty or whitespace-only texts embed as the bare brackets (the reference does the same), which
/// is almost never what a user meant: refuse them unless allowed, naming every such line.
pub fn check_empty(inputs: &[InputText], source: &str) -> Result<()> {
    let empty: Vec<String> = inputs
        .iter()
        .filter(|t| crate::tokenize::py_rstrip(&t.text).is_empty())
        .map(|t| t.line.to_string())
        .collect();
    if empty.is_empty() {
        return Ok(());
    }
    let shown = empty
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = if empty.len() > 10 {
        format!(" and {} more", empty.len() - 10)
    } else {
        String::new()
    };
    Err(Error::Input(format!(
        "{source}: {} empty or whitespace-only text(s) at line/argument {shown}{more}; \
         pass --allow-empty to embed them as the reference does (brackets only)",
        empty.len()
    )))
}

/// Where embeddings go.
pub enum Sink {
    Jsonl(Box<dyn Write>),
    Npy(Box<dyn Write>),
}

/// Writes embeddings in order; finishes into `path` (if any) by atomic rename.
pub struct EmbeddingWriter {
    sink: Sink,
    tmp: Option<(PathBuf, PathBuf)>,
    expected_rows: usize,
    rows: usize,
    hidden: usize,
}

impl EmbeddingWriter {
    /// `path` None → JSONL to stdout. A path ending in `.npy` → float32 matrix [rows, hidden].
    pub fn create(path: Option<&Path>, rows: usize, hidden: usize) -> Result<Self> {
        let (sink, tmp) = match path {
            None => (
                Sink::Jsonl(Box::new(BufWriter::new(std::io::stdout()))),
                None,
            ),
            Some(p) => {
                let tmp = p.with_file_name(format!(
                    ".{}.partial",
                    p.file_name()
                        .map(|s| s.to_string_lossy())
                        .unwrap_or_default()
                ));
                let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                let w: Box<dyn Write> = Box::new(BufWriter::with_capacity(1 << 20, f));
                let npy = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
                let mut sink = if npy { Sink::Npy(w) } else { Sink::Jsonl(w) };
                if let Sink::Npy(w) = &mut sink {
                    w.write_all(&npy_header(rows, hidden))
                        .map_err(|e| Error::io(&tmp, e))?;
                }
                (sink, Some((tmp, p.to_path_buf())))
            }
        };
        Ok(EmbeddingWriter {
            sink,
            tmp,
            expected_rows: rows,
            rows: 0,
            hidden,
        })
    }

    fn target(&self) -> PathBuf {
        self.tmp
            .as_ref()
            .map(|t| t.1.clone())
            .unwrap_or_else(|| PathBuf::from("<stdout>"))
    }

    /// Appends rows ([k, hidden]).
    pub fn write(&mut self, embeddings: &[f32]) -> Result<()> {
        let target = self.target();
        let io = |e| Error::io(&target, e);
        match &mut self.sink {
            Sink::Jsonl(w) => {
                for row in embeddings.chunks(self.hidden) {
                    serde_json::to_writer(&mut *w, &serde_json::json!({ "embedding": row }))
                        .map_err(|e| io(e.into()))?;
                    w.write_all(b"\n").map_err(io)?;
                }
            }
            Sink::Npy(w) => w.write_all(bytemuck::cast_slice(embeddings)).map_err(io)?,
        }
        self.rows += embeddings.len() / self.hidden;
        Ok(())
    }

    /// Flushes and renames the file into place; fails if rows are missing.
    pub fn finish(mut self) -> Result<()> {
        let target = self.target();
        if self.rows != self.expected_rows {
            return Err(Error::Input(format!(
                "{}: wrote {} of {} embeddings",
                target.display(),
                self.rows,
                self.expected_rows
            )));
        }
        match &mut self.sink {
            Sink::Jsonl(w) | Sink::Npy(w) => w.flush().map_err(|e| Error::io(&target, e))?,
        }
        if let Some((tmp, dst)) = self.tmp.take() {
            std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        }
        Ok(())
    }
}

impl Drop for EmbeddingWriter {
    fn drop(&mut self) {
        // Not finished (an error on the way): remove the partial file.
        if let Some((tmp, _)) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// NPY format 1.0 header for a C-order little-endian float32 matrix; the header is padded so
/// the data starts at a multiple of 64 bytes, as numpy writes it.
fn npy_header(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + pad + 1;
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(header_len as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_detects_jsonl_and_plain_lines() {
        let j = "{\"text\": \"a\"}\n{\"text\": \"b\", \"kind\": \"document\", \"title\": \"T\"}\n";
        let v = parse_inputs(j, "x", InputFormat::Auto, Kind::Query).unwrap();
        assert_eq!(v[0].kind, Kind::Query);
        assert_eq!((v[1].text.as_str(), v[1].kind), ("T b", Kind::Document));
        let p = parse_inputs("a\n{b}\n", "x", InputFormat::Auto, Kind::Document).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].text, "{b}");
        let bad = parse_inputs(
            "{\"text\": \"a\"}\n{\"txt\": 1}\n",
            "f.jsonl",
            InputFormat::Auto,
            Kind::Query,
        );
        assert!(bad.unwrap_err().to_string().contains("f.jsonl:2"));
        let blank = parse_inputs(
            "{\"text\": \"a\"}\n\n",
            "f",
            InputFormat::Jsonl,
            Kind::Query,
        );
        assert!(blank.unwrap_err().to_string().contains("f:2"));
        let kind = parse_inputs(
            "{\"text\": \"a\", \"kind\": \"doc\"}",
            "f",
            InputFormat::Jsonl,
            Kind::Query,
        );
        assert!(kind.is_err());
    }

    #[test]
    fn empty_texts_are_named() {
        let v = parse_inputs("a\n  \nb\n\n", "in.txt", InputFormat::Lines, Kind::Query).unwrap();
        let e = check_empty(&v, "in.txt").unwrap_err().to_string();
        assert!(e.contains("line/argument 2, 4"), "{e}");
    }

    #[test]
    fn npy_header_is_aligned() {
        for (r, c) in [(1, 64), (123456, 4096)] {
            let h = npy_header(r, c);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
        }
    }
}
