//! The FP8 accuracy study (docs/fp8-accuracy.md): how far the FP8 emulation's embeddings are
//! from the f32 forward's, per text, at BLOOM shapes with random weights (`sgpt::bench`'s
//! scaling), with and without outlier channels, for several quantization variants.
//!
//! ```sh
//! cargo run --release --example fp8_accuracy -- --shape bloom-560m
//! cargo run --release --example fp8_accuracy -- --shape bloom-560m --outliers 100
//! cargo run --release --example fp8_accuracy -- --shape bloom-7b1 --layers 10 --texts 16
//! cargo run --release --example fp8_accuracy -- --shape bloom-560m --write-model /tmp/m560
//! cargo run --release --example fp8_accuracy -- --shape bloom-560m --fp8-table --variants bf16,per-token
//! ```
//!
//! Prints, per variant, the cosine to f32 of every text's embedding (min and mean), of the
//! pooled hidden states after each block (the error's growth with depth), and the time.
//! `--write-model DIR` also writes the weights as a model directory (the tokenizer of
//! models/sgpt-tiny, whose 1000 ids the random embedding matrix covers) for `sgpt eval`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use sgpt::backend::batch::PackedBatch;
use sgpt::backend::cpu::fp8::Fp8Blocks::{All, Alternate};
use sgpt::backend::cpu::fp8::{
    decode_codes, from_e4m3, quantize, scale_for, to_e4m3, ActScale, Fp8Linear,
};
use sgpt::backend::cpu::linear::{linear, LinearKernel};
use sgpt::backend::cpu::model::Proj;
use sgpt::backend::cpu::pooling::weighted_mean_pool;
use sgpt::backend::cpu::CpuModel;
use sgpt::model::weights::DType;

#[derive(Parser)]
struct Args {
    /// A shape of `sgpt bench` (hidden, blocks, heads of a BLOOM size).
    #[arg(long, default_value = "bloom-560m")]
    shape: String,
    /// Run only this many blocks (memory: 4 bytes per parameter for f32 plus 1 for the E4M3
    /// codes of the variant running).
    #[arg(long)]
    layers: Option<usize>,
    /// Texts (`sgpt::bench::synthetic_corpus`: 30% queries of 10–16 ids, passages ≈ 80).
    #[arg(long, default_value_t = 32)]
    texts: usize,
    /// Longest text in ids.
    #[arg(long, default_value_t = 160)]
    max_len: usize,
    /// Give 6 hidden channels this many times the others' magnitude (see --outlier-mode).
    #[arg(long)]
    outliers: Option<f32>,
    #[arg(long, value_enum, default_value = "residual")]
    outlier_mode: OutlierMode,
    /// Variants to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "per-token,per-tensor"
    )]
    variants: Vec<Variant>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run every variant with the embedding table in E4M3 too (each row rounded with its own
    /// scale, amax/448, and decoded as code·scale in f32); the f32 reference keeps the table
    /// as it is. Random weights only.
    #[arg(long, conflicts_with = "model")]
    fp8_table: bool,
    /// Also write these weights as a model directory for `sgpt eval`.
    #[arg(long)]
    write_model: Option<PathBuf>,
    /// Instead of random weights: this model directory (e.g. a converted SGPT checkpoint)...
    #[arg(long, requires = "beir")]
    model: Option<PathBuf>,
    /// ... on the queries (as queries) and the first --texts documents of this BEIR directory.
    #[arg(long)]
    beir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum OutlierMode {
    /// In the residual stream: the embedding layernorm's bias is ±F on those channels, so every
    /// hidden state carries them and every layernorm output (the QKV and FC1 inputs) has them
    /// at ≈ F times the other channels.
    Residual,
    /// Only in the GEMM inputs: the weights of every block's two layernorms are ×F on those
    /// channels; the residual stream and the final hidden state have none.
    GemmInput,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Variant {
    /// `--dtype fp8`: E4M3 weights per output channel, inputs per token.
    PerToken,
    /// Inputs with one scale per tensor.
    PerTensor,
    /// Diagnosis: only the weights in E4M3 (inputs f32).
    WeightsOnly,
    /// Diagnosis: only the inputs in E4M3 (weights f32).
    InputsOnly,
    /// Per-token, with the QKV projection in f32.
    F32Qkv,
    /// Per-token, with the attention output projection in f32.
    F32Dense,
    /// Per-token, with the MLP up projection in f32.
    F32Fc1,
    /// Per-token, with the MLP down projection in f32.
    F32Fc2,
    /// Per-token, with the first and the last block in f32.
    F32Ends,
    /// Per-token in the MLP only (FC1, FC2: 2/3 of the GEMM FLOPs); QKV and dense in f32.
    MlpOnly,
    /// `--dtype fp8-alternate`: per-token in every other block (the odd ones, by the engine's
    /// own rule, `Fp8Blocks::Alternate`), the rest f32. Also accepted as `half-blocks`, its
    /// name in the study's first runs.
    #[value(name = "fp8-alternate", alias = "half-blocks")]
    Fp8Alternate,
    /// `--dtype fp8` as the GPU path holds it: every GEMM input and output rounded to f16 (the
    /// GPU's f16 activations), the residual stream f32. Also printed: its cosine to per-token.
    PerTokenF16,
    /// `--dtype fp8-alternate` likewise, its f32 blocks with f16 weights and biases (the f16
    /// engine's GEMMs). Also printed: its cosine to fp8-alternate.
    Fp8AlternateF16,
    /// Per-token, each bias corrected by the weights' rounding error times the mean GEMM input
    /// of the f32 forward over calibration texts (other texts than those measured).
    BiasCorrected,
    /// Calibration of this study: both GEMM operands rounded to bf16 instead (8 significant
    /// bits; E4M3 has 4).
    Bf16,
    /// Per-token, except the input channels whose calibration amax exceeds 6× the median
    /// channel's: their weight columns and inputs stay f32 (a thin second GEMM).
    OutliersF32,
}

/// The channels given outliers (fixed, spread over the hidden size).
fn outlier_channels(h: usize) -> Vec<usize> {
    (0..6).map(|i| (i * h / 6 + 37) % h).collect()
}

/// [`CpuModel::load_with`] without progress reports.
fn load_with(
    ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
    dtype: &'static str,
    make: sgpt::backend::cpu::model::MakeLinear,
) -> sgpt::Result<CpuModel> {
    CpuModel::load_with(ckpt, cfg, dtype, make, &|_, _| {})
}

/// Weights in E4M3 (per output channel), dequantized once; inputs stay f32.
struct WeightsOnly {
    w: Vec<f32>,
}

impl LinearKernel for WeightsOnly {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        linear(x, &self.w, b, out, accumulate)
    }
}

/// Inputs in E4M3 per token, dequantized; weights f32.
struct InputsOnly {
    w: sgpt::model::weights::F32Buf,
}

impl LinearKernel for InputsOnly {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let n_in = self.w.len() / b.len();
        let (codes, s) = quantize(x, n_in, ActScale::PerToken);
        let mut xq = decode_codes(&codes);
        for (row, s) in xq.chunks_mut(n_in).zip(s) {
            row.iter_mut().for_each(|v| *v *= s);
        }
        linear(&xq, &self.w, b, out, accumulate)
    }
}

/// Both operands rounded to bf16 (weights once), the product in f32.
struct Bf16Both {
    w: Vec<f32>,
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

impl LinearKernel for Bf16Both {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        linear(&bf16_round(x), &self.w, b, out, accumulate)
    }
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// A linear layer with f16 between the ops, as on the GPU: the input rounded to f16 before the
/// product, the output (bias included) rounded after it, then added to the f32 residual when
/// accumulating; the bias rounded to f16 too when `f16_bias` (16-bit layers hold it in f16).
struct F16Io {
    inner: Box<dyn LinearKernel>,
    f16_bias: bool,
}

impl LinearKernel for F16Io {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let b = if self.f16_bias {
            f16_round(b)
        } else {
            b.to_vec()
        };
        let mut y = vec![0f32; out.len()];
        self.inner.forward(&f16_round(x), &b, &mut y, false);
        for (o, y) in out.iter_mut().zip(f16_round(&y)) {
            *o = if accumulate { *o + y } else { y };
        }
    }
}

/// What the calibration forward saw at one linear layer's input: per channel, the sum and the
/// largest magnitude, and the rows.
#[derive(Default)]
struct Seen {
    sum: Vec<f64>,
    amax: Vec<f32>,
    rows: usize,
}

/// The f32 product, recording what its inputs look like.
struct Recording {
    w: sgpt::model::weights::F32Buf,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

impl LinearKernel for Recording {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let n_in = self.w.len() / b.len();
        let mut s = self.seen.lock().unwrap();
        if s.sum.is_empty() {
            s.sum = vec![0.0; n_in];
            s.amax = vec![0.0; n_in];
        }
        for row in x.chunks(n_in) {
            s.sum.iter_mut().zip(row).for_each(|(a, v)| *a += *v as f64);
            s.amax
                .iter_mut()
                .zip(row)
                .for_each(|(a, v)| *a = a.max(v.abs()));
        }
        s.rows += x.len() / n_in;
        drop(s);
        linear(x, &self.w, b, out, accumulate)
    }
}

/// Outlier channels of a GEMM input: those whose largest magnitude in calibration exceeds 6×
/// the median channel's.
fn outlier_inputs(st: &Stats) -> Vec<usize> {
    let mut m = st.amax.clone();
    m.sort_by(f32::total_cmp);
    let median = m[m.len() / 2];
    (0..st.amax.len())
        .filter(|&k| st.amax[k] > 6.0 * median)
        .collect()
}

/// E4M3 for every input channel but the outliers, whose columns stay f32 (a second, thin GEMM).
struct SplitOutliers {
    fp8: Fp8Linear,  // W with the outlier columns zeroed
    w_out: Vec<f32>, // [out, k]: the outlier columns
    channels: Vec<usize>,
}

impl LinearKernel for SplitOutliers {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let n_in = x.len() / (out.len() / b.len()).max(1);
        let mut rest = x.to_vec();
        let mut picked = Vec::with_capacity(x.len() / n_in * self.channels.len());
        for row in rest.chunks_mut(n_in) {
            for &c in &self.channels {
                picked.push(row[c]);
                row[c] = 0.0;
            }
        }
        self.fp8.forward(&rest, b, out, accumulate);
        if !self.channels.is_empty() {
            linear(&picked, &self.w_out, &vec![0.0; b.len()], out, true);
        }
    }
}

/// FP8 with a constant added to the bias.
struct Corrected {
    inner: Fp8Linear,
    c: Vec<f32>,
}

impl LinearKernel for Corrected {
    fn forward(&self, x: &[f32], b: &[f32], out: &mut [f32], accumulate: bool) {
        let b: Vec<f32> = b.iter().zip(&self.c).map(|(b, c)| b + c).collect();
        self.inner.forward(x, &b, out, accumulate)
    }
}

/// Per GEMM input channel: the mean and the largest magnitude.
struct Stats {
    mean: Vec<f64>,
    amax: Vec<f32>,
}

type Means = std::collections::HashMap<(usize, u8), Stats>;

/// What every linear layer's input looks like in the f32 forward over `batch`.
fn mean_inputs(
    ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
    batch: &PackedBatch,
) -> Means {
    type Slot = std::sync::Arc<std::sync::Mutex<Seen>>;
    let slots: std::sync::Mutex<Vec<((usize, u8), Slot)>> = Default::default();
    let model = load_with(ckpt, cfg, "recording", &|l, p, w, _| {
        let seen = Slot::default();
        slots.lock().unwrap().push(((l, p as u8), seen.clone()));
        Box::new(Recording { w, seen })
    })
    .expect("recording model");
    model.embed(batch).expect("calibration forward");
    slots
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|(k, s)| {
            let s = std::mem::take(&mut *s.lock().unwrap());
            let n = s.rows as f64;
            let mean = s.sum.into_iter().map(|v| v / n).collect();
            (k, Stats { mean, amax: s.amax })
        })
        .collect()
}

fn load(
    v: Variant,
    ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
    means: Option<&Means>,
) -> CpuModel {
    let last = cfg.layers - 1;
    let keep = move |l: usize, p: Proj| match v {
        Variant::F32Qkv => p == Proj::Qkv,
        Variant::F32Dense => p == Proj::Dense,
        Variant::F32Fc1 => p == Proj::Fc1,
        Variant::F32Fc2 => p == Proj::Fc2,
        Variant::F32Ends => l == 0 || l == last,
        Variant::MlpOnly => p == Proj::Qkv || p == Proj::Dense,
        _ => false,
    };
    let r = match v {
        Variant::PerToken => CpuModel::load_fp8(ckpt, cfg, ActScale::PerToken, All, &|_, _| {}),
        Variant::PerTensor => CpuModel::load_fp8(ckpt, cfg, ActScale::PerTensor, All, &|_, _| {}),
        // Exactly what the engine loads for `--device cpu --dtype fp8-alternate`.
        Variant::Fp8Alternate => {
            CpuModel::load_fp8(ckpt, cfg, ActScale::PerToken, Alternate, &|_, _| {})
        }
        Variant::PerTokenF16 | Variant::Fp8AlternateF16 => {
            let blocks = if v == Variant::PerTokenF16 {
                All
            } else {
                Alternate
            };
            load_with(ckpt, cfg, "f16 between ops", &move |l, _, w, n_out| {
                let fp8 = blocks.covers(l);
                let inner: Box<dyn LinearKernel> = if fp8 {
                    Box::new(Fp8Linear::new(&w, n_out, ActScale::PerToken))
                } else {
                    Box::new(WeightsOnly { w: f16_round(&w) })
                };
                Box::new(F16Io {
                    inner,
                    f16_bias: !fp8,
                })
            })
        }
        Variant::WeightsOnly => load_with(ckpt, cfg, "w8", &|_, _, w, n_out| {
            let (codes, s) = quantize(&w, w.len() / n_out, ActScale::PerToken);
            let mut w = decode_codes(&codes);
            let n_in = w.len() / n_out;
            for (row, s) in w.chunks_mut(n_in).zip(s) {
                row.iter_mut().for_each(|v| *v *= s);
            }
            Box::new(WeightsOnly { w })
        }),
        Variant::InputsOnly => load_with(ckpt, cfg, "a8", &|_, _, w, _| Box::new(InputsOnly { w })),
        Variant::Bf16 => load_with(ckpt, cfg, "bf16", &|_, _, w, _| {
            Box::new(Bf16Both { w: bf16_round(&w) })
        }),
        Variant::BiasCorrected => load_with(ckpt, cfg, "fp8+bias", &|l, p, w, n_out| {
            let inner = Fp8Linear::new(&w, n_out, ActScale::PerToken);
            let mu = &means.expect("calibration means")[&(l, p as u8)].mean;
            let (codes, s) = inner.parts();
            let n_in = w.len() / n_out;
            let c = (0..n_out)
                .map(|o| {
                    (0..n_in)
                        .map(|k| {
                            let i = o * n_in + k;
                            let wq = sgpt::backend::cpu::fp8::from_e4m3(codes[i]) * s[o];
                            mu[k] * (w[i] - wq) as f64
                        })
                        .sum::<f64>() as f32
                })
                .collect();
            Box::new(Corrected { inner, c })
        }),
        Variant::OutliersF32 => load_with(ckpt, cfg, "fp8+f32 outliers", &|l, p, w, n_out| {
            let channels = outlier_inputs(&means.expect("calibration")[&(l, p as u8)]);
            let n_in = w.len() / n_out;
            let mut rest = w.to_vec();
            let mut w_out = Vec::with_capacity(n_out * channels.len());
            for row in rest.chunks_mut(n_in) {
                for &c in &channels {
                    w_out.push(row[c]);
                    row[c] = 0.0;
                }
            }
            let fp8 = Fp8Linear::new(&rest, n_out, ActScale::PerToken);
            Box::new(SplitOutliers {
                fp8,
                w_out,
                channels,
            })
        }),
        _ => load_with(ckpt, cfg, "mixed", &|l, p, w, n_out| {
            if keep(l, p) {
                Box::new(w)
            } else {
                Box::new(Fp8Linear::new(&w, n_out, ActScale::PerToken))
            }
        }),
    };
    r.expect("loading the variant")
}

/// Pooled hidden states after each block and the embeddings: [L][S·H], the last = embeddings.
fn run(model: &CpuModel, batch: &PackedBatch) -> (Vec<Vec<f32>>, f64) {
    let h = model.cfg.hidden;
    let mut pooled = Vec::new();
    let t = Instant::now();
    let e = model
        .forward(batch, &mut |i, states| {
            if i > 0 {
                let mut p = vec![0f32; batch.num_seqs() * h];
                weighted_mean_pool(states, &batch.cu_seqlens, &mut p);
                pooled.push(p);
            }
        })
        .expect("forward");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(
        pooled.last(),
        Some(&e),
        "the last observed state pools to the embedding"
    );
    (pooled, secs)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Per text, the cosine between rows of [S·H], optionally leaving out channels.
fn per_text(a: &[f32], b: &[f32], h: usize, skip: &[usize]) -> Vec<f64> {
    let keep = |r: &[f32]| -> Vec<f32> {
        r.iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, v)| *v)
            .collect()
    };
    a.chunks(h)
        .zip(b.chunks(h))
        .map(|(x, y)| cosine(&keep(x), &keep(y)))
        .collect()
}

fn main() {
    let a = Args::parse();
    if let Some(dir) = &a.model {
        // A model directory and real texts: the queries, then --texts documents; the next
        // --texts documents calibrate bias-corrected.
        use sgpt::model::tokenize::Kind;
        let e = sgpt::engine::Embedder::open(dir, sgpt::engine::Device::Cpu).expect("model");
        let data =
            sgpt::eval::beir::Dataset::load(a.beir.as_ref().unwrap(), "test").expect("BEIR data");
        let docs = |skip: usize| {
            data.corpus.texts[skip.min(data.corpus.texts.len())..]
                .iter()
                .take(a.texts)
                .map(|t| (t.clone(), Kind::Document))
        };
        let texts: Vec<(String, Kind)> = data
            .queries
            .iter()
            .map(|q| (q.text.clone(), Kind::Query))
            .chain(docs(0))
            .collect();
        let encode = |t: &[(String, Kind)]| -> PackedBatch {
            let ids: Vec<Vec<u32>> = e.encode(t).unwrap().into_iter().map(|s| s.ids).collect();
            PackedBatch::from_seqs(&ids)
        };
        let batch = encode(&texts);
        let calibration = encode(&docs(a.texts).collect::<Vec<_>>());
        let cfg = &e.model.config;
        println!(
            "{} (H {}, L {}, n {}): {} queries and {} documents of {}, {} tokens",
            dir.display(),
            cfg.hidden,
            cfg.layers,
            cfg.heads,
            data.queries.len(),
            texts.len() - data.queries.len(),
            data.dir.display(),
            batch.num_tokens()
        );
        let ckpt = &e.model.checkpoint;
        study(&a, ckpt, ckpt, cfg, &batch, &calibration, &[]);
        return;
    }

    let mut cfg = sgpt::bench::shape(&a.shape).expect("shape");
    if let Some(l) = a.layers {
        cfg.layers = l;
    }
    cfg.vocab = 1000; // the rows the texts use; the tiny tokenizer's size, for --write-model
    let h = cfg.hidden;
    let channels = outlier_channels(h);
    let (factor, mode) = (a.outliers, a.outlier_mode);
    let edit = |name: &str, i: usize, v: f32| -> f32 {
        let Some(f) = factor else { return v };
        let Some(n) = channels.iter().position(|&c| c == i) else {
            return v;
        };
        match mode {
            OutlierMode::Residual if name == "word_embeddings_layernorm.bias" => {
                if n.is_multiple_of(2) {
                    f
                } else {
                    -f
                }
            }
            OutlierMode::GemmInput
                if name.ends_with("input_layernorm.weight")
                    || name.ends_with("post_attention_layernorm.weight") =>
            {
                v * f
            }
            _ => v,
        }
    };
    let t = Instant::now();
    let ckpt = sgpt::bench::random_checkpoint_with(&cfg, DType::F32, a.seed, &edit)
        .expect("random weights");
    // The measured texts, then as many others for calibration.
    let mut seqs =
        sgpt::bench::synthetic_corpus(2 * a.texts, cfg.vocab as u32, a.max_len, [(5, 6), (7, 8)]);
    let calibration = PackedBatch::from_seqs(&seqs.split_off(a.texts));
    let batch = PackedBatch::from_seqs(&seqs);
    println!(
        "{} (H {h}, L {} of {}, n {}), seed {}, {} texts, {} tokens, outliers {}; weights in {:.1} s",
        a.shape,
        cfg.layers,
        sgpt::bench::shape(&a.shape).unwrap().layers,
        cfg.heads,
        a.seed,
        a.texts,
        batch.num_tokens(),
        match factor {
            Some(f) => format!("×{f} ({mode:?}) on channels {channels:?}"),
            None => "none".into(),
        },
        t.elapsed().as_secs_f64()
    );
    if let Some(dir) = &a.write_model {
        write_model(dir, &ckpt, &cfg);
        println!("wrote {}", dir.display());
    }
    let skip = if factor.is_some() {
        channels.clone()
    } else {
        vec![]
    };
    let rounded;
    let variant_ckpt = if a.fp8_table {
        rounded = fp8_table(&ckpt, &cfg, a.seed, &edit);
        println!("variants run with the embedding table in E4M3 (a scale per row)");
        &rounded
    } else {
        &ckpt
    };
    study(&a, &ckpt, variant_ckpt, &cfg, &batch, &calibration, &skip);
}

/// The same random weights, but the embedding table's rows rounded to E4M3 with a scale per
/// row (`scale_for(amax)`, as the weights of the FP8 GEMMs) and decoded as `code·scale` in f32.
fn fp8_table(
    ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
    seed: u64,
    edit: &(dyn Fn(&str, usize, f32) -> f32 + Sync),
) -> sgpt::model::weights::Checkpoint {
    let h = cfg.hidden;
    let emb = ckpt
        .get_shaped("word_embeddings.weight", &[cfg.vocab, h])
        .unwrap();
    let mut table = vec![0f32; cfg.vocab * h];
    for (r, row) in table.chunks_mut(h).enumerate() {
        emb.row_to_f32(r, row);
        let s = scale_for(row.iter().fold(0f32, |m, v| m.max(v.abs())));
        row.iter_mut()
            .for_each(|v| *v = from_e4m3(to_e4m3(*v / s)) * s);
    }
    let name = "word_embeddings.weight";
    sgpt::bench::random_checkpoint_with(cfg, DType::F32, seed, &|n, i, v| {
        if n == name {
            table[i]
        } else {
            edit(n, i, v)
        }
    })
    .expect("random weights")
}

/// The f32 forward (on `ckpt`), then each variant's (on `variant_ckpt`: the same or with
/// `--fp8-table`), and one table row per variant. `outliers`: channels also left out in one
/// column (none: no column).
fn study(
    a: &Args,
    ckpt: &sgpt::model::weights::Checkpoint,
    variant_ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
    batch: &PackedBatch,
    calibration: &PackedBatch,
    outliers: &[usize],
) {
    let h = cfg.hidden;
    let reference = CpuModel::load(ckpt, cfg).expect("f32 model");
    let (want, secs) = run(&reference, batch);
    drop(reference);
    let e = want.last().unwrap();
    let anisotropy = {
        let rows: Vec<&[f32]> = e.chunks(h).collect();
        let mut sum = (0.0, 0usize);
        for i in 0..rows.len() {
            for j in 0..i {
                sum = (sum.0 + cosine(rows[i], rows[j]), sum.1 + 1);
            }
        }
        sum.0 / sum.1.max(1) as f64
    };
    println!(
        "f32 forward {secs:.1} s; mean cosine between two texts' f32 embeddings {anisotropy:.3}"
    );
    if !outliers.is_empty() {
        let all: f64 = e.iter().map(|v| (*v as f64).powi(2)).sum();
        let some: f64 = e
            .chunks(h)
            .flat_map(|r| outliers.iter().map(move |&c| (r[c] as f64).powi(2)))
            .sum();
        println!(
            "outlier channels hold {:.1}% of the embeddings' squared norm",
            100.0 * some / all
        );
    }
    let means = a
        .variants
        .iter()
        .any(|v| matches!(v, Variant::BiasCorrected | Variant::OutliersF32))
        .then(|| mean_inputs(ckpt, cfg, calibration));
    if let Some(m) = &means {
        let mut counts: Vec<usize> = m.values().map(|s| outlier_inputs(s).len()).collect();
        counts.sort();
        println!(
            "outlier input channels per GEMM (calibration amax > 6x the median): min {}, median {}, max {}",
            counts[0],
            counts[counts.len() / 2],
            counts[counts.len() - 1]
        );
    }
    println!("| variant | min cosine | mean cosine | worst text (ids) | min cosine, other channels | min cosine of the pooled states after blocks 1..L-1, then of the embeddings | s |");
    println!("|---|---|---|---|---|---|---|");
    // Embeddings of the variants run so far, and the lines comparing an f16 variant with its
    // counterpart (printed after the table).
    let mut done: Vec<(Variant, Vec<f32>)> = Vec::new();
    let mut versus = Vec::new();
    for &v in &a.variants {
        let model = load(v, variant_ckpt, cfg, means.as_ref());
        let (got, secs) = run(&model, batch);
        drop(model);
        let counterpart = match v {
            Variant::PerTokenF16 => Some(Variant::PerToken),
            Variant::Fp8AlternateF16 => Some(Variant::Fp8Alternate),
            _ => None,
        };
        let name = |v: Variant| v.to_possible_value().unwrap().get_name().to_string();
        if let Some((c, other)) = counterpart.and_then(|c| done.iter().find(|(d, _)| *d == c)) {
            let last = got.last().unwrap();
            let to_other = per_text(last, other, h, &[]);
            let worst = |c: &[f64]| c.iter().map(|c| 1.0 - c).fold(0.0, f64::max);
            let (mine, theirs) = (per_text(last, e, h, &[]), per_text(other, e, h, &[]));
            versus.push(format!(
                "| {} vs {} | {:.6} | {:.2} |",
                name(v),
                name(*c),
                to_other.iter().copied().fold(f64::INFINITY, f64::min),
                worst(&mine) / worst(&theirs)
            ));
        }
        done.push((v, got.last().unwrap().clone()));
        let c = per_text(got.last().unwrap(), e, h, &[]);
        let min = c.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = c.iter().sum::<f64>() / c.len() as f64;
        let worst = (0..c.len()).min_by(|&i, &j| c[i].total_cmp(&c[j])).unwrap();
        let worst_len = batch.cu_seqlens[worst + 1] - batch.cu_seqlens[worst];
        let other = if outliers.is_empty() {
            "–".into()
        } else {
            let o = per_text(got.last().unwrap(), e, h, outliers);
            format!("{:.6}", o.iter().copied().fold(f64::INFINITY, f64::min))
        };
        let per_block: Vec<String> = got
            .iter()
            .zip(&want)
            .map(|(g, w)| {
                let c = per_text(g, w, h, &[]);
                format!("{:.5}", c.iter().copied().fold(f64::INFINITY, f64::min))
            })
            .collect();
        println!(
            "| {} | {min:.6} | {mean:.6} | {worst_len} | {other} | {} | {secs:.1} |",
            name(v),
            per_block.join(" ")
        );
    }
    if !versus.is_empty() {
        println!("\n| f16 between ops vs without | min cosine between the two | worst 1 − cosine to f32, ratio |");
        println!("|---|---|---|");
        versus.iter().for_each(|l| println!("{l}"));
    }
}

/// The checkpoint as a model directory (f32 safetensors; the tiny model's tokenizer and
/// sentence-transformers files, the config and pooling dimension set to this shape).
fn write_model(
    dir: &Path,
    ckpt: &sgpt::model::weights::Checkpoint,
    cfg: &sgpt::model::config::BloomConfig,
) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sgpt-tiny");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    for f in [
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(tiny.join(f), dir.join(f)).unwrap();
    }
    let edit = |p: &str, set: &[(&str, serde_json::Value)]| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny.join(p)).unwrap()).unwrap();
        for (k, x) in set {
            v[*k] = x.clone();
        }
        std::fs::write(dir.join(p), serde_json::to_string_pretty(&v).unwrap()).unwrap();
    };
    edit(
        "config.json",
        &[
            ("hidden_size", cfg.hidden.into()),
            ("n_layer", cfg.layers.into()),
            ("n_head", cfg.heads.into()),
            ("vocab_size", cfg.vocab.into()),
        ],
    );
    edit(
        "1_Pooling/config.json",
        &[("word_embedding_dimension", cfg.hidden.into())],
    );
    let refs: Vec<_> = sgpt::model::schema::tensors(cfg)
        .into_iter()
        .map(|t| ckpt.get(&t.name).unwrap())
        .collect();
    let tensors = refs.iter().map(|r| {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            r.shape.clone(),
            r.bytes(),
        );
        (r.name.clone(), view.unwrap())
    });
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
}
