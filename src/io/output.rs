//! Output files that never destroy what they replace and never leave half a file behind.
//!
//! - A regular file (or a path that does not exist yet) is written to a temp file created
//!   exclusively, with a unique name, in the target's own directory, and renamed over the target
//!   only when complete. Two runs writing the same target each write their own temp file: the
//!   target ends up as one run's complete output, never a mix.
//! - A symlink is followed: the file it points to is what gets replaced, the link stays.
//! - This process's own streams named as paths (`/dev/stdout`, `/dev/stderr`, `/dev/fd/N`,
//!   `/proc/self/fd/N`) are written through the open stream, never resolved to the file behind
//!   it (that would replace a shell's redirection target, or fail on a pipe).
//! - Anything else that exists (a FIFO, a character device such as `/dev/null` or `/dev/stdout`,
//!   a pipe) is written directly: it is a stream, not a file to replace.
//! - A temp file is removed on every error path (drop) and, once [`remove_temps_on_signal`] is
//!   installed, on SIGINT/SIGTERM/SIGHUP too.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Temp files not yet renamed into place, removed by the signal handler.
fn live_temps() -> &'static Mutex<HashSet<PathBuf>> {
    static TEMPS: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    TEMPS.get_or_init(Default::default)
}

/// Installs a SIGINT/SIGTERM/SIGHUP handler that removes every live temp file and exits with
/// 130 (the shell's code for an interrupted command). For CLI commands that write files; a
/// server or an embedding host handles its own signals. Idempotent.
pub fn remove_temps_on_signal() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                if let Ok(temps) = live_temps().lock() {
                    for p in temps.iter() {
                        // A temp file, or a directory being built (`sgpt quantize`).
                        if std::fs::remove_file(p).is_err() {
                            let _ = std::fs::remove_dir_all(p);
                        }
                    }
                }
                eprintln!("sgpt: interrupted; partial output removed");
                std::process::exit(130);
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Input(format!("installing the signal handler: {e}")))
}

/// Marks `path` (a file or directory this process is writing under a temporary name) for removal
/// by the [`remove_temps_on_signal`] handler, until [`untrack_temp`].
pub fn track_temp(path: &Path) {
    if let Ok(mut t) = live_temps().lock() {
        t.insert(path.to_path_buf());
    }
}

/// Ends [`track_temp`] (the temporary was renamed into place or removed).
pub fn untrack_temp(path: &Path) {
    if let Ok(mut t) = live_temps().lock() {
        t.remove(path);
    }
}

/// The descriptor a path names when it is one of this process's own streams (`-`: stdout).
fn own_stream(path: &Path) -> Option<u32> {
    let s = path.to_str()?;
    match s {
        "-" | "/dev/stdout" => Some(1),
        "/dev/stderr" => Some(2),
        _ => s
            .strip_prefix("/dev/fd/")
            .or_else(|| s.strip_prefix("/proc/self/fd/"))
            .and_then(|n| n.parse().ok()),
    }
}

/// Opens one of this process's streams for writing: stdout and stderr are duplicated (so the
/// bytes go where the shell's redirection points, at its current offset); another descriptor
/// (a pipe from process substitution) is opened through its path, appending.
fn open_stream(path: &Path, fd: u32) -> Result<File> {
    use std::os::fd::AsFd;
    let dup = match fd {
        1 => std::io::stdout().as_fd().try_clone_to_owned(),
        2 => std::io::stderr().as_fd().try_clone_to_owned(),
        _ => {
            return OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| Error::io(path, e))
        }
    };
    dup.map(File::from).map_err(|e| Error::io(path, e))
}

/// The file a path finally names: symlinks followed (relative links against their own
/// directory), up to a depth that stops loops.
fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
                p = match p.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::io(
        path,
        std::io::Error::other("too many levels of symbolic links"),
    ))
}

/// What an output path names, decided once for [`check`] and [`OutputFile::create`].
enum Dest {
    /// One of this process's streams (fd).
    Stream(u32),
    /// An existing FIFO, device or other non-regular file, after symlinks.
    InPlace(PathBuf),
    /// A regular file (existing or not) `dst` in the existing directory `dir`.
    File { dst: PathBuf, dir: PathBuf },
}

fn classify(path: &Path) -> Result<Dest> {
    if let Some(fd) = own_stream(path) {
        return Ok(Dest::Stream(fd));
    }
    let dst = resolve_links(path)?;
    let err = |msg: String| Error::io(path, std::io::Error::other(msg));
    match std::fs::metadata(&dst) {
        Ok(m) if m.is_dir() => return Err(err("is a directory, not a file to write".into())),
        Ok(m) if !m.is_file() => return Ok(Dest::InPlace(dst)),
        _ => {}
    }
    let dir = match dst.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(err(format!("directory {} does not exist", dir.display())));
    }
    Ok(Dest::File { dst, dir })
}

/// Checks that `path` can be written (see [`OutputFile::create`]) without creating or opening
/// anything: for a command that writes its output only at the end.
pub fn check(path: &Path) -> Result<()> {
    classify(path).map(drop)
}

enum Target {
    /// Renamed onto `dst` when complete.
    Temp {
        file: tempfile::NamedTempFile,
        dst: PathBuf,
    },
    /// A FIFO, device or other stream: written in place.
    Direct(File),
}

/// A file being written; [`OutputFile::commit`] puts it in place. Dropping it uncommitted
/// removes the temp file.
pub struct OutputFile {
    /// None only after commit.
    target: Option<Target>,
    /// The path as the user gave it, for messages.
    shown: PathBuf,
    temp_path: Option<PathBuf>,
}

impl OutputFile {
    /// Checks the target and opens the temp file (or the stream). Fails before any work is
    /// done if the target is a directory or its directory does not exist.
    pub fn create(path: &Path) -> Result<Self> {
        let direct = |f: File| OutputFile {
            target: Some(Target::Direct(f)),
            shown: path.to_path_buf(),
            temp_path: None,
        };
        let (dst, dir) = match classify(path)? {
            Dest::Stream(fd) => return Ok(direct(open_stream(path, fd)?)),
            Dest::InPlace(dst) => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&dst)
                    .map_err(|e| Error::io(path, e))?;
                return Ok(direct(f));
            }
            Dest::File { dst, dir } => (dst, dir),
        };
        let name = dst
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // 0o666 before the umask, like File::create: the finished file gets the usual mode.
        let file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(&dir)
            .map_err(|e| Error::io(path, e))?;
        let temp_path = file.path().to_path_buf();
        if let Ok(mut t) = live_temps().lock() {
            t.insert(temp_path.clone());
        }
        Ok(OutputFile {
            target: Some(Target::Temp { file, dst }),
            shown: path.to_path_buf(),
            temp_path: Some(temp_path),
        })
    }

    /// The path as given (for messages).
    pub fn path(&self) -> &Path {
        &self.shown
    }

    fn file(&self) -> &File {
        match self
            .target
            .as_ref()
            .expect("target is set until commit consumes self")
        {
            Target::Temp { file, .. } => file.as_file(),
            Target::Direct(f) => f,
        }
    }

    /// A buffered writer over the file (its own handle); flush it before [`Self::commit`].
    pub fn writer(&self) -> Result<BufWriter<File>> {
        let f = self
            .file()
            .try_clone()
            .map_err(|e| Error::io(&self.shown, e))?;
        Ok(BufWriter::with_capacity(1 << 20, f))
    }

    /// Writes `bytes` as the whole content and commits.
    pub fn write_all_and_commit(self, bytes: &[u8]) -> Result<()> {
        {
            let mut w = self.writer()?;
            w.write_all(bytes).map_err(|e| Error::io(&self.shown, e))?;
            w.flush().map_err(|e| Error::io(&self.shown, e))?;
        }
        self.commit()
    }

    /// Puts the complete file in place (a stream: nothing to do).
    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp_path.take();
        let r = match self.target.take() {
            Some(Target::Temp { file, dst }) => file
                .persist(&dst)
                .map(drop)
                .map_err(|e| Error::io(&self.shown, e.error)),
            _ => Ok(()),
        };
        if let (Some(t), Ok(mut live)) = (temp, live_temps().lock()) {
            live.remove(&t);
        }
        r
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        // NamedTempFile removes the file itself; only forget it here.
        if let (Some(t), Ok(mut live)) = (self.temp_path.take(), live_temps().lock()) {
            live.remove(&t);
        }
    }
}

/// Writes `bytes` to `path` through an [`OutputFile`].
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    OutputFile::create(path)?.write_all_and_commit(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect()
    }

    #[test]
    fn writes_through_a_symlink_to_its_target() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real.txt");
        std::fs::write(&real, "old").unwrap();
        let link = d.path().join("link.txt");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        write_file(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new");
        assert!(temps_in(d.path()).is_empty());
    }

    #[test]
    fn a_fifo_is_written_in_place_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_file(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(temps_in(d.path()).is_empty());
    }

    #[test]
    fn a_directory_or_missing_directory_fails_before_any_file_is_made() {
        let d = tempfile::tempdir().unwrap();
        let e = OutputFile::create(d.path()).err().unwrap().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = OutputFile::create(&d.path().join("nope/out.jsonl"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(temps_in(d.path()).is_empty());
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing_and_keeps_the_old_target() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.txt");
        std::fs::write(&p, "previous run").unwrap();
        {
            let out = OutputFile::create(&p).unwrap();
            let mut w = out.writer().unwrap();
            w.write_all(b"half").unwrap();
            w.flush().unwrap();
            assert_eq!(temps_in(d.path()).len(), 1);
        }
        assert!(temps_in(d.path()).is_empty());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "previous run");
    }

    #[test]
    fn concurrent_writers_each_have_their_own_temp_and_the_target_is_one_of_them() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.txt");
        let a = OutputFile::create(&p).unwrap();
        let b = OutputFile::create(&p).unwrap();
        assert_eq!(temps_in(d.path()).len(), 2);
        for (o, byte) in [(&a, b'a'), (&b, b'b')] {
            let mut w = o.writer().unwrap();
            for _ in 0..1000 {
                w.write_all(&[byte; 100]).unwrap();
            }
            w.flush().unwrap();
        }
        b.commit().unwrap();
        a.commit().unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got, vec![b'a'; 100_000]);
        assert!(temps_in(d.path()).is_empty());
    }
}
