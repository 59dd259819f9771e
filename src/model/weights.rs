//! Memory-mapped safetensors checkpoints, single-file or sharded (`model.safetensors.index.json`).
//!
//! Tensors are looked up by their `BloomModel` name; the `transformer.` prefix written by
//! `BloomForCausalLM` is accepted, and `lm_head.*` is never read. f32 tensors are used in place
//! (zero-copy); f16/bf16 are converted to f32 when a backend asks for them. E4M3 codes (the
//! linear layers of a checkpoint written by `sgpt quantize`) are read only through
//! [`Checkpoint::get_any`], by the FP8 loaders: [`Checkpoint::get`] refuses them, so no float
//! reader can take codes for weights.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};

/// Element types the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// OCP E4M3 codes, one byte each; their values need the scales stored beside them.
    F8E4M3,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
        }
    }
}

/// One mapped safetensors file.
pub struct MappedFile {
    pub path: PathBuf,
    mmap: Arc<Mmap>,
    metadata: Metadata,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

impl MappedFile {
    /// Maps `path` and validates its header (offsets inside the file, file not truncated).
    ///
    /// # Safety (of the mapping)
    /// The file must not be modified or truncated while it is mapped: that is undefined
    /// behaviour for any mmap reader. Model files are treated as read-only inputs.
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        // SAFETY: read-only mapping of a file we do not write; see the `# Safety` note above.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    /// Validates a mapping that holds a safetensors file (from disk, or built in memory by
    /// [`crate::bench::random_checkpoint`]); `path` names it in errors.
    pub fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    "the data section does not match the header (truncated file?)".to_string()
                }
                other => other.to_string(),
            },
        })?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            metadata,
            data_start: 8 + n,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    pub fn len_bytes(&self) -> usize {
        self.mmap.len()
    }
}

/// A whole checkpoint: one or more mapped files and where each tensor lives.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<MappedFile>,
    /// Tensor name as stored → index into `files`.
    location: HashMap<String, usize>,
}

/// A tensor's bytes inside the mapping, with its dtype and shape.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub file: PathBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    mmap: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl Checkpoint {
    /// A checkpoint made of one already mapped file (e.g. random weights built in memory).
    pub fn from_file(dir: &Path, f: MappedFile) -> Self {
        let location = f.names().into_iter().map(|n| (n, 0)).collect();
        Checkpoint {
            dir: dir.to_path_buf(),
            files: vec![f],
            location,
        }
    }

    /// Opens `model.safetensors`, or `model.safetensors.index.json` and every shard it names.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index.exists() {
            let v = crate::model::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::config(&index, "missing object `weight_map`"))?;
            // Open each shard once, in a stable order.
            let mut shards: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::config(&index, format!("weight_map[\"{name}\"] is not a file name"))
                })?;
                if file.contains('/') || file.contains('\\') || file.contains("..") {
                    return Err(Error::config(
                        &index,
                        format!("shard name {file:?} is not a plain file name"),
                    ));
                }
                let next = shards.len();
                shards.entry(file.to_string()).or_insert(next);
            }
            let mut by_index: Vec<(usize, String)> =
                shards.iter().map(|(f, &i)| (i, f.clone())).collect();
            by_index.sort();
            for (_, f) in &by_index {
                files.push(MappedFile::open(&dir.join(f))?);
            }
            for (name, file) in map {
                let i = shards[file.as_str().unwrap_or_default()];
                if files[i].info(name).is_none() {
                    return Err(Error::MissingTensor {
                        path: files[i].path.clone(),
                        name: format!("{name} (listed in {})", index.display()),
                    });
                }
                location.insert(name.clone(), i);
            }
        } else if single.exists() {
            let f = MappedFile::open(&single)?;
            for name in f.names() {
                location.insert(name, 0);
            }
            files.push(f);
        } else {
            return Err(Error::config(
                dir,
                "no model.safetensors or model.safetensors.index.json (convert PyTorch .bin \
                 checkpoints with tools/convert_checkpoint.py)",
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            location,
        })
    }

    /// Whether `name` is stored exactly so (no prefix lookup).
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Every stored name, as stored (unsorted, `lm_head.*` included).
    pub fn stored_names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Stored tensor names, sorted, `lm_head.*` left out.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .location
            .keys()
            .map(String::as_str)
            .filter(|n| !is_ignored(n))
            .collect();
        v.sort();
        v
    }

    /// Looks `name` up with and without the `transformer.` prefix; a float tensor (an E4M3 one
    /// is an error: its values need its scales, see [`Checkpoint::get_any`]).
    pub fn get(&self, name: &str) -> Result<TensorRef> {
        let t = self.get_any(name)?;
        if t.dtype == DType::F8E4M3 {
            return Err(Error::Dtype {
                path: t.file,
                name: t.name,
                got: "F8_E4M3".into(),
                expected: "F32, F16 or BF16 (only the linear layers' weights of a checkpoint \
                           written by `sgpt quantize` may be F8_E4M3)",
            });
        }
        Ok(t)
    }

    /// [`get`](Self::get), E4M3 codes included: for the FP8 loaders, `inspect` and the schema.
    pub fn get_any(&self, name: &str) -> Result<TensorRef> {
        let prefixed = format!("transformer.{name}");
        let (stored, &fi) = self
            .location
            .get_key_value(name)
            .or_else(|| self.location.get_key_value(&prefixed))
            .ok_or_else(|| Error::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })?;
        let f = &self.files[fi];
        let info = f.info(stored).ok_or_else(|| Error::MissingTensor {
            path: f.path.clone(),
            name: stored.clone(),
        })?;
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F8_E4M3 => DType::F8E4M3,
            other => {
                return Err(Error::Dtype {
                    path: f.path.clone(),
                    name: stored.clone(),
                    got: format!("{other:?}"),
                    expected: "F32, F16 or BF16 (or F8_E4M3 for the linear layers' weights \
                               of a checkpoint written by `sgpt quantize`)",
                })
            }
        };
        let (b, e) = info.data_offsets;
        Ok(TensorRef {
            name: stored.clone(),
            file: f.path.clone(),
            dtype,
            shape: info.shape.clone(),
            mmap: f.mmap.clone(),
            start: f.data_start + b,
            end: f.data_start + e,
        })
    }

    /// [`get`](Self::get) plus a shape check.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        let t = self.get(name)?;
        t.expect_shape(shape)?;
        Ok(t)
    }

    pub fn total_bytes(&self) -> usize {
        self.files.iter().map(MappedFile::len_bytes).sum()
    }
}

/// Opens a model file for reading, refusing anything but a regular file (after symlinks): a FIFO
/// would block the open forever, a device would be read as weights.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::other("not a regular file (a directory, FIFO or device?)"),
        ));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

fn is_ignored(name: &str) -> bool {
    name.starts_with("lm_head.")
}

impl TensorRef {
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.start..self.end]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::Shape {
                path: self.file.clone(),
                name: self.name.clone(),
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Elements that are NaN or ±Inf, read from the stored bits (no conversion), in parallel.
    pub fn count_non_finite(&self) -> usize {
        use rayon::prelude::*;
        let sz = self.dtype.size();
        // Chunks of whole elements; an element is non-finite iff its exponent bits are all ones.
        let chunk = (1 << 20) * sz;
        let dtype = self.dtype;
        self.bytes()
            .par_chunks(chunk)
            .map(|c| match dtype {
                DType::F32 => c
                    .chunks_exact(4)
                    .filter(|e| {
                        u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & 0x7f80_0000 == 0x7f80_0000
                    })
                    .count(),
                DType::F16 => c
                    .chunks_exact(2)
                    .filter(|e| u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00)
                    .count(),
                DType::BF16 => c
                    .chunks_exact(2)
                    .filter(|e| u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80)
                    .count(),
                // E4M3 has no infinities; S.1111.111 is NaN.
                DType::F8E4M3 => c.iter().filter(|&&b| b & 0x7f == 0x7f).count(),
            })
            .sum()
    }

    /// The tensor as f32: borrowed from the mapping when stored as aligned f32, else converted.
    pub fn to_f32(&self) -> F32Buf {
        if self.dtype == DType::F32 && bytemuck::try_cast_slice::<u8, f32>(self.bytes()).is_ok() {
            return F32Buf::Mapped {
                mmap: self.mmap.clone(),
                start: self.start,
                len: self.numel(),
            };
        }
        let mut v = vec![0f32; self.numel()];
        convert_to_f32(self.dtype, self.bytes(), &mut v);
        F32Buf::Owned(v)
    }

    /// Row `r` of a 2-D tensor, converted to f32 (the embedding gather: the matrix is never
    /// converted whole, it may be GBs).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.shape[1];
        let sz = self.dtype.size();
        let b = &self.bytes()[r * cols * sz..(r + 1) * cols * sz];
        convert_to_f32(self.dtype, b, out);
    }
}

/// Little-endian bytes of `dtype` → f32. Unaligned input is fine (read byte-wise). E4M3 codes are
/// not weights without their scales: they give NaN, so a misuse fails the engine's finite check
/// rather than passing codes off as values ([`Checkpoint::get`] never yields them).
pub fn convert_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::F8E4M3 => out.fill(f32::NAN),
    }
}

/// f32 data either borrowed from a mapping or owned.
pub enum F32Buf {
    Mapped {
        mmap: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

impl Deref for F32Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            // The alignment was checked when this variant was made (`to_f32`).
            F32Buf::Mapped { mmap, start, len } => {
                bytemuck::cast_slice(&mmap[*start..*start + *len * 4])
            }
            F32Buf::Owned(v) => v,
        }
    }
}

impl F32Buf {
    pub fn is_mapped(&self) -> bool {
        matches!(self, F32Buf::Mapped { .. })
    }
}
