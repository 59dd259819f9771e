//! Tokenization with SGPT's "special brackets" (docs/semantics.md): a query is `[` + tokens + `]`, a
//! document `{` + tokens + `}`; no BOS/EOS; trailing whitespace removed first (Python's
//! `str.rstrip()`); the text is cut on the right to `max_seq_length - 3` tokens.
//!
//! Memory is bounded by the tokens kept, not by the text: a long text is tokenized only up to a
//! prefix that yields the same first ids as the whole text would (see [`safe_cut`]), so a 50 MB
//! line costs what a few kilobytes do.

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
    /// Text tokens before truncation (without brackets). When a long text was tokenized only up
    /// to a prefix, this counts the prefix's tokens: a lower bound, still over the limit.
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
    /// The tokenizer is BLOOM's (no normalizer, the Split-then-ByteLevel pre-tokenizer, added
    /// tokens free of separators), so long texts may be cut before tokenizing ([`safe_cut`]).
    prefix_cut: bool,
}

/// Texts up to this many bytes are tokenized whole; longer ones from a prefix of at least this
/// size, growing 4× while it yields too few tokens. 297 tokens of any real text fit in far less.
const PREFIX_BYTES: usize = 16 * 1024;
/// A run with no separator longer than this is cut inside the run (see [`safe_cut`]).
const MAX_RUN_BYTES: usize = 64 * 1024;

impl SpecbTokenizer {
    /// Loads `tokenizer.json`; `vocab_rows` is the embedding matrix's row count, which every id
    /// the tokenizer can produce must fit.
    pub fn from_file(path: &Path, max_seq_length: usize, vocab_rows: usize) -> Result<Self> {
        // Missing, a directory or a FIFO (which would block the read): a clear error first.
        crate::model::weights::open_regular(path)?;
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
        let prefix_cut = is_bloom_pretokenization(&inner);
        Ok(SpecbTokenizer {
            prefix_cut,
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

    /// Token ids of `text` with no brackets and no truncation (whole-text tokenization).
    pub fn encode_whole(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })
    }

    /// The text's ids, enough of them to tell whether it is over the limit: a long text is
    /// tokenized from growing prefixes cut at [`safe_cut`] points until one has more than
    /// `max_text_tokens` ids, whose first ones are then the whole text's.
    fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut want = PREFIX_BYTES;
        while self.prefix_cut && text.len() > 2 * want {
            let Some(cut) = safe_cut(text, want) else {
                break;
            };
            let ids = self.encode_whole(&text[..cut])?;
            if ids.len() > self.max_text_tokens {
                return Ok(ids);
            }
            want = cut.saturating_mul(4);
        }
        self.encode_whole(text)
    }

    pub fn encode(&self, text: &str, kind: Kind) -> Result<Encoded> {
        let text = py_rstrip(text);
        let toks = self.text_ids(text)?;
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

/// BLOOM's pre-tokenizer (tokenizer.json): a `Split` on the regex
/// ` ?[^(\s|[.,!?…。，、।۔،])]+` (pieces are the matches *and* the gaps between them), then a
/// `ByteLevel` mapping that splits nothing further; no normalizer. BPE merges never cross a
/// piece, so the ids of a prefix that ends where a piece ends are the whole text's first ids.
fn is_bloom_pretokenization(t: &tokenizers::Tokenizer) -> bool {
    let Ok(pre) = serde_json::to_value(t.get_pre_tokenizer()) else {
        return false;
    };
    let split_ok = |v: &serde_json::Value| {
        v["type"] == "Split"
            && v["pattern"]["Regex"] == BLOOM_SPLIT
            && v["behavior"] == "Isolated"
            && v["invert"] == false
    };
    let byte_level_ok = |v: &serde_json::Value| {
        v["type"] == "ByteLevel" && v["use_regex"] == false && v["add_prefix_space"] == false
    };
    let seq_ok = pre["type"] == "Sequence"
        && pre["pretokenizers"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && split_ok(&p[0]) && byte_level_ok(&p[1]));
    // An added token is matched in the raw text before pre-tokenization: one containing a
    // separator could straddle a cut.
    let added_ok = t
        .get_added_tokens_decoder()
        .values()
        .all(|a| a.content.chars().all(|c| !maybe_separator(c)));
    seq_ok && t.get_normalizer().is_none() && added_ok
}

const BLOOM_SPLIT: &str = " ?[^(\\s|[.,!?…。，、।۔،])]+";

/// Characters that certainly belong to the class the BLOOM regex excludes (it never matches
/// them): ASCII space and controls of `\s`, and the listed punctuation.
fn certain_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t'
            | '\n'
            | '\r'
            | '.'
            | ','
            | '!'
            | '?'
            | '('
            | ')'
            | '|'
            | '…'
            | '。'
            | '，'
            | '、'
    )
}

/// Characters that might be in the excluded class: every Unicode whitespace or control
/// character (the regex engine's `\s` may count any of them), the zero-width and format
/// characters some engines treat as spaces, and the listed punctuation.
fn maybe_separator(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{180e}' | '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}' | '।' | '۔' | '،'
        )
        || certain_separator(c)
}

/// The first byte offset `p >= from` where the text can be cut without changing the ids before
/// it: `text[p]` is certainly a separator and `text[p-1]` certainly is not. Then the regex match
/// holding `text[p-1]` ends at `p` in the whole text too (it cannot take a separator, and its
/// optional leading space lies before `p - 1`), so every piece before `p` is the same with or
/// without the rest, and so are its ids.
///
/// A text with no such point within [`MAX_RUN_BYTES`] after `from` is one piece longer than
/// that (a base64 blob, repeated letters, a run of spaces): it is cut inside the piece, at a
/// character boundary. This is the one case not proven exact: BPE could in principle merge
/// differently near the cut, tens of kilobytes after the ids kept; the tests compare such texts
/// with whole-text tokenization. None when the text ends first.
pub fn safe_cut(text: &str, from: usize) -> Option<usize> {
    let start = text.ceil_char_boundary(from);
    let mut prev = text[..start].chars().next_back()?;
    for (i, c) in text[start..].char_indices() {
        let p = start + i;
        if certain_separator(c) && !maybe_separator(prev) {
            return Some(p);
        }
        if p - start > MAX_RUN_BYTES {
            return Some(p);
        }
        prev = c;
    }
    None
}

/// Python's `str.rstrip()` with no argument: Rust's `char::is_whitespace` plus U+001C..U+001F,
/// which Python also counts as whitespace (they are Unicode "B"/"S" separators).
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_whitespace)
}

/// Whether Python's `str.isspace()` holds for `c` (what `rstrip()` removes).
pub fn py_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
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

    fn tiny(max_seq_length: usize) -> SpecbTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sgpt-tiny/tokenizer.json");
        SpecbTokenizer::from_file(&p, max_seq_length, usize::MAX).unwrap()
    }

    /// xorshift64*: deterministic texts without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[(self.next() % xs.len() as u64) as usize]
        }
    }

    /// Long texts mixing words, separator runs, Unicode spaces and punctuation, CJK, emoji,
    /// combining marks, and the characters the BLOOM regex treats specially.
    fn adversarial_text(rng: &mut Rng, bytes: usize) -> String {
        const PIECES: &[&str] = &[
            "the",
            " capital",
            " of",
            " France",
            "Paris",
            "'s",
            " 1234",
            "x",
            "ab",
            "(",
            ")",
            "|",
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            ".",
            "...",
            ",",
            "!",
            "?",
            "…",
            "。",
            "，",
            "、",
            "।",
            "۔",
            "،",
            "\u{3000}",
            "\u{a0}",
            "\u{2009}",
            "\u{180e}",
            "\u{200b}",
            "\u{feff}",
            "東京",
            "は",
            "日本の首都",
            "🙂",
            "👩‍👩‍👧",
            "e\u{301}",
            "ü",
            "Ωμέγα",
            "ab\u{1f}",
            "\u{85}",
            "base64+/=",
            "--",
            "__init__",
            "<s>",
            "</s>",
            "<pad>",
        ];
        let mut s = String::new();
        while s.len() < bytes {
            s.push_str(rng.pick(PIECES));
        }
        s
    }

    fn check_same_as_whole(t: &SpecbTokenizer, text: &str, what: &str) {
        let got = t.encode(text, Kind::Query).unwrap();
        let whole = t.encode_whole(py_rstrip(text)).unwrap();
        let keep = whole.len().min(t.max_text_tokens());
        let inner = &got.ids[1..got.ids.len() - 1];
        if let Some(i) = (0..keep).find(|&i| inner.get(i) != whole.get(i)) {
            panic!(
                "{what} ({} bytes): id {i} differs: prefix-cut {:?} vs whole {:?}",
                text.len(),
                inner.get(i),
                whole.get(i)
            );
        }
        assert_eq!(
            inner.len(),
            keep,
            "{what}: kept {} ids, whole {keep}",
            inner.len()
        );
        assert_eq!(got.truncated, whole.len() > keep, "{what}: truncated flag");
    }

    #[test]
    fn the_shipped_tokenizer_is_recognized_as_bloom() {
        assert!(tiny(300).prefix_cut);
    }

    /// The prefix cut is exact: on long adversarial texts (tens to hundreds of KB, over several
    /// limits) the kept ids and the truncation flag equal whole-text tokenization's.
    #[test]
    fn prefix_cut_equals_whole_text_tokenization() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for max_seq_length in [4, 300, 2051] {
            let t = tiny(max_seq_length);
            for case in 0..12 {
                let bytes = [20_000, 40_000, 100_000, 300_000][case % 4];
                let text = adversarial_text(&mut rng, bytes);
                check_same_as_whole(&t, &text, &format!("max {max_seq_length}, case {case}"));
            }
        }
    }

    /// The sharp version: the limit is set so the kept ids reach the very end of the first
    /// prefix (its token count minus one), where a cut in the wrong place would change them.
    #[test]
    fn prefix_cut_is_exact_up_to_the_cut_itself() {
        let mut rng = Rng(0x2545_f491);
        let probe = tiny(300);
        for case in 0..24 {
            let text = adversarial_text(&mut rng, 3 * PREFIX_BYTES);
            let cut = safe_cut(&text, PREFIX_BYTES).unwrap();
            let n = probe.encode_whole(&text[..cut]).unwrap().len();
            for below in [1, 2, 5] {
                let t = tiny(n - below + 3);
                check_same_as_whole(&t, &text, &format!("case {case}, {below} below the cut"));
            }
        }
    }

    #[test]
    fn long_runs_without_separators_equal_whole_text_tokenization() {
        let t = tiny(300);
        let mut rng = Rng(7);
        let b64: String = (0..300_000)
            .map(|_| {
                let a = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                a[(rng.next() % 64) as usize] as char
            })
            .collect();
        let cases = [
            ("one letter repeated", "a".repeat(300_000)),
            ("two letters repeated", "ab".repeat(150_000)),
            ("random base64", b64),
            ("CJK without punctuation", "日本の首都は東京".repeat(20_000)),
            (
                "words then a blob",
                format!("{} {}", "word ".repeat(10), "z".repeat(300_000)),
            ),
            ("only separators", " .\n".repeat(100_000)),
            (
                "spaces then words",
                format!("{}{}", " ".repeat(200_000), "x y ".repeat(1000)),
            ),
        ];
        for (what, text) in &cases {
            check_same_as_whole(&t, text, what);
        }
    }

    #[test]
    fn a_cut_point_ends_a_match_and_starts_a_separator() {
        assert_eq!(safe_cut("aaaa bbbb", 2), Some(4));
        assert_eq!(safe_cut("aa  bb", 1), Some(2));
        // Inside a run of separators no point qualifies until a word ends.
        assert_eq!(safe_cut("a   bb.", 2), Some(6));
        assert_eq!(safe_cut("abc", 1), None);
        // Multi-byte characters: offsets stay on boundaries.
        let s = "日本 東京";
        assert_eq!(safe_cut(s, 1), Some("日本".len()));
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("query".parse::<Kind>().unwrap(), Kind::Query);
        assert_eq!("document".parse::<Kind>().unwrap(), Kind::Document);
        assert!("doc".parse::<Kind>().is_err());
    }
}
