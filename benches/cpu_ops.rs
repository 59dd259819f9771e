//! Criterion benchmarks of the CPU ops at bloom-560m shapes (H = 1024, n = 16, d = 64) on a
//! 512-token packed batch, with throughput in FLOPs (GEMMs, attention) or bytes (memory-bound ops).
//! Inputs are seeded pseudo-random values, never zeros.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sgpt::backend::cpu::attention::{alibi_attention, alibi_slopes};
use sgpt::backend::cpu::gelu::gelu_inplace;
use sgpt::backend::cpu::layernorm::layernorm;
use sgpt::backend::cpu::linear::linear;
use sgpt::backend::cpu::pooling::weighted_mean_pool;

const H: usize = 1024;
const HEADS: usize = 16;
const T: usize = 512;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    sgpt::seeded::uniform(n, seed, 1.0)
}

/// A ragged packing like a real corpus: lengths 12, 80, 299, 121 → 512 tokens.
fn cu_seqlens() -> Vec<usize> {
    vec![0, 12, 92, 391, 512]
}

fn ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_bloom560m_T512");
    g.sample_size(10);

    let x = rand_vec(T * H, 1);
    let w = rand_vec(H, 2);
    let b = rand_vec(H, 3);
    let mut out = vec![0f32; T * H];
    g.throughput(Throughput::Bytes((2 * T * H * 4) as u64));
    g.bench_function("layernorm", |bch| {
        bch.iter(|| layernorm(&x, &w, &b, 1e-5, &mut out))
    });

    for (name, n_out, n_in) in [
        ("linear_qkv", 3 * H, H),
        ("linear_fc1", 4 * H, H),
        ("linear_fc2", H, 4 * H),
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

    let qkv: Vec<f32> = rand_vec(T * 3 * H, 7);
    let cu = cu_seqlens();
    let slopes = alibi_slopes(HEADS);
    let causal_pairs: usize = cu
        .windows(2)
        .map(|w| (w[1] - w[0]) * (w[1] - w[0] + 1) / 2)
        .sum();
    g.throughput(Throughput::Elements((4 * causal_pairs * H) as u64)); // QKᵀ and PV FLOPs
    g.bench_function("alibi_attention", |bch| {
        bch.iter(|| alibi_attention(&qkv, &cu, HEADS, &slopes, &mut out))
    });

    let mut m = rand_vec(T * 4 * H, 8);
    g.throughput(Throughput::Bytes((2 * T * 4 * H * 4) as u64));
    g.bench_function("gelu", |bch| bch.iter(|| gelu_inplace(&mut m)));

    let mut pooled = vec![0f32; (cu.len() - 1) * H];
    g.throughput(Throughput::Bytes((T * H * 4) as u64));
    g.bench_function("weighted_mean_pool", |bch| {
        bch.iter(|| weighted_mean_pool(&x, &cu, &mut pooled))
    });
    g.finish();
}

criterion_group!(benches, ops);
criterion_main!(benches);
