//! The BLOOM forward pass on the CPU, over one packed batch, top to bottom.
//!
//! Glossary: T tokens in the packed batch, S sequences, H hidden, n heads, d = H/n head dim,
//! L blocks, V embedding rows. Activations are f32 row-major; weights are f32 views of the
//! memory map (or converted copies for f16/bf16 checkpoints).
//!
//! The four GEMMs of each block go through [`LinearKernel`]: the f32 weight here, or its E4M3
//! form in the FP8 emulation ([`CpuModel::load_fp8`], docs/fp8.md: in every block, or in every
//! other one), which is otherwise this same forward.

use std::time::Instant;

use crate::backend::batch::PackedBatch;
use crate::backend::cpu::attention::{alibi_attention, alibi_slopes};
use crate::backend::cpu::fp8::{
    stored_blocks, stored_fp8_needs, stored_weight, ActScale, Fp8Blocks, Fp8Linear,
};
use crate::backend::cpu::gelu::gelu_inplace;
use crate::backend::cpu::layernorm::layernorm;
use crate::backend::cpu::linear::LinearKernel;
use crate::backend::cpu::pooling::weighted_mean_pool;
use crate::backend::LoadProgress;
use crate::error::{Error, Result};
use crate::model::config::BloomConfig;
use crate::model::weights::{Checkpoint, F32Buf, TensorRef};

struct Norm {
    w: F32Buf,
    b: F32Buf,
}

struct Linear {
    w: Box<dyn LinearKernel>, // W [out, in] and the product
    b: F32Buf,                // [out]
}

impl Linear {
    /// out = x·Wᵀ + b, or out += x·Wᵀ + b when `accumulate`.
    fn apply(&self, x: &[f32], out: &mut [f32], accumulate: bool) {
        self.w.forward(x, &self.b, out, accumulate)
    }
}

/// The four linear layers of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// Fused query/key/value, [3H, H].
    Qkv,
    /// Attention output, [H, H].
    Dense,
    /// MLP up, [4H, H].
    Fc1,
    /// MLP down, [H, 4H].
    Fc2,
}

/// Builds the kernel of one linear layer (block, which one) from its f32 weight [out, in]
/// and `out`.
pub type MakeLinear<'a> = &'a dyn Fn(usize, Proj, F32Buf, usize) -> Box<dyn LinearKernel>;

struct Block {
    ln1: Norm,
    qkv: Linear,   // [3H, H], rows interleaved per head
    dense: Linear, // [H, H]
    ln2: Norm,
    fc1: Linear, // [4H, H]
    fc2: Linear, // [H, 4H]
}

pub struct CpuModel {
    pub cfg: BloomConfig,
    dtype: &'static str, // what `info()` reports: "f32", "fp8", "fp8-alternate"
    emb: TensorRef,      // [V, H], gathered row by row, never converted whole
    emb_ln: Norm,
    blocks: Vec<Block>,
    ln_f: Norm,
    slopes: Vec<f32>, // [n]
}

impl CpuModel {
    /// Reads every tensor the forward needs, after checking the checkpoint against the schema.
    pub fn load(ckpt: &Checkpoint, cfg: &BloomConfig) -> Result<Self> {
        Self::load_reporting(ckpt, cfg, &|_, _| {})
    }

    /// [`CpuModel::load`], calling `progress` after each block.
    pub fn load_reporting(
        ckpt: &Checkpoint,
        cfg: &BloomConfig,
        progress: LoadProgress,
    ) -> Result<Self> {
        if let Some(b) = stored_blocks(ckpt, cfg)? {
            return Err(stored_fp8_needs(&ckpt.dir, b));
        }
        Self::load_with(ckpt, cfg, "f32", &|_, _, w, _| Box::new(w), progress)
    }

    /// The FP8 emulation (docs/fp8.md): the same forward, with the weights of the four GEMMs of
    /// each block in `blocks` rounded to E4M3 here, one scale per output channel, and their
    /// inputs rounded to E4M3 just before each GEMM with scales chosen by `act`; the other
    /// blocks' GEMMs stay f32.
    pub fn load_fp8(
        ckpt: &Checkpoint,
        cfg: &BloomConfig,
        act: ActScale,
        blocks: Fp8Blocks,
        progress: LoadProgress,
    ) -> Result<Self> {
        match stored_blocks(ckpt, cfg)? {
            Some(b) if b != blocks => return Err(stored_fp8_needs(&ckpt.dir, b)),
            Some(_) if act != ActScale::PerToken => {
                return Err(Error::Input(format!(
                    "{}: stored E4M3 weights run with per-token input scales only",
                    ckpt.dir.display()
                )))
            }
            _ => {}
        }
        let dtype = match (blocks, act) {
            (Fp8Blocks::All, ActScale::PerToken) => "fp8",
            (Fp8Blocks::All, ActScale::PerTensor) => "fp8 (per-tensor activation scales)",
            (Fp8Blocks::Alternate, ActScale::PerToken) => "fp8-alternate",
            (Fp8Blocks::Alternate, ActScale::PerTensor) => {
                "fp8-alternate (per-tensor activation scales)"
            }
        };
        let make: MakeLinear = &|l, _, w, n_out| -> Box<dyn LinearKernel> {
            if blocks.covers(l) {
                Box::new(Fp8Linear::new(&w, n_out, act))
            } else {
                Box::new(w)
            }
        };
        Self::load_with(ckpt, cfg, dtype, make, progress)
    }

    /// [`load_reporting`](Self::load_reporting) with each block's linear layers built by `make`
    /// from their f32 weights, and `dtype` for `info()`: how the FP8 emulation and its reference
    /// test plug in. Linear layers stored as E4M3 codes (`sgpt quantize`) are used as stored,
    /// with per-token input scales, without `make` (the callers above check that they are
    /// what the dtype asks for).
    pub fn load_with(
        ckpt: &Checkpoint,
        cfg: &BloomConfig,
        dtype: &'static str,
        make: MakeLinear,
        progress: LoadProgress,
    ) -> Result<Self> {
        crate::model::schema::check(ckpt, cfg)?;
        let h = cfg.hidden;
        let norm = |p: &str| -> Result<Norm> {
            Ok(Norm {
                w: ckpt.get_shaped(&format!("{p}.weight"), &[h])?.to_f32(),
                b: ckpt.get_shaped(&format!("{p}.bias"), &[h])?.to_f32(),
            })
        };
        let lin = |l: usize, proj: Proj, out: usize, inp: usize| -> Result<Linear> {
            let p = match proj {
                Proj::Qkv => "self_attention.query_key_value",
                Proj::Dense => "self_attention.dense",
                Proj::Fc1 => "mlp.dense_h_to_4h",
                Proj::Fc2 => "mlp.dense_4h_to_h",
            };
            let name = format!("h.{l}.{p}.weight");
            let w: Box<dyn LinearKernel> = match stored_weight(ckpt, &name)? {
                Some((codes, scales)) => {
                    Box::new(Fp8Linear::from_parts(codes, scales, ActScale::PerToken))
                }
                None => make(l, proj, ckpt.get_shaped(&name, &[out, inp])?.to_f32(), out),
            };
            Ok(Linear {
                w,
                b: ckpt
                    .get_shaped(&format!("h.{l}.{p}.bias"), &[out])?
                    .to_f32(),
            })
        };
        let emb = ckpt.get_shaped("word_embeddings.weight", &[cfg.vocab, h])?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let block = Block {
                    ln1: norm(&format!("h.{i}.input_layernorm"))?,
                    qkv: lin(i, Proj::Qkv, 3 * h, h)?,
                    dense: lin(i, Proj::Dense, h, h)?,
                    ln2: norm(&format!("h.{i}.post_attention_layernorm"))?,
                    fc1: lin(i, Proj::Fc1, 4 * h, h)?,
                    fc2: lin(i, Proj::Fc2, h, 4 * h)?,
                };
                progress(i + 1, cfg.layers);
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuModel {
            cfg: cfg.clone(),
            dtype,
            emb,
            emb_ln: norm("word_embeddings_layernorm")?,
            blocks,
            ln_f: norm("ln_f")?,
            slopes: alibi_slopes(cfg.heads),
        })
    }

    /// Embeddings [S, H] of a packed batch.
    pub fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        // On a worker of the thread pool, so that an op too small to split runs right there
        // instead of being handed to the pool and waited for (one hand-off per batch, not per op).
        rayon::scope(|_| self.forward(batch, &mut |_, _| {}))
    }

    /// The forward pass. `observe(i, states)` sees the same hidden states as transformers'
    /// `output_hidden_states`: i = 0 after the embedding layernorm, i = 1..L-1 after block i-1,
    /// i = L after the final layernorm; each [T, H].
    pub fn forward(
        &self,
        batch: &PackedBatch,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        self.forward_timed(batch, observe, None)
    }

    /// [`CpuModel::embed`], adding the wall time of each op to `times` (for `sgpt bench
    /// --op-times`: where the time goes). The same code path; the clock is read between ops.
    pub fn embed_profiled(&self, batch: &PackedBatch, times: &mut OpTimes) -> Result<Vec<f32>> {
        rayon::scope(|_| self.forward_timed(batch, &mut |_, _| {}, Some(times)))
    }

    fn forward_timed(
        &self,
        batch: &PackedBatch,
        observe: &mut dyn FnMut(usize, &[f32]),
        times: Option<&mut OpTimes>,
    ) -> Result<Vec<f32>> {
        let mut clock = Clock::new(times);
        batch.validate(self.cfg.vocab)?;
        let (t, h, eps) = (batch.num_tokens(), self.cfg.hidden, self.cfg.eps);
        let cu = &batch.cu_seqlens;

        let mut x = vec![0f32; t * h]; // [T, H] residual stream
        for (row, &id) in x.chunks_mut(h).zip(&batch.ids) {
            self.emb.row_to_f32(id as usize, row);
        }
        let mut a = vec![0f32; t * h]; // [T, H] layernorm output
        layernorm(&x, &self.emb_ln.w, &self.emb_ln.b, eps, &mut a);
        std::mem::swap(&mut x, &mut a);
        clock.lap(|t| &mut t.embed);
        observe(0, &x);

        let mut qkv = vec![0f32; t * 3 * h]; // [T, 3H]
        let mut ctx = vec![0f32; t * h]; // [T, H]
        let mut m = vec![0f32; t * 4 * h]; // [T, 4H]
        for (l, blk) in self.blocks.iter().enumerate() {
            layernorm(&x, &blk.ln1.w, &blk.ln1.b, eps, &mut a);
            clock.lap(|t| &mut t.layernorm);
            blk.qkv.apply(&a, &mut qkv, false); // [T, 3H]
            clock.lap(|t| &mut t.qkv);
            alibi_attention(&qkv, cu, self.cfg.heads, &self.slopes, &mut ctx); // [T, H]
            clock.lap(|t| &mut t.attention);
            blk.dense.apply(&ctx, &mut x, true); // x += ctx·Wᵀ + b
            clock.lap(|t| &mut t.dense);
            layernorm(&x, &blk.ln2.w, &blk.ln2.b, eps, &mut a);
            clock.lap(|t| &mut t.layernorm);
            blk.fc1.apply(&a, &mut m, false); // [T, 4H]
            clock.lap(|t| &mut t.fc1);
            gelu_inplace(&mut m);
            clock.lap(|t| &mut t.gelu);
            blk.fc2.apply(&m, &mut x, true); // x += gelu(..)·W2ᵀ + b2
            clock.lap(|t| &mut t.fc2);
            if l + 1 < self.blocks.len() {
                observe(l + 1, &x);
            }
        }
        layernorm(&x, &self.ln_f.w, &self.ln_f.b, eps, &mut a);
        observe(self.blocks.len(), &a);
        clock.lap(|t| &mut t.layernorm);

        let mut out = vec![0f32; batch.num_seqs() * h]; // [S, H]
        weighted_mean_pool(&a, cu, &mut out);
        clock.lap(|t| &mut t.pool);
        Ok(out)
    }
}

/// Seconds spent in each op of the forward, summed over blocks and calls (`embed` covers the
/// gather, the embedding layernorm and the buffers' set-up; `layernorm` the other 2L + 1).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct OpTimes {
    pub embed: f64,
    pub layernorm: f64,
    pub qkv: f64,
    pub attention: f64,
    pub dense: f64,
    pub fc1: f64,
    pub gelu: f64,
    pub fc2: f64,
    pub pool: f64,
}

impl OpTimes {
    /// (name, seconds) of each op, in forward order.
    pub fn ops(&self) -> [(&'static str, f64); 9] {
        [
            ("embed", self.embed),
            ("layernorm", self.layernorm),
            ("qkv", self.qkv),
            ("attention", self.attention),
            ("dense", self.dense),
            ("fc1", self.fc1),
            ("gelu", self.gelu),
            ("fc2", self.fc2),
            ("pool", self.pool),
        ]
    }

    pub fn total(&self) -> f64 {
        self.ops().iter().map(|(_, s)| s).sum()
    }
}

/// Charges the time since the previous lap to one field of [`OpTimes`]; reads no clock when
/// there is nothing to charge.
struct Clock<'a> {
    times: Option<&'a mut OpTimes>,
    last: Instant,
}

impl<'a> Clock<'a> {
    fn new(times: Option<&'a mut OpTimes>) -> Self {
        Clock {
            times,
            last: Instant::now(),
        }
    }

    fn lap(&mut self, field: impl FnOnce(&mut OpTimes) -> &mut f64) {
        if let Some(t) = self.times.as_deref_mut() {
            let now = Instant::now();
            *field(t) += (now - self.last).as_secs_f64();
            self.last = now;
        }
    }
}

impl crate::backend::Backend for CpuModel {
    fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        CpuModel::embed(self, batch)
    }
    fn info(&self) -> crate::backend::BackendInfo {
        crate::backend::BackendInfo {
            kind: "cpu",
            device: "cpu".into(),
            dtype: self.dtype,
            threads: Some(rayon::current_num_threads()),
            kernels: None,
            replicas: None,
        }
    }
}
