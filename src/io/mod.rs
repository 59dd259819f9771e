//! Inputs and outputs of `sgpt embed`: texts from plain lines or JSONL, embeddings to JSONL or a
//! float32 `.npy` matrix. Output files go through [`crate::io::output::OutputFile`]: complete or
//! not at all, symlinks followed, streams (FIFOs, devices) written in place.

pub mod output;

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::tokenize::{join_title, Kind};
use output::OutputFile;

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
    /// JSONL if the first non-blank character is `{`, else plain lines. A JSONL input whose lines
    /// are malformed is then reported line by line, never read as plain text.
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

/// Inputs read one line at a time from any reader, so a corpus never has to fit in memory.
/// Every line is one input: a blank line is an error in JSONL, and an empty text in plain lines
/// (caught by [`EmptyTexts`]). Lines end in `\n` or `\r\n`; the input's line `i` is text `i`.
pub struct InputReader<R> {
    lines: std::io::Lines<R>,
    /// Nothing read from `lines` yet (a byte-order mark is dropped from the first line).
    at_start: bool,
    /// Lines read ahead to detect the format (blank lines, then the first non-blank one).
    ahead: std::collections::VecDeque<String>,
    jsonl: bool,
    source: String,
    default_kind: Kind,
    line: usize,
}

impl<R: BufRead> InputReader<R> {
    /// `source` names the input in errors. With [`InputFormat::Auto`] the first non-blank
    /// character decides: `{` means JSONL, anything else plain lines.
    pub fn new(reader: R, source: &str, format: InputFormat, default_kind: Kind) -> Result<Self> {
        let mut r = InputReader {
            lines: reader.lines(),
            at_start: true,
            ahead: Default::default(),
            jsonl: format == InputFormat::Jsonl,
            source: source.to_string(),
            default_kind,
            line: 0,
        };
        if format == InputFormat::Auto {
            while let Some(l) = r.read_line() {
                let l = l.map_err(|e| r.read_error(r.ahead.len() + 1, e))?;
                let blank = l.trim().is_empty();
                r.ahead.push_back(l);
                if !blank {
                    let first = r.ahead.back().map(String::as_str).unwrap_or_default();
                    r.jsonl = first.trim_start().starts_with('{');
                    break;
                }
            }
        }
        Ok(r)
    }

    fn read_error(&self, line: usize, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::Input(format!("{}:{line}: not valid UTF-8", self.source))
        } else {
            Error::Input(format!("{}:{line}: {e}", self.source))
        }
    }

    fn parse(&self, line: &str, line_no: usize) -> Result<InputText> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if !self.jsonl {
            return Ok(InputText {
                text: line.to_string(),
                kind: self.default_kind,
                line: line_no,
            });
        }
        if is_blank(line) {
            return Err(Error::Input(format!(
                "{}:{line_no}: blank line in JSONL input (one JSON object per line; blank lines \
                 are allowed only at the end)",
                self.source
            )));
        }
        let obj: JsonInput = serde_json::from_str(line).map_err(|e| {
            Error::Input(format!(
                "{}:{line_no}: expected a JSON object with a string \"text\" and optional \
                 \"kind\" (\"query\"|\"document\") and \"title\": {e}",
                self.source
            ))
        })?;
        Ok(InputText {
            text: join_title(obj.title.as_deref(), &obj.text),
            kind: obj.kind.unwrap_or(self.default_kind),
            line: line_no,
        })
    }
}

impl<R: BufRead> InputReader<R> {
    /// The next raw line: those read ahead first, then the reader's.
    fn next_raw(&mut self) -> Option<std::io::Result<String>> {
        match self.ahead.pop_front() {
            Some(l) => Some(Ok(l)),
            None => self.read_line(),
        }
    }

    /// The reader's next line; a UTF-8 byte-order mark at the very start (as Windows tools
    /// write) is dropped, so it neither hides a JSONL file nor ends up in the first text.
    fn read_line(&mut self) -> Option<std::io::Result<String>> {
        let line = self.lines.next()?;
        if !std::mem::replace(&mut self.at_start, false) {
            return Some(line);
        }
        Some(line.map(|l| match l.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => l,
        }))
    }
}

fn is_blank(l: &str) -> bool {
    l.trim().is_empty()
}

impl<R: BufRead> Iterator for InputReader<R> {
    type Item = Result<InputText>;

    fn next(&mut self) -> Option<Result<InputText>> {
        let line = match self.next_raw()? {
            Ok(l) if is_blank(&l) => {
                // Blank lines at the very end (an editor's trailing newlines) are not texts and
                // are dropped; anywhere else they stay inputs (an error in JSONL, an empty
                // text in plain lines), so line i is still text i.
                let mut pending = Vec::new();
                loop {
                    match self.next_raw() {
                        None => return None,
                        Some(Ok(n)) => {
                            let blank = is_blank(&n);
                            pending.push(n);
                            if !blank {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            self.line += 1;
                            return Some(Err(self.read_error(self.line + pending.len(), e)));
                        }
                    }
                }
                for n in pending.into_iter().rev() {
                    self.ahead.push_front(n);
                }
                Ok(l)
            }
            other => other,
        };
        self.line += 1;
        Some(
            line.map_err(|e| self.read_error(self.line, e))
                .and_then(|l| self.parse(&l, self.line)),
        )
    }
}

/// Parses `content` (from `source`, named in errors): [`InputReader`] over a string.
pub fn parse_inputs(
    content: &str,
    source: &str,
    format: InputFormat,
    default_kind: Kind,
) -> Result<Vec<InputText>> {
    InputReader::new(content.as_bytes(), source, format, default_kind)?.collect()
}

/// Empty or whitespace-only texts embed as the bare brackets (the reference does the same), which
/// is almost never what a user meant: they are refused unless allowed, naming the first lines.
/// Fed one input at a time, so a streamed corpus is checked without being held.
#[derive(Default)]
pub struct EmptyTexts {
    count: usize,
    first: Vec<usize>,
}

impl EmptyTexts {
    pub fn add(&mut self, t: &InputText) {
        if crate::model::tokenize::py_rstrip(&t.text).is_empty() {
            self.count += 1;
            if self.first.len() < 10 {
                self.first.push(t.line);
            }
        }
    }

    pub fn check(&self, source: &str) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let shown: Vec<String> = self.first.iter().map(usize::to_string).collect();
        let more = if self.count > shown.len() {
            format!(" and {} more", self.count - shown.len())
        } else {
            String::new()
        };
        Err(Error::Input(format!(
            "{source}: {} empty or whitespace-only text(s) at line/argument {}{more}; \
             pass --allow-empty to embed them as the reference does (brackets only)",
            self.count,
            shown.join(", ")
        )))
    }
}

/// [`EmptyTexts`] over a slice.
pub fn check_empty(inputs: &[InputText], source: &str) -> Result<()> {
    let mut e = EmptyTexts::default();
    inputs.iter().for_each(|t| e.add(t));
    e.check(source)
}

/// Where embeddings go.
pub enum Sink {
    Jsonl(Box<dyn Write>),
    Npy(Box<dyn Write>),
}

/// Writes embeddings in order; finishes into `path` (if any) by atomic rename.
pub struct EmbeddingWriter {
    sink: Sink,
    out: Option<OutputFile>,
    expected_rows: usize,
    rows: usize,
    hidden: usize,
}

impl EmbeddingWriter {
    /// `out` None → JSONL to stdout. An output path ending in `.npy` → float32 matrix
    /// [rows, hidden], else JSONL. The output is opened (and checked) by the caller before any
    /// work, so a bad path fails at once.
    pub fn create(out: Option<OutputFile>, rows: usize, hidden: usize) -> Result<Self> {
        let sink = match &out {
            None => Sink::Jsonl(Box::new(BufWriter::new(std::io::stdout()))),
            Some(o) => {
                let p = o.path();
                let w: Box<dyn Write> = Box::new(o.writer()?);
                let npy = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
                let mut sink = if npy { Sink::Npy(w) } else { Sink::Jsonl(w) };
                if let Sink::Npy(w) = &mut sink {
                    w.write_all(&npy_header(rows, hidden))
                        .map_err(|e| Error::io(p, e))?;
                }
                sink
            }
        };
        Ok(EmbeddingWriter {
            sink,
            out,
            expected_rows: rows,
            rows: 0,
            hidden,
        })
    }

    fn target(&self) -> PathBuf {
        self.out
            .as_ref()
            .map(|o| o.path().to_path_buf())
            .unwrap_or_else(|| PathBuf::from("<stdout>"))
    }

    /// Appends rows ([k, hidden]).
    pub fn write(&mut self, embeddings: &[f32]) -> Result<()> {
        let target = self.target();
        let io = |e| Error::io(&target, e);
        match &mut self.sink {
            Sink::Jsonl(w) => {
                // Serialized as f32 (the shortest text that reads back as the same f32, as the
                // server writes), not widened to f64 digits.
                #[derive(serde::Serialize)]
                struct Row<'a> {
                    embedding: &'a [f32],
                }
                for row in embeddings.chunks(self.hidden) {
                    serde_json::to_writer(&mut *w, &Row { embedding: row })
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
        match self.out.take() {
            Some(out) => out.commit(),
            None => Ok(()),
        }
    }
}

/// NPY format 1.0 header for a C-order little-endian float32 matrix; the header is padded so
/// the data starts at a multiple of 64 bytes, as numpy writes it. (Also the eval cache's shards.)
pub fn npy_header(rows: usize, cols: usize) -> Vec<u8> {
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
            "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n",
            "f",
            InputFormat::Jsonl,
            Kind::Query,
        );
        let e = blank.unwrap_err().to_string();
        assert!(e.contains("f:2: blank line in JSONL"), "{e}");
        let kind = parse_inputs(
            "{\"text\": \"a\", \"kind\": \"doc\"}",
            "f",
            InputFormat::Jsonl,
            Kind::Query,
        );
        assert!(kind.is_err());
    }

    #[test]
    fn a_malformed_first_json_line_is_an_error_not_plain_text() {
        let bad = "{\"text\": \"a\",}\n{\"text\": \"b\"}\n";
        let e = parse_inputs(bad, "in.jsonl", InputFormat::Auto, Kind::Query)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in.jsonl:1"), "{e}");
        let indented = "\n   {\"text\": \"a\"}\n";
        let v = parse_inputs(indented, "x", InputFormat::Auto, Kind::Query);
        assert!(
            v.unwrap_err().to_string().contains("x:1"),
            "blank line in JSONL"
        );
    }

    #[test]
    fn empty_texts_are_named() {
        let v = parse_inputs("a\n  \nb\n\nc\n", "in.txt", InputFormat::Lines, Kind::Query).unwrap();
        let e = check_empty(&v, "in.txt").unwrap_err().to_string();
        assert!(e.contains("line/argument 2, 4"), "{e}");
    }

    #[test]
    fn reads_crlf_and_names_bad_utf8_lines() {
        let v = parse_inputs("a\r\nb\r\n", "x", InputFormat::Auto, Kind::Query).unwrap();
        assert_eq!(
            v.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let bytes: &[u8] = b"ok\nfine\n\xff\xfe\n";
        let r = InputReader::new(bytes, "in.txt", InputFormat::Lines, Kind::Query).unwrap();
        let e = r.collect::<Result<Vec<_>>>().unwrap_err().to_string();
        assert!(e.contains("in.txt:3: not valid UTF-8"), "{e}");
        // Lines read ahead to detect the format are still returned, in order, with their numbers.
        let v = parse_inputs(
            "\n  \n{\"text\": \"a\"}",
            "x",
            InputFormat::Auto,
            Kind::Query,
        );
        assert!(v.unwrap_err().to_string().contains("x:1"));
        let v = parse_inputs("\n  \nplain", "x", InputFormat::Auto, Kind::Query).unwrap();
        assert_eq!((v.len(), v[2].line, v[2].text.as_str()), (3, 3, "plain"));
    }

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let j = parse_inputs(
            "\u{feff}{\"text\": \"a\"}\n",
            "x",
            InputFormat::Auto,
            Kind::Query,
        )
        .unwrap();
        assert_eq!(j[0].text, "a");
        let p = parse_inputs("\u{feff}plain\nnext\n", "x", InputFormat::Auto, Kind::Query).unwrap();
        assert_eq!((p[0].text.as_str(), p[1].text.as_str()), ("plain", "next"));
        // Only at the very start: elsewhere it is text.
        let p = parse_inputs("a\n\u{feff}b\n", "x", InputFormat::Lines, Kind::Query).unwrap();
        assert_eq!(p[1].text, "\u{feff}b");
    }

    #[test]
    fn trailing_blank_lines_are_not_texts_but_inner_ones_are() {
        let v = parse_inputs("a\n\nb\n\n  \n\n", "x", InputFormat::Lines, Kind::Query).unwrap();
        let texts: Vec<_> = v.iter().map(|t| (t.line, t.text.as_str())).collect();
        assert_eq!(texts, [(1, "a"), (2, ""), (3, "b")]);
        let j = parse_inputs("{\"text\": \"a\"}\n\n", "x", InputFormat::Auto, Kind::Query).unwrap();
        assert_eq!(j.len(), 1);
        let v = parse_inputs("\n\n", "x", InputFormat::Lines, Kind::Query).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn empty_texts_beyond_ten_are_counted() {
        let v = parse_inputs(
            &("\n".repeat(12) + "x\n"),
            "in.txt",
            InputFormat::Lines,
            Kind::Query,
        )
        .unwrap();
        let e = check_empty(&v, "in.txt").unwrap_err().to_string();
        assert!(e.contains("12 empty") && e.contains("10 and 2 more"), "{e}");
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
