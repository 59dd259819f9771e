//! Shared test helpers: paths, golden fixtures, and the one place tolerances are compared.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root: `$SGPT_REPO_ROOT` when set (test binaries carried to a GPU machine run
/// from another checkout), else where the tests were compiled.
pub fn root() -> PathBuf {
    std::env::var_os("SGPT_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn tiny_model() -> PathBuf {
    root().join("models/sgpt-tiny")
}

pub fn tiny_b_model() -> PathBuf {
    root().join("tests/fixtures/models/tiny-b")
}

/// Compares element-wise with |got - want| ≤ atol + rtol·|want|; on failure reports the label,
/// the worst element (index, both values, |Δ|) and NaN counts on both sides.
pub fn assert_close(label: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{label}: length {} vs {}",
        got.len(),
        want.len()
    );
    let nan_got = got.iter().filter(|v| v.is_nan()).count();
    let nan_want = want.iter().filter(|v| v.is_nan()).count();
    let mut worst = (0usize, 0f32, f32::NEG_INFINITY);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.2 || excess.is_nan() {
            worst = (
                i,
                (g - w).abs(),
                if excess.is_nan() {
                    f32::INFINITY
                } else {
                    excess
                },
            );
        }
    }
    let (i, d, excess) = worst;
    assert!(
        nan_got == 0 && nan_want == 0 && excess <= 0.0,
        "{label}: worst element {i}: got {} want {} |Δ| {d:.3e} (atol {atol:e}, rtol {rtol:e}); NaNs got {nan_got} want {nan_want}",
        got[i], want[i]
    );
}

/// max |got - want| (for reporting measured errors).
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// One golden text from tools/make_fixtures.py.
pub struct GoldenText {
    pub text: String,
    pub kind: sgpt::model::tokenize::Kind,
    pub truncated: bool,
    pub ids: Vec<u32>,
    /// [L+1, n, H] flattened, as transformers' hidden_states.
    pub hidden: Vec<f32>,
    pub embedding: Vec<f32>,
}

pub struct Golden {
    pub model_dir: PathBuf,
    pub layers: usize,
    pub hidden: usize,
    pub texts: Vec<GoldenText>,
}

fn f32s(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn load_golden(name: &str) -> Golden {
    let dir = root().join("tests/fixtures/golden");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let texts = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let ids = st.tensor(&format!("ids.{k}")).unwrap();
            assert_eq!(ids.dtype(), safetensors::Dtype::I64);
            let ids = ids
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect();
            GoldenText {
                text: t["text"].as_str().unwrap().to_string(),
                kind: t["kind"].as_str().unwrap().parse().unwrap(),
                truncated: t["truncated"].as_bool().unwrap(),
                ids,
                hidden: f32s(&st.tensor(&format!("hidden.{k}")).unwrap()),
                embedding: f32s(&st.tensor(&format!("embedding.{k}")).unwrap()),
            }
        })
        .collect();
    Golden {
        model_dir: root().join(meta["model_dir"].as_str().unwrap()),
        layers: meta["layers"].as_u64().unwrap() as usize,
        hidden: meta["hidden"].as_u64().unwrap() as usize,
        texts,
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copies a directory tree (a model directory, to corrupt a copy of it).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A writable copy of a model directory in a temp dir.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(src, dir.path());
    dir
}

/// (name, dtype, shape, bytes) of every tensor in a safetensors file.
pub type Records = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites `dir/model.safetensors` through `edit`.
pub fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Records)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut recs: Records = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut recs);
    let views: Vec<(String, safetensors::tensor::TensorView)> = recs
        .iter()
        .map(|(n, d, s, b)| {
            let v = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// Rewrites a JSON file through `edit`.
pub fn edit_json(path: PathBuf, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// The vectors of `sgpt embed`'s JSONL output (`{"embedding": [...]}` per line), as f32.
pub fn parse_jsonl(out: &[u8]) -> Vec<Vec<f32>> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}
