//! The engine seam: the [`Backend`] trait, the typed description each backend gives of itself,
//! the GPU kernel choices, and the packed batch that crosses the seam ([`batch`]). This module
//! depends on neither implementation; each of them — the readable CPU forward, also the oracle
//! of every GPU test ([`cpu`]), and the CUDA forward with hand-written kernels ([`cuda`]) —
//! depends on it and on `model` only.

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod replicas;

use serde::Serialize;

use crate::backend::batch::PackedBatch;
use crate::error::Result;

/// What a loader reports as it goes: (blocks loaded, blocks in all), after each transformer
/// block, so a caller can show progress while gigabytes of weights are read or uploaded.
pub type LoadProgress<'a> = &'a dyn Fn(usize, usize);

/// A packed batch in, embeddings [S, H] out.
pub trait Backend: Send + Sync {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>>;
    /// What runs the forward, typed: shown by `/info`, `sgpt bench --json`, the eval metrics,
    /// and part of the eval cache key.
    fn info(&self) -> BackendInfo;
    /// One line for people, e.g. "cpu (f32, 2 threads)".
    fn describe(&self) -> String {
        self.info().to_string()
    }
    /// What loading cost (bytes, seconds, GB/s), when worth telling the operator.
    fn load_summary(&self) -> Option<String> {
        None
    }
    /// The CUDA context this backend runs in, if any: other GPU work that belongs with the
    /// embeddings (eval's exact search, bench's ceilings and kernel timings) runs there too.
    /// cudarc's cross-stream event tracking may be off in it (the CUDA backend turns it off for
    /// graphs), so a caller must keep each of its buffers on one stream of its own and gets no
    /// automatic synchronization with the backend's stream.
    fn cuda_context(&self) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
        None
    }
    /// How many batches can usefully run at once: `embed` called from that many threads
    /// (more than 1 only for a replica set, [`replicas::Replicas`]).
    fn concurrency(&self) -> usize {
        1
    }
    /// Each replica's counters and state (empty for a single engine).
    fn replica_stats(&self) -> Vec<replicas::ReplicaStats> {
        Vec::new()
    }
}

/// Which backend, on what, computing in what, with which kernels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    /// "cpu" or "cuda".
    pub kind: &'static str,
    /// "cpu", or the GPU's name and architecture (e.g. "NVIDIA H200 (sm_90)").
    pub device: String,
    /// Activation type of the forward: "f32", or "fp8" / "fp8-alternate" (the FP8 emulation in
    /// every block / every other block) on the CPU; "f16", "bf16", or "fp8" / "fp8-alternate"
    /// (E4M3 GEMMs in those blocks, f16 activations) on the GPU.
    pub dtype: &'static str,
    /// CPU threads (the CPU forward gives the same result for any count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// GPU kernel choices (None on the CPU, which has one implementation of each op).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<KernelChoices>,
    /// How many identical replicas run the forward (`--device cuda:all`); None for one. Not
    /// part of the identity: every replica computes the same vectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
}

impl BackendInfo {
    /// Everything that can change the vectors (threads left out: they do not): the eval cache
    /// keys on this, so embeddings of different engines are never mixed.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "device": self.device,
            "dtype": self.dtype,
            "kernels": self.kernels,
        })
    }
}

impl std::fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        let mut parts = Vec::new();
        if self.kind != "cpu" {
            parts.push(match self.replicas {
                Some(n) => format!("{n} × {}", self.device),
                None => self.device.clone(),
            });
        }
        parts.push(self.dtype.to_string());
        if let Some(t) = self.threads {
            parts.push(format!("{t} threads"));
        }
        if let Some(k) = &self.kernels {
            if *k != KernelChoices::default() {
                parts.push(k.to_string());
            }
        }
        write!(f, " ({})", parts.join(", "))
    }
}

/// The attention kernel of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// Per batch, the faster of v1 and tc as measured on an H200: v1 below 128 tokens, tc from
    /// 128 on.
    #[default]
    Auto,
    /// Version 1: one warp per query on CUDA cores.
    V1,
    /// Version 2: flash-style tiles on tensor cores (WMMA).
    Tc,
    /// Version 3: FlashAttention-2-style register tiles with mma.sync. On trial: never run on
    /// a GPU yet; head dims it lacks fall back to auto.
    Mma,
    /// Version 4: version 3 with ldmatrix fragments, cp.async K/V tiles overlapped with
    /// compute, a base-2 softmax masked only on diagonal tiles, no empty blocks, and 128-row
    /// query tiles for long sequences. On trial: never run on a GPU yet; head dims it lacks
    /// fall back to auto.
    Mma2,
}

/// The row kernels of the CUDA backend: the embedding and block layernorms, bias + GELU, and
/// the final layernorm with pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RowKernel {
    /// Version 1, as measured on an H200: a shared-memory row per block, scalar loads.
    #[default]
    V1,
    /// Rows held in registers, 16-byte loads and stores, the first block's input layernorm
    /// fused into the embedding's, GELU through one exp2 instead of tanh, pooling with eight
    /// tokens in flight per column. On trial: never run on a GPU yet; hidden sizes that are not
    /// a multiple of 8 fall back to v1. (`--dtype fp8` fuses its attention-output and FC2
    /// epilogues into a register-row add + layernorm of its own whatever this choice: part of
    /// the FP8 path, itself on trial; docs/fp8.md.)
    Vec,
}

impl RowKernel {
    /// Written and compile-checked but never run on a GPU: opt-in only, tested last.
    pub fn on_trial(self) -> bool {
        self == RowKernel::Vec
    }
}

/// Where the CUDA backend keeps the embedding table `[V, H]` (2.06 GB at bloom-7b1 in f16, a
/// quarter of the weights under `--dtype fp8`). The forward reads only the rows of the batch's
/// tokens, so the table need not be on the device: the same values, read from elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingTable {
    /// In device memory.
    #[default]
    Device,
    /// In page-locked host memory mapped into the device's address space: the embedding kernel
    /// reads each token's row over the bus (8 KB per token at bloom-7b1). On trial: never run
    /// on a GPU yet.
    Host,
}

impl EmbeddingTable {
    /// Written and compile-checked but never run on a GPU: opt-in only.
    pub fn on_trial(self) -> bool {
        self == EmbeddingTable::Host
    }
}

impl AttentionKernel {
    /// Written and compile-checked but never run on a GPU: opt-in only, tested last.
    pub fn on_trial(self) -> bool {
        matches!(self, AttentionKernel::Mma | AttentionKernel::Mma2)
    }
}

impl GemmKernel {
    /// Written and compile-checked but never run on a GPU: opt-in only, tested last.
    pub fn on_trial(self) -> bool {
        self == GemmKernel::Skinny
    }
}

/// The GEMM path of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GemmKernel {
    /// cuBLASLt for every GEMM.
    #[default]
    Cublaslt,
    /// The skinny tensor-core GEMM for batches of at most 16 tokens, cuBLASLt above. On trial:
    /// never run on a GPU yet.
    Skinny,
}

/// Parses a choice by its flag value (`auto`, `v1`, … / `cublaslt`, `skinny` / `f16`, …),
/// naming the accepted values when it is none of them.
fn parse_choice<T: clap::ValueEnum>(s: &str, what: &str) -> std::result::Result<T, String> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        format!("unknown {what} {s:?}: expected one of {}", names.join(", "))
    })
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_choice(s, "attention kernel")
    }
}

impl std::str::FromStr for GemmKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_choice(s, "GEMM kernel")
    }
}

impl std::str::FromStr for RowKernel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_choice(s, "row kernel")
    }
}

impl std::str::FromStr for EmbeddingTable {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_choice(s, "embedding table placement")
    }
}

/// The kernel choices of the CUDA backend, and where it keeps the embedding table: typed engine
/// options with CLI flags, never environment variables. The defaults are the measured ones;
/// anything on trial is opt-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct KernelChoices {
    pub attention: AttentionKernel,
    pub gemm: GemmKernel,
    /// Capture and replay CUDA graphs for batches of up to 128 tokens (the latency path).
    pub cuda_graphs: bool,
    pub rows: RowKernel,
    /// Not a kernel but where one reads from; it changes no value (the GPU test checks the
    /// vectors bit for bit), yet it is part of the identity like the rest: a cache miss at
    /// worst.
    pub table: EmbeddingTable,
}

impl KernelChoices {
    /// Every selectable kernel configuration, the defaults first and those with more choices on
    /// trial (mma attention, the skinny GEMM, the vec row kernels) later: what the GPU tests
    /// run, in that order. The table stays on the device in all of them (its own GPU test
    /// compares the two placements).
    pub fn all() -> Vec<KernelChoices> {
        use clap::ValueEnum;
        let mut v = Vec::new();
        for &attention in AttentionKernel::value_variants() {
            for &gemm in GemmKernel::value_variants() {
                for cuda_graphs in [false, true] {
                    for &rows in RowKernel::value_variants() {
                        v.push(KernelChoices {
                            attention,
                            gemm,
                            cuda_graphs,
                            rows,
                            table: EmbeddingTable::Device,
                        });
                    }
                }
            }
        }
        v.sort_by_key(|k| k.trials());
        v
    }

    /// How many of the choices are on trial.
    pub fn trials(&self) -> u8 {
        u8::from(self.attention.on_trial())
            + u8::from(self.gemm.on_trial())
            + u8::from(self.rows.on_trial())
            + u8::from(self.table.on_trial())
    }
}

impl std::fmt::Display for KernelChoices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        let name = |v: Option<clap::builder::PossibleValue>| {
            v.map(|p| p.get_name().to_string()).unwrap_or_default()
        };
        write!(
            f,
            "attention {}, gemm {}, cuda graphs {}, rows {}, embedding table {}",
            name(self.attention.to_possible_value()),
            name(self.gemm.to_possible_value()),
            if self.cuda_graphs { "on" } else { "off" },
            name(self.rows.to_possible_value()),
            name(self.table.to_possible_value())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_once_defaults_first() {
        let all = KernelChoices::all();
        assert_eq!(all.len(), 5 * 2 * 2 * 2);
        assert_eq!(all[0], KernelChoices::default());
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        // Proven choices before those on trial, so a trial's failure cannot hide them.
        let trial = |k: &KernelChoices| {
            matches!(k.attention, AttentionKernel::Mma | AttentionKernel::Mma2)
                || k.gemm == GemmKernel::Skinny
                || k.rows == RowKernel::Vec
        };
        let first_trial = all.iter().position(trial).unwrap();
        assert!(all[first_trial..].iter().all(trial), "{all:?}");
        // and one trial at a time before two (a failure then names its culprit).
        assert!(all.windows(2).all(|w| w[0].trials() <= w[1].trials()));
    }

    #[test]
    fn choices_parse_by_their_flag_values() {
        assert_eq!("mma".parse::<AttentionKernel>(), Ok(AttentionKernel::Mma));
        assert_eq!("skinny".parse::<GemmKernel>(), Ok(GemmKernel::Skinny));
        assert_eq!("vec".parse::<RowKernel>(), Ok(RowKernel::Vec));
        assert_eq!("host".parse::<EmbeddingTable>(), Ok(EmbeddingTable::Host));
        let e = "v2".parse::<RowKernel>().unwrap_err();
        assert!(
            e.contains("unknown row kernel \"v2\": expected one of v1, vec"),
            "{e}"
        );
        let e = "v9".parse::<AttentionKernel>().unwrap_err();
        assert!(e.contains("expected one of auto, v1, tc, mma, mma2"), "{e}");
    }

    #[test]
    fn identity_covers_what_changes_vectors_and_not_threads() {
        let cpu = |threads| BackendInfo {
            kind: "cpu",
            device: "cpu".into(),
            dtype: "f32",
            threads: Some(threads),
            kernels: None,
            replicas: None,
        };
        assert_eq!(cpu(1).identity(), cpu(8).identity());
        let gpu = |dtype, kernels| BackendInfo {
            kind: "cuda",
            device: "NVIDIA H200 (sm_90)".into(),
            dtype,
            threads: None,
            kernels: Some(kernels),
            replicas: None,
        };
        let base = gpu("f16", KernelChoices::default());
        for other in [
            gpu("bf16", KernelChoices::default()),
            gpu("fp8", KernelChoices::default()),
            gpu("fp8-alternate", KernelChoices::default()),
            gpu(
                "f16",
                KernelChoices {
                    attention: AttentionKernel::Mma,
                    ..Default::default()
                },
            ),
            gpu(
                "f16",
                KernelChoices {
                    gemm: GemmKernel::Skinny,
                    ..Default::default()
                },
            ),
            gpu(
                "f16",
                KernelChoices {
                    cuda_graphs: true,
                    ..Default::default()
                },
            ),
            gpu(
                "f16",
                KernelChoices {
                    rows: RowKernel::Vec,
                    ..Default::default()
                },
            ),
            gpu(
                "f16",
                KernelChoices {
                    table: EmbeddingTable::Host,
                    ..Default::default()
                },
            ),
            cpu(2),
        ] {
            assert_ne!(base.identity(), other.identity(), "{other}");
        }
        assert_eq!(base.to_string(), "cuda (NVIDIA H200 (sm_90), f16)");
        assert_eq!(cpu(2).to_string(), "cpu (f32, 2 threads)");
    }
}
