//! A resumable on-disk cache of embeddings, written in shards as they are computed.
//!
//! ```text
//! ROOT/<name>-<hash>/manifest.json                identity + the list of complete shards
//! ROOT/<name>-<hash>/rows-<start>-<end>.npy       float32 [end - start, H], C order
//! ROOT/<name>-<hash>/lock                         held (flock) while a process uses the cache
//! ```
//!
//! `<hash>` is a hash of the *identity* (model files, texts, embedding settings; the caller
//! decides), which the manifest also holds in full and which is compared on open, so a cache is
//! only ever reused for exactly the same inputs.
//!
//! Crash safety: a shard is written to `*.tmp`, flushed to disk, renamed into place, and only
//! then added to the manifest, which is itself replaced atomically (write, fsync, rename). A
//! shard is therefore either listed and complete, or ignored: on open, files the manifest does
//! not list (a `.tmp` from a killed run, a shard renamed just before the kill) are deleted, and
//! a listed shard whose size is wrong ends the usable prefix. Each shard's checksum is verified
//! when it is read; a corrupt one is dropped with everything after it and recomputed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::hash::Fnv;
use crate::io::npy_header;

/// Manifest format; bump when the layout changes (old caches are then rebuilt).
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub file: String,
    pub start: usize,
    pub rows: usize,
    /// FNV-1a of the float32 data (little endian), hex.
    pub checksum: String,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    hidden: usize,
    identity: Value,
    shards: Vec<ShardEntry>,
}

/// What opening found, for the operator.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OpenReport {
    /// Files removed because no manifest listed them (e.g. a shard half-written when killed).
    pub removed_files: Vec<String>,
    /// Listed shards dropped because their file was missing or had the wrong size.
    pub dropped_shards: usize,
    /// The manifest was unreadable or for other inputs: the cache was started over.
    pub reset: Option<String>,
}

pub struct ShardCache {
    dir: PathBuf,
    manifest: Manifest,
    /// Held for the life of the cache; the OS releases it if the process dies.
    _lock: File,
}

fn checksum(data: &[f32]) -> String {
    let mut f = Fnv::default();
    f.write(bytemuck::cast_slice(data));
    f.hex()
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of `bytes`.
fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |e| Error::io(&tmp, e);
    let mut f = File::create(&tmp).map_err(io)?;
    for p in parts {
        f.write_all(p).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable; not every filesystem allows syncing a directory.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl ShardCache {
    /// Opens (or creates) the cache for `identity` under `root`, keeps the longest complete
    /// prefix of shards and removes everything else.
    pub fn open(
        root: &Path,
        name: &str,
        identity: Value,
        hidden: usize,
    ) -> Result<(Self, OpenReport)> {
        let mut h = Fnv::default();
        h.write_str(&identity.to_string());
        let dir = root.join(format!("{name}-{}", h.hex()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::Input(format!(
                "cannot create the embedding cache {}: {e} (choose another place with --cache-dir)",
                dir.display()
            ))
        })?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Input(format!(
                    "{}: another process is using this embedding cache",
                    dir.display()
                )))
            }
            // Some network filesystems cannot lock; the cache still works, unguarded.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }

        let mut report = OpenReport::default();
        let fresh = || Manifest {
            format: FORMAT,
            hidden,
            identity: identity.clone(),
            shards: Vec::new(),
        };
        let manifest_path = dir.join("manifest.json");
        let mut manifest = match std::fs::read(&manifest_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(),
            Err(e) => return Err(Error::io(&manifest_path, e)),
            Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if m.format == FORMAT && m.hidden == hidden && m.identity == identity => m,
                Ok(_) => {
                    report.reset =
                        Some("the manifest is for other inputs or an older format".into());
                    fresh()
                }
                Err(e) => {
                    report.reset = Some(format!("the manifest is unreadable ({e})"));
                    fresh()
                }
            },
        };

        // The longest prefix of listed shards that are contiguous and the right size.
        let header = |rows| npy_header(rows, hidden).len() as u64;
        let mut keep = 0;
        let mut next = 0;
        for s in &manifest.shards {
            let want = header(s.rows) + (s.rows * hidden * 4) as u64;
            let ok = s.start == next
                && s.rows > 0
                && std::fs::metadata(dir.join(&s.file)).is_ok_and(|m| m.len() == want);
            if !ok {
                break;
            }
            keep += 1;
            next += s.rows;
        }
        report.dropped_shards = manifest.shards.len() - keep;
        manifest.shards.truncate(keep);
        let cache = ShardCache {
            dir,
            manifest,
            _lock: lock,
        };
        if report.dropped_shards > 0 || report.reset.is_some() {
            cache.save_manifest()?;
        }
        report.removed_files = cache.remove_unlisted()?;
        Ok((cache, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shards(&self) -> &[ShardEntry] {
        &self.manifest.shards
    }

    /// Rows covered by the complete shards (they start at row 0 and are contiguous).
    pub fn rows(&self) -> usize {
        self.manifest.shards.iter().map(|s| s.rows).sum()
    }

    fn save_manifest(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::Json {
            path: self.dir.join("manifest.json"),
            err: e,
        })?;
        write_atomically(&self.dir.join("manifest.json"), &[&json])
    }

    /// Deletes shard files and temporaries the manifest does not list.
    fn remove_unlisted(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours =
                name.ends_with(".tmp") || (name.starts_with("rows-") && name.ends_with(".npy"));
            if ours && !self.manifest.shards.iter().any(|s| s.file == name) {
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                removed.push(name);
            }
        }
        removed.sort();
        Ok(removed)
    }

    /// Appends rows `start .. start + rows` ([rows, H]): the data first, then the manifest.
    pub fn append(&mut self, start: usize, data: &[f32]) -> Result<()> {
        let hidden = self.manifest.hidden;
        let rows = data.len() / hidden;
        if start != self.rows() || rows == 0 || !data.len().is_multiple_of(hidden) {
            return Err(Error::Input(format!(
                "cache {}: shard must continue at row {} with whole rows, got row {start}",
                self.dir.display(),
                self.rows()
            )));
        }
        let file = format!("rows-{start:010}-{:010}.npy", start + rows);
        write_atomically(
            &self.dir.join(&file),
            &[&npy_header(rows, hidden), bytemuck::cast_slice(data)],
        )?;
        self.manifest.shards.push(ShardEntry {
            file,
            start,
            rows,
            checksum: checksum(data),
        });
        self.save_manifest()
    }

    /// Reads shard `i`; `Ok(None)` if its file is damaged (wrong checksum, unreadable), in which
    /// case it and every later shard have been dropped so the caller recomputes from its start.
    pub fn read(&mut self, i: usize) -> Result<Option<Vec<f32>>> {
        let s = self.manifest.shards[i].clone();
        let hidden = self.manifest.hidden;
        let path = self.dir.join(&s.file);
        let header = npy_header(s.rows, hidden);
        let mut bytes = Vec::new();
        let ok = File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_ok()
            && bytes.len() == header.len() + s.rows * hidden * 4
            && bytes[..header.len()] == header[..];
        let data: Option<Vec<f32>> = ok.then(|| {
            bytes[header.len()..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        });
        match data {
            Some(d) if checksum(&d) == s.checksum => Ok(Some(d)),
            _ => {
                self.truncate(i)?;
                Ok(None)
            }
        }
    }

    /// Keeps the first `n` shards and deletes the others.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        self.manifest.shards.truncate(n);
        self.save_manifest()?;
        self.remove_unlisted()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, h: usize, seed: f32) -> Vec<f32> {
        (0..n * h).map(|i| seed + i as f32 * 0.5).collect()
    }

    #[test]
    fn resumes_from_the_last_complete_shard() {
        let root = tempfile::tempdir().unwrap();
        let id = serde_json::json!({"model": "m", "texts": "abc"});
        let h = 3;
        {
            let (mut c, r) = ShardCache::open(root.path(), "documents", id.clone(), h).unwrap();
            assert_eq!(r, OpenReport::default());
            c.append(0, &rows(4, h, 0.0)).unwrap();
            c.append(4, &rows(2, h, 1.0)).unwrap();
            assert!(c.append(7, &rows(1, h, 0.0)).is_err());
            // A second process cannot use the cache at the same time.
            let e = ShardCache::open(root.path(), "documents", id.clone(), h)
                .err()
                .unwrap();
            assert!(e.to_string().contains("another process"), "{e}");
        }
        let (mut c, r) = ShardCache::open(root.path(), "documents", id.clone(), h).unwrap();
        assert_eq!(r, OpenReport::default());
        assert_eq!(c.rows(), 6);
        assert_eq!(c.read(1).unwrap().unwrap(), rows(2, h, 1.0));
        let dir = c.dir().to_path_buf();
        drop(c);

        // A killed run leaves a temporary and an unlisted shard; a listed shard is truncated.
        std::fs::write(dir.join("rows-0000000006-0000000009.npy.tmp"), b"half").unwrap();
        std::fs::write(dir.join("rows-0000000006-0000000009.npy"), b"unlisted").unwrap();
        let f = dir.join("rows-0000000004-0000000006.npy");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let (mut c, r) = ShardCache::open(root.path(), "documents", id.clone(), h).unwrap();
        assert_eq!(r.dropped_shards, 1);
        assert_eq!(
            r.removed_files,
            [
                "rows-0000000004-0000000006.npy",
                "rows-0000000006-0000000009.npy",
                "rows-0000000006-0000000009.npy.tmp"
            ]
        );
        assert_eq!(c.rows(), 4);

        // A flipped bit is caught by the checksum on read: the shard is dropped.
        let f0 = dir.join("rows-0000000000-0000000004.npy");
        let mut b = std::fs::read(&f0).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&f0, b).unwrap();
        assert_eq!(c.read(0).unwrap(), None);
        assert_eq!(c.rows(), 0);
        assert!(!f0.exists());

        // Other inputs → another directory; a damaged manifest → started over.
        let (other, _) =
            ShardCache::open(root.path(), "documents", serde_json::json!({"x": 1}), h).unwrap();
        assert_ne!(other.dir(), dir);
        drop(c);
        std::fs::write(dir.join("manifest.json"), b"{").unwrap();
        let (c, r) = ShardCache::open(root.path(), "documents", id, h).unwrap();
        assert!(r.reset.is_some());
        assert_eq!(c.rows(), 0);
    }

    #[test]
    fn shards_are_numpy_files() {
        let h = npy_header(1000, 4096);
        assert_eq!(h.len() % 64, 0);
        assert!(std::str::from_utf8(&h[10..])
            .unwrap()
            .contains("'shape': (1000, 4096)"));
    }
}
