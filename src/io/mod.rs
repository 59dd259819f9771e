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
    reader: R,
    /// Nothing read yet (a byte-order mark is dropped from the first line).
    at_start: bool,
    /// Most bytes of a plain-text line kept (see [`MAX_LINE_BYTES`]).
    line_cap: usize,
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
            reader,
            at_start: true,
            line_cap: MAX_LINE_BYTES,
            ahead: Default::default(),
            jsonl: format == InputFormat::Jsonl,
            source: source.to_string(),
            default_kind,
            line: 0,
        };
        if format == InputFormat::Auto {
            r.detect()?;
        }
        Ok(r)
    }

    /// Plain-text lines keep at most `cap` bytes (tests use a small one).
    pub fn with_line_cap(mut self, cap: usize) -> Self {
        self.line_cap = cap.max(4);
        self
    }

    /// Auto-detection: the first non-blank character decides, found by peeking at the bytes, so
    /// a huge first line is never read whole just to see how it starts. Blank lines before it
    /// are read as lines (they are inputs too).
    fn detect(&mut self) -> Result<()> {
        loop {
            let line_no = self.ahead.len() + 1;
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) => return Err(read_error(&self.source, line_no, e)),
            };
            let mut i = 0;
            if self.at_start && self.ahead.is_empty() && buf.starts_with(BOM) {
                i = BOM.len();
            }
            while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\r') {
                i += 1;
            }
            let first = buf.get(i).copied();
            match first {
                None if buf.is_empty() => return Ok(()), // no input at all
                Some(b'\n') | None => {
                    // A blank line, or spaces longer than the buffer: read the line itself.
                    let Some(l) = self.read_line() else {
                        return Ok(());
                    };
                    let l = l.map_err(|e| self.read_error(self.ahead.len() + 1, e))?;
                    let start = l.trim_start().chars().next();
                    self.ahead.push_back(l);
                    if let Some(c) = start {
                        self.jsonl = c == '{';
                        return Ok(());
                    }
                }
                Some(b) => {
                    self.jsonl = b == b'{';
                    return Ok(());
                }
            }
        }
    }

    fn read_error(&self, line: usize, e: std::io::Error) -> Error {
        read_error(&self.source, line, e)
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
    /// A plain-text line keeps at most `line_cap` bytes (JSONL lines are parsed whole).
    fn read_line(&mut self) -> Option<std::io::Result<String>> {
        let cap = if self.jsonl {
            usize::MAX
        } else {
            self.line_cap
        };
        let line = read_capped_line(&mut self.reader, cap)?;
        if !std::mem::replace(&mut self.at_start, false) {
            return Some(line);
        }
        Some(line.map(|l| match l.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => l,
        }))
    }
}

fn read_error(source: &str, line: usize, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Error::Input(format!("{source}:{line}: not valid UTF-8"))
    } else {
        Error::Input(format!("{source}:{line}: {e}"))
    }
}

const BOM: &[u8] = b"\xef\xbb\xbf";

/// Most bytes of one plain-text line that are kept. A text is only ever tokenized up to a
/// prefix that yields its first `max_seq_length - 3` ids (`model::tokenize`): the first such
/// prefix is tried at 16 KiB plus at most 64 KiB to a cut point, and grows only while it has
/// too few ids, so 4 MiB is never reached unless 4 MiB of text makes fewer than 298 tokens
/// (tokens averaging over 14 KB). Keeping more would change no id; it would only cost memory.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// Reads one line (without `\n`) keeping at most `cap` bytes of it; None at the end of input.
/// The rest of a longer line is read and checked (UTF-8) but not kept. If that rest holds any
/// text besides whitespace, the kept prefix gets a trailing NUL, so that stripping trailing
/// whitespace (as the reference does to the whole text) cannot eat into the kept prefix: the
/// whole line's rstrip ends in the discarded part. The ids used come from far before the NUL.
fn read_capped_line<R: BufRead>(r: &mut R, cap: usize) -> Option<std::io::Result<String>> {
    use std::io::{Error as IoError, ErrorKind};
    let invalid = || IoError::new(ErrorKind::InvalidData, "stream did not contain valid UTF-8");
    let mut kept: Vec<u8> = Vec::new();
    let mut rest: Vec<u8> = Vec::new(); // the discarded part's unchecked bytes (≤ 3 carried)
    let (mut any, mut cut, mut rest_has_text) = (false, false, false);
    // Checks `rest` as UTF-8 up to an incomplete tail, noting any non-whitespace character.
    let mut check = |rest: &mut Vec<u8>, end: bool| -> std::io::Result<()> {
        let valid = match std::str::from_utf8(rest) {
            Ok(_) => rest.len(),
            Err(e) if e.error_len().is_none() && !end => e.valid_up_to(),
            Err(_) => return Err(invalid()),
        };
        let text = std::str::from_utf8(&rest[..valid]).map_err(|_| invalid())?;
        rest_has_text |= text
            .chars()
            .any(|c| !crate::model::tokenize::py_whitespace(c));
        rest.drain(..valid);
        Ok(())
    };
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Some(Err(e)),
        };
        if buf.is_empty() {
            break;
        }
        any = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let line_part = &buf[..newline.unwrap_or(buf.len())];
        let take = cap.saturating_sub(kept.len()).min(line_part.len());
        kept.extend_from_slice(&line_part[..take]);
        if take < line_part.len() {
            if !cut {
                cut = true;
                // The cap may split a character: its first bytes go with the rest.
                match std::str::from_utf8(&kept) {
                    Ok(_) => {}
                    Err(e) if e.error_len().is_none() => rest.extend(kept.drain(e.valid_up_to()..)),
                    Err(_) => return Some(Err(invalid())),
                }
            }
            rest.extend_from_slice(&line_part[take..]);
            if let Err(e) = check(&mut rest, false) {
                return Some(Err(e));
            }
        }
        let used = newline.map_or(buf.len(), |i| i + 1);
        r.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return None;
    }
    if cut {
        if let Err(e) = check(&mut rest, true) {
            return Some(Err(e));
        }
    }
    let mut line = match String::from_utf8(kept) {
        Ok(l) => l,
        Err(_) => return Some(Err(invalid())),
    };
    if cut && rest_has_text {
        line.push('\0');
    }
    Some(Ok(line))
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
        Err(Error::Input(format!(
            "{source}: {} empty or whitespace-only text(s) at line/argument {}; \
             pass --allow-empty to embed them as the reference does (brackets only)",
            self.count,
            crate::error::list_some(&self.first, self.count)
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

    fn capped(input: &[u8], cap: usize) -> Result<Vec<String>> {
        InputReader::new(input, "in.txt", InputFormat::Auto, Kind::Query)?
            .with_line_cap(cap)
            .map(|t| t.map(|t| t.text))
            .collect()
    }

    #[test]
    fn a_long_plain_line_keeps_a_capped_prefix() {
        // More text after the cap: the prefix is kept and marked so rstrip cannot shorten it.
        assert_eq!(
            capped(b"abcdefghij\nnext\n", 8).unwrap(),
            ["abcdefgh\0", "next"]
        );
        // Only whitespace after the cap: the whole line's rstrip would reach into the prefix,
        // so it is kept unmarked (and rstripped later, as the whole line would be).
        assert_eq!(
            capped(b"abcdefgh  \t \r\nnext", 8).unwrap(),
            ["abcdefgh", "next"]
        );
        // A character split by the cap goes with the discarded part.
        assert_eq!(capped("aaaaaaaé!\n".as_bytes(), 8).unwrap(), ["aaaaaaa\0"]);
        // The discarded part is still checked.
        let e = capped(b"ok\nabcdefgh\xff\xfe\n", 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in.txt:2: not valid UTF-8"), "{e}");
        // JSONL lines are never cut (they are parsed whole).
        let j = format!("{{\"text\": \"{}\"}}\n", "x".repeat(100));
        assert_eq!(capped(j.as_bytes(), 8).unwrap()[0].len(), 100);
        // Detection peeks at bytes: blank lines first still count, a BOM is skipped.
        let e = capped(b"\n  \n{\"text\": \"a\"}\n", 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in.txt:1: blank line in JSONL"), "{e}");
        assert_eq!(
            capped("\u{feff}{\"text\": \"a\"}".as_bytes(), 8).unwrap(),
            ["a"]
        );
    }

    /// The cap changes no id: texts far longer than it, read through the reader, tokenize to
    /// the same kept ids and truncation flag as the whole texts (a smaller cap than the real
    /// 4 MiB, still above the first prefix the tokenizer tries: 16 KiB + 64 KiB).
    #[test]
    fn capped_lines_tokenize_like_whole_lines() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/sgpt-tiny/tokenizer.json");
        let tok = crate::model::tokenize::SpecbTokenizer::from_file(&p, 300, usize::MAX).unwrap();
        let cap = 256 << 10;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut words = String::new();
        while words.len() < 700_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            words.push_str(
                [
                    "the ", "capital", "  ", "東京", ". ", "\t", "🙂", "x", "...",
                ][(seed % 9) as usize],
            );
        }
        let cases = [
            ("words", words),
            ("spaces then a word", format!("x{}y", " ".repeat(700_000))),
            ("one long piece", "ab".repeat(400_000)),
            (
                "text then trailing spaces",
                format!("{}{}", "word ".repeat(60_000), " ".repeat(400_000)),
            ),
        ];
        for (what, text) in &cases {
            let line = format!("{text}\n");
            let read = capped(line.as_bytes(), cap).unwrap();
            assert!(read[0].len() <= cap + 1, "{what}: not capped");
            for kind in [Kind::Query, Kind::Document] {
                let got = tok.encode(&read[0], kind).unwrap();
                let want = tok.encode(text, kind).unwrap();
                assert_eq!(got.ids, want.ids, "{what}: ids differ");
                assert_eq!(got.truncated, want.truncated, "{what}: truncation differs");
            }
        }
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
