//! `sgpt quantize`: a copy of a model directory whose linear layers are stored as E4M3 codes
//! with their per-output-channel scales (docs/fp8.md, "Quantized checkpoints"), so that
//! `--dtype fp8` (or `fp8-alternate`) loads them as they are instead of quantizing at load.
//!
//! The codes and scales are exactly those the loaders compute from the float weights
//! ([`fp8::quantize`] with one scale per row, [`fp8::row_scales`]; the GPU's quantize kernel
//! matches them bit for bit), so a quantized directory gives the same vectors as the original
//! run with the same dtype. Every other tensor is copied in its stored dtype; `lm_head.*` is
//! dropped (never read).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::View;
use safetensors::Dtype as StDtype;

use crate::backend::cpu::fp8::{self, ActScale, Fp8Blocks};
use crate::error::{Error, Result};
use crate::model::schema::{linear_weights, scale_name, tensors};
use crate::model::weights::{DType, TensorRef};
use crate::model::ModelDir;

/// What [`quantize_dir`] wrote.
pub struct Written {
    pub dir: PathBuf,
    /// Blocks whose linear layers are now E4M3.
    pub fp8_blocks: usize,
    /// Bytes of the new weights file, and of the checkpoint it came from.
    pub bytes: u64,
    pub source_bytes: u64,
}

/// Writes `dst` (which must not exist): `src`'s files but its weights, and one
/// `model.safetensors` with the linear layers of the blocks `blocks` covers in E4M3.
/// `progress(done, all)` is called after each tensor is written. The directory appears only
/// when complete: it is written under a temporary name beside `dst` and renamed at the end (a
/// failure removes it).
pub fn quantize_dir(
    src: &Path,
    dst: &Path,
    blocks: Fp8Blocks,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Written> {
    let m = ModelDir::open(src)?;
    if let Some(b) = fp8::stored_blocks(&m.checkpoint, &m.config)? {
        return Err(Error::Input(format!(
            "{}: its linear layers are E4M3 already (--dtype {}): quantize the float model",
            src.display(),
            b.dtype_name()
        )));
    }
    if dst.exists() {
        return Err(Error::Input(format!(
            "{}: already exists; give a new directory for the quantized model",
            dst.display()
        )));
    }
    let name = dst
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a directory name", dst.display())))?;
    let tmp = dst.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = write(&m, &tmp, blocks, progress).and_then(|bytes| {
        std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
        Ok(bytes)
    });
    match written {
        Ok(bytes) => Ok(Written {
            dir: dst.to_path_buf(),
            fp8_blocks: blocks.count(m.config.layers),
            bytes,
            source_bytes: m.checkpoint.total_bytes() as u64,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The new directory's files into `dir`; the bytes of its weights file.
fn write(
    m: &ModelDir,
    dir: &Path,
    blocks: Fp8Blocks,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<u64> {
    copy_except_weights(&m.dir, dir)?;
    let ckpt = &m.checkpoint;
    let fp8: std::collections::HashSet<String> = (0..m.config.layers)
        .filter(|&l| blocks.covers(l))
        .flat_map(linear_weights)
        .collect();
    let mut views = Vec::new();
    for spec in tensors(&m.config) {
        let t = ckpt.get(&spec.name)?;
        if fp8.contains(&spec.name) {
            views.push((scale_name(&spec.name), Lazy::new(t.clone(), Part::Scales)));
            views.push((spec.name, Lazy::new(t, Part::Codes)));
        } else {
            views.push((spec.name, Lazy::new(t, Part::AsStored)));
        }
    }
    let (done, all) = (AtomicUsize::new(0), views.len());
    let views: Vec<(String, Counted)> = views
        .into_iter()
        .map(|(n, v)| {
            let c = Counted {
                v,
                done: &done,
                all,
                progress,
            };
            (n, c)
        })
        .collect();
    let info = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "sgpt_quantize".to_string(),
            format!("--dtype {}", blocks.dtype_name()),
        ),
    ]);
    let file = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(info), &file).map_err(|e| Error::Safetensors {
        path: file.clone(),
        msg: e.to_string(),
    })?;
    Ok(std::fs::metadata(&file)
        .map_err(|e| Error::io(&file, e))?
        .len())
}

/// Copies `src`'s regular files and subdirectories into the new `dst`, leaving out the weights
/// (`*.safetensors` and the shard index).
fn copy_except_weights(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir(dst).map_err(|e| Error::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = std::fs::metadata(&from).map_err(|e| Error::io(&from, e))?;
        if meta.is_dir() {
            copy_except_weights(&from, &to)?;
        } else if meta.is_file()
            && !name.ends_with(".safetensors")
            && name != "model.safetensors.index.json"
        {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}

/// Which bytes of a stored tensor a view writes.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    AsStored,
    /// E4M3 codes of W [out, in], a scale per row.
    Codes,
    /// Those scales [out], f32.
    Scales,
}

/// A tensor of the new file, computed when the writer asks for its bytes (one at a time, so a
/// multi-GB checkpoint never needs more than one weight in f32 at once).
struct Lazy {
    t: TensorRef,
    part: Part,
    shape: Vec<usize>,
}

impl Lazy {
    fn new(t: TensorRef, part: Part) -> Self {
        let shape = match part {
            Part::Scales => t.shape[..1].to_vec(),
            _ => t.shape.clone(),
        };
        Lazy { t, part, shape }
    }
}

impl View for Lazy {
    fn dtype(&self) -> StDtype {
        match (self.part, self.t.dtype) {
            (Part::Codes, _) => StDtype::F8_E4M3,
            (Part::Scales, _) | (Part::AsStored, DType::F32) => StDtype::F32,
            (Part::AsStored, DType::F16) => StDtype::F16,
            (Part::AsStored, DType::BF16) => StDtype::BF16,
            (Part::AsStored, DType::F8E4M3) => StDtype::F8_E4M3, // refused by the caller
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n_in = self.t.shape[1..].iter().product::<usize>().max(1);
        match self.part {
            Part::AsStored => Cow::Borrowed(self.t.bytes()),
            Part::Codes => Cow::Owned(fp8::quantize(&self.t.to_f32(), n_in, ActScale::PerToken).0),
            Part::Scales => Cow::Owned(
                fp8::row_scales(&self.t.to_f32(), n_in)
                    .iter()
                    .flat_map(|s| s.to_le_bytes())
                    .collect(),
            ),
        }
    }

    fn data_len(&self) -> usize {
        let n = self.shape.iter().product::<usize>();
        match self.part {
            Part::AsStored => self.t.bytes().len(),
            Part::Codes => n,
            Part::Scales => 4 * n,
        }
    }
}

/// A [`Lazy`] that reports progress once its bytes are taken.
struct Counted<'a> {
    v: Lazy,
    done: &'a AtomicUsize,
    all: usize,
    progress: &'a (dyn Fn(usize, usize) + Sync),
}

impl View for Counted<'_> {
    fn dtype(&self) -> StDtype {
        self.v.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.v.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let d = self.v.data();
        (self.progress)(self.done.fetch_add(1, Ordering::Relaxed) + 1, self.all);
        d
    }
    fn data_len(&self) -> usize {
        self.v.data_len()
    }
}
