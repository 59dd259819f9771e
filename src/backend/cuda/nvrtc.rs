//! Kernels are compiled at start-up by NVRTC for the device's own architecture, to CUBIN (PTX
//! from a newer NVRTC can be rejected by an older driver), and cached on disk under a key
//! of source, architecture and NVRTC version, so a second start does not recompile.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::backend::cuda::kernels::KernelSource;
use crate::error::{Error, Result};

/// A compiled kernel file.
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's log, with ptxas' register/spill report (`--ptxas-options=-v`).
    pub log: String,
    pub from_cache: bool,
}

/// True when libnvrtc can be loaded. cudarc panics on first use when it cannot, so every entry
/// point checks this first.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// (major, minor) of the loaded NVRTC.
pub fn version() -> Result<(i32, i32)> {
    if !available() {
        return Err(Error::Cuda(
            "NVRTC (libnvrtc.so) is not installed or not on LD_LIBRARY_PATH".into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live locals.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Directories searched for `cuda_fp16.h` / `cuda_bf16.h`: `$SGPT_CUDA_INCLUDE`,
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("SGPT_CUDA_INCLUDE") {
        v.extend(std::env::split_paths(&p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            v.push(Path::new(&p).join("include"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/include"));
    v.retain(|d| d.join("cuda_fp16.h").exists());
    v
}

/// Compiles `k` for `arch` (e.g. "sm_90") to CUBIN, or reads it from `cache_dir` (None: no
/// disk cache).
pub fn compile(k: &KernelSource, arch: &str, cache_dir: Option<&Path>) -> Result<Compiled> {
    compile_inner(k, arch, cache_dir, true)
}

/// As [`compile`], never reading the cache (a cached file failed to load), still writing it.
pub fn compile_fresh(k: &KernelSource, arch: &str, cache_dir: Option<&Path>) -> Result<Compiled> {
    compile_inner(k, arch, cache_dir, false)
}

fn compile_inner(
    k: &KernelSource,
    arch: &str,
    cache_dir: Option<&Path>,
    read_cache: bool,
) -> Result<Compiled> {
    let (major, minor) = version()?;
    let src = k.full_source();
    let key = cache_key(&src, arch, (major, minor));
    let cached = cache_dir.map(|d| {
        d.join(format!(
            "{}-{arch}-{key:016x}.cubin",
            k.file.trim_end_matches(".cu")
        ))
    });
    if let (Some(p), true) = (&cached, read_cache) {
        if let Ok(cubin) = std::fs::read(p) {
            return Ok(Compiled {
                cubin,
                log: String::new(),
                from_cache: true,
            });
        }
    }
    let includes = include_dirs();
    if includes.is_empty() {
        return Err(Error::Cuda(
            "cuda_fp16.h not found: set SGPT_CUDA_INCLUDE (or CUDA_HOME) to a CUDA include directory".into(),
        ));
    }
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    // NVRTC 12.9+ keeps its own compile cache and returns a cached result with an empty log,
    // so no ptxas report (seen on the H200 machine; NVIDIA/Fuser#4694). We cache CUBINs
    // ourselves, so NVRTC's cache only costs us the register and spill report.
    if (major, minor) >= (12, 9) {
        opts.push("--no-cache".to_string());
    }
    opts.extend(
        includes
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    let c_src =
        CString::new(src).map_err(|_| Error::Cuda(format!("{}: NUL byte in source", k.file)))?;
    let name = CString::new(k.file).unwrap_or_default();
    let prog = result::create_program(&c_src, Some(&name))
        .map_err(|e| Error::Cuda(format!("{}: {e:?}", k.file)))?;
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let outcome = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let cubin = outcome
        .map_err(|e| {
            Error::Cuda(format!(
                "{} ({arch}) failed to compile: {e:?}\n{log}",
                k.file
            ))
        })
        .and_then(|_| {
            let mut size = 0usize;
            // SAFETY: size query then a buffer of exactly that size, on a compiled program.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| Error::Cuda(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut buf = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| Error::Cuda(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok(buf)
        });
    // SAFETY: created above, not used afterwards.
    let _ = unsafe { result::destroy_program(prog) };
    let cubin = cubin?;
    if let Some(p) = &cached {
        // Best effort: a read-only cache directory only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // A name of our own, so concurrent writers never interleave; the rename is atomic.
        let tmp = p.with_extension(format!(
            "tmp.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(Compiled {
        cubin,
        log,
        from_cache: false,
    })
}

/// FNV-1a over the source, the architecture and the NVRTC version.
fn cache_key(src: &str, arch: &str, (major, minor): (i32, i32)) -> u64 {
    let mut h = crate::hash::Fnv::default();
    h.write(src.as_bytes());
    h.write(arch.as_bytes());
    h.write(format!("{major}.{minor}").as_bytes());
    h.value()
}

/// The default cache: `$SGPT_CACHE_DIR`, else `$XDG_CACHE_HOME/sgpt/kernels`, else
/// `~/.cache/sgpt/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("SGPT_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("sgpt").join("kernels"))
}

/// Register and spill counts per function from ptxas' verbose log:
/// (function, registers, spill store bytes, spill load bytes).
pub fn ptxas_report(log: &str) -> Vec<(String, u32, u32, u32)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    let mut spills = (0, 0);
    for line in log.lines() {
        // The entry's name comes first as "Compiling entry function 'f' for 'sm_XX'" and again
        // as "Function properties for f"; take either, so a build that omits one still parses.
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = rest.split_whitespace().next().map(str::to_string);
        } else if line.contains("bytes spill stores") {
            let nums: Vec<u32> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            if nums.len() >= 3 {
                spills = (nums[1], nums[2]);
            }
        } else if let Some(rest) = line.split("Used ").nth(1) {
            if let (Some(f), Some(regs)) = (
                current.take(),
                rest.split_whitespace().next().and_then(|r| r.parse().ok()),
            ) {
                out.push((f, regs, spills.0, spills.1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ptxas_report;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'a_f16' for 'sm_90'
ptxas info    : Function properties for a_f16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'b_f16' for 'sm_90'
ptxas info    : Function properties for b_f16
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]
";

    #[test]
    fn reads_registers_and_spills_per_function() {
        let want = vec![
            ("a_f16".to_string(), 22, 0, 0),
            ("b_f16".to_string(), 255, 12, 16),
        ];
        assert_eq!(ptxas_report(LOG), want);
        // A log without the "Compiling entry function" lines still names each function.
        let short: String = LOG
            .lines()
            .filter(|l| !l.contains("Compiling"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ptxas_report(&short), want);
        assert!(ptxas_report("").is_empty());
    }
}
