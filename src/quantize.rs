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
    /// Entries of the model directory not copied: other weight formats (`*.bin`, `*.pt`, …) and
    /// hidden files or folders (`.git`, `.cache`).
    pub skipped: Vec<String>,
}

/// File endings of weights in other formats, never copied (the new directory's weights are its
/// one `model.safetensors`).
const OTHER_WEIGHTS: &[&str] = &[
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
];

/// Writes `dst` (which must not exist, outside `src`): `src`'s files but its weights, and one
/// `model.safetensors` with the linear layers of the blocks `blocks` covers in E4M3.
/// `progress(done, all)` is called as each tensor is written. The directory appears only when
/// complete and synced to disk: it is written under a unique temporary name beside `dst` and
/// renamed at the end (a failure removes it; so does SIGINT/SIGTERM/SIGHUP once
/// `io::output::remove_temps_on_signal` is installed, as the CLI does).
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
    if blocks.count(m.config.layers) == 0 {
        return Err(Error::Input(format!(
            "{}: nothing to quantize: --dtype {} covers none of its {} block(s)",
            src.display(),
            blocks.dtype_name(),
            m.config.layers
        )));
    }
    let (parent, name) = output_place(src, dst)?;
    let bad = non_finite(&m)?;
    if !bad.is_empty() {
        return Err(Error::Input(format!(
            "{}: {} tensor(s) hold NaN or Inf ({}): refusing to quantize them",
            src.display(),
            bad.len(),
            crate::error::list_some(&bad, bad.len())
        )));
    }
    let files = listing(&m.dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.partial-", name.to_string_lossy()))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let tmp_path = tmp.path().to_path_buf();
    crate::io::output::track_temp(&tmp_path);
    let out = parent.join(&name);
    let done = write(&m, &files, tmp.path(), blocks, progress).and_then(|bytes| {
        // Renamed without replacing: a directory that appeared meanwhile stays as it was.
        if std::fs::symlink_metadata(&out).is_ok() {
            return Err(exists(&out));
        }
        let kept = tmp.keep();
        std::fs::rename(&kept, &out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&kept);
            Error::io(&out, e)
        })?;
        sync(&parent)?;
        Ok(bytes)
    });
    // On success the temporary is renamed; on failure `tmp` removes it when dropped.
    crate::io::output::untrack_temp(&tmp_path);
    let bytes = done?;
    Ok(Written {
        dir: out,
        fp8_blocks: blocks.count(m.config.layers),
        bytes,
        source_bytes: m.checkpoint.total_bytes() as u64,
        skipped: files.skipped,
    })
}
/// Where the output goes: its parent directory (which must exist) and its name; refused when it
/// exists already (even as a dangling link) or lies inside the model directory.
fn output_place(src: &Path, dst: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(exists(dst));
    }
    let name = match dst.components().next_back() {
        Some(std::path::Component::Normal(n)) => n.to_os_string(),
        _ => {
            return Err(Error::Input(format!(
                "{}: not a name for a new directory",
                dst.display()
            )))
        }
    };
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = std::fs::canonicalize(&parent).map_err(|e| {
        Error::io(
            &parent,
            std::io::Error::new(e.kind(), format!("the output's parent directory: {e}")),
        )
    })?;
    let src = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
    if parent.starts_with(&src) {
        return Err(Error::Input(format!(
            "{}: the output would be inside the model directory {}: choose a place outside it",
            dst.display(),
            src.display()
        )));
    }
    Ok((parent, name))
}

fn exists(p: &Path) -> Error {
    Error::Input(format!(
        "{}: already exists; give a new directory for the quantized model",
        p.display()
    ))
}

/// The tensors holding NaN or Inf (a quantized copy of them would fail only when run).
fn non_finite(m: &ModelDir) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for spec in tensors(&m.config) {
        let k = m.checkpoint.get(&spec.name)?.count_non_finite();
        if k > 0 {
            bad.push(format!("`{}` ({k} values)", spec.name));
        }
    }
    Ok(bad)
}

/// What of the model directory is copied: relative paths.
struct Files {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    skipped: Vec<String>,
}

/// Lists `root`'s regular files and folders (a link to a file is copied as the file; a link to a
/// folder is refused: it could lead outside the model, or back into it), leaving out the
/// weights and, as `skipped`, other weight formats and hidden entries. FIFOs, sockets and
/// devices are left out (never opened).
fn listing(root: &Path) -> Result<Files> {
    let mut f = Files {
        dirs: Vec::new(),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let dir = root.join(&rel);
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            entries.push(e.map_err(|e| Error::io(&dir, e))?.file_name());
        }
        entries.sort();
        for name in entries {
            let (path, rel) = (dir.join(&name), rel.join(&name));
            let n = name.to_string_lossy();
            let link = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            let top = rel.parent() == Some(Path::new(""));
            if n.starts_with('.') {
                f.skipped.push(rel.display().to_string());
            } else if meta.is_dir() && link.file_type().is_symlink() {
                return Err(Error::Input(format!(
                    "{}: a link to a folder; quantize copies the model's own files and folders \
                     (replace the link with the folder)",
                    path.display()
                )));
            } else if meta.is_dir() {
                f.dirs.push(rel.clone());
                todo.push(rel);
            } else if !meta.is_file()
                || (top && (n.ends_with(".safetensors") || n == "model.safetensors.index.json"))
            {
                // not a regular file, or the weights this command rewrites
            } else if OTHER_WEIGHTS.iter().any(|x| n.ends_with(x)) {
                f.skipped.push(rel.display().to_string());
            } else {
                f.files.push(rel);
            }
        }
    }
    f.dirs.sort(); // parents before children
    Ok(f)
}

/// fsync of a file or directory, so that a rename after it publishes complete contents.
fn sync(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}

/// The new directory's files into `dir`; the bytes of its weights file.
fn write(
    m: &ModelDir,
    files: &Files,
    dir: &Path,
    blocks: Fp8Blocks,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<u64> {
    for d in &files.dirs {
        let to = dir.join(d);
        std::fs::create_dir(&to).map_err(|e| Error::io(&to, e))?;
    }
    for f in &files.files {
        let (from, to) = (m.dir.join(f), dir.join(f));
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        sync(&to)?;
    }
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
    safetensors::serialize_to_file(views, Some(info), &file).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => Error::io(&file, e),
        other => Error::Safetensors {
            path: file.clone(),
            msg: other.to_string(),
        },
    })?;
    sync(&file)?;
    sync(dir)?;
    Ok(std::fs::metadata(&file)
        .map_err(|e| Error::io(&file, e))?
        .len())
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
