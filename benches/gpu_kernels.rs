//! Criterion benchmarks of every GPU kernel and GEMM of one block at a BLOOM shape
//! (`SGPT_BENCH_SHAPE`, default bloom-7b1; 16 sequences × 300 tokens, f16), timed with CUDA
//! events so the device is synchronized, with bytes (memory-bound ops) or FLOPs (GEMMs,
//! attention) as throughput. Without a usable GPU it prints one line and measures nothing.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use sgpt::backend::cuda::bench::{KernelBench, OPS};
use sgpt::backend::cuda::device::{open, unavailable_reason};
use sgpt::backend::cuda::ops::Kernels;

fn gpu_kernels(c: &mut Criterion) {
    if let Some(why) = unavailable_reason(0) {
        eprintln!("skipped: no GPU ({why})");
        return;
    }
    let shape = std::env::var("SGPT_BENCH_SHAPE").unwrap_or_else(|_| "bloom-7b1".into());
    let cfg = sgpt::bench::shape(&shape).expect("SGPT_BENCH_SHAPE");
    let ctx = open(0).expect("GPU 0");
    let k = Kernels::load(
        &ctx,
        sgpt::backend::cuda::nvrtc::default_cache_dir().as_deref(),
    )
    .expect("kernels");
    let mut b = KernelBench::<half::f16>::new(&ctx, &k, &cfg, 16, 300).expect("buffers");
    let s = b.stream().clone();
    let mut g = c.benchmark_group(format!("gpu_{shape}_f16_16x300"));
    g.sample_size(20);
    let ops: Vec<&str> = OPS.iter().copied().filter(|op| b.applies(op)).collect();
    for op in ops {
        let (bytes, flops) = b.work(op);
        g.throughput(if flops > 0.0 {
            Throughput::Elements(flops as u64)
        } else {
            Throughput::Bytes(bytes as u64)
        });
        g.bench_function(op, |bch| {
            bch.iter_custom(|iters| {
                let ev = || {
                    s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .expect("event")
                };
                let start = ev();
                for _ in 0..iters {
                    b.launch(op).expect("launch");
                }
                let end = ev();
                end.synchronize().expect("sync");
                Duration::from_secs_f64(start.elapsed_ms(&end).expect("elapsed") as f64 / 1e3)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, gpu_kernels);
criterion_main!(benches);
