//! Criterion benchmarks of each CPU op on a 512-token packed batch at the four sizes of the
//! cross-size benchmark (tools/bench_cpu.py --sizes: hidden 256, 512, 1024 = bloom-560m, 2048 =
//! bloom-1b7), with throughput in FLOPs (GEMMs, attention) or bytes (memory-bound ops); filter
//! one size with e.g. `cargo bench --bench cpu_ops -- cpu_h1024_T512`.
//! Inputs are seeded pseudo-random values, never zeros. A second group times the linear layers
//! at query size (1–64 tokens) at hidden 1024 and 2048: the skinny product against the `gemm`
//! crate's, next to a plain read of the same weights (the memory floor of both). A third times
//! a corpus batch's projections (128, 512, 2048 tokens, hidden 2048) as `linear` runs them (one
//! single-threaded product per thread on its share of the output columns, src/backend/cpu/gemm.rs)
//! against the `gemm` crate's own threading of the same product.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgpt::backend::cpu::attention::{alibi_attention, alibi_slopes};
use sgpt::backend::cpu::gelu::gelu_inplace;
use sgpt::backend::cpu::layernorm::layernorm;
use sgpt::backend::cpu::linear::{gemm_acc, linear};
use sgpt::backend::cpu::pooling::weighted_mean_pool;
use sgpt::backend::cpu::{skinny, vmath};

/// (hidden, heads) of the cross-size benchmark's models.
const SIZES: [(usize, usize); 4] = [(256, 4), (512, 8), (1024, 16), (2048, 16)];
const T: usize = 512;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    sgpt::seeded::uniform(n, seed, 1.0)
}

/// A ragged packing like a real corpus: lengths 12, 80, 299, 121 → 512 tokens.
fn cu_seqlens() -> Vec<usize> {
    vec![0, 12, 92, 391, 512]
}

fn ops(c: &mut Criterion) {
    for (h, heads) in SIZES {
        ops_at(c, h, heads);
    }
}

fn ops_at(c: &mut Criterion, h: usize, heads: usize) {
    let mut g = c.benchmark_group(format!("cpu_h{h}_T512"));
    g.sample_size(10);

    let x = rand_vec(T * h, 1);
    let w = rand_vec(h, 2);
    let b = rand_vec(h, 3);
    let mut out = vec![0f32; T * h];
    g.throughput(Throughput::Bytes((2 * T * h * 4) as u64));
    g.bench_function("layernorm", |bch| {
        bch.iter(|| layernorm(&x, &w, &b, 1e-5, &mut out))
    });

    for (name, n_out, n_in) in [
        ("linear_qkv", 3 * h, h),
        ("linear_fc1", 4 * h, h),
        ("linear_fc2", h, 4 * h),
    ] {
        let xi = rand_vec(T * n_in, 4);
        let wi = rand_vec(n_out * n_in, 5);
        let bi = rand_vec(n_out, 6);
        let mut o = vec![0f32; T * n_out];
        g.throughput(Throughput::Elements((2 * T * n_in * n_out) as u64)); // FLOPs
        g.bench_function(name, |bch| {
            bch.iter(|| linear(&xi, &wi, &bi, &mut o, false))
        });
    }

    let qkv: Vec<f32> = rand_vec(T * 3 * h, 7);
    let cu = cu_seqlens();
    let slopes = alibi_slopes(heads);
    let causal_pairs: usize = cu
        .windows(2)
        .map(|w| (w[1] - w[0]) * (w[1] - w[0] + 1) / 2)
        .sum();
    g.throughput(Throughput::Elements((4 * causal_pairs * h) as u64)); // QKᵀ and PV FLOPs
    g.bench_function("alibi_attention", |bch| {
        bch.iter(|| alibi_attention(&qkv, &cu, heads, &slopes, &mut out))
    });

    let mut m = rand_vec(T * 4 * h, 8);
    g.throughput(Throughput::Bytes((2 * T * 4 * h * 4) as u64));
    g.bench_function("gelu", |bch| bch.iter(|| gelu_inplace(&mut m)));

    let mut pooled = vec![0f32; (cu.len() - 1) * h];
    g.throughput(Throughput::Bytes((T * h * 4) as u64));
    g.bench_function("weighted_mean_pool", |bch| {
        bch.iter(|| weighted_mean_pool(&x, &cu, &mut pooled))
    });
    g.finish();
}

/// Enough copies of a weight matrix to fill 512 MB, used in turn, so that every product streams
/// its weights from memory as the model's layers do, not from a cache that holds one matrix.
fn weight_copies(len: usize) -> Vec<Vec<f32>> {
    let copies = ((512 << 20) / (4 * len)).max(2);
    (0..copies).map(|i| rand_vec(len, 50 + i as u64)).collect()
}

/// The sum of a slice in 32 independent lanes (so that it vectorizes and is bound by memory, not
/// by the latency of a chain of adds; the tail of each 64 Ki chunk is not read), split over the threads as the products are.
fn read_all(w: &[f32]) -> f32 {
    use rayon::prelude::*;
    w.par_chunks(1 << 16)
        .map(|c| {
            vmath::with_simd(|| {
                let lanes = c.chunks_exact(32).fold([0f32; 32], |mut l, v| {
                    l.iter_mut().zip(v).for_each(|(a, b)| *a += b);
                    l
                });
                lanes.iter().sum::<f32>()
            })
        })
        .sum()
}

fn small_batches(c: &mut Criterion) {
    for h in [1024, 2048] {
        let mut g = c.benchmark_group(format!("cpu_linear_small_h{h}"));
        g.sample_size(10);
        for (name, n_out, n_in) in [("fc1", 4 * h, h), ("fc2", h, 4 * h)] {
            let ws = weight_copies(n_out * n_in);
            let next = std::cell::Cell::new(0);
            let w = || {
                next.set((next.get() + 1) % ws.len());
                &ws[next.get()]
            };
            // throughput in weight bytes: criterion's GB/s is then comparable to the read's
            g.throughput(Throughput::Bytes((n_out * n_in * 4) as u64));
            g.bench_function(format!("{name}/read_weights"), |bch| {
                bch.iter(|| read_all(w()))
            });
            for t in [1, 4, 8, 12, 16, 24, 32, 48, 64] {
                let x = rand_vec(t * n_in, 4);
                let mut o = vec![0f32; t * n_out];
                g.bench_function(format!("{name}/skinny/{t}"), |bch| {
                    bch.iter(|| skinny::matmul_acc(&x, w(), n_out, &mut o))
                });
                g.bench_function(format!("{name}/gemm/{t}"), |bch| {
                    bch.iter(|| gemm_acc(&x, w(), n_out, &mut o))
                });
            }
        }
        g.finish();
    }
}

fn corpus_threads(c: &mut Criterion) {
    for t in [128, 512, 2048] {
        corpus_threads_at(c, t);
    }
}

fn corpus_threads_at(c: &mut Criterion, t: usize) {
    let h = 2048;
    let mut g = c.benchmark_group(format!("cpu_gemm_threads_h{h}_T{t}"));
    g.sample_size(10);
    for (name, n_out, n_in) in [("qkv", 3 * h, h), ("fc1", 4 * h, h), ("fc2", h, 4 * h)] {
        let x = rand_vec(t * n_in, 5);
        let w = rand_vec(n_out * n_in, 6);
        let mut o = vec![0f32; t * n_out];
        g.throughput(Throughput::Elements((2 * t * n_out * n_in) as u64)); // FLOPs
        g.bench_function(format!("{name}/column_split"), |b| {
            b.iter(|| gemm_acc(&x, &w, n_out, &mut o))
        });
        g.bench_function(format!("{name}/crate_threads"), |b| {
            // SAFETY: as gemm_acc's call: o is [t, n_out], x [t, n_in], w [n_out, n_in] read as
            // its transpose; all three are exactly that long.
            b.iter(|| unsafe {
                gemm::gemm(
                    t,
                    n_out,
                    n_in,
                    o.as_mut_ptr(),
                    1,
                    n_out as isize,
                    true,
                    x.as_ptr(),
                    1,
                    n_in as isize,
                    w.as_ptr(),
                    n_in as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ops, small_batches, corpus_threads);
criterion_main!(benches);
