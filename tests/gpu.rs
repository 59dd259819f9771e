//! GPU tests: each kernel against its CPU twin on fresh seeded random inputs (edge shapes
//! included), cuBLASLt GEMMs against the CPU GEMM, the GPU forward against the CPU forward and
//! the reference fixtures, and batch invariance on the GPU. Without a usable GPU every test
//! prints one line and passes; the device script sets SGPT_REQUIRE_GPU=1 so a missing GPU fails.

mod common;

use std::sync::Arc;

use common::{assert_close, cosine, load_golden};
use cudarc::driver::{CudaSlice, CudaStream};
use sgpt::backend::batch::PackedBatch;
use sgpt::backend::cpu;
use sgpt::backend::cuda::device::{unavailable_reason, GpuDtype};
use sgpt::backend::cuda::gemm::Gemm;
use sgpt::backend::cuda::ops::{
    attention_mma2_tiles, skinny_fits, Act, Kernels, SkinnyPlan, Table,
};
use sgpt::backend::KernelChoices;
use sgpt::engine::{Device, Embedder, EngineOptions};
use sgpt::model::tokenize::Kind;
use sgpt::model::ModelDir;

struct Gpu {
    s: Arc<CudaStream>,
    k: Kernels,
}

fn gpu() -> Option<Gpu> {
    if let Some(why) = unavailable_reason(0) {
        assert!(
            std::env::var("SGPT_REQUIRE_GPU").as_deref() != Ok("1"),
            "SGPT_REQUIRE_GPU=1 but {why}"
        );
        eprintln!("skipped: no GPU ({why})");
        return None;
    }
    let ctx = sgpt::backend::cuda::device::open(0).unwrap();
    let k = Kernels::load(&ctx, None).unwrap();
    Some(Gpu {
        s: ctx.default_stream(),
        k,
    })
}

fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    sgpt::seeded::uniform(n, seed, scale)
}

/// Values rounded through T, as the GPU sees them.
fn round<T: Act>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn up<T: Act>(g: &Gpu, v: &[f32]) -> CudaSlice<T> {
    g.s.clone_htod(&v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())
        .unwrap()
}

fn up32(g: &Gpu, v: &[f32]) -> CudaSlice<f32> {
    g.s.clone_htod(v).unwrap()
}

fn down<T: Act>(g: &Gpu, d: &CudaSlice<T>) -> Vec<f32> {
    g.s.clone_dtoh(d)
        .unwrap()
        .into_iter()
        .map(|v: T| v.to_f32())
        .collect()
}

/// The end of a test that records each failure and goes on (so one device run reports them all).
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Poisoned output buffer: NaN everywhere, so an element the kernel forgot shows up.
fn poison<T: Act>(g: &Gpu, n: usize) -> CudaSlice<T> {
    up::<T>(g, &vec![f32::NAN; n])
}

/// Tolerances for outputs rounded to T once (inputs already rounded identically on both
/// sides): a few units in the last place of O(1) values. f16 has 11 significant bits
/// (2^-11 ≈ 4.9e-4), bf16 8 (2^-8 ≈ 3.9e-3).
fn tol<T: Act>() -> f32 {
    if T::SUFFIX == "f16" {
        2e-3
    } else {
        1.6e-2
    }
}

fn layernorm_kernels<T: Act>(g: &Gpu) {
    let eps = 1e-5;
    for (rows, h) in [
        (1usize, 33usize),
        (7, 132),
        (300, 260),
        (33, 1025),
        (5, 4096),
    ] {
        let label = format!("{} rows {rows} H {h}", T::SUFFIX);
        let x = rand(rows * h, 1 + h as u64, 3.0);
        let y = round::<T>(&rand(rows * h, 2 + h as u64, 1.0));
        let w = rand(h, 3, 1.0)
            .iter()
            .map(|v| 1.0 + 0.3 * v)
            .collect::<Vec<_>>();
        let b = rand(h, 4, 0.2);
        // add_layernorm: x += y; a = LN(x)
        let mut dx = up32(g, &x);
        let dy = up::<T>(g, &y);
        let mut da = poison::<T>(g, rows * h);
        g.k.add_layernorm(
            &g.s,
            &mut dx,
            Some(&dy),
            &up32(g, &w),
            &up32(g, &b),
            &mut da,
            rows,
            h,
            eps,
        )
        .unwrap();
        let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let mut want = vec![0f32; rows * h];
        cpu::layernorm::layernorm(&xy, &w, &b, eps, &mut want);
        assert_close(
            &format!("add_layernorm x {label}"),
            &g.s.clone_dtoh(&dx).unwrap(),
            &xy,
            1e-6,
            1e-6,
        );
        assert_close(
            &format!("add_layernorm a {label}"),
            &down(g, &da),
            &want,
            tol::<T>(),
            tol::<T>(),
        );
        // no residual: a = LN(x)
        let mut dx = up32(g, &x);
        g.k.add_layernorm::<T>(
            &g.s,
            &mut dx,
            None,
            &up32(g, &w),
            &up32(g, &b),
            &mut da,
            rows,
            h,
            eps,
        )
        .unwrap();
        cpu::layernorm::layernorm(&x, &w, &b, eps, &mut want);
        assert_close(
            &format!("layernorm a {label}"),
            &down(g, &da),
            &want,
            tol::<T>(),
            tol::<T>(),
        );
        // embedding gather + layernorm
        let vocab = 50;
        let emb = round::<T>(&rand(vocab * h, 5, 2.0));
        let ids: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7 + 3) % vocab as u32)
            .collect();
        let mut dx = up32(g, &vec![f32::NAN; rows * h]);
        g.k.embedding_layernorm(
            &g.s,
            &g.s.clone_htod(&ids).unwrap(),
            Table::Device(&up::<T>(g, &emb)),
            &up32(g, &w),
            &up32(g, &b),
            &mut dx,
            rows,
            h,
            eps,
        )
        .unwrap();
        let gathered: Vec<f32> = ids
            .iter()
            .flat_map(|&i| emb[i as usize * h..(i as usize + 1) * h].to_vec())
            .collect();
        cpu::layernorm::layernorm(&gathered, &w, &b, eps, &mut want);
        assert_close(
            &format!("embedding_layernorm {label}"),
            &g.s.clone_dtoh(&dx).unwrap(),
            &want,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn layernorms_match_cpu() {
    let Some(g) = gpu() else { return };
    layernorm_kernels::<half::f16>(&g);
    layernorm_kernels::<half::bf16>(&g);
}

/// Hidden sizes for the `vec` row kernels (multiples of 8): one chunk per thread with a
/// partial warp (8, 264), 1, 2 and 4 chunks per thread with whole and partial blocks (1024 and
/// 4096 at 128/256 threads; 2056: 2 chunks, 160 threads; 6144: 4 chunks, 192 threads; 8192:
/// 4 chunks, 256 threads — the largest `vec_rows` takes).
const VEC_HIDDEN: [usize; 7] = [8, 264, 1024, 2056, 4096, 6144, 8192];

/// The `vec` layernorms (on trial) against the CPU: add_layernorm_vec, and the embedding
/// layernorm with the first block's input layernorm fused in. Same bars as version 1: x in f32
/// (only the summation order of the statistics differs), a rounded to T once.
fn layernorm_vec_kernels<T: Act>(g: &Gpu) {
    let eps = 1e-5;
    for (i, &h) in VEC_HIDDEN.iter().enumerate() {
        let rows = [3usize, 37, 5, 9, 17, 2, 3][i];
        let label = format!("{} rows {rows} H {h}", T::SUFFIX);
        let x = rand(rows * h, 21 + h as u64, 3.0);
        let y = round::<T>(&rand(rows * h, 22 + h as u64, 1.0));
        let norm = |seed| -> (Vec<f32>, Vec<f32>) {
            let w = rand(h, seed, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect();
            (w, rand(h, seed + 1, 0.2))
        };
        let ((w, b), (w1, b1)) = (norm(23), norm(25));
        let mut dx = up32(g, &x);
        let mut da = poison::<T>(g, rows * h);
        let (dw, db) = (up32(g, &w), up32(g, &b));
        g.k.add_layernorm_vec(
            &g.s,
            &mut dx,
            &up::<T>(g, &y),
            &dw,
            &db,
            &mut da,
            rows,
            h,
            eps,
        )
        .unwrap();
        let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let mut want = vec![0f32; rows * h];
        cpu::layernorm::layernorm(&xy, &w, &b, eps, &mut want);
        let got_x = g.s.clone_dtoh(&dx).unwrap();
        assert_close(
            &format!("add_layernorm_vec x {label}"),
            &got_x,
            &xy,
            1e-6,
            1e-6,
        );
        let (got, t) = (down(g, &da), tol::<T>());
        assert_close(&format!("add_layernorm_vec a {label}"), &got, &want, t, t);

        let vocab = 50;
        let emb = round::<T>(&rand(vocab * h, 27, 2.0));
        let ids: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7 + 3) % vocab as u32)
            .collect();
        let mut dx = up32(g, &vec![f32::NAN; rows * h]);
        let mut da = poison::<T>(g, rows * h);
        let (dw1, db1) = (up32(g, &w1), up32(g, &b1));
        g.k.embedding_layernorm_vec(
            &g.s,
            &g.s.clone_htod(&ids).unwrap(),
            Table::Device(&up::<T>(g, &emb)),
            (&dw, &db),
            (&dw1, &db1),
            &mut dx,
            &mut da,
            rows,
            h,
            eps,
        )
        .unwrap();
        let gathered: Vec<f32> = ids
            .iter()
            .flat_map(|&i| emb[i as usize * h..(i as usize + 1) * h].to_vec())
            .collect();
        let mut want_x = vec![0f32; rows * h];
        cpu::layernorm::layernorm(&gathered, &w, &b, eps, &mut want_x);
        let got_x = g.s.clone_dtoh(&dx).unwrap();
        let what = format!("embedding_layernorm_vec x {label}");
        assert_close(&what, &got_x, &want_x, 1e-4, 1e-4);
        // LN1 of the device's own x, so only this layernorm's error is measured.
        cpu::layernorm::layernorm(&got_x, &w1, &b1, eps, &mut want);
        let what = format!("embedding_layernorm_vec a {label}");
        assert_close(&what, &down(g, &da), &want, t, t);
    }
    // Hidden sizes the vec kernels do not take are refused with an error, never launched.
    let mut dx = up32(g, &[0.0; 33]);
    let mut da = poison::<T>(g, 33);
    let e =
        g.k.add_layernorm_vec(
            &g.s,
            &mut dx,
            &up::<T>(g, &[0.0; 33]),
            &up32(g, &[1.0; 33]),
            &up32(g, &[0.0; 33]),
            &mut da,
            1,
            33,
            eps,
        )
        .unwrap_err();
    assert!(e.to_string().contains("not a multiple of 8"), "{e}");
}

#[test]
fn vec_layernorms_match_cpu() {
    let Some(g) = gpu() else { return };
    layernorm_vec_kernels::<half::f16>(&g);
    layernorm_vec_kernels::<half::bf16>(&g);
}

fn attention<T: Act>(g: &Gpu) {
    // ragged batches with sequences of length 1 and across warp/tile edges
    // and more than 32 sequences (version 4 finds its tile 32 sequences at a time)
    let many: Vec<usize> = (0..70).map(|i| (i * 37) % 150 + 1).collect();
    let cases: [(&[usize], usize, usize); 9] = [
        (&[1], 16, 64),
        (&[1, 33, 2, 300], 16, 64),
        (&[299, 5, 1, 64], 32, 128),
        (&[17, 130], 32, 80),
        (&[1, 40, 65], 112, 128),
        (&[3, 77, 128], 8, 96),
        (&[63, 1, 200], 4, 16),
        (&[128, 129, 192, 255, 256, 257], 2, 128),
        (&many, 4, 64),
    ];
    for (lens, heads, d) in cases {
        let mut cu = vec![0usize];
        for l in lens {
            cu.push(cu.last().unwrap() + l);
        }
        let t = *cu.last().unwrap();
        let h = heads * d;
        let label = format!("{} lens {lens:?} heads {heads} d {d}", T::SUFFIX);
        let qkv = round::<T>(&rand(t * 3 * h, t as u64 + heads as u64, 2.0));
        let mut want = vec![0f32; t * h];
        let slopes = cpu::attention::alibi_slopes(heads);
        cpu::attention::alibi_attention(&qkv, &cu, heads, &slopes, &mut want);
        let dslopes = g.s.clone_htod(&slopes).unwrap();
        let cu32: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
        let (dq, dcu) = (up::<T>(g, &qkv), g.s.clone_htod(&cu32).unwrap());
        let (n_seqs, max_len) = (lens.len(), *lens.iter().max().unwrap());
        // versions 2 (tensor cores), 3 and 4 (register tiles) round the probabilities to T
        // once more than version 1, within the same bound; version 4 with both tile heights
        for version in [
            "alibi_attention",
            "alibi_attention_tc",
            "alibi_attention_mma",
            "alibi_attention_mma2_r64",
            "alibi_attention_mma2_r128",
        ] {
            let mut out = poison::<T>(g, t * h);
            let (q, cu, o) = (&dq, &dcu, &mut out);
            match version {
                "alibi_attention" => g.k.alibi_attention(&g.s, q, cu, n_seqs, o, t, heads, d),
                "alibi_attention_tc" => {
                    g.k.alibi_attention_tc(&g.s, q, cu, n_seqs, max_len, o, t, heads, d)
                }
                "alibi_attention_mma" => {
                    g.k.alibi_attention_mma(&g.s, q, cu, n_seqs, max_len, o, t, heads, d)
                }
                _ => {
                    let rows = if version.ends_with("r64") { 64 } else { 128 };
                    let plan = attention_mma2_tiles(&cu32, Some(rows));
                    let map = g.s.clone_htod(&plan.map).unwrap();
                    g.k.alibi_attention_mma2(&g.s, q, &map, &plan, &dslopes, o, t, heads, d)
                }
            }
            .unwrap();
            assert_close(
                &format!("{version} {label}"),
                &down(g, &out),
                &want,
                tol::<T>(),
                tol::<T>(),
            );
        }
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(g) = gpu() else { return };
    attention::<half::f16>(&g);
    attention::<half::bf16>(&g);
}

fn gelu_and_pool<T: Act>(g: &Gpu) {
    // F % 8 == 0 takes the kernel's 16-byte path, F = 1044 its one-element path.
    for (t, f) in [(33, 4 * 260), (7, 4 * 261)] {
        let m = round::<T>(&rand(t * f, 9, 4.0));
        let b = rand(f, 10, 0.5);
        let mut dm = up::<T>(g, &m);
        g.k.bias_gelu(&g.s, &mut dm, &up32(g, &b), t).unwrap();
        let want: Vec<f32> = m
            .iter()
            .enumerate()
            .map(|(i, v)| cpu::gelu::gelu(v + b[i % f]))
            .collect();
        assert_close(
            &format!("bias_gelu {} F {f}", T::SUFFIX),
            &down(g, &dm),
            &want,
            tol::<T>(),
            tol::<T>(),
        );
    }

    for h in [64usize, 1025, 4096] {
        let cu = [0usize, 1, 34, 36, 336];
        let t = cu[4];
        let x = rand(t * h, 11, 3.0);
        let y = round::<T>(&rand(t * h, 12, 1.0));
        let w: Vec<f32> = rand(h, 13, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect();
        let b = rand(h, 14, 0.2);
        let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let mut normed = vec![0f32; t * h];
        cpu::layernorm::layernorm(&xy, &w, &b, 1e-5, &mut normed);
        let mut want = vec![0f32; 4 * h];
        cpu::pooling::weighted_mean_pool(&normed, &cu, &mut want);
        let cu32: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
        let mut out = up32(g, &vec![f32::NAN; 4 * h]);
        let mut stats = up32(g, &vec![f32::NAN; 2 * t]);
        g.k.final_norm_pool(
            &g.s,
            &up32(g, &x),
            Some(&up::<T>(g, &y)),
            &up32(g, &w),
            &up32(g, &b),
            &g.s.clone_htod(&cu32).unwrap(),
            4,
            t,
            &mut stats,
            &mut out,
            h,
            1e-5,
        )
        .unwrap();
        // all f32 on the device: only summation order differs
        assert_close(
            &format!("final_norm_pool {} H {h}", T::SUFFIX),
            &g.s.clone_dtoh(&out).unwrap(),
            &want,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn gelu_and_pooling_match_cpu() {
    let Some(g) = gpu() else { return };
    gelu_and_pool::<half::f16>(&g);
    gelu_and_pool::<half::bf16>(&g);
}

/// bias_gelu_vec and final_norm_pool_vec (on trial) against the CPU, with version 1's bars:
/// GELU rounded to T once (its exp2 form is ≲ 3e-6 relative from tanh's, far below T's step),
/// pooling all f32 (only the summation order differs).
fn gelu_and_pool_vec<T: Act>(g: &Gpu) {
    // F = 8 (one chunk), 4·264 (a partial block: 132 chunks), 4·4096 (8 blocks of 256 chunks);
    // values up to ±12 so both tails (−0 and x) are reached.
    for (t, f) in [(3, 8), (33, 4 * 264), (9, 4 * 4096)] {
        let m = round::<T>(&rand(t * f, 31, 12.0));
        let b = rand(f, 32, 0.5);
        let mut dm = up::<T>(g, &m);
        g.k.bias_gelu_vec(&g.s, &mut dm, &up32(g, &b), t).unwrap();
        let want: Vec<f32> = m
            .iter()
            .enumerate()
            .map(|(i, v)| cpu::gelu::gelu(v + b[i % f]))
            .collect();
        let (got, tl) = (down(g, &dm), tol::<T>());
        assert_close(
            &format!("bias_gelu_vec {} F {f}", T::SUFFIX),
            &got,
            &want,
            tl,
            tl,
        );
    }
    // every chunk count of the statistics kernel, whole and partial blocks (VEC_HIDDEN)
    for h in [8usize, 264, 1024, 2056, 4096, 6144] {
        // ragged: lengths 1, 33, 2, 300 and 9 (a token lane with none, lanes with one)
        let cu = [0usize, 1, 34, 36, 336, 345];
        let (seqs, t) = (cu.len() - 1, cu[cu.len() - 1]);
        let x = rand(t * h, 33, 3.0);
        let y = round::<T>(&rand(t * h, 34, 1.0));
        let w: Vec<f32> = rand(h, 35, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect();
        let b = rand(h, 36, 0.2);
        let xy: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        let mut normed = vec![0f32; t * h];
        cpu::layernorm::layernorm(&xy, &w, &b, 1e-5, &mut normed);
        let mut want = vec![0f32; seqs * h];
        cpu::pooling::weighted_mean_pool(&normed, &cu, &mut want);
        let cu32: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
        let mut out = up32(g, &vec![f32::NAN; seqs * h]);
        let mut stats = up32(g, &vec![f32::NAN; 2 * t]);
        let (dw, db) = (up32(g, &w), up32(g, &b));
        g.k.final_norm_pool_vec(
            &g.s,
            &up32(g, &x),
            &up::<T>(g, &y),
            (&dw, &db),
            &g.s.clone_htod(&cu32).unwrap(),
            seqs,
            t,
            &mut stats,
            &mut out,
            h,
            1e-5,
        )
        .unwrap();
        let got = g.s.clone_dtoh(&out).unwrap();
        assert_close(
            &format!("final_norm_pool_vec {} H {h}", T::SUFFIX),
            &got,
            &want,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn vec_gelu_and_pooling_match_cpu() {
    let Some(g) = gpu() else { return };
    gelu_and_pool_vec::<half::f16>(&g);
    gelu_and_pool_vec::<half::bf16>(&g);
}

#[test]
fn conversion_rounds_like_the_half_crate() {
    let Some(g) = gpu() else { return };
    let v = rand(100_003, 21, 70_000.0); // overflows f16 beyond 65504: both sides give inf
    let src: CudaSlice<f32> = up32(&g, &v);
    let src_bytes = unsafe { src.transmute::<u8>(v.len() * 4) }.unwrap();
    let mut dst: CudaSlice<u16> = g.s.alloc_zeros(v.len()).unwrap();
    let mut dst_bytes = unsafe { dst.transmute_mut::<u8>(v.len() * 2) }.unwrap();
    g.k.convert(&g.s, &src_bytes, "f32", &mut dst_bytes, "f16", v.len())
        .unwrap();
    let got = g.s.clone_dtoh(&dst).unwrap();
    let want: Vec<u16> = v
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    assert_eq!(
        got, want,
        "f32 → f16 must round to nearest even like half::f16::from_f32"
    );
}

fn gemm<T: Act>(g: &Gpu) {
    let mut gm = Gemm::new(g.s.clone()).unwrap();
    for (t, n_in, n_out) in [
        (1usize, 64usize, 192usize),
        (33, 1024, 4096),
        (260, 4096, 1024),
        (7, 96, 288),
        (12, 4096, 1024),
        (16, 256, 64),
    ] {
        for bias in [false, true] {
            let x = round::<T>(&rand(t * n_in, 31, 1.0));
            let w = round::<T>(&rand(n_out * n_in, 32, 0.05));
            let b = round::<T>(&rand(n_out, 33, 0.5));
            let mut want = vec![0f32; t * n_out];
            let zero = vec![0f32; n_out];
            cpu::linear::linear(&x, &w, if bias { &b } else { &zero }, &mut want, false);
            let (dx, dw, db) = (up::<T>(g, &x), up::<T>(g, &w), up::<T>(g, &b));
            let bias_arg = bias.then_some(&db);
            // cuBLASLt always; the skinny tensor-core GEMM where it applies (≤ 16 rows)
            for engine in ["gemm", "skinny_gemm"] {
                if engine == "skinny_gemm" && !skinny_fits(t, n_in, n_out) {
                    continue;
                }
                let mut y = poison::<T>(g, t * n_out);
                if engine == "gemm" {
                    gm.linear(&dx, &dw, bias_arg, &mut y, t, n_in, n_out)
                } else {
                    // split-K partial sums, poisoned as y is (≥ 1 element: not every plan splits)
                    let ws_len = g.k.skinny_workspace_len(t, n_in, n_out).max(1);
                    let mut ws = up32(g, &vec![f32::NAN; ws_len]);
                    let ws = Some(&mut ws);
                    g.k.skinny_gemm(&g.s, &dx, &dw, bias_arg, &mut y, ws, t, n_in, n_out)
                }
                .unwrap();
                // f32 accumulation on both sides; one rounding of the output to T
                assert_close(
                    &format!(
                        "{engine} {} [{t}×{n_in}]·[{n_out}×{n_in}]ᵀ bias {bias}",
                        T::SUFFIX
                    ),
                    &down(g, &y),
                    &want,
                    tol::<T>(),
                    tol::<T>(),
                );
            }
        }
    }
}

/// The skinny GEMM's split-K path at the shapes that matter (bloom-7b1's dense, fc2 and a
/// one-token QKV) and at edges: this device's plan and forced ones — pieces that do not divide K,
/// pieces in which some warps have no chunk, one piece — with and without a bias, against the
/// CPU; the same call twice gives the same bits (the sums run in a fixed order), a row's bits do
/// not depend on the other rows (the last row alone gives the same), and nothing is written past
/// y's rows or the plan's workspace (both end in a poisoned tail that must stay as it was).
fn skinny_split_k<T: Act>(g: &Gpu) {
    for (t, n_in, n_out, forced) in [
        // dense: 3 pieces as on an H200 (1536, 1536, 1024), and no split
        (12usize, 4096usize, 4096usize, &[1536usize, 4096][..]),
        // fc2: 3 pieces as on an H200 (5632, 5632, 5120)
        (12, 16384, 4096, &[5632][..]),
        // QKV of one token: no split on an H200; 4 pieces of 1024
        (1, 4096, 12288, &[1024][..]),
        // 11 pieces (the last of 64: warps 2..7 have no chunk in it); 800 + 224; 4 of 256;
        // 2 of 512 (two ring steps for every warp); 288 (warp 0 two steps, the others one)
        (16, 1024, 256, &[96, 800, 256, 512, 288][..]),
        // K no multiple of 256, 5 rows
        (5, 2080, 64, &[1280, 224][..]),
    ] {
        let x = round::<T>(&rand(t * n_in, 41, 1.0));
        let w = round::<T>(&rand(n_out * n_in, 42, 0.05));
        let b = round::<T>(&rand(n_out, 43, 0.5));
        let (dx, dw, db) = (up::<T>(g, &x), up::<T>(g, &w), up::<T>(g, &b));
        let device_plan = g.k.skinny_plan(n_in, n_out);
        eprintln!(
            "skinny [{n_in} → {n_out}] on {} SMs: {device_plan:?}",
            g.k.sms
        );
        let mut plans = vec![device_plan];
        plans.extend(
            forced
                .iter()
                .map(|&k| SkinnyPlan::with_k_per_split(n_in, k)),
        );
        for bias in [false, true] {
            let mut want = vec![0f32; t * n_out];
            let zero = vec![0f32; n_out];
            cpu::linear::linear(&x, &w, if bias { &b } else { &zero }, &mut want, false);
            for plan in &plans {
                let label = format!(
                    "skinny_gemm {} [{t}×{n_in}]·[{n_out}×{n_in}]ᵀ bias {bias} {plan:?}",
                    T::SUFFIX
                );
                const TAIL: usize = 64;
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                let nan_tail = |v: &[f32]| v.iter().all(|x| x.is_nan());
                let run = |xs: &CudaSlice<T>, rows: usize| {
                    let mut y = poison::<T>(g, rows * n_out + TAIL);
                    let ws_len = plan.workspace_len(rows, n_out);
                    let mut ws = up32(g, &vec![f32::NAN; ws_len + TAIL]);
                    g.k.skinny_gemm_with_plan(
                        &g.s,
                        xs,
                        &dw,
                        bias.then_some(&db),
                        &mut y,
                        Some(&mut ws),
                        rows,
                        n_in,
                        n_out,
                        *plan,
                    )
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                    let (y, ws) = (down(g, &y), g.s.clone_dtoh(&ws).unwrap());
                    assert!(
                        nan_tail(&y[rows * n_out..]) && nan_tail(&ws[ws_len..]),
                        "{label}, {rows} rows: written past y's rows or the workspace"
                    );
                    y[..rows * n_out].to_vec()
                };
                let runs = [run(&dx, t), run(&dx, t)];
                assert_close(&label, &runs[0], &want, tol::<T>(), tol::<T>());
                assert!(
                    bits(&runs[0]) == bits(&runs[1]),
                    "{label}: two identical calls gave different bits"
                );
                let last = up::<T>(g, &x[(t - 1) * n_in..]);
                assert!(
                    bits(&run(&last, 1)) == bits(&runs[0][(t - 1) * n_out..]),
                    "{label}: the last row alone gave other bits than within the batch"
                );
                if plan.splits > 1 {
                    // a split plan without (enough) workspace is an error, not a launch
                    let mut y = poison::<T>(g, t * n_out);
                    let mut short = up32(g, &vec![0f32; plan.workspace_len(t, n_out) - 1]);
                    for ws in [None, Some(&mut short)] {
                        let r = g.k.skinny_gemm_with_plan(
                            &g.s, &dx, &dw, None, &mut y, ws, t, n_in, n_out, *plan,
                        );
                        assert!(r.is_err(), "{label}: ran without its workspace");
                    }
                }
            }
        }
    }
}

#[test]
fn gemms_match_cpu() {
    let Some(g) = gpu() else { return };
    gemm::<half::f16>(&g);
    gemm::<half::bf16>(&g);
    skinny_split_k::<half::f16>(&g);
    skinny_split_k::<half::bf16>(&g);
}

/// The whole GPU forward against the CPU forward and the transformers fixtures, by cosine:
/// f16 ≥ 0.9999 and bf16 ≥ 0.999 (the [cuda] issue's bars for the big shapes, applied here too),
/// for every forward configuration the engine can select: each kernel choice × each dtype.
/// A failing configuration is recorded and the others still run (proven choices first, those on
/// trial after), so one device run reports on all of them; a fatal device error stops the loop,
/// since the context is gone.
#[test]
fn forward_matches_cpu_and_reference() {
    let Some(_g) = gpu() else { return };
    let mut failures: Vec<String> = Vec::new();
    'all: for name in ["sgpt-tiny", "tiny-b"] {
        let golden = load_golden(name);
        let m = ModelDir::open(&golden.model_dir).unwrap();
        let cpu_model = cpu::CpuModel::load(&m.checkpoint, &m.config).unwrap();
        for kernels in KernelChoices::all() {
            for (dtype, bar) in [(GpuDtype::F16, 0.9999), (GpuDtype::Bf16, 0.999)] {
                let label = format!("{name} {dtype:?} [{kernels}]");
                let opts = EngineOptions {
                    device: Device::Cuda(0),
                    dtype: Some(dtype),
                    max_batch_tokens: None,
                    kernels,
                };
                let e = match Embedder::open_with(&golden.model_dir, opts) {
                    Ok(e) => e,
                    Err(err) => {
                        failures.push(format!("{label}: load: {err}"));
                        continue;
                    }
                };
                let mut worst = 1.0f64;
                // One text at a time (the latency path, graphs and skinny GEMM included), the
                // first four together (a multi-sequence batch small enough for graphs), then
                // all at once (the corpus path).
                let n = golden.texts.len();
                let mut batches: Vec<Vec<usize>> = (0..n).map(|k| vec![k]).collect();
                batches.push((0..4.min(n)).collect());
                batches.push((0..n).collect());
                'batches: for ks in batches {
                    let seqs: Vec<&[u32]> = ks.iter().map(|&k| &golden.texts[k].ids[..]).collect();
                    let batch = PackedBatch::from_seqs(&seqs);
                    let got = match e.embed_batch(&batch) {
                        Ok(g) => g,
                        Err(err) => {
                            let fatal = matches!(err, sgpt::Error::DeviceFatal(_));
                            failures.push(format!("{label}: batch of {}: {err}", ks.len()));
                            if fatal {
                                break 'all;
                            }
                            break 'batches;
                        }
                    };
                    let want_cpu = cpu_model.embed(&batch).unwrap();
                    let h = golden.hidden;
                    for (i, &k) in ks.iter().enumerate() {
                        let row = &got[i * h..(i + 1) * h];
                        let c_ref = cosine(row, &golden.texts[k].embedding);
                        let c_cpu = cosine(row, &want_cpu[i * h..(i + 1) * h]);
                        worst = worst.min(c_ref).min(c_cpu);
                        if c_ref < bar || c_cpu < bar {
                            failures.push(format!(
                                "{label}: text {k} in a batch of {}: cosine vs reference \
                                 {c_ref:.6}, vs CPU {c_cpu:.6} (bar {bar})",
                                ks.len()
                            ));
                        }
                    }
                }
                println!("{label}: worst cosine {worst:.7}");
            }
        }
    }
    assert_no_failures(&failures);
}

/// The per-layer view: the GPU forward's residual stream after the embedding and after each
/// block against the CPU forward's, token by token (cosine ≥ 0.9999 in f16, the forward test's
/// bar), with the proven kernels and with each attention version on trial — so a numerical bug
/// is reported at the first layer it shows in, not only in the pooled embedding.
#[test]
fn layers_match_cpu() {
    use sgpt::backend::cuda::model::{CudaModel, WeightFormat};
    use sgpt::backend::{AttentionKernel, RowKernel};
    let Some(_g) = gpu() else { return };
    let mut failures: Vec<String> = Vec::new();
    for name in ["sgpt-tiny", "tiny-b"] {
        let golden = load_golden(name);
        let m = ModelDir::open(&golden.model_dir).unwrap();
        let cpu_model = cpu::CpuModel::load(&m.checkpoint, &m.config).unwrap();
        let seqs: Vec<&[u32]> = golden.texts.iter().map(|t| &t.ids[..]).collect();
        let batch = PackedBatch::from_seqs(&seqs);
        let mut want: Vec<Vec<f32>> = Vec::new();
        cpu_model
            .forward(&batch, &mut |_, x| want.push(x.to_vec()))
            .unwrap();
        let h = m.config.hidden;
        for (attention, rows) in [
            (AttentionKernel::Auto, RowKernel::V1),
            (AttentionKernel::Mma, RowKernel::V1),
            (AttentionKernel::Mma2, RowKernel::V1),
            (AttentionKernel::Auto, RowKernel::Vec),
        ] {
            let kernels = KernelChoices {
                attention,
                rows,
                ..Default::default()
            };
            let label = format!("{name} f16 [{kernels}]");
            let ctx = sgpt::backend::cuda::device::open(0).unwrap();
            let gpu_model = CudaModel::<half::f16>::load(
                ctx,
                &m.checkpoint,
                &m.config,
                batch.num_tokens(),
                kernels,
                WeightFormat::Half,
                &|_, _| {},
            )
            .unwrap();
            let mut got: Vec<Vec<f32>> = Vec::new();
            if let Err(e) = gpu_model.forward_observed(&batch, &mut |_, x| got.push(x.to_vec())) {
                failures.push(format!("{label}: {e}"));
                continue;
            }
            // states 0..L-1 (the GPU fuses the final layernorm into the pooling)
            assert_eq!(got.len(), m.config.layers, "{label}: states observed");
            for (layer, (g, c)) in got.iter().zip(&want).enumerate() {
                let (worst, token) = g
                    .chunks(h)
                    .zip(c.chunks(h))
                    .map(|(a, b)| cosine(a, b))
                    .enumerate()
                    .map(|(k, cos)| (cos, k))
                    .fold((1.0, 0), |w, x| if x.0 < w.0 { x } else { w });
                if worst < 0.9999 {
                    failures.push(format!(
                        "{label}: hidden states {layer}: token {token} cosine {worst:.6} \
                         (bar 0.9999); the first layer that fails is where to look"
                    ));
                    break;
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// `--embedding-table host`: the table in page-locked host memory, read by the embedding kernel
/// over the bus, gives the same vectors bit for bit as the table on the device (the same
/// values, converted on the host with the device's rounding), with both row kernels, in f16
/// and bf16 and under FP8 where the device has it; the weights then take the device bytes
/// `device_weight_bytes` says, and the table its bytes in host memory.
#[test]
fn host_embedding_table_matches_the_device_table() {
    use sgpt::backend::cuda::model::{device_weight_bytes, CudaModel, WeightFormat};
    use sgpt::backend::{Backend, EmbeddingTable, RowKernel};
    let Some(_g) = gpu() else { return };
    let open = || sgpt::backend::cuda::device::open(0).unwrap();
    let fp8 = open().compute_capability().unwrap() >= (8, 9);
    let mut failures: Vec<String> = Vec::new();
    fn run<T: Act>(
        m: &ModelDir,
        batch: &PackedBatch,
        kernels: KernelChoices,
        format: WeightFormat,
    ) -> sgpt::error::Result<(Vec<f32>, u64, u64)> {
        let ctx = sgpt::backend::cuda::device::open(0).unwrap();
        let n = batch.num_tokens();
        let model = CudaModel::<T>::load(
            ctx,
            &m.checkpoint,
            &m.config,
            n,
            kernels,
            format,
            &|_, _| {},
        )?;
        let r = (model.report.weight_bytes, model.report.host_table_bytes);
        Ok((model.embed(batch)?, r.0, r.1))
    }
    for name in ["sgpt-tiny", "tiny-b"] {
        let golden = load_golden(name);
        let m = ModelDir::open(&golden.model_dir).unwrap();
        let seqs: Vec<&[u32]> = golden.texts.iter().map(|t| &t.ids[..]).collect();
        let all = PackedBatch::from_seqs(&seqs);
        // A batch CUDA graphs take (≤ 128 tokens): captured with the table's address in it.
        let short = PackedBatch::from_seqs(
            &seqs
                .iter()
                .map(|s| &s[..s.len().min(12)])
                .take(4)
                .collect::<Vec<_>>(),
        );
        let (cfg, table_bytes) = (&m.config, (m.config.vocab * m.config.hidden * 2) as u64);
        let mut formats = vec![("f16", WeightFormat::Half), ("bf16", WeightFormat::Half)];
        if fp8 {
            formats.push((
                "fp8",
                WeightFormat::Fp8(sgpt::backend::cpu::fp8::Fp8Blocks::All),
            ));
        }
        for (dtype, format) in formats {
            for (rows, graphs) in [
                (RowKernel::V1, false),
                (RowKernel::Vec, false),
                (RowKernel::V1, true),
            ] {
                let batch = if graphs { &short } else { &all };
                let kernels = |table| KernelChoices {
                    rows,
                    table,
                    cuda_graphs: graphs,
                    ..Default::default()
                };
                let label = format!("{name} {dtype} [{}]", kernels(EmbeddingTable::Host));
                let both = [EmbeddingTable::Device, EmbeddingTable::Host].map(|t| {
                    if dtype == "bf16" {
                        run::<half::bf16>(&m, batch, kernels(t), format)
                    } else {
                        run::<half::f16>(&m, batch, kernels(t), format)
                    }
                });
                let [Ok((want, on_device, device_host)), Ok((got, held, in_host))] = both else {
                    failures.push(format!("{label}: {:?}", both.map(|r| r.err())));
                    continue;
                };
                if device_host != 0 {
                    failures.push(format!(
                        "{label}: the device table reports {device_host} bytes in host memory"
                    ));
                }
                let differ = want
                    .iter()
                    .zip(&got)
                    .filter(|(a, b)| a.to_bits() != b.to_bits());
                let n = differ.count();
                if n > 0 {
                    let worst = want
                        .iter()
                        .zip(&got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    failures.push(format!(
                        "{label}: {n} of {} values differ from the device table's (worst by {worst:e})",
                        want.len()
                    ));
                }
                let predicted = device_weight_bytes(cfg, format, 2, EmbeddingTable::Host);
                if held != predicted || held + table_bytes != on_device || in_host != table_bytes {
                    failures.push(format!(
                        "{label}: device bytes {held} (predicted {predicted}, with the table on \
                         the device {on_device}), host bytes {in_host} (the table: {table_bytes})"
                    ));
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// A checkpoint written by `sgpt quantize` loads on the GPU as stored (the codes and scales
/// copied, no quantize kernel) and gives, bit for bit, the vectors of its float source quantized
/// at load — both FP8 dtypes, where the device has FP8.
#[test]
fn quantized_checkpoint_matches_quantizing_at_load_on_gpu() {
    use sgpt::backend::cpu::fp8::Fp8Blocks;
    use sgpt::backend::cuda::model::{CudaModel, WeightFormat};
    use sgpt::backend::Backend;
    let Some(_g) = gpu() else { return };
    let open = || sgpt::backend::cuda::device::open(0).unwrap();
    if open().compute_capability().unwrap() < (8, 9) {
        eprintln!("skipped: no FP8 on this device");
        return;
    }
    let golden = load_golden("tiny-b");
    let seqs: Vec<&[u32]> = golden.texts.iter().map(|t| &t.ids[..]).collect();
    let batch = PackedBatch::from_seqs(&seqs);
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for b in [Fp8Blocks::All, Fp8Blocks::Alternate] {
        let q = tmp.path().join(b.dtype_name());
        sgpt::quantize::quantize_dir(&golden.model_dir, &q, b, &|_, _| {}).unwrap();
        let embed = |dir: &std::path::Path| {
            let m = ModelDir::open(dir).unwrap();
            let n = batch.num_tokens();
            let k = KernelChoices::default();
            let model = CudaModel::<half::f16>::load(
                open(),
                &m.checkpoint,
                &m.config,
                n,
                k,
                WeightFormat::Fp8(b),
                &|_, _| {},
            )
            .unwrap();
            model.embed(&batch).unwrap()
        };
        let (want, got) = (embed(&golden.model_dir), embed(&q));
        let n = want
            .iter()
            .zip(&got)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        if n > 0 {
            failures.push(format!(
                "{}: {n} of {} values differ",
                b.dtype_name(),
                want.len()
            ));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn batch_invariance_on_gpu() {
    let Some(_g) = gpu() else { return };
    let golden = load_golden("sgpt-tiny");
    let e = Embedder::open_with(
        &golden.model_dir,
        EngineOptions {
            device: Device::Cuda(0),
            dtype: Some(GpuDtype::F16),
            max_batch_tokens: None,
            kernels: KernelChoices::default(),
        },
    )
    .unwrap();
    let seqs: Vec<&[u32]> = golden.texts.iter().map(|t| &t.ids[..]).collect();
    let together = e.backend.embed(&PackedBatch::from_seqs(&seqs)).unwrap();
    let h = golden.hidden;
    for (k, s) in seqs.iter().enumerate() {
        let alone = e.backend.embed(&PackedBatch::from_seqs(&[*s])).unwrap();
        // GEMM algorithms may differ with the row count, so allow one f16 rounding step.
        assert_close(
            &format!("gpu text {k} in batch"),
            &together[k * h..(k + 1) * h],
            &alone,
            2e-3,
            2e-3,
        );
    }
}

/// `sgpt eval`'s search on the GPU (cuBLASLt f32 tiles) ranks like the CPU search: the same top
/// documents, scores within f32 summation-order noise.
#[test]
fn gpu_search_matches_cpu_search() {
    use sgpt::eval::search::{tie_ranks, BlockedScorer, CpuScorer, Scorer, SearchPlan};
    use sgpt::eval::search_gpu::GpuProduct;
    let Some(_g) = gpu() else { return };
    // The search runs in the engine's own context, as eval does, with CUDA graphs on (the
    // model then has its own stream and cudarc's event tracking off).
    let graphs_engine = Embedder::open_with(
        &load_golden("sgpt-tiny").model_dir,
        EngineOptions {
            device: Device::Cuda(0),
            kernels: KernelChoices {
                cuda_graphs: true,
                ..KernelChoices::default()
            },
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let (q, d, h) = (37usize, 5000usize, 96usize);
    let mut queries = rand(q * h, 41, 1.0);
    let mut docs = rand(d * h, 42, 1.0);
    cpu::pooling::l2_normalize(&mut queries, h);
    cpu::pooling::l2_normalize(&mut docs, h);
    let ids: Vec<String> = (0..d).map(|i| format!("d{i:05}")).collect();
    let plan = SearchPlan {
        k: 100,
        tie_rank: tie_ranks(&ids),
        exclude: (0..q).map(|i| (i % 3 == 0).then_some(i as u32)).collect(),
    };
    let run = |mut s: Box<dyn Scorer>| {
        for (i, chunk) in docs.chunks(1000 * h).enumerate() {
            s.add_documents(i * 1000, chunk).unwrap();
        }
        s.finish().unwrap()
    };
    let cpu_hits = run(Box::new(
        CpuScorer::with_blocks(queries.clone(), h, plan.clone(), 16, 512).unwrap(),
    ));
    let gpu_hits = run(Box::new(
        BlockedScorer::with_product(
            GpuProduct::new(&graphs_engine.backend.cuda_context().unwrap()).unwrap(),
            queries.clone(),
            h,
            plan,
            16,
            512,
        )
        .unwrap(),
    ));
    for (qi, (c, g)) in cpu_hits.iter().zip(&gpu_hits).enumerate() {
        assert_eq!(c.len(), g.len());
        // Random unit vectors have no near-ties at the top: the best 10 must agree exactly.
        let (ct, gt): (Vec<u32>, Vec<u32>) = (
            c.iter().take(10).map(|x| x.doc).collect(),
            g.iter().take(10).map(|x| x.doc).collect(),
        );
        assert_eq!(ct, gt, "query {qi}: top 10 differ");
        for (a, b) in c.iter().zip(g) {
            if a.doc == b.doc {
                assert!(
                    (a.score - b.score).abs() < 1e-5,
                    "query {qi} doc {}: {} vs {}",
                    a.doc,
                    a.score,
                    b.score
                );
            }
        }
    }
}

/// The same batch three times gives bit-identical embeddings under every kernel choice: the
/// forward is deterministic, and with CUDA graphs the second and third runs replay the graph
/// captured by the first.
#[test]
fn repeated_batches_are_identical() {
    let Some(_g) = gpu() else { return };
    let golden = load_golden("tiny-b");
    let mut failures: Vec<String> = Vec::new();
    for kernels in KernelChoices::all() {
        let e = match Embedder::open_with(
            &golden.model_dir,
            EngineOptions {
                device: Device::Cuda(0),
                dtype: Some(GpuDtype::F16),
                max_batch_tokens: None,
                kernels,
            },
        ) {
            Ok(e) => e,
            Err(err) => {
                failures.push(format!("[{kernels}] load: {err}"));
                continue;
            }
        };
        // Two shapes, alternated A B A B A B: a graph captured for A must replay correctly
        // after B's was captured (graphs are kept per shape).
        let a = PackedBatch::from_seqs(&[&golden.texts[3].ids[..]]);
        let four: Vec<&[u32]> = golden.texts[..4].iter().map(|t| &t.ids[..]).collect();
        let b = PackedBatch::from_seqs(&four);
        let mut first: [Option<Vec<f32>>; 2] = [None, None];
        'runs: for round in 0..6 {
            let (i, batch) = if round % 2 == 0 { (0, &a) } else { (1, &b) };
            let got = match e.embed_batch(batch) {
                Ok(g) => g,
                Err(err) => {
                    failures.push(format!("[{kernels}] round {round}: {err}"));
                    break 'runs;
                }
            };
            match &first[i] {
                None => {
                    let want = &golden.texts[if i == 0 { 3 } else { 0 }].embedding;
                    let c = cosine(&got[..golden.hidden], want);
                    if c < 0.9999 {
                        failures.push(format!("[{kernels}] cosine {c} against the reference"));
                    }
                    first[i] = Some(got);
                }
                Some(f) if *f != got => failures.push(format!(
                    "[{kernels}] round {round}: a repeated batch of {} tokens changed",
                    batch.num_tokens()
                )),
                Some(_) => {}
            }
        }
    }
    assert_no_failures(&failures);
}

/// `--device cuda:0,0`: two replicas on one GPU give one engine's vectors bit for bit (same
/// batches, same device) and both take batches.
#[test]
fn two_replicas_on_one_gpu_match_one_engine() {
    let Some(_g) = gpu() else { return };
    let golden = load_golden("sgpt-tiny");
    let open = |device: &str| {
        Embedder::open_with(
            &golden.model_dir,
            EngineOptions {
                device: device.parse().unwrap(),
                dtype: Some(GpuDtype::F16),
                max_batch_tokens: Some(32), // many batches
                kernels: KernelChoices::default(),
            },
        )
        .unwrap()
    };
    let (one, two) = (open("cuda:0"), open("cuda:0,0"));
    let texts: Vec<(String, Kind)> = (0..64)
        .map(|i| {
            (
                format!("replica text {i} {}", "x ".repeat(i % 13)),
                Kind::Query,
            )
        })
        .collect();
    let a = one.embed_texts(&texts, false).unwrap();
    let b = two.embed_texts(&texts, false).unwrap();
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "text {k} differs between one engine and two replicas"
        );
    }
    let stats = two.backend.replica_stats();
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|s| s.batches > 0), "{stats:?}");
}

// ---- FP8 (`--dtype fp8`, docs/fp8.md): every piece against the CPU emulation ----------------

/// Rows that exercise every rule of the per-row E4M3 rounding, `rnd` applied to every value (the
/// rounding to the kernel's input type, so both sides see the same numbers): random rows, an
/// all-zero row, a row whose scale is exactly 1 holding every midpoint between E4M3 codes (ties)
/// and one f32 step either side of them, values in E4M3's subnormal range and below it, a row
/// with an outlier (the rest falls into the subnormal range after scaling), a row whose amax
/// divided by its scale rounds above 448 (must saturate to 448, not become NaN), a row with a
/// NaN (its code is 0x7F, the scale ignores it), and rows of tiny and huge magnitudes.
fn fp8_test_rows(n: usize, seed: u64, rnd: &dyn Fn(f32) -> f32) -> Vec<f32> {
    use sgpt::backend::cpu::fp8::{from_e4m3, scale_for};
    let codes: Vec<f32> = (0u8..=0x7E).map(from_e4m3).collect();
    let mut special = Vec::new();
    for w in codes.windows(2) {
        let mid = (w[0] + w[1]) / 2.0; // ≤ 5 significant bits: exact
        special.extend([
            mid,
            -mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
            w[0],
        ]);
    }
    special.extend([
        0.0,
        -0.0,
        2f32.powi(-10),
        3.0 * 2f32.powi(-10),
        1e-4,
        1e-12,
        -1e-30,
    ]);
    // amax / scale_for(amax) > 448 after rounding: found by search, in the input type.
    let saturating = (0..200_000)
        .map(|i| rnd(1.0 + i as f32 * 0.0137))
        .find(|&a| a / scale_for(a) > 448.0)
        .expect("an amax whose quotient rounds above 448");
    let mut x = Vec::new();
    for r in 0..10 {
        let mut row = rand(n, seed + r, 3.0);
        match r {
            1 => row.fill(0.0),
            2 => {
                // scale exactly 1: 448 first, then the special values in turn
                row[0] = 448.0;
                for (i, v) in row.iter_mut().enumerate().skip(1) {
                    *v = special[(i * 7 + seed as usize) % special.len()];
                }
            }
            3 => {
                row.iter_mut().for_each(|v| *v *= 0.01 / 3.0);
                row[n / 3] = -1e4;
            }
            4 => {
                row.iter_mut().for_each(|v| *v *= 0.1); // below `saturating` (≥ 1): it is the amax
                row[n / 2] = saturating;
            }
            5 => row.iter_mut().step_by(3).for_each(|v| *v = 0.0),
            6 if n > 1 => row[n - 1] = f32::NAN,
            7 => row.iter_mut().for_each(|v| *v *= 1e-30),
            8 => row.iter_mut().for_each(|v| *v *= 1e30),
            _ => {}
        }
        x.extend(row.into_iter().map(rnd));
    }
    x
}

/// The types the quantize kernel reads, with their host conversions.
trait Fp8Input: sgpt::backend::cuda::ops::Fp8Source + Copy {
    fn of(v: f32) -> Self;
    fn value(self) -> f32;
}

impl Fp8Input for f32 {
    fn of(v: f32) -> Self {
        v
    }
    fn value(self) -> f32 {
        self
    }
}

impl Fp8Input for half::f16 {
    fn of(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

impl Fp8Input for half::bf16 {
    fn of(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

/// The quantize kernel against `fp8::quantize` (per token): codes and scales bit for bit, for
/// the input type S (f32: weights at load; f16/bf16: GEMM inputs), at widths that take its
/// 8-wide path (multiples of 8, 1000 not of 16) and its one-element path (1, 7, 37, 1030).
fn fp8_quantize_case<S: Fp8Input>(g: &Gpu, name: &str) {
    use sgpt::backend::cpu::fp8::{quantize, ActScale};
    let rnd = |v: f32| S::of(v).value();
    let mut saturated = 0;
    for n in [1usize, 7, 37, 64, 1000, 1030, 4096] {
        let x = fp8_test_rows(n, 50 + n as u64, &rnd);
        let rows = x.len() / n;
        let (want_q, want_s) = quantize(&x, n, ActScale::PerToken);
        let host: Vec<S> = x.iter().map(|&v| S::of(v)).collect();
        let dx: CudaSlice<S> = g.s.clone_htod(&host).unwrap();
        let mut q: CudaSlice<u8> = g.s.clone_htod(&vec![0xAAu8; rows * n]).unwrap();
        let mut s = up32(g, &vec![f32::NAN; rows]);
        g.k.fp8_quantize_rows(&g.s, &dx, &mut q, &mut s, rows, n)
            .unwrap();
        let (got_q, got_s) = (g.s.clone_dtoh(&q).unwrap(), g.s.clone_dtoh(&s).unwrap());
        for r in 0..rows {
            assert_eq!(
                got_s[r].to_bits(),
                want_s[r].to_bits(),
                "fp8_quantize_rows_{name} n {n} row {r}: scale {} vs {}",
                got_s[r],
                want_s[r]
            );
            let (gq, wq) = (&got_q[r * n..(r + 1) * n], &want_q[r * n..(r + 1) * n]);
            if let Some(i) = (0..n).find(|&i| gq[i] != wq[i]) {
                panic!(
                    "fp8_quantize_rows_{name} n {n} row {r} element {i}: x {:e} (x/s {:e}) → \
                     code {:#04x}, want {:#04x}",
                    x[r * n + i],
                    x[r * n + i] / want_s[r],
                    gq[i],
                    wq[i]
                );
            }
            saturated += (0..n)
                .filter(|&i| x[r * n + i].abs() / want_s[r] > 448.0 && wq[i] & 0x7F == 0x7E)
                .count();
        }
    }
    assert!(
        saturated > 0,
        "{name}: no value beyond 448 after scaling was exercised"
    );
}

#[test]
fn fp8_quantize_matches_the_emulation_bit_for_bit() {
    let Some(g) = gpu() else { return };
    fp8_quantize_case::<f32>(&g, "f32");
    fp8_quantize_case::<half::f16>(&g, "f16");
    fp8_quantize_case::<half::bf16>(&g, "bf16");
}

/// The epilogue alone, bit for bit: the same f32 operations in the same order on the host
/// (acc·(sx·sw), then + b, then one rounding to T), with and without a bias, a width that is
/// not a multiple of 256·4 (the grid's last block partly idle), and more rows than the grid's
/// 65535 (the row loop).
fn fp8_epilogue_case<T: Act>(g: &Gpu) {
    for (rows, n, bias) in [
        (1usize, 16usize, true),
        (7, 4100, false),
        (33, 1024, true),
        (65_600, 16, true),
    ] {
        let acc: Vec<f32> = rand(rows * n, 61, 3e9);
        let sx: Vec<f32> = rand(rows, 62, 1e-2)
            .iter()
            .map(|v| v.abs() + 1e-6)
            .collect();
        let sw: Vec<f32> = rand(n, 63, 1e-4).iter().map(|v| v.abs() + 1e-9).collect();
        let b = rand(n, 64, 0.5);
        let mut y = poison::<T>(g, rows * n);
        let db = up32(g, &b);
        g.k.fp8_epilogue(
            &g.s,
            &up32(g, &acc),
            &up32(g, &sx),
            &up32(g, &sw),
            bias.then_some(&db),
            &mut y,
            rows,
            n,
        )
        .unwrap();
        let got = down(g, &y);
        for t in 0..rows {
            for o in 0..n {
                let mut v = acc[t * n + o] * (sx[t] * sw[o]);
                if bias {
                    v += b[o];
                }
                let want = T::from_f32(v).to_f32();
                let i = t * n + o;
                assert!(
                    got[i].to_bits() == want.to_bits(),
                    "fp8_epilogue_{} rows {rows} n {n} bias {bias}: [{t}, {o}] {} vs {want}",
                    T::SUFFIX,
                    got[i]
                );
            }
        }
    }
}

/// The FP8 product (cuBLASLt, E4M3 in, f32 out) and the epilogue against `Fp8Linear`, the CPU
/// emulation, on the same operands (x rounded to f16 as the forward holds it, W in f32 as a
/// checkpoint's widened values), at small shapes and bloom-7b1's (12 tokens: the latency path;
/// 260: a corpus batch). Both sides multiply the same E4M3 codes (the quantize kernel is
/// checked bit for bit above) and every product is exact in f32, so they differ only in the
/// order and width of the accumulation, then in the GPU's rounding of y to f16. Every shape
/// runs and reports before the test fails (one device run says everything).
fn fp8_linear_case(g: &Gpu) {
    use sgpt::backend::cpu::fp8::{decode_codes, ActScale, Fp8Linear};
    use sgpt::backend::cpu::linear::LinearKernel;
    let mut gm = Gemm::new(g.s.clone()).unwrap();
    let mut failures: Vec<String> = Vec::new();
    // y: one rounding to f16 (2^-11 ≈ 4.9e-4 relative) on O(1) outputs dominates the
    // accumulation differences (an f32 sum of K random-signed terms in another order: ≈ 2^-24·√K
    // ≈ 1e-5 relative at K = 16384); assert_close's report names the worst element.
    let close = |label: &str, got: &[f32], want: &[f32]| -> Option<String> {
        std::panic::catch_unwind(|| assert_close(label, got, want, 2e-3, 2e-3))
            .err()
            .map(|_| format!("{label}: y differs (see the panic message above)"))
    };
    for (t, n_in, n_out) in [
        (1usize, 64usize, 192usize),
        (7, 96, 288),
        (33, 1024, 4096),
        (12, 4096, 12288),
        (12, 4096, 4096),
        (12, 4096, 16384),
        (12, 16384, 4096),
        (260, 4096, 1024),
    ] {
        // Operands, quantization and the product once per shape (the 16384-wide ones cost
        // seconds of host time); the epilogue with and without a bias.
        let label = format!("fp8 linear [{t}×{n_in}]·[{n_out}×{n_in}]ᵀ");
        let mut x = round::<half::f16>(&rand(t * n_in, 71, 1.0));
        x[n_in / 2] = 40.0; // an outlier channel in token 0
        let w = rand(n_out * n_in, 72, 0.05);
        let b = rand(n_out, 73, 0.5);
        let lin = Fp8Linear::new(&w, n_out, ActScale::PerToken);
        let (dx, dw, db) = (up::<half::f16>(g, &x), up32(g, &w), up32(g, &b));
        let mut wq: CudaSlice<u8> = g.s.alloc_zeros(n_out * n_in).unwrap();
        let mut sw = up32(g, &vec![f32::NAN; n_out]);
        g.k.fp8_quantize_rows(&g.s, &dw, &mut wq, &mut sw, n_out, n_in)
            .unwrap();
        let mut xq: CudaSlice<u8> = g.s.alloc_zeros(t * n_in).unwrap();
        let mut sx = up32(g, &vec![f32::NAN; t]);
        g.k.fp8_quantize_rows(&g.s, &dx, &mut xq, &mut sx, t, n_in)
            .unwrap();
        let mut acc = up32(g, &vec![f32::NAN; t * n_out]);
        if let Err(e) = gm.fp8_product(&xq, &wq, &mut acc, t, n_in, n_out) {
            failures.push(format!("{label}: {e}"));
            continue;
        }
        for bias in [false, true] {
            let zero = vec![0f32; n_out];
            let mut want = vec![0f32; t * n_out];
            lin.forward(&x, if bias { &b } else { &zero }, &mut want, false);
            let mut y = poison::<half::f16>(g, t * n_out);
            g.k.fp8_epilogue(&g.s, &acc, &sx, &sw, bias.then_some(&db), &mut y, t, n_out)
                .unwrap();
            failures.extend(close(&format!("{label} bias {bias}"), &down(g, &y), &want));
        }

        // The unscaled sums against f64 sums of the same codes, relative to Σ|products|. An
        // f32 sum of random-signed products errs by ≈ 2^-24 of that (≈ 1e-7) whatever the
        // order, the worst of ~10^5 outputs a few times more; a sum that keeps ~14 bits between
        // promotions to f32 (Hopper's fast FP8 accumulation) by ≈ 2^-14 (≈ 6e-5): the bar of
        // 2e-5 tells them apart, and the measured value is printed either way.
        let (codes, _) = lin.parts();
        let (qw, qx) = (
            decode_codes(codes),
            decode_codes(&g.s.clone_dtoh(&xq).unwrap()),
        );
        let got_acc = g.s.clone_dtoh(&acc).unwrap();
        let mut worst = 0f64;
        for r in 0..t {
            let xr = &qx[r * n_in..(r + 1) * n_in];
            for o in (0..n_out).step_by(if t * n_in * n_out > 1 << 26 { 7 } else { 1 }) {
                let wr = &qw[o * n_in..(o + 1) * n_in];
                let (exact, mag) = xr.iter().zip(wr).fold((0f64, 0f64), |(s, m), (a, b)| {
                    let p = f64::from(*a) * f64::from(*b);
                    (s + p, m + p.abs())
                });
                let e = (f64::from(got_acc[r * n_out + o]) - exact).abs() / mag.max(1e-30);
                worst = worst.max(e);
            }
        }
        println!("{label}: max |acc − exact| / Σ|products| = {worst:.2e}");
        if worst.is_nan() || worst >= 2e-5 {
            failures.push(format!("{label}: accumulation error {worst:e}"));
        }
    }
    // A width cuBLASLt's FP8 kernels cannot take is an error, not a launch.
    let (xq, wq) = (
        g.s.alloc_zeros::<u8>(64).unwrap(),
        g.s.alloc_zeros::<u8>(64 * 8).unwrap(),
    );
    let mut acc = g.s.alloc_zeros::<f32>(64).unwrap();
    if gm.fp8_product(&xq, &wq, &mut acc, 1, 64, 8).is_ok() {
        failures.push("fp8_product took n_out = 8".into());
    }
    assert_no_failures(&failures);
}

/// The epilogue fused into the residual add + layernorm (dense and FC2 of an FP8 block): x
/// bit for bit against `Fp8Linear`'s accumulate (its `epilogue`, y = acc·(sx·sw) + b, then
/// x + y, each rounded in f32 in that order: IEEE operations on both sides, no FMA contraction,
/// NVRTC without -ftz, so equal bits), a
/// against the CPU layernorm of that x with `tol` (rounded to T once; only the statistics'
/// summation order differs). Rows in registers at every chunk count of the vec kernels.
fn fp8_epilogue_add_layernorm_case<T: Act>(g: &Gpu) {
    let eps = 1e-5;
    for (rows, h) in [
        (3usize, 16usize),
        (37, 1024),
        (5, 2064),
        (9, 4096),
        (3, 4104), // 4 chunks with a partly filled last step (513 chunks, 160 threads)
        (2, 6144),
    ] {
        let label = format!("fp8_epilogue_add_layernorm_{} rows {rows} H {h}", T::SUFFIX);
        let x = rand(rows * h, 71, 3.0);
        // unscaled E4M3 sums (up to ~K·448² in the forward), scales making y O(1)
        let acc = rand(rows * h, 72, 3e6);
        let sx: Vec<f32> = rand(rows, 73, 1e-2)
            .iter()
            .map(|v| v.abs() + 1e-4)
            .collect();
        let sw: Vec<f32> = rand(h, 74, 1e-4).iter().map(|v| v.abs() + 1e-6).collect();
        let (b, b_ln) = (rand(h, 75, 0.5), rand(h, 76, 0.2));
        let w_ln: Vec<f32> = rand(h, 77, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect();
        let (dsw, db, dw_ln, db_ln) = (up32(g, &sw), up32(g, &b), up32(g, &w_ln), up32(g, &b_ln));
        let (dacc, dsx) = (up32(g, &acc), up32(g, &sx));
        let mut dx = up32(g, &x);
        let mut da = poison::<T>(g, rows * h);
        g.k.fp8_epilogue_add_layernorm(
            &g.s,
            &mut dx,
            (&dacc, &dsx),
            (&dsw, &db),
            (&dw_ln, &db_ln),
            &mut da,
            rows,
            h,
            eps,
        )
        .unwrap();
        let want_x: Vec<f32> = (0..rows * h)
            .map(|i| {
                let (t, o) = (i / h, i % h);
                x[i] + sgpt::backend::cpu::fp8::epilogue(acc[i], sx[t], sw[o], b[o])
            })
            .collect();
        let got_x = g.s.clone_dtoh(&dx).unwrap();
        if let Some(i) = (0..rows * h).find(|&i| got_x[i].to_bits() != want_x[i].to_bits()) {
            panic!(
                "{label}: x[{i}] {} vs {} (must be equal)",
                got_x[i], want_x[i]
            );
        }
        let mut want = vec![0f32; rows * h];
        cpu::layernorm::layernorm(&want_x, &w_ln, &b_ln, eps, &mut want);
        assert_close(
            &format!("{label} a"),
            &down(g, &da),
            &want,
            tol::<T>(),
            tol::<T>(),
        );
    }
}

/// FC1's epilogue, GELU and FC2's input quantization in one kernel, against the emulation's
/// steps: m = gelu_fast(epilogue(acc, sx, sw, b1)) in f32, then `fp8::quantize` per token.
/// The GPU's GELU (ex2.approx, a fast division) is within ≲ 5e-6 relative of the CPU's
/// (bias_gelu.cu's bound; a desk model put it at 1.4e-6), so a scale may differ by that much
/// and a code may round the other way at a midpoint: the bars are the scale to 1e-5 relative
/// and each decoded value within half an E4M3 step of the CPU's m (2^-4 relative for normals,
/// 2^-10·scale absolute for subnormals) with 2e-4 slack (≥ 16 × 5e-6 and the scale's 1e-5) —
/// far below what a wrong column, row or bias gives (it would be off by O(m)).
fn fp8_gelu_quantize_case(g: &Gpu) {
    use sgpt::backend::cpu::fp8::{epilogue, from_e4m3, quantize, ActScale};
    // every chunk count (1, 2, 4, 8), whole and partly filled last steps
    for (rows, f) in [
        (3usize, 64usize),
        (9, 4 * 264),
        (5, 4 * 1024),
        (3, 4128),
        (2, 6144),
        (2, 8256),
        (2, 10240),
        (4, 16384),
    ] {
        let label = format!("fp8_gelu_quantize_rows rows {rows} F {f}");
        let acc = rand(rows * f, 81, 3e6);
        let sx: Vec<f32> = rand(rows, 82, 1e-2)
            .iter()
            .map(|v| v.abs() + 1e-4)
            .collect();
        let sw: Vec<f32> = rand(f, 83, 1e-4).iter().map(|v| v.abs() + 1e-6).collect();
        let b1 = rand(f, 84, 0.5);
        let mut dsx = up32(g, &sx);
        let mut q = g.s.clone_htod(&vec![0x7Fu8; rows * f]).unwrap(); // NaN codes: poison
        let (dsw, db1) = (up32(g, &sw), up32(g, &b1));
        g.k.fp8_gelu_quantize_rows(
            &g.s,
            &up32(g, &acc),
            &mut dsx,
            (&dsw, &db1),
            &mut q,
            rows,
            f,
        )
        .unwrap();
        let (codes, scales) = (g.s.clone_dtoh(&q).unwrap(), g.s.clone_dtoh(&dsx).unwrap());
        let m: Vec<f32> = (0..rows * f)
            .map(|i| {
                let (t, o) = (i / f, i % f);
                cpu::gelu::gelu_fast(epilogue(acc[i], sx[t], sw[o], b1[o]))
            })
            .collect();
        let (_, want_scales) = quantize(&m, f, ActScale::PerToken);
        for t in 0..rows {
            let (got, want) = (scales[t], want_scales[t]);
            assert!(
                (got / want - 1.0).abs() <= 1e-5,
                "{label}: scale of row {t}: {got} vs {want}"
            );
            for o in 0..f {
                let i = t * f + o;
                let deq = from_e4m3(codes[i]) * got;
                let bar = (m[i].abs() / 16.0 + got / 1024.0) * (1.0 + 2e-4);
                assert!(
                    (deq - m[i]).abs() <= bar,
                    "{label}: [{t}, {o}] code {:#04x} decodes to {deq}, m = {} (bar {bar})",
                    codes[i],
                    m[i]
                );
            }
        }
    }
}

#[test]
fn fp8_gemm_matches_the_emulation() {
    let Some(g) = gpu() else { return };
    fp8_gelu_quantize_case(&g);
    fp8_epilogue_case::<half::f16>(&g);
    fp8_epilogue_case::<half::bf16>(&g);
    fp8_epilogue_add_layernorm_case::<half::f16>(&g);
    fp8_epilogue_add_layernorm_case::<half::bf16>(&g);
    fp8_linear_case(&g);
}

/// The GPU `--dtype fp8` forward against the CPU emulation (`--device cpu --dtype fp8`) and the
/// f32 forward, on the two fixture models (f32 and f16 checkpoints) and a random
/// bloom-560m-like one (bf16 checkpoint, H 1024, 24 blocks, a small vocabulary): one text at a
/// time, then all together, under each kernel choice that applies (the skinny GEMM has no FP8
/// version and is refused). Also: the engine reports dtype fp8, and the weights take on the
/// device what `device_weight_bytes` says (≈ half of f16's).
///
/// The bars, and why not issue 15's 0.9999 to the emulation: the two cannot agree that closely.
/// The GPU holds activations in f16 and sums in another order; wherever that moves a GEMM input
/// across an E4M3 rounding boundary, the input changes by a whole E4M3 step (≈ 6%), and the
/// difference spreads through the following blocks. Measured on the CPU (the emulation against
/// itself with every GEMM input and output rounded to f16): worst cosine 0.99953 (sgpt-tiny),
/// 0.99923 (tiny-b), 0.99882 (this bloom-560m-like model, 24 blocks); even a relative
/// perturbation of 1e-7 on each GEMM output, the size of a reordered f32 sum, gives 0.99955
/// after 24 blocks. So each text must be within cosine 0.997 of the emulation (a wrong or
/// transposed weight or an unscaled product lands far below), and the GPU path must be as
/// accurate as the emulation: its worst 1 − cosine to the f32 forward at most 1.5× the
/// emulation's (measured with f16 rounding on the CPU: 0.88–1.15×), which a missing or doubled
/// bias would break.
/// The cosine to the emulation is printed against 0.9999 too, for the record.
#[test]
fn fp8_forward_matches_the_emulation() {
    use sgpt::backend::cpu::fp8::{ActScale::PerToken, Fp8Blocks::All, Fp8Blocks::Alternate};
    use sgpt::backend::cuda::model::{device_weight_bytes, CudaModel, WeightFormat};
    use sgpt::model::weights::{Checkpoint, DType};
    let Some(_g) = gpu() else { return };
    // A context per model, as the engine opens them (a model with CUDA graphs turns its
    // context's event tracking off).
    let open = || sgpt::backend::cuda::device::open(0).unwrap();
    let cc = open().compute_capability().unwrap();
    let none = &|_: usize, _: usize| {};
    let mut failures: Vec<String> = Vec::new();
    let mut cases: Vec<(
        String,
        Checkpoint,
        sgpt::model::config::BloomConfig,
        Vec<Vec<u32>>,
    )> = Vec::new();
    for name in ["sgpt-tiny", "tiny-b"] {
        let golden = load_golden(name);
        let m = ModelDir::open(&golden.model_dir).unwrap();
        let texts = golden.texts.iter().map(|t| t.ids.clone()).collect();
        cases.push((name.into(), m.checkpoint, m.config, texts));
    }
    let mut cfg = sgpt::bench::shape("bloom-560m").unwrap();
    cfg.vocab = 4096;
    let ckpt = sgpt::bench::random_checkpoint(&cfg, DType::BF16, 7).unwrap();
    let texts = sgpt::bench::synthetic_corpus(12, 4096, 120, [(62, 64), (94, 96)]);
    cases.push((
        "random bloom-560m-like (vocab 4096)".into(),
        ckpt,
        cfg,
        texts,
    ));

    for (name, ckpt, cfg, texts) in &cases {
        let cpu_f32 = cpu::CpuModel::load(ckpt, cfg).unwrap();
        let h = cfg.hidden;
        // Every text alone on the fixture models, the first three alone at bloom-560m's width
        // (the CPU emulation's time), then all together.
        let alone = if h < 1024 { texts.len() } else { 3 };
        let mut batches: Vec<Vec<usize>> = (0..alone).map(|k| vec![k]).collect();
        batches.push((0..texts.len()).collect());
        let run = |m: &cpu::CpuModel| -> Vec<Vec<f32>> {
            batches
                .iter()
                .map(|ks| {
                    let seqs: Vec<&[u32]> = ks.iter().map(|&k| &texts[k][..]).collect();
                    m.embed(&PackedBatch::from_seqs(&seqs)).unwrap()
                })
                .collect()
        };
        let want32 = run(&cpu_f32);
        // `--dtype fp8`, then `fp8-alternate` (FP8 in the odd blocks, f16 in the others).
        for (blocks, dtype) in [(All, "fp8"), (Alternate, "fp8-alternate")] {
            let format = WeightFormat::Fp8(blocks);
            let cpu_fp8 = cpu::CpuModel::load_fp8(ckpt, cfg, PerToken, blocks, none).unwrap();
            let want = run(&cpu_fp8);
            // The emulation's own worst 1 − cosine to f32 over every text of every batch.
            let emu_err = want
                .iter()
                .zip(&want32)
                .flat_map(|(a, b)| {
                    a.chunks(h)
                        .zip(b.chunks(h))
                        .map(|(p, q)| 1.0 - cosine(p, q))
                })
                .fold(0f64, f64::max);
            let choices: Vec<KernelChoices> = KernelChoices::all()
                .into_iter()
                .filter(|k| k.gemm != sgpt::backend::GemmKernel::Skinny)
                .filter(|k| h < 1024 || k.attention == sgpt::backend::AttentionKernel::Auto)
                .collect();
            for kernels in choices {
                let label = format!("{name} {dtype} [{kernels}]");
                let m = match CudaModel::<half::f16>::load(
                    open(),
                    ckpt,
                    cfg,
                    4096,
                    kernels,
                    format,
                    none,
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        failures.push(format!("{label}: load: {e}"));
                        continue;
                    }
                };
                assert_eq!(sgpt::backend::Backend::info(&m).dtype, dtype);
                let table = kernels.table;
                let (held, predicted) = (
                    m.report.weight_bytes,
                    device_weight_bytes(cfg, format, 2, table),
                );
                if held != predicted {
                    failures.push(format!(
                        "{label}: weights hold {held} bytes, predicted {predicted}"
                    ));
                }
                let (mut worst, mut gpu_err) = (1.0f64, 0f64);
                for ((ks, want), want32) in batches.iter().zip(&want).zip(&want32) {
                    let seqs: Vec<&[u32]> = ks.iter().map(|&k| &texts[k][..]).collect();
                    let got = match m.forward(&PackedBatch::from_seqs(&seqs)) {
                        Ok(got) => got,
                        Err(e) => {
                            failures.push(format!("{label}: batch of {}: {e}", ks.len()));
                            break;
                        }
                    };
                    for (i, &k) in ks.iter().enumerate() {
                        let row = &got[i * h..(i + 1) * h];
                        let c = cosine(row, &want[i * h..(i + 1) * h]);
                        worst = worst.min(c);
                        gpu_err = gpu_err.max(1.0 - cosine(row, &want32[i * h..(i + 1) * h]));
                        if c.is_nan() || c < 0.997 {
                            failures.push(format!(
                                "{label}: text {k} in a batch of {}: cosine {c:.6} to the emulation",
                                ks.len()
                            ));
                        }
                    }
                }
                if gpu_err.is_nan() || gpu_err > 1.5 * emu_err {
                    failures.push(format!(
                        "{label}: worst 1 − cosine to f32 {gpu_err:.2e}, the emulation's {emu_err:.2e}"
                    ));
                }
                println!(
                    "{label}: worst 1 − cosine to f32: GPU {gpu_err:.2e}, emulation {emu_err:.2e}; \
                     issue 15's 0.9999 to the emulation {}; worst cosine to the CPU emulation {worst:.7}",
                    if worst >= 0.9999 { "met" } else { "not met" }
                );
            }
            // The skinny GEMM is refused with the reason, before anything is uploaded.
            let skinny = KernelChoices {
                gemm: sgpt::backend::GemmKernel::Skinny,
                ..KernelChoices::default()
            };
            let e = CudaModel::<half::f16>::load(open(), ckpt, cfg, 64, skinny, format, none)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if !e.contains("--gemm skinny has no FP8 version") {
                failures.push(format!("{name}: --gemm skinny with {dtype} gave {e:?}"));
            }
        }
    }
    println!("device compute capability {cc:?}");
    assert_no_failures(&failures);
}

/// Through the engine: `--device cuda --dtype fp8` and `fp8-alternate` open (no longer
/// refused), report their dtype (the eval cache key, /info, bench JSON), and embed finite
/// vectors close to f16's.
#[test]
fn fp8_engine_on_the_gpu() {
    let Some(_g) = gpu() else { return };
    let golden = load_golden("sgpt-tiny");
    let open = |dtype| {
        Embedder::open_with(
            &golden.model_dir,
            EngineOptions {
                device: Device::Cuda(0),
                dtype: Some(dtype),
                max_batch_tokens: None,
                kernels: KernelChoices::default(),
            },
        )
        .unwrap()
    };
    let e16 = open(GpuDtype::F16);
    let seqs: Vec<&[u32]> = golden.texts.iter().map(|t| &t.ids[..]).collect();
    let batch = PackedBatch::from_seqs(&seqs);
    let b = e16.embed_batch(&batch).unwrap();
    let mut identities = vec![e16.backend.info().identity()];
    for dtype in [GpuDtype::Fp8, GpuDtype::Fp8Alternate] {
        let e8 = open(dtype);
        assert_eq!(e8.backend.info().dtype, dtype.name());
        let id = e8.backend.info().identity();
        assert!(!identities.contains(&id), "{dtype:?}: {id}");
        identities.push(id);
        let a = e8.embed_batch(&batch).unwrap();
        let h = golden.hidden;
        for k in 0..seqs.len() {
            let c = cosine(&a[k * h..(k + 1) * h], &b[k * h..(k + 1) * h]);
            // FP8's own error on this random model: the emulation gives 0.9962–0.998 to f32
            // (docs/fp8-accuracy.md), fp8-alternate less; 0.99 leaves room without hiding a
            // broken path (≈ 0 or < 0.9).
            assert!(c >= 0.99, "text {k}: {dtype:?} vs f16 cosine {c}");
        }
    }
}
