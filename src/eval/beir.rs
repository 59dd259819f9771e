//! Reading a dataset in BEIR layout:
//!
//! ```text
//! DIR/corpus.jsonl        {"_id": "...", "title": "...", "text": "..."} per line
//! DIR/queries.jsonl       {"_id": "...", "text": "..."} per line
//! DIR/qrels/<split>.tsv   header line, then query-id <TAB> corpus-id <TAB> score
//! ```
//!
//! The semantics are those of BEIR's `GenericDataLoader`, with errors where BEIR would crash or
//! silently guess:
//! - Ids may be JSON strings or integers (integers are read as their decimal text); an empty id
//!   is an error, and so is an id seen twice in the same file (BEIR keeps the last one silently).
//! - Extra fields (`metadata`, …) are ignored; blank lines are skipped; a missing or null
//!   `title` means no title. A document is embedded as `title + " " + text` (docs/semantics.md).
//! - The first line of the qrels is a header and is skipped, as BEIR does; a first line that
//!   parses as a judgment is refused (it would be lost silently).
//! - Only queries that appear in the qrels are evaluated, in the order of their first judgment.
//!   A qrels query id missing from queries.jsonl is an error (BEIR raises KeyError). A judged
//!   document missing from the corpus is kept, as in BEIR: it counts as a relevant document
//!   that is never retrieved; it is reported in [`Dataset::unknown_docs`].
//! - A judgment repeated for the same (query, document) pair: the last one wins, as in BEIR and
//!   pytrec_eval (both read into a dict); they are counted in [`Dataset::duplicate_judgments`].
//!
//! Every malformed line is reported as `path:line: what is wrong`.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::tokenize::join_title;

/// The documents, in file order. Document `i` is `ids[i]`, embedded as `texts[i]`.
#[derive(Debug, Default)]
pub struct Corpus {
    pub ids: Vec<String>,
    pub texts: Vec<String>,
    /// id → index.
    pub index: HashMap<String, u32>,
}

/// One query to evaluate, with its judgments.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: String,
    pub text: String,
    /// Document id → label, one entry per judged document (after duplicates are resolved).
    pub judgments: HashMap<String, i64>,
}

/// A judged document that is not in the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownDoc {
    pub line: usize,
    pub query_id: String,
    pub doc_id: String,
}

#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub split: String,
    pub qrels_path: PathBuf,
    pub corpus: Corpus,
    /// The evaluated queries (those with judgments), in order of first judgment.
    pub queries: Vec<Query>,
    /// Queries in queries.jsonl, judged or not.
    pub queries_in_file: usize,
    /// Judgment lines read (duplicates included).
    pub judgment_lines: usize,
    pub duplicate_judgments: usize,
    pub unknown_docs: Vec<UnknownDoc>,
}

impl Dataset {
    /// Reads `dir` for `split`; every error names the file and line.
    pub fn load(dir: &Path, split: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "dataset directory not found"),
            ));
        }
        let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
        if !qrels_path.is_file() {
            return Err(Error::Input(format!(
                "{}: no qrels for split {split:?}; splits present: {}",
                qrels_path.display(),
                available_splits(&dir.join("qrels"))
            )));
        }
        let corpus = read_corpus(&dir.join("corpus.jsonl"))?;
        let queries_path = dir.join("queries.jsonl");
        let all_queries = read_queries(&queries_path)?;
        let queries_in_file = all_queries.len();
        let qrels = read_qrels(&qrels_path)?;

        let mut order: Vec<String> = Vec::new();
        let mut judged: HashMap<String, HashMap<String, i64>> = HashMap::new();
        let mut duplicate_judgments = 0;
        let mut unknown_docs = Vec::new();
        for j in &qrels {
            if !all_queries.contains_key(&j.query_id) {
                return Err(Error::Input(format!(
                    "{}:{}: query-id {:?} is not in {}",
                    qrels_path.display(),
                    j.line,
                    j.query_id,
                    queries_path.display()
                )));
            }
            if !corpus.index.contains_key(&j.doc_id) {
                unknown_docs.push(UnknownDoc {
                    line: j.line,
                    query_id: j.query_id.clone(),
                    doc_id: j.doc_id.clone(),
                });
            }
            let entry = judged.entry(j.query_id.clone()).or_insert_with(|| {
                order.push(j.query_id.clone());
                HashMap::new()
            });
            if entry.insert(j.doc_id.clone(), j.label).is_some() {
                duplicate_judgments += 1;
            }
        }
        let mut all_queries = all_queries;
        let queries = order
            .into_iter()
            .map(|id| {
                let (text, _) = all_queries.remove(&id).unwrap_or_default();
                let judgments = judged.remove(&id).unwrap_or_default();
                Query {
                    id,
                    text,
                    judgments,
                }
            })
            .collect();
        Ok(Dataset {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            qrels_path,
            corpus,
            queries,
            queries_in_file,
            judgment_lines: qrels.len(),
            duplicate_judgments,
            unknown_docs,
        })
    }

    /// Evaluated queries whose judgments hold no label ≥ 1 (they score 0 on every metric).
    pub fn queries_without_relevant(&self) -> usize {
        self.queries
            .iter()
            .filter(|q| q.judgments.values().all(|&l| l < 1))
            .count()
    }

    /// Refuses ids that would break the whitespace-separated TREC run format.
    pub fn check_ids_for_run_file(&self) -> Result<()> {
        let bad = |id: &str| id.chars().any(char::is_whitespace);
        if let Some(id) = self.corpus.ids.iter().find(|id| bad(id)) {
            return Err(Error::Input(format!(
                "{}: document id {id:?} contains whitespace, which a TREC run file cannot hold",
                self.dir.join("corpus.jsonl").display()
            )));
        }
        if let Some(q) = self.queries.iter().find(|q| bad(&q.id)) {
            return Err(Error::Input(format!(
                "{}: query id {:?} contains whitespace, which a TREC run file cannot hold",
                self.dir.join("queries.jsonl").display(),
                q.id
            )));
        }
        Ok(())
    }
}

fn available_splits(qrels_dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(qrels_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.strip_suffix(".tsv").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        format!("none (no {}/*.tsv)", qrels_dir.display())
    } else {
        names.join(", ")
    }
}

/// An id as BEIR's JSON files write it: a string, or (in a few hand-made sets) an integer.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Str(String),
    Int(i64),
}

impl Id {
    fn into_string(self) -> String {
        match self {
            Id::Str(s) => s,
            Id::Int(i) => i.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct CorpusLine {
    #[serde(rename = "_id")]
    id: Id,
    #[serde(default)]
    title: Option<String>,
    text: String,
}

#[derive(Deserialize)]
struct QueryLine {
    #[serde(rename = "_id")]
    id: Id,
    text: String,
}

/// Calls `f(line_number, line)` for every non-blank line, with `\r` and a leading BOM removed;
/// I/O errors and invalid UTF-8 are reported with the line number.
fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = std::str::from_utf8(&buf).map_err(|e| {
            Error::Input(format!(
                "{}:{line_no}: not valid UTF-8 ({e})",
                path.display()
            ))
        })?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = if line_no == 1 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        f(line_no, line)?;
    }
}

fn bad_line(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}:{line}: {msg}", path.display()))
}

fn check_id(path: &Path, line: usize, id: &str, seen: &HashMap<String, usize>) -> Result<()> {
    if id.is_empty() {
        return Err(bad_line(path, line, "empty \"_id\""));
    }
    if let Some(first) = seen.get(id) {
        return Err(bad_line(
            path,
            line,
            format!("duplicate \"_id\" {id:?} (first at line {first})"),
        ));
    }
    Ok(())
}

pub fn read_corpus(path: &Path) -> Result<Corpus> {
    let mut corpus = Corpus::default();
    let mut lines: HashMap<String, usize> = HashMap::new();
    for_each_line(path, |line, s| {
        let doc: CorpusLine = serde_json::from_str(s).map_err(|e| {
            bad_line(
                path,
                line,
                format!(
                    "expected a JSON object with \"_id\" (string), \"text\" (string) and \
                     optional \"title\": {e}"
                ),
            )
        })?;
        let id = doc.id.into_string();
        check_id(path, line, &id, &lines)?;
        let index = u32::try_from(corpus.ids.len())
            .map_err(|_| bad_line(path, line, "more than 2^32 documents"))?;
        lines.insert(id.clone(), line);
        corpus.index.insert(id.clone(), index);
        corpus.ids.push(id);
        corpus
            .texts
            .push(join_title(doc.title.as_deref(), &doc.text));
        Ok(())
    })?;
    if corpus.ids.is_empty() {
        return Err(Error::Input(format!("{}: no documents", path.display())));
    }
    Ok(corpus)
}

/// id → (text, line).
pub fn read_queries(path: &Path) -> Result<HashMap<String, (String, usize)>> {
    let mut out: HashMap<String, (String, usize)> = HashMap::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    for_each_line(path, |line, s| {
        let q: QueryLine = serde_json::from_str(s).map_err(|e| {
            bad_line(
                path,
                line,
                format!("expected a JSON object with \"_id\" (string) and \"text\" (string): {e}"),
            )
        })?;
        let id = q.id.into_string();
        check_id(path, line, &id, &lines)?;
        lines.insert(id.clone(), line);
        out.insert(id, (q.text, line));
        Ok(())
    })?;
    Ok(out)
}

/// One judgment line.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    pub line: usize,
    pub query_id: String,
    pub doc_id: String,
    pub label: i64,
}

/// Splits on tabs when the line has one (BEIR's files), else on runs of spaces.
fn fields(line: &str) -> Vec<&str> {
    if line.contains('\t') {
        line.split('\t').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

pub fn read_qrels(path: &Path) -> Result<Vec<Judgment>> {
    let mut out = Vec::new();
    let mut header_seen = false;
    for_each_line(path, |line, s| {
        let f = fields(s);
        let parsed = (f.len() == 3).then(|| f[2].parse::<i64>());
        if !header_seen {
            header_seen = true;
            if let Some(Ok(_)) = parsed {
                return Err(bad_line(
                    path,
                    line,
                    "the first line must be the header \"query-id<TAB>corpus-id<TAB>score\"; \
                     this one looks like a judgment (BEIR would skip it silently)",
                ));
            }
            return Ok(());
        }
        let label = match parsed {
            None => {
                return Err(bad_line(
                    path,
                    line,
                    format!(
                        "expected 3 tab-separated fields (query-id, corpus-id, score), got {}",
                        f.len()
                    ),
                ))
            }
            Some(Err(_)) => {
                return Err(bad_line(
                    path,
                    line,
                    format!("score {:?} is not an integer", f[2]),
                ))
            }
            Some(Ok(l)) => l,
        };
        if f[0].is_empty() || f[1].is_empty() {
            return Err(bad_line(path, line, "empty query-id or corpus-id"));
        }
        out.push(Judgment {
            line,
            query_id: f[0].to_string(),
            doc_id: f[1].to_string(),
            label,
        });
        Ok(())
    })?;
    if !header_seen {
        return Err(Error::Input(format!(
            "{}: empty (expected a header and judgments)",
            path.display()
        )));
    }
    if out.is_empty() {
        return Err(Error::Input(format!(
            "{}: a header but no judgments",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn reads_titles_ids_and_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "corpus.jsonl",
            "\u{feff}{\"_id\": \"a\", \"title\": \"T\", \"text\": \"x\", \"metadata\": {}}\r\n\n\
             {\"_id\": 7, \"text\": \"y\"}\n{\"_id\": \"b\", \"title\": \"\", \"text\": \"z\"}\n\
             {\"_id\": \"c\", \"title\": null, \"text\": \"\"}",
        );
        let c = read_corpus(&p).unwrap();
        assert_eq!(c.ids, ["a", "7", "b", "c"]);
        assert_eq!(c.texts, ["T x", "y", "z", ""]);
        assert_eq!(c.index["b"], 2);
    }

    #[test]
    fn errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"a\", \"text\": \"y\"}\n",
                ":2: duplicate \"_id\" \"a\" (first at line 1)",
            ),
            (
                "{\"_id\": \"a\", \"text\": \"x\"}\n\n{\"_id\": \"b\"}\n",
                ":3: expected a JSON object",
            ),
            ("{\"_id\": \"\", \"text\": \"x\"}\n", ":1: empty \"_id\""),
            ("[1, 2]\n", ":1: expected"),
        ];
        for (content, needle) in cases {
            let p = write(d.path(), "corpus.jsonl", content);
            let e = read_corpus(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("corpus.jsonl{needle}")), "{e}");
        }
        let p = d.path().join("bad.jsonl");
        std::fs::write(&p, b"{\"_id\": \"a\", \"text\": \"x\"}\n\xff\n").unwrap();
        let e = read_corpus(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2: not valid UTF-8"), "{e}");
    }

    #[test]
    fn qrels_header_fields_and_scores() {
        let d = tempfile::tempdir().unwrap();
        let ok = write(
            d.path(),
            "q.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq1\td2\t0\nq2 d3 -1\n",
        );
        let j = read_qrels(&ok).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!((j[2].line, j[2].label), (5, -1));
        let cases = [
            ("q1\td1\t1\n", "q.tsv:1: the first line must be the header"),
            (
                "h\th\th\nq1\td1\n",
                "q.tsv:2: expected 3 tab-separated fields",
            ),
            (
                "h\th\th\nq1\td1\t1.5\n",
                "q.tsv:2: score \"1.5\" is not an integer",
            ),
            ("h\th\th\n\tx\t1\n", "q.tsv:2: empty query-id"),
            ("h\th\th\n", "a header but no judgments"),
            ("", "q.tsv: empty"),
        ];
        for (content, needle) in cases {
            let p = write(d.path(), "q.tsv", content);
            let e = read_qrels(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{content:?}: {e}");
        }
    }
}
