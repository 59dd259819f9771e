//! A model directory opened as a whole: configuration, sentence-transformers settings,
//! tokenizer and mapped weights, every check run (see [`crate::model::schema`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::config::{BloomConfig, SentenceConfig};
use crate::model::tokenize::SpecbTokenizer;
use crate::model::weights::Checkpoint;

/// Everything read from a model directory.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: BloomConfig,
    pub sentence: SentenceConfig,
    pub tokenizer: SpecbTokenizer,
    pub checkpoint: Checkpoint,
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        use std::io::ErrorKind;
        let why = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => None,
            Ok(_) => Some((
                ErrorKind::NotADirectory,
                "not a directory: give the model's directory, not a file in it",
            )),
            Err(_) => Some((ErrorKind::NotFound, "model directory not found")),
        };
        if let Some((kind, why)) = why {
            return Err(Error::io(dir, std::io::Error::new(kind, why)));
        }
        let config = BloomConfig::from_file(&dir.join("config.json"))?;
        let sentence = SentenceConfig::from_dir(dir, config.hidden)?;
        let tokenizer = SpecbTokenizer::from_file(
            &dir.join("tokenizer.json"),
            sentence.max_seq_length,
            config.vocab,
        )?;
        let checkpoint = Checkpoint::open(dir)?;
        crate::model::schema::check(&checkpoint, &config)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            sentence,
            tokenizer,
            checkpoint,
        })
    }
}
