//! `sgpt embed`: texts (arguments, a file, stdin) in, one vector per text out, in input order.

use std::io::Seek;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use sgpt::io::output::OutputFile;
use sgpt::io::{check_empty, EmbeddingWriter, EmptyTexts, InputFormat, InputReader, InputText};
use sgpt::model::tokenize::Kind;

use super::{progress_bar, setup, Common, KindArg, TEXTS};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    common: Common,
    /// Texts to embed (alternative to --input).
    texts: Vec<String>,
    /// Read texts from FILE ("-" for stdin): plain lines, or JSONL objects with "text" and
    /// optional "kind" ("query"|"document") and "title" (joined as "title text").
    #[arg(long, short)]
    input: Option<String>,
    /// How to read --input.
    #[arg(long, value_enum, default_value = "auto")]
    format: InputFormat,
    /// Kind of every text without its own "kind": queries get [ ], documents { }.
    #[arg(long, value_enum, default_value = "query")]
    kind: KindArg,
    /// Write to FILE instead of stdout: JSONL ({"embedding": [...]} per line), or a float32
    /// .npy matrix [texts, hidden] when FILE ends in .npy.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Scale embeddings to unit length (the reference does not; cosine similarity is unchanged).
    #[arg(long)]
    normalize: bool,
    /// Embed empty or whitespace-only texts (as the bare brackets) instead of refusing them.
    #[arg(long)]
    allow_empty: bool,
    /// No progress bar or notices on stderr.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let default_kind = Kind::from(a.kind);
    // Cheap, so before reading a large input.
    a.common.engine.device.check_available()?;
    match (&a.input, a.texts.is_empty()) {
        (Some(_), false) => bail!("give texts as arguments or with --input, not both"),
        (None, true) => {
            bail!("no texts: give them as arguments or with --input FILE (- for stdin)")
        }
        (None, false) => {
            let inputs: Vec<InputText> = a
                .texts
                .iter()
                .enumerate()
                .map(|(i, t)| InputText {
                    text: t.clone(),
                    kind: default_kind,
                    line: i + 1,
                })
                .collect();
            if !a.allow_empty {
                check_empty(&inputs, "arguments")?;
            }
            let n = inputs.len();
            let stream = inputs.into_iter().map(|t| Ok((t.text, t.kind)));
            embed_inputs(&a, "arguments", n, stream)
        }
        (Some(f), true) => {
            // Streamed twice: once to check every line (bad JSON, empty texts) and count them
            // before the model loads and anything is written, once to embed; neither pass holds
            // more than a chunk. Standard input is spooled to an unnamed temporary file first.
            let (mut file, name) = if f == "-" {
                let mut tmp =
                    tempfile::tempfile().context("creating a temporary file for stdin")?;
                std::io::copy(&mut std::io::stdin().lock(), &mut tmp).context("reading stdin")?;
                (tmp, "<stdin>".to_string())
            } else {
                let file = std::fs::File::open(f).with_context(|| format!("reading {f}"))?;
                (file, f.clone())
            };
            let reader = |file: &mut std::fs::File| -> Result<_> {
                file.rewind().with_context(|| format!("reading {name}"))?;
                let r = std::io::BufReader::with_capacity(1 << 20, file.try_clone()?);
                Ok(InputReader::new(r, &name, a.format, default_kind)?)
            };
            let mut empty = EmptyTexts::default();
            let mut n = 0;
            for t in reader(&mut file)? {
                empty.add(&t?);
                n += 1;
            }
            if !a.allow_empty {
                empty.check(&name)?;
            }
            let stream = reader(&mut file)?.map(|t| t.map(|t| (t.text, t.kind)));
            embed_inputs(&a, &name, n, stream)
        }
    }
}

/// Embeds `n` texts from `stream` (already checked) into the output; text `i` is line or
/// argument `i + 1` of `source`.
fn embed_inputs<I>(a: &EmbedArgs, source: &str, n: usize, stream: I) -> Result<()>
where
    I: Iterator<Item = sgpt::Result<(String, Kind)>> + Send,
{
    if n == 0 {
        bail!("{source}: no texts to embed");
    }
    // Checked and opened before the model loads; complete or absent (sgpt::io::output).
    sgpt::io::output::remove_temps_on_signal()?;
    let out = a.output.as_deref().map(OutputFile::create).transpose()?;
    let embedder = setup(&a.common, a.quiet)?;
    let mut writer = EmbeddingWriter::create(out, n, embedder.hidden())?;
    let bar = progress_bar(n as u64, a.quiet, TEXTS);
    let h = embedder.hidden();
    let mut cut = Vec::new();
    embedder.embed_stream(stream, a.normalize, &mut |i| cut.push(i), &mut |_, e| {
        writer.write(e)?;
        bar.inc((e.len() / h) as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    writer.finish()?;
    if !a.quiet {
        report_truncation(n, &cut, embedder.model.tokenizer.max_text_tokens());
    }
    Ok(())
}

/// Truncation follows the reference, but silently losing text would surprise: say so.
fn report_truncation(n: usize, cut: &[usize], max: usize) {
    if cut.is_empty() {
        return;
    }
    let lines: Vec<usize> = cut.iter().take(10).map(|&i| i + 1).collect();
    eprintln!(
        "sgpt: note: {} of {} texts were longer than {max} tokens and were truncated on the right, \
         as the reference does (line/argument {})",
        cut.len(),
        n,
        sgpt::error::list_some(&lines, cut.len())
    );
}
