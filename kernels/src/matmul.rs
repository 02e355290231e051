//! Dense layers: `out[N, OC] = inp[N, C] @ weight[OC, C]^T + bias[OC]`.
//!
//! Weights are stored `[out, in]` exactly as `torch.nn.Linear` (and so every Hugging Face
//! checkpoint) stores them; the transposes are expressed through strides, never copied. The
//! products run in the `gemm` crate (packed, SIMD micro-kernels, threaded with rayon), which
//! splits work over output tiles only: each output element's reduction runs on one thread in a
//! fixed order, so results are deterministic. With [`Operands::Bf16`] the dense layers' products
//! round both operands to bf16 and sum in f32 instead ([`crate::bf16`]), the bias and its
//! gradient staying f32, as torch's CPU autocast runs `nn.Linear`.

use gemm::Parallelism;
use rayon::prelude::*;

/// The operands of one strided product `dst[m, n] (+)= scale * lhs[m, k] @ rhs[k, n]`; each
/// matrix is a slice plus (row stride, column stride).
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// What a dense layer's products multiply: the f32 values, or their bf16 roundings (summed in
/// f32; only where [`crate::bf16::supported`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    F32,
    Bf16,
}

/// [`gemm`] or [`crate::bf16::gemm_bf16`], as `operands` says.
pub fn gemm_of(
    operands: Operands,
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
    accumulate: bool,
    threaded: bool,
) {
    match operands {
        Operands::F32 => gemm(dst, m, n, k, lhs, rhs, scale, accumulate, threaded),
        Operands::Bf16 => crate::bf16::gemm_bf16(dst, m, n, k, lhs, rhs, scale, accumulate, None, threaded),
    }
}

/// Checks a product's operands against their strides (panicking where one is too short) and
/// does the products with nothing to sum (`m`, `n` or `k` zero); true when that was all.
pub(crate) fn trivial(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
) -> bool {
    assert!(dst.len() >= m * n, "gemm: dst holds {} < {m}x{n}", dst.len());
    assert!(lhs.data.len() >= span(m, k, lhs.rs, lhs.cs), "gemm: lhs too short");
    assert!(rhs.data.len() >= span(k, n, rhs.rs, rhs.cs), "gemm: rhs too short");
    if k == 0 && !accumulate {
        dst[..m * n].fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

/// `dst[m, n] = accumulate ? dst + scale * lhs @ rhs : scale * lhs @ rhs`, with `dst` row-major
/// contiguous (`[m, n]`). Bounds are checked against the strides before calling into `gemm`.
pub fn gemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
    accumulate: bool,
    threaded: bool,
) {
    if trivial(dst, m, n, k, lhs, rhs, accumulate) {
        return;
    }
    let par = if threaded { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: the asserts above keep every strided access of the three matrices in bounds, the
    // strides are non-negative, and `dst` is an exclusive borrow that aliases neither input.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// `out[N, OC] = inp[N, C] @ weight[OC, C]^T + bias`.
pub fn matmul_forward(
    operands: Operands,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert_eq!(out.len(), n * oc, "matmul_forward: out must be [N, OC]");
    assert_eq!(inp.len(), n * c, "matmul_forward: inp must be [N, C]");
    assert_eq!(weight.len(), oc * c, "matmul_forward: weight must be [OC, C]");
    let lhs = Mat { data: inp, rs: c, cs: 1 };
    let rhs = Mat { data: weight, rs: 1, cs: c }; // weight^T viewed as [C, OC]
    if let Some(b) = bias {
        assert_eq!(b.len(), oc, "matmul_forward: bias must be [OC]");
        if operands == Operands::Bf16 {
            // The bias joins each tile as it is stored (the same bits as the rows below).
            return crate::bf16::gemm_bf16(out, n, oc, c, lhs, rhs, 1.0, false, Some(b), true);
        }
        out.par_chunks_mut(oc).for_each(|row| row.copy_from_slice(b));
    }
    gemm_of(operands, out, n, oc, c, lhs, rhs, 1.0, bias.is_some(), true);
}

/// Backward of [`matmul_forward`]: `dinp = dout @ weight` (with `accumulate`, `dinp +=`: the
/// input feeds another op too, a residual, whose gradient is already there), `dweight += dout^T
/// @ inp`, `dbias += sum_rows(dout)`.
pub fn matmul_backward(
    operands: Operands,
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
    accumulate: bool,
) {
    assert_eq!(dinp.len(), n * c, "matmul_backward: dinp must be [N, C]");
    assert_eq!(dweight.len(), oc * c, "matmul_backward: dweight must be [OC, C]");
    assert_eq!(dout.len(), n * oc, "matmul_backward: dout must be [N, OC]");
    assert_eq!(inp.len(), n * c, "matmul_backward: inp must be [N, C]");
    assert_eq!(weight.len(), oc * c, "matmul_backward: weight must be [OC, C]");
    let (dout_m, weight_m) = (Mat { data: dout, rs: oc, cs: 1 }, Mat { data: weight, rs: c, cs: 1 });
    gemm_of(operands, dinp, n, c, oc, dout_m, weight_m, 1.0, accumulate, true);
    matmul_backward_weight(operands, dweight, dbias, dout, inp, n, c, oc);
}

/// The parameter half of [`matmul_backward`], for layers whose input needs no gradient.
pub fn matmul_backward_weight(
    operands: Operands,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    let (dout_t, inp_m) = (Mat { data: dout, rs: 1, cs: oc }, Mat { data: inp, rs: c, cs: 1 });
    gemm_of(operands, dweight, oc, c, n, dout_t, inp_m, 1.0, true, true);
    if let Some(db) = dbias {
        assert_eq!(db.len(), oc, "matmul_backward: dbias must be [OC]");
        column_sum_accumulate(db, dout, n, oc);
    }
}

/// Columns `j0..j0 + acc.len()` of [`column_sum_accumulate`], compiled for each SIMD level.
#[multiversion::multiversion(targets = "simd")]
fn column_block(acc: &mut [f32], x: &[f32], n: usize, oc: usize, j0: usize) {
    for i in 0..n {
        let row = &x[i * oc + j0..i * oc + j0 + acc.len()];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// `acc[j] += sum_i x[i, j]` for `x: [N, OC]`, each column summed in row order.
pub(crate) fn column_sum_accumulate(acc: &mut [f32], x: &[f32], n: usize, oc: usize) {
    const COLS: usize = 64;
    acc.par_chunks_mut(COLS).enumerate().for_each(|(ci, chunk)| {
        let j0 = ci * COLS;
        column_block(chunk, x, n, oc, j0);
    });
}
