//! Benchmark support shared by `sgpt bench` and the tests: named BLOOM shapes with random
//! weights built in memory (no checkpoint needed), a synthetic corpus with a realistic length
//! mix, FLOP accounting, and the CPU's measured ceilings (copy bandwidth, GEMM rate).

use std::path::Path;
use std::time::Instant;

use memmap2::MmapMut;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::schema::Role;
use crate::model::weights::{Checkpoint, DType, MappedFile};

/// (name, hidden, layers, heads) of the BLOOM sizes in docs/semantics.md; 250880 embedding rows.
pub const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("bloom-560m", 1024, 24, 16),
    ("bloom-1b1", 1536, 24, 16),
    ("bloom-1b7", 2048, 24, 16),
    ("bloom-3b", 2560, 30, 32),
    ("bloom-7b1", 4096, 30, 32),
];

pub fn shape(name: &str) -> Result<BloomConfig> {
    SHAPES
        .iter()
        .find(|s| s.0 == name)
        .map(|&(_, hidden, layers, heads)| BloomConfig {
            hidden,
            layers,
            heads,
            vocab: 250880,
            eps: 1e-5,
        })
        .ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.0).collect();
            Error::Input(format!(
                "unknown shape {name:?}; known: {}",
                names.join(", ")
            ))
        })
}

/// splitmix64: seeds independent streams per (tensor, chunk), so values do not depend on threads.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Random weights at `cfg`'s shape as an in-memory safetensors "file", scaled like a trained
/// model so activations neither vanish nor overflow f16: matrices and embeddings uniform with
/// std 0.02 (BLOOM's initializer), layernorm weights 1 ± 0.1, biases std 0.02.
pub fn random_checkpoint(cfg: &BloomConfig, dtype: DType, seed: u64) -> Result<Checkpoint> {
    random_checkpoint_with(cfg, dtype, seed, &|_, _, v| v)
}

/// [`random_checkpoint`] with every value passed through `edit(tensor name, flat index, value)`
/// before it is stored: how the FP8 study injects outlier channels.
pub fn random_checkpoint_with(
    cfg: &BloomConfig,
    dtype: DType,
    seed: u64,
    edit: &(dyn Fn(&str, usize, f32) -> f32 + Sync),
) -> Result<Checkpoint> {
    if dtype == DType::F8E4M3 {
        return Err(Error::Input(
            "random weights are stored as F32, F16 or BF16 (quantize them with `sgpt quantize`)"
                .into(),
        ));
    }
    let tensors = crate::model::schema::tensors(cfg);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &tensors {
        let bytes = t.shape.iter().product::<usize>() * dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let start = 8 + header.len();
    let mut map =
        MmapMut::map_anon(start + offset).map_err(|e| Error::io("<random weights>", e))?;
    map[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    map[8..start].copy_from_slice(&header);
    let mut rest = &mut map[start..];
    let mut jobs = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let (this, tail) = rest.split_at_mut(t.shape.iter().product::<usize>() * dtype.size());
        rest = tail;
        jobs.push((i, t.role, t.name.as_str(), this));
    }
    const CHUNK: usize = 1 << 20; // elements per independently seeded chunk
    let sqrt3 = 3f32.sqrt();
    jobs.into_par_iter().for_each(|(i, kind, name, bytes)| {
        bytes
            .par_chunks_mut(CHUNK * dtype.size())
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut state = splitmix(seed ^ ((i as u64) << 32) ^ c as u64);
                for (k, e) in chunk.chunks_exact_mut(dtype.size()).enumerate() {
                    state = splitmix(state);
                    let u = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * sqrt3; // std 1
                    let v = match kind {
                        Role::NormWeight => 1.0 + 0.1 * u,
                        Role::Matrix | Role::Bias => 0.02 * u,
                    };
                    let v = edit(name, c * CHUNK + k, v);
                    match dtype {
                        DType::F32 => e.copy_from_slice(&v.to_le_bytes()),
                        DType::F16 => e.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                        DType::BF16 => e.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                        DType::F8E4M3 => e.fill(0x7f), // refused above
                    }
                }
            });
    });
    let map = map
        .make_read_only()
        .map_err(|e| Error::io("<random weights>", e))?;
    let label = Path::new("<random weights>");
    // Built from the schema; every loader checks it against the schema again.
    Ok(Checkpoint::from_file(
        label,
        MappedFile::from_mmap(label, map)?,
    ))
}

/// Deterministic synthetic corpus: ~30% short queries (8–14 tokens), the rest passages averaging
/// ≈ 80 tokens with a tail up to `max_len`; ids drawn from `4..vocab`, bracket-wrapped.
pub fn synthetic_corpus(
    n: usize,
    vocab: u32,
    max_len: usize,
    brackets: [(u32, u32); 2],
) -> Vec<Vec<u32>> {
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state = splitmix(state);
        state
    };
    (0..n)
        .map(|_| {
            let query = next() % 10 < 3;
            let len = if query {
                8 + (next() % 7) as usize
            } else {
                // sum of three uniforms on [0, 53]: mean ≈ 80; one in eight doubled + 80 (the tail)
                let base = (0..3).map(|_| (next() % 54) as usize).sum::<usize>();
                if next() % 8 == 0 {
                    base * 2 + 80
                } else {
                    base
                }
            }
            .clamp(1, max_len);
            let (o, c) = brackets[if query { 0 } else { 1 }];
            let mut ids = vec![o];
            ids.extend((0..len).map(|_| 4 + (next() % (vocab as u64 - 4)) as u32));
            ids.push(c);
            ids
        })
        .collect()
}

/// FLOPs of one forward over `lengths`: 2 per parameter per token in the projections, plus
/// QKᵀ and PV over the causal pairs of each sequence (4·H per pair per layer).
pub fn forward_flops(cfg: &BloomConfig, lengths: &[usize]) -> f64 {
    let tokens: usize = lengths.iter().sum();
    let pairs: usize = lengths.iter().map(|&n| n * (n + 1) / 2).sum();
    let proj = 2.0 * (cfg.non_embedding_params() as f64) * tokens as f64;
    let attn = 4.0 * cfg.hidden as f64 * cfg.layers as f64 * pairs as f64;
    proj + attn
}

/// Best-of-`reps` seconds of `f`.
pub fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The CPU's copy bandwidth in bytes/s (bytes read + written by a 256 MiB memcpy).
pub fn cpu_copy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let t = best_of(5, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    });
    2.0 * n as f64 / t
}

/// The `gemm` crate's f32 rate in FLOP/s at [m × k]·[k × n] on all threads.
pub fn cpu_gemm_rate(m: usize, k: usize, n: usize) -> f64 {
    // Random operands like every other bench: constants could take shortcuts no real run gets.
    let a = crate::seeded::uniform(m * k, 1, 1.0);
    let w = crate::seeded::uniform(n * k, 2, 0.02);
    let b = crate::seeded::uniform(n, 3, 0.02);
    let mut y = vec![0f32; m * n];
    let t = best_of(3, || {
        crate::backend::cpu::linear::linear(&a, &w, &b, &mut y, false)
    });
    2.0 * (m * k * n) as f64 / t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_checkpoint_loads_and_is_deterministic() {
        let cfg = BloomConfig {
            hidden: 32,
            layers: 2,
            heads: 4,
            vocab: 100,
            eps: 1e-5,
        };
        let a = random_checkpoint(&cfg, DType::F16, 1).unwrap();
        let b = random_checkpoint(&cfg, DType::F16, 1).unwrap();
        let cpu = crate::backend::cpu::CpuModel::load(&a, &cfg).unwrap();
        let batch = crate::backend::batch::PackedBatch::from_seqs(&[vec![5u32, 6, 7]]);
        let e = cpu.embed(&batch).unwrap();
        assert!(e.iter().all(|v| v.is_finite()) && e.iter().any(|v| *v != 0.0));
        let (ta, tb) = (
            a.get("h.1.mlp.dense_4h_to_h.weight").unwrap(),
            b.get("h.1.mlp.dense_4h_to_h.weight").unwrap(),
        );
        assert_eq!(ta.bytes(), tb.bytes());
        let ln = a.get("ln_f.weight").unwrap().to_f32();
        assert!(
            ln.iter().all(|v| (0.8..1.2).contains(v)),
            "layernorm weights near 1"
        );
        assert!(shape("bloom-7b1").unwrap().non_embedding_params() > 6_000_000_000);
        assert!(shape("bloom-9z").is_err());
    }

    #[test]
    fn edits_reach_only_the_values_they_name() {
        let cfg = BloomConfig {
            hidden: 32,
            layers: 1,
            heads: 4,
            vocab: 10,
            eps: 1e-5,
        };
        let plain = random_checkpoint(&cfg, DType::F32, 5).unwrap();
        let edited = random_checkpoint_with(&cfg, DType::F32, 5, &|name, i, v| {
            if name == "h.0.input_layernorm.weight" && i == 7 {
                v * 50.0
            } else {
                v
            }
        })
        .unwrap();
        for t in crate::model::schema::tensors(&cfg) {
            let (p, e) = (
                plain.get(&t.name).unwrap().to_f32(),
                edited.get(&t.name).unwrap().to_f32(),
            );
            for (i, (p, e)) in p.iter().zip(e.iter()).enumerate() {
                if t.name == "h.0.input_layernorm.weight" && i == 7 {
                    assert_eq!(*e, p * 50.0);
                } else {
                    assert_eq!(p, e, "{} [{i}]", t.name);
                }
            }
        }
    }

    #[test]
    fn corpus_has_the_promised_mix() {
        let c = synthetic_corpus(2000, 1000, 297, [(1, 2), (3, 4)]);
        let queries = c.iter().filter(|s| s[0] == 1).count();
        let mean_doc = c.iter().filter(|s| s[0] == 3).map(Vec::len).sum::<usize>() as f64
            / (2000 - queries) as f64;
        assert!((500..700).contains(&queries), "{queries} queries");
        assert!((70.0..110.0).contains(&mean_doc), "mean passage {mean_doc}");
        assert!(c.iter().all(|s| s.len() <= 299
            && s.iter()
                .skip(1)
                .take(s.len() - 2)
                .all(|&t| (4..1000).contains(&t))));
    }
}
