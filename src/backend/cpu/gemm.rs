//! The one call into the `gemm` crate: every CPU matrix product (the linear layers, attention's
//! score and context products, eval's exact search) goes through [`matmul`].

/// How the threads of one product are used.
pub use gemm::Parallelism;

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` (or `dst += …` when `accumulate`), each operand given by
/// pointer and (row, column) strides in elements; `dst`'s column stride is 1.
///
/// # Safety
/// Every element `ptr + r·rs + c·cs` inside the stated shape must be in bounds of its buffer;
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    // gemm computes dst = alpha·dst + beta·lhs·rhs, reading dst only when asked to.
    let alpha = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        alpha,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}
