//! The device twins of the CPU ops that are more than one kernel: dense layers (matmul.rs) and
//! attention (attention.rs), as cuBLAS GEMMs around our kernels. Same names and argument order
//! as the CPU functions, over device buffers, with the [`Gpu`] first.
//!
//! cuBLAS is column-major and our buffers are row-major: a row-major `[R, C]` buffer read
//! column-major is its transpose `[C, R]`. So a row-major product `Z = X @ Y` is computed as
//! the column-major `Z^T = Y^T @ X^T`, with each operand's op flag chosen so that cuBLAS sees
//! the matrix each formula below needs; `ld` is always the row-major row length.
//!
//! | op | row-major | cuBLAS (m, n, k), op(A), op(B) |
//! |----|-----------|--------------------------------|
//! | dense forward   | `out[N,OC] = inp[N,C] @ W[OC,C]^T` (+ bias rows, beta = 1) | (OC, N, C), W: T, inp: N |
//! | dense dinp      | `dinp[N,C] += dout[N,OC] @ W` | (C, N, OC), W: N, dout: N |
//! | dense dW        | `dW[OC,C] += dout^T @ inp` | (C, OC, N), inp: N, dout: T |
//! | attention S     | `S[T,T] = scale Q K^T` per (example, head) | (T, T, HD), K: T, Q: N |
//! | attention O     | `O[T,HD] = P' V` | (HD, T, T), V: N, P': N |
//! | attention dV    | `dV += P'^T dO` | (HD, T, T), dO: N, P': T |
//! | attention dP'   | `dP' = dO V^T` | (T, T, HD), V: T, dO: N |
//! | attention dQ    | `dQ += scale dS K` | (HD, T, T), K: N, dS: N |
//! | attention dK    | `dK += scale dS^T Q` | (HD, T, T), Q: N, dS: T |
//!
//! The attention products are strided-batched over the `B * NH` contiguous (example, head)
//! blocks of `[B, NH, T, HD]` and `[B, NH, T, T]`. fp32 GEMMs run in cuBLAS's default math
//! mode (no TF32), so they agree with the CPU's to ~1e-6 relative; the order of a GEMM's sums
//! is cuBLAS's, so unlike the elementwise kernels they are not bit-identical to the CPU.
//!
//! Compiled everywhere, run only on a GPU (scripts/gpu-check.sh checks each against the CPU).
#![allow(unsafe_code)] // cuBLAS calls and kernel launches; every buffer's size is asserted first

use crate::attention::AttnDims;
use crate::dropout::{DropoutSpec, LogicalDims};
use crate::gpu::{elementwise, Gpu, GpuError};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const N: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;
const T: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;

/// A column-major GEMM `C = alpha op(A) op(B) + beta C` as cuBLAS takes it.
#[allow(clippy::too_many_arguments)]
fn gemm_cfg(
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    alpha: f32,
    beta: f32,
) -> GemmConfig<f32> {
    let i = |v: usize| i32::try_from(v).expect("a GEMM dimension fits in i32");
    GemmConfig { transa, transb, m: i(m), n: i(n), k: i(k), alpha, lda: i(lda), ldb: i(ldb), beta, ldc: i(ldc) }
}

fn batched(gemm: GemmConfig<f32>, batch: usize, sa: usize, sb: usize, sc: usize) -> StridedBatchedConfig<f32> {
    StridedBatchedConfig {
        gemm,
        batch_size: i32::try_from(batch).expect("batch fits in i32"),
        stride_a: sa as i64,
        stride_b: sb as i64,
        stride_c: sc as i64,
    }
}

/// `out[N, OC] = inp[N, C] @ weight[OC, C]^T + bias`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    inp: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    bias: Option<&CudaView<'_, f32>>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), GpuError> {
    assert!(out.len() == n * oc && inp.len() == n * c && weight.len() == oc * c, "matmul_forward: shapes");
    let beta = match bias {
        Some(b) => {
            assert_eq!(b.len(), oc, "matmul_forward: bias must be [OC]");
            let f = gpu.function("matmul", "bias_rows_f32")?;
            let (nn, oci) = (n as i64, oc as i32);
            unsafe {
                gpu.stream.launch_builder(&f).arg(&mut *out).arg(b).arg(&nn).arg(&oci).launch(elementwise(n * oc))
            }?;
            1.0
        }
        None => 0.0,
    };
    let cfg = gemm_cfg(T, N, oc, n, c, c, c, oc, 1.0, beta);
    unsafe { gpu.blas()?.gemm(cfg, weight, inp, out) }?;
    Ok(())
}

/// Backward of [`matmul_forward`]: `dinp += dout @ weight`, `dweight += dout^T @ inp`,
/// `dbias += sum_rows(dout)` (rows summed in order, as on the CPU).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    gpu: &Gpu,
    dinp: &mut CudaViewMut<'_, f32>,
    dweight: &mut CudaViewMut<'_, f32>,
    dbias: Option<&mut CudaViewMut<'_, f32>>,
    dout: &CudaView<'_, f32>,
    inp: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), GpuError> {
    assert!(dinp.len() == n * c && weight.len() == oc * c && dout.len() == n * oc, "matmul_backward: shapes");
    let cfg = gemm_cfg(N, N, c, n, oc, c, oc, c, 1.0, 1.0);
    unsafe { gpu.blas()?.gemm(cfg, weight, dout, dinp) }?;
    matmul_backward_weight(gpu, dweight, dbias, dout, inp, n, c, oc)
}

/// The parameter half of [`matmul_backward`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_weight(
    gpu: &Gpu,
    dweight: &mut CudaViewMut<'_, f32>,
    dbias: Option<&mut CudaViewMut<'_, f32>>,
    dout: &CudaView<'_, f32>,
    inp: &CudaView<'_, f32>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), GpuError> {
    assert!(dweight.len() == oc * c && dout.len() == n * oc && inp.len() == n * c, "matmul_backward: shapes");
    let cfg = gemm_cfg(N, T, c, oc, n, c, oc, c, 1.0, 1.0);
    unsafe { gpu.blas()?.gemm(cfg, inp, dout, dweight) }?;
    if let Some(db) = dbias {
        assert_eq!(db.len(), oc, "matmul_backward: dbias must be [OC]");
        let f = gpu.function("matmul", "column_sum_accumulate_f32")?;
        let (nn, oci) = (n as i64, oc as i32);
        let cfg =
            LaunchConfig { grid_dim: (oc.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { gpu.stream.launch_builder(&f).arg(db).arg(dout).arg(&nn).arg(&oci).launch(cfg) }?;
    }
    Ok(())
}

/// Dropout on the attention probabilities, as the CPU draws it (see `attention::AttnDropout`).
#[derive(Clone, Copy, Debug)]
pub struct DeviceAttnDropout<'a> {
    pub spec: DropoutSpec,
    /// `[B]`: each example's index in its dataset, on the device.
    pub example_ids: &'a CudaView<'a, u32>,
    pub logical: LogicalDims,
}

fn dropout_launch(
    gpu: &Gpu,
    kernel: &str,
    x: &mut CudaViewMut<'_, f32>,
    dr: &DeviceAttnDropout<'_>,
    d: AttnDims,
) -> Result<(), GpuError> {
    let f = gpu.function("dropout", kernel)?;
    let n = d.b * d.nh * d.t * d.t;
    let (h, t, w, tm, wm) = (d.nh as i32, d.t as i32, d.t as i32, dr.logical.t_max as i32, dr.logical.w_max as i32);
    let (sl, sh) = (dr.spec.seed as u32, (dr.spec.seed >> 32) as u32);
    let nn = n as i64;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(dr.example_ids)
            .arg(&h)
            .arg(&t)
            .arg(&w)
            .arg(&tm)
            .arg(&wm)
            .arg(&dr.spec.p)
            .arg(&sl)
            .arg(&sh)
            .arg(&dr.spec.step)
            .arg(&dr.spec.site)
            .arg(&nn)
            .launch(elementwise(n))
    }?;
    Ok(())
}

/// One warp per row of scores, 4 rows per block.
fn rows_launch(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(4).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// Forward, as `attention::attention_forward`: `out`, `q`, `k`, `v` are `[B, NH, T, HD]`,
/// `probs` (and `probs_drop` with dropout) `[B, NH, T, T]`, `mask` `[B, T]` additive.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    probs: &mut CudaViewMut<'_, f32>,
    probs_drop: &mut CudaViewMut<'_, f32>,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    mask: &CudaView<'_, f32>,
    d: AttnDims,
    dropout: Option<&DeviceAttnDropout<'_>>,
) -> Result<(), GpuError> {
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let (bh, tt, th) = (d.b * d.nh, d.t * d.t, d.t * d.hd);
    assert!(q.len() == bh * th && k.len() == bh * th && v.len() == bh * th && out.len() == bh * th, "attention: qkv");
    assert!(probs.len() == bh * tt && mask.len() == d.b * d.t, "attention: probs, mask");
    let blas = gpu.blas()?;
    let scale = 1.0 / (d.hd as f32).sqrt();
    let s = batched(gemm_cfg(T, N, d.t, d.t, d.hd, d.hd, d.hd, d.t, scale, 0.0), bh, th, th, tt);
    unsafe { blas.gemm_strided_batched(s, k, q, probs) }?;
    let f = gpu.function("attention", "softmax_forward_f32")?;
    let (bi, nhi, ti) = (d.b as i32, d.nh as i32, d.t as i32);
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&mut *probs)
            .arg(mask)
            .arg(&bi)
            .arg(&nhi)
            .arg(&ti)
            .launch(rows_launch(bh * d.t))
    }?;
    let o = batched(gemm_cfg(N, N, d.hd, d.t, d.t, d.hd, d.t, d.hd, 1.0, 0.0), bh, th, tt, th);
    match dropout {
        Some(dr) => {
            assert_eq!(probs_drop.len(), bh * tt, "attention: probs_drop must be [B, NH, T, T]");
            gpu.stream.memcpy_dtod(&*probs, probs_drop)?;
            dropout_launch(gpu, "dropout_forward_f32", probs_drop, dr, d)?;
            unsafe { blas.gemm_strided_batched(o, v, &*probs_drop, out) }?;
        }
        None => unsafe { blas.gemm_strided_batched(o, v, &*probs, out) }?,
    }
    Ok(())
}

/// Backward, as `attention::attention_backward`: accumulates into `dq`, `dk`, `dv`. `scratch`
/// is `[B, NH, T, T]` (dP, then dS in place).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    dq: &mut CudaViewMut<'_, f32>,
    dk: &mut CudaViewMut<'_, f32>,
    dv: &mut CudaViewMut<'_, f32>,
    scratch: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    probs: &CudaView<'_, f32>,
    probs_drop: &CudaView<'_, f32>,
    q: &CudaView<'_, f32>,
    k: &CudaView<'_, f32>,
    v: &CudaView<'_, f32>,
    d: AttnDims,
    dropout: Option<&DeviceAttnDropout<'_>>,
) -> Result<(), GpuError> {
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let (bh, tt, th) = (d.b * d.nh, d.t * d.t, d.t * d.hd);
    assert!(dq.len() == bh * th && dk.len() == bh * th && dv.len() == bh * th && dout.len() == bh * th, "shapes");
    assert!(probs.len() == bh * tt && scratch.len() == bh * tt, "attention_backward: probs, scratch");
    let blas = gpu.blas()?;
    let scale = 1.0 / (d.hd as f32).sqrt();
    let weights = if dropout.is_some() { probs_drop } else { probs };
    // dV += P'^T dO
    let cfg = batched(gemm_cfg(N, T, d.hd, d.t, d.t, d.hd, d.t, d.hd, 1.0, 1.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, dout, weights, dv) }?;
    // dP' = dO V^T
    let cfg = batched(gemm_cfg(T, N, d.t, d.t, d.hd, d.hd, d.hd, d.t, 1.0, 0.0), bh, th, th, tt);
    unsafe { blas.gemm_strided_batched(cfg, v, dout, scratch) }?;
    if let Some(dr) = dropout {
        dropout_launch(gpu, "dropout_backward_f32", scratch, dr, d)?;
    }
    // dS = P * (dP - rowsum(P * dP)), in place
    let f = gpu.function("attention", "softmax_backward_f32")?;
    let (rows, ti) = ((bh * d.t) as i32, d.t as i32);
    unsafe {
        gpu.stream.launch_builder(&f).arg(&mut *scratch).arg(probs).arg(&rows).arg(&ti).launch(rows_launch(bh * d.t))
    }?;
    // dQ += scale dS K ; dK += scale dS^T Q
    let cfg = batched(gemm_cfg(N, N, d.hd, d.t, d.t, d.hd, d.t, d.hd, scale, 1.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, k, &*scratch, dq) }?;
    let cfg = batched(gemm_cfg(N, T, d.hd, d.t, d.t, d.hd, d.t, d.hd, scale, 1.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, q, &*scratch, dk) }?;
    Ok(())
}
