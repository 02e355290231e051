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

/// Backward of [`matmul_forward`]: `dinp = dout @ weight` (`+=` with `accumulate`), `dweight +=
/// dout^T @ inp`, `dbias += sum_rows(dout)` (rows summed in order, as on the CPU).
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
    accumulate: bool,
) -> Result<(), GpuError> {
    assert!(dinp.len() == n * c && weight.len() == oc * c && dout.len() == n * oc, "matmul_backward: shapes");
    let beta = if accumulate { 1.0 } else { 0.0 };
    let cfg = gemm_cfg(N, N, c, n, oc, c, oc, c, 1.0, beta);
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

/// Which keys each query sees (`attention::Mask` on the device).
#[derive(Clone, Copy)]
pub struct DeviceMask<'a> {
    /// `[B, T]`, additive.
    pub add: &'a CudaView<'a, f32>,
    /// `[B, T]`: each token's segment in its row; `None` for one segment per row.
    pub segments: Option<&'a CudaView<'a, u32>>,
}

/// Dropout on the attention probabilities, as the CPU draws it (see `attention::AttnDropout`).
#[derive(Clone, Copy, Debug)]
pub struct DeviceAttnDropout<'a> {
    pub spec: DropoutSpec,
    /// `[B]`: each example's index in its dataset, on the device.
    pub example_ids: &'a CudaView<'a, u32>,
    pub logical: LogicalDims,
}

/// Dropout on `[B, NH, T, T]` probabilities: [`dropout_apply`] with H = NH, W = T.
fn attention_dropout(
    gpu: &Gpu,
    backward: bool,
    x: &mut CudaViewMut<'_, f32>,
    dr: &DeviceAttnDropout<'_>,
    d: AttnDims,
) -> Result<(), GpuError> {
    dropout_apply(gpu, backward, x, dr.example_ids, d.nh, d.t, d.t, dr.logical, &dr.spec)
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
    mask: DeviceMask<'_>,
    d: AttnDims,
    dropout: Option<&DeviceAttnDropout<'_>>,
) -> Result<(), GpuError> {
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let (bh, tt, th) = (d.b * d.nh, d.t * d.t, d.t * d.hd);
    assert!(q.len() == bh * th && k.len() == bh * th && v.len() == bh * th && out.len() == bh * th, "attention: qkv");
    assert!(probs.len() == bh * tt && mask.add.len() == d.b * d.t, "attention: probs, mask");
    assert!(mask.segments.is_none_or(|sg| sg.len() == d.b * d.t), "attention: segments must be [B, T]");
    let blas = gpu.blas()?;
    let scale = 1.0 / (d.hd as f32).sqrt();
    let s = batched(gemm_cfg(T, N, d.t, d.t, d.hd, d.hd, d.hd, d.t, scale, 0.0), bh, th, th, tt);
    unsafe { blas.gemm_strided_batched(s, k, q, probs) }?;
    let f = gpu.function("attention", "softmax_forward_f32")?;
    let (bi, nhi, ti) = (d.b as i32, d.nh as i32, d.t as i32);
    // No segments: a null pointer, which the kernel reads as one segment per row.
    let null = 0u64;
    let mut launch = gpu.stream.launch_builder(&f);
    launch.arg(&mut *probs).arg(mask.add);
    match mask.segments {
        Some(sg) => launch.arg(sg),
        None => launch.arg(&null),
    };
    launch.arg(&bi).arg(&nhi).arg(&ti);
    unsafe { launch.launch(rows_launch(bh * d.t)) }?;
    let o = batched(gemm_cfg(N, N, d.hd, d.t, d.t, d.hd, d.t, d.hd, 1.0, 0.0), bh, th, tt, th);
    match dropout {
        Some(dr) => {
            assert_eq!(probs_drop.len(), bh * tt, "attention: probs_drop must be [B, NH, T, T]");
            gpu.stream.memcpy_dtod(&*probs, probs_drop)?;
            attention_dropout(gpu, false, probs_drop, dr, d)?;
            unsafe { blas.gemm_strided_batched(o, v, &*probs_drop, out) }?;
        }
        None => unsafe { blas.gemm_strided_batched(o, v, &*probs, out) }?,
    }
    Ok(())
}

/// Backward, as `attention::attention_backward`: writes `dq`, `dk`, `dv`. `scratch`
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
    // dV = P'^T dO
    let cfg = batched(gemm_cfg(N, T, d.hd, d.t, d.t, d.hd, d.t, d.hd, 1.0, 0.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, dout, weights, dv) }?;
    // dP' = dO V^T
    let cfg = batched(gemm_cfg(T, N, d.t, d.t, d.hd, d.hd, d.hd, d.t, 1.0, 0.0), bh, th, th, tt);
    unsafe { blas.gemm_strided_batched(cfg, v, dout, scratch) }?;
    if let Some(dr) = dropout {
        attention_dropout(gpu, true, scratch, dr, d)?;
    }
    // dS = P * (dP - rowsum(P * dP)), in place
    let f = gpu.function("attention", "softmax_backward_f32")?;
    let (rows, ti) = ((bh * d.t) as i32, d.t as i32);
    unsafe {
        gpu.stream.launch_builder(&f).arg(&mut *scratch).arg(probs).arg(&rows).arg(&ti).launch(rows_launch(bh * d.t))
    }?;
    // dQ = scale dS K ; dK = scale dS^T Q
    let cfg = batched(gemm_cfg(N, N, d.hd, d.t, d.t, d.hd, d.t, d.hd, scale, 0.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, k, &*scratch, dq) }?;
    let cfg = batched(gemm_cfg(N, T, d.hd, d.t, d.t, d.hd, d.t, d.hd, scale, 0.0), bh, th, tt, th);
    unsafe { blas.gemm_strided_batched(cfg, q, &*scratch, dk) }?;
    Ok(())
}

// --- One kernel each: the launchers of the elementwise, row and table ops -------------------

type In<'a, 'b, T = f32> = &'a CudaView<'b, T>;
type Out<'a, 'b, T = f32> = &'a mut CudaViewMut<'b, T>;

fn launch_elementwise(
    gpu: &Gpu,
    family: &str,
    kernel: &str,
    out: Out<'_, '_>,
    ins: &[In<'_, '_>],
    n: usize,
) -> Result<(), GpuError> {
    let f = gpu.function(family, kernel)?;
    let nn = n as i64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(out);
    for i in ins {
        b.arg(*i);
    }
    b.arg(&nn);
    unsafe { b.launch(elementwise(n)) }?;
    Ok(())
}

/// `out = gelu(x)` (exact erf form); `x` becomes `gelu'(x)`, what [`gelu_backward`] needs.
pub fn gelu_forward(gpu: &Gpu, out: Out<'_, '_>, x: Out<'_, '_>) -> Result<(), GpuError> {
    assert_eq!(out.len(), x.len());
    let f = gpu.function("gelu", "gelu_forward_f32")?;
    let n = x.len();
    let nn = n as i64;
    unsafe { gpu.stream.launch_builder(&f).arg(out).arg(x).arg(&nn).launch(elementwise(n)) }?;
    Ok(())
}

/// `dinp = deriv * dout`, with `deriv` what [`gelu_forward`] left.
pub fn gelu_backward(gpu: &Gpu, dinp: Out<'_, '_>, deriv: In<'_, '_>, dout: In<'_, '_>) -> Result<(), GpuError> {
    assert!(dinp.len() == deriv.len() && dout.len() == deriv.len());
    launch_elementwise(gpu, "gelu", "gelu_backward_f32", dinp, &[deriv, dout], deriv.len())
}

/// `out = tanh(inp)`.
pub fn tanh_forward(gpu: &Gpu, out: Out<'_, '_>, inp: In<'_, '_>) -> Result<(), GpuError> {
    assert_eq!(out.len(), inp.len());
    launch_elementwise(gpu, "tanh", "tanh_forward_f32", out, &[inp], inp.len())
}

/// `dinp += (1 - out^2) * dout`.
pub fn tanh_backward(gpu: &Gpu, dinp: Out<'_, '_>, out: In<'_, '_>, dout: In<'_, '_>) -> Result<(), GpuError> {
    assert!(dinp.len() == out.len() && dout.len() == out.len());
    launch_elementwise(gpu, "tanh", "tanh_backward_f32", dinp, &[out, dout], out.len())
}

/// `out = a + b`.
pub fn residual_forward(gpu: &Gpu, out: Out<'_, '_>, a: In<'_, '_>, b: In<'_, '_>) -> Result<(), GpuError> {
    assert!(out.len() == a.len() && b.len() == a.len());
    launch_elementwise(gpu, "residual", "residual_forward_f32", out, &[a, b], a.len())
}

/// `acc += x`.
pub fn add_inplace(gpu: &Gpu, acc: Out<'_, '_>, x: In<'_, '_>) -> Result<(), GpuError> {
    assert_eq!(acc.len(), x.len());
    launch_elementwise(gpu, "residual", "add_inplace_f32", acc, &[x], x.len())
}

/// `x *= coef` (gradient clipping).
pub fn scale(gpu: &Gpu, x: Out<'_, '_>, coef: f32) -> Result<(), GpuError> {
    let f = gpu.function("gradnorm", "scale_f32")?;
    let n = x.len();
    let nn = n as i64;
    unsafe { gpu.stream.launch_builder(&f).arg(x).arg(&coef).arg(&nn).launch(elementwise(n)) }?;
    Ok(())
}

/// Layer norm over rows of `c`: `out`, and each row's `mean` and `rstd` (saved for backward).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    gpu: &Gpu,
    out: Out<'_, '_>,
    mean: Out<'_, '_>,
    rstd: Out<'_, '_>,
    inp: In<'_, '_>,
    weight: In<'_, '_>,
    bias: In<'_, '_>,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<(), GpuError> {
    assert!(out.len() == n * c && inp.len() == n * c && mean.len() == n && rstd.len() == n && weight.len() == c);
    let f = gpu.function("layernorm", "layernorm_forward_f32")?;
    let (ni, ci) = (n as i32, c as i32);
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(mean)
            .arg(rstd)
            .arg(inp)
            .arg(weight)
            .arg(bias)
            .arg(&ni)
            .arg(&ci)
            .arg(&eps)
            .launch(crate::gpu::warp_per_row(n))
    }?;
    Ok(())
}

/// Backward of [`layernorm_forward`]: `dinp =`, `dweight +=`, `dbias +=`. The parameter
/// gradients go through fixed 64-row partial sums (`scratch`-free for the caller: allocated
/// here), reduced in block order.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    gpu: &Gpu,
    dinp: Out<'_, '_>,
    dweight: Out<'_, '_>,
    dbias: Out<'_, '_>,
    dout: In<'_, '_>,
    inp: In<'_, '_>,
    weight: In<'_, '_>,
    mean: In<'_, '_>,
    rstd: In<'_, '_>,
    n: usize,
    c: usize,
) -> Result<(), GpuError> {
    assert!(dinp.len() == n * c && dout.len() == n * c && inp.len() == n * c && dweight.len() == c && dbias.len() == c);
    let (ni, ci) = (n as i32, c as i32);
    let f = gpu.function("layernorm", "layernorm_backward_f32")?;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dinp)
            .arg(dout)
            .arg(inp)
            .arg(weight)
            .arg(mean)
            .arg(rstd)
            .arg(&ni)
            .arg(&ci)
            .launch(crate::gpu::warp_per_row(n))
    }?;
    let blocks = n.div_ceil(64);
    let mut scratch = gpu.stream.alloc_zeros::<f32>(blocks * 2 * c)?;
    let f = gpu.function("layernorm", "layernorm_param_partials_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(256) as u32, blocks as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&mut scratch)
            .arg(dout)
            .arg(inp)
            .arg(mean)
            .arg(rstd)
            .arg(&ni)
            .arg(&ci)
            .launch(cfg)
    }?;
    let f = gpu.function("layernorm", "layernorm_param_reduce_f32")?;
    let bi = blocks as i32;
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { gpu.stream.launch_builder(&f).arg(dweight).arg(dbias).arg(&scratch).arg(&bi).arg(&ci).launch(cfg) }?;
    Ok(())
}

/// Dropout in place on `x: [B, H, T, W]` (hidden states: H = 1, W = C), the CPU's mask
/// (`dropout::dropout_forward`); `backward` applies the same mask to a gradient.
#[allow(clippy::too_many_arguments)]
pub fn dropout_apply(
    gpu: &Gpu,
    backward: bool,
    x: Out<'_, '_>,
    example_ids: In<'_, '_, u32>,
    h: usize,
    t: usize,
    w: usize,
    logical: LogicalDims,
    spec: &DropoutSpec,
) -> Result<(), GpuError> {
    let n = x.len();
    assert_eq!(n, example_ids.len() * h * t * w, "dropout: x must be [B, H, T, W]");
    let f = gpu.function("dropout", if backward { "dropout_backward_f32" } else { "dropout_forward_f32" })?;
    let (hi, ti, wi, tm, wm) = (h as i32, t as i32, w as i32, logical.t_max as i32, logical.w_max as i32);
    let (sl, sh) = (spec.seed as u32, (spec.seed >> 32) as u32);
    let nn = n as i64;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(x)
            .arg(example_ids)
            .arg(&hi)
            .arg(&ti)
            .arg(&wi)
            .arg(&tm)
            .arg(&wm)
            .arg(&spec.p)
            .arg(&sl)
            .arg(&sh)
            .arg(&spec.step)
            .arg(&spec.site)
            .arg(&nn)
            .launch(elementwise(n))
    }?;
    Ok(())
}

/// `out[b, t] = wte[ids] + wpe[positions] + wtt[types]`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    gpu: &Gpu,
    out: Out<'_, '_>,
    input_ids: In<'_, '_, u32>,
    token_type_ids: In<'_, '_, u32>,
    position_ids: In<'_, '_, u32>,
    wte: In<'_, '_>,
    wpe: In<'_, '_>,
    wtt: In<'_, '_>,
    b: usize,
    t: usize,
    c: usize,
) -> Result<(), GpuError> {
    assert!(out.len() == b * t * c && input_ids.len() == b * t && token_type_ids.len() == b * t);
    assert_eq!(position_ids.len(), b * t);
    let f = gpu.function("embedding", "embedding_forward_f32")?;
    let (bi, ti, ci) = (b as i32, t as i32, c as i32);
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(256) as u32, (b * t) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(out)
            .arg(input_ids)
            .arg(token_type_ids)
            .arg(position_ids)
            .arg(wte)
            .arg(wpe)
            .arg(wtt)
            .arg(&bi)
            .arg(&ti)
            .arg(&ci)
            .launch(cfg)
    }?;
    Ok(())
}

/// Source rows grouped by destination row, in source order (compressed rows): what
/// [`scatter_add_rows`] adds. Built on the host from the batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowGroups {
    pub keys: Vec<i64>,
    pub offsets: Vec<i32>,
    pub rows: Vec<i32>,
}

impl RowGroups {
    /// `dest[r]` is source row r's destination (None: dropped, e.g. the padding token).
    pub fn new(dest: impl IntoIterator<Item = Option<usize>>) -> Self {
        let mut by_key: std::collections::BTreeMap<usize, Vec<i32>> = std::collections::BTreeMap::new();
        for (r, d) in dest.into_iter().enumerate() {
            if let Some(d) = d {
                by_key.entry(d).or_default().push(r as i32);
            }
        }
        let mut g = RowGroups { offsets: vec![0], ..RowGroups::default() };
        for (k, rows) in by_key {
            g.keys.push(k as i64);
            g.rows.extend(rows);
            g.offsets.push(g.rows.len() as i32);
        }
        g
    }
}

/// `dtable[keys[k]] += sum of dout[rows of group k]`, each group's rows added in order: the
/// embedding tables' backward and the gather's, bit-identical to the CPU's sequential adds.
pub fn scatter_add_rows(
    gpu: &Gpu,
    dtable: Out<'_, '_>,
    dout: In<'_, '_>,
    groups: &RowGroups,
    c: usize,
) -> Result<(), GpuError> {
    if groups.keys.is_empty() {
        return Ok(());
    }
    let (keys, offsets, rows) = (gpu.upload(&groups.keys)?, gpu.upload(&groups.offsets)?, gpu.upload(&groups.rows)?);
    let f = gpu.function("gather", "scatter_add_rows_f32")?;
    let (nk, ci) = (groups.keys.len() as i32, c as i32);
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(256) as u32, groups.keys.len() as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(dtable)
            .arg(dout)
            .arg(&keys)
            .arg(&offsets)
            .arg(&rows)
            .arg(&nk)
            .arg(&ci)
            .launch(cfg)
    }?;
    Ok(())
}

/// `out[r] = inp[rows[r]]` (rows of `c`).
pub fn gather_rows_forward(
    gpu: &Gpu,
    out: Out<'_, '_>,
    inp: In<'_, '_>,
    rows: In<'_, '_, i64>,
    c: usize,
) -> Result<(), GpuError> {
    let r = rows.len();
    assert_eq!(out.len(), r * c);
    let f = gpu.function("gather", "gather_rows_forward_f32")?;
    let (ri, ci) = (r as i32, c as i32);
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(256) as u32, r.max(1) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { gpu.stream.launch_builder(&f).arg(out).arg(inp).arg(rows).arg(&ri).arg(&ci).launch(cfg) }?;
    Ok(())
}

/// Per-row cross-entropy losses of `logits: [N, V]` (0 for ignored rows).
pub fn crossentropy_forward(
    gpu: &Gpu,
    losses: Out<'_, '_>,
    logits: In<'_, '_>,
    targets: In<'_, '_, i64>,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    assert!(losses.len() == n && logits.len() == n * v && targets.len() == n);
    let f = gpu.function("crossentropy", "crossentropy_forward_f32")?;
    let (ni, vi) = (n as i32, v as i32);
    let cfg = LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { gpu.stream.launch_builder(&f).arg(losses).arg(logits).arg(targets).arg(&ni).arg(&vi).launch(cfg) }?;
    Ok(())
}

/// `dlogits = scale * (softmax(logits) - onehot(target))`, 0 for ignored rows.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy_backward(
    gpu: &Gpu,
    dlogits: Out<'_, '_>,
    logits: In<'_, '_>,
    targets: In<'_, '_, i64>,
    scale: f32,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    assert!(dlogits.len() == n * v && logits.len() == n * v && targets.len() == n);
    let f = gpu.function("crossentropy", "crossentropy_backward_f32")?;
    let (ni, vi) = (n as i32, v as i32);
    let cfg = LaunchConfig { grid_dim: (n.max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe {
        gpu.stream.launch_builder(&f).arg(dlogits).arg(logits).arg(targets).arg(&scale).arg(&ni).arg(&vi).launch(cfg)
    }?;
    Ok(())
}

/// The head permutes of attention.cu: `split` `[B, T, NH*HD] -> [B, NH, T, HD]`, `merge` the
/// reverse (each the other's backward).
pub fn heads(gpu: &Gpu, kernel: &str, dst: Out<'_, '_>, src: In<'_, '_>, d: AttnDims) -> Result<(), GpuError> {
    let n = d.b * d.nh * d.t * d.hd;
    assert!(dst.len() == n && src.len() == n, "{kernel}: [B, T, C]");
    let f = gpu.function("attention", kernel)?;
    let (bi, nhi, ti, hdi) = (d.b as i32, d.nh as i32, d.t as i32, d.hd as i32);
    unsafe {
        gpu.stream.launch_builder(&f).arg(dst).arg(src).arg(&bi).arg(&nhi).arg(&ti).arg(&hdi).launch(elementwise(n))
    }?;
    Ok(())
}

/// `sqrt(sum g^2)` over a flat buffer: f64 partials over fixed 16384-element blocks, summed in
/// block order (gradnorm.rs's arithmetic).
pub fn global_norm(gpu: &Gpu, grads: In<'_, '_>) -> Result<f32, GpuError> {
    let n = grads.len();
    let blocks = n.div_ceil(16384).max(1);
    let mut partials = gpu.stream.alloc_zeros::<f64>(blocks)?;
    let mut total = gpu.stream.alloc_zeros::<f64>(1)?;
    let nn = n as i64;
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function("gradnorm", "sumsq_partials_f64")?;
    unsafe { gpu.stream.launch_builder(&f).arg(&mut partials).arg(grads).arg(&nn).launch(cfg) }?;
    let bi = blocks as i32;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function("gradnorm", "sumsq_reduce_f64")?;
    unsafe { gpu.stream.launch_builder(&f).arg(&mut total).arg(&partials).arg(&bi).launch(one) }?;
    Ok(gpu.download(&total)?[0].sqrt() as f32)
}

/// One AdamW step over flat buffers (`adamw::adamw_update`'s arithmetic; `t >= 1`).
pub fn adamw_update(
    gpu: &Gpu,
    params: Out<'_, '_>,
    grads: In<'_, '_>,
    m: Out<'_, '_>,
    v: Out<'_, '_>,
    hp: &crate::adamw::AdamWParams,
    t: u64,
) -> Result<(), GpuError> {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n && t >= 1, "adamw_update: buffers differ");
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let apply = i32::from(hp.weight_decay != 0.0);
    let (omb1, b2, omb2) = ((1.0 - hp.beta1) as f32, hp.beta2 as f32, (1.0 - hp.beta2) as f32);
    let step_size = (hp.lr / (1.0 - hp.beta1.powi(t as i32))) as f32;
    let bc2 = (1.0 - hp.beta2.powi(t as i32)).sqrt() as f32;
    let eps = hp.eps as f32;
    let nn = n as i64;
    let f = gpu.function("adamw", "adamw_update_f32")?;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(params)
            .arg(grads)
            .arg(m)
            .arg(v)
            .arg(&decay)
            .arg(&apply)
            .arg(&omb1)
            .arg(&b2)
            .arg(&omb2)
            .arg(&step_size)
            .arg(&bc2)
            .arg(&eps)
            .arg(&nn)
            .launch(elementwise(n))
    }?;
    Ok(())
}

// --- bf16 dense layers (train.precision = "bf16") --------------------------------------------
//
// Mixed precision as torch's autocast does it for `nn.Linear`: the GEMM's inputs are bf16
// copies (activations cast here, weights cast once per step by the caller into a flat bf16 twin
// of the parameter buffer), cuBLAS multiplies on tensor cores with f32 accumulation and writes
// bf16, and the result is added into the f32 output or gradient. The bias and its gradient stay
// f32. Same op flags as the f32 functions above.

pub type Bf16 = half::bf16;

/// `dst = bf16(src)` (round to nearest even).
pub fn cast_to_bf16(gpu: &Gpu, dst: &mut CudaViewMut<'_, Bf16>, src: In<'_, '_>) -> Result<(), GpuError> {
    assert_eq!(dst.len(), src.len());
    let f = gpu.function("cast", "cast_f32_to_bf16")?;
    let n = src.len();
    let nn = n as i64;
    unsafe { gpu.stream.launch_builder(&f).arg(dst).arg(src).arg(&nn).launch(elementwise(n)) }?;
    Ok(())
}

/// `dst += f32(src)`, or `dst = f32(src)` without `accumulate`.
fn from_bf16(gpu: &Gpu, dst: Out<'_, '_>, src: &CudaView<'_, Bf16>, accumulate: bool) -> Result<(), GpuError> {
    assert_eq!(dst.len(), src.len());
    let f = gpu.function("cast", if accumulate { "add_bf16_to_f32" } else { "cast_bf16_to_f32" })?;
    let n = src.len();
    let nn = n as i64;
    unsafe { gpu.stream.launch_builder(&f).arg(dst).arg(src).arg(&nn).launch(elementwise(n)) }?;
    Ok(())
}

fn bf16_cfg(cfg: GemmConfig<f32>) -> GemmConfig<Bf16> {
    GemmConfig {
        transa: cfg.transa,
        transb: cfg.transb,
        m: cfg.m,
        n: cfg.n,
        k: cfg.k,
        alpha: Bf16::from_f32(cfg.alpha),
        lda: cfg.lda,
        ldb: cfg.ldb,
        beta: Bf16::from_f32(cfg.beta),
        ldc: cfg.ldc,
    }
}

fn bf16_copy(gpu: &Gpu, src: In<'_, '_>) -> Result<cudarc::driver::CudaSlice<Bf16>, GpuError> {
    let mut dst = gpu.stream.alloc_zeros::<Bf16>(src.len().max(1))?;
    cast_to_bf16(gpu, &mut dst.slice_mut(0..src.len()), src)?;
    Ok(dst)
}

/// [`matmul_forward`] with bf16 GEMM inputs: `weight` is the bf16 twin of the f32 weight.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_bf16(
    gpu: &Gpu,
    out: Out<'_, '_>,
    inp: In<'_, '_>,
    weight: &CudaView<'_, Bf16>,
    bias: Option<In<'_, '_>>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<(), GpuError> {
    assert!(out.len() == n * oc && inp.len() == n * c && weight.len() == oc * c, "matmul_forward_bf16: shapes");
    match bias {
        Some(b) => {
            assert_eq!(b.len(), oc, "matmul_forward_bf16: bias must be [OC]");
            let f = gpu.function("matmul", "bias_rows_f32")?;
            let (nn, oci) = (n as i64, oc as i32);
            unsafe {
                gpu.stream.launch_builder(&f).arg(&mut *out).arg(b).arg(&nn).arg(&oci).launch(elementwise(n * oc))
            }?;
        }
        None => gpu.stream.memset_zeros(out)?,
    }
    let inp16 = bf16_copy(gpu, inp)?;
    let mut out16 = gpu.stream.alloc_zeros::<Bf16>(n * oc)?;
    let cfg = bf16_cfg(gemm_cfg(T, N, oc, n, c, c, c, oc, 1.0, 0.0));
    unsafe { gpu.blas()?.gemm(cfg, weight, &inp16.slice(0..n * c), &mut out16) }?;
    from_bf16(gpu, out, &out16.as_view(), true)
}

/// [`matmul_backward`] with bf16 GEMM inputs; `dinp` written (or, with `accumulate`, added to),
/// `dweight` and `dbias` accumulated, in f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_bf16(
    gpu: &Gpu,
    dinp: Out<'_, '_>,
    dweight: Out<'_, '_>,
    dbias: Option<Out<'_, '_>>,
    dout: In<'_, '_>,
    inp: In<'_, '_>,
    weight: &CudaView<'_, Bf16>,
    n: usize,
    c: usize,
    oc: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    assert!(dinp.len() == n * c && weight.len() == oc * c && dout.len() == n * oc, "matmul_backward_bf16: shapes");
    assert!(dweight.len() == oc * c && inp.len() == n * c, "matmul_backward_bf16: shapes");
    let blas = gpu.blas()?;
    let (dout16, inp16) = (bf16_copy(gpu, dout)?, bf16_copy(gpu, inp)?);
    let mut dinp16 = gpu.stream.alloc_zeros::<Bf16>(n * c)?;
    let cfg = bf16_cfg(gemm_cfg(N, N, c, n, oc, c, oc, c, 1.0, 0.0));
    unsafe { blas.gemm(cfg, weight, &dout16.slice(0..n * oc), &mut dinp16) }?;
    from_bf16(gpu, dinp, &dinp16.as_view(), accumulate)?;
    let mut dw16 = gpu.stream.alloc_zeros::<Bf16>(oc * c)?;
    let cfg = bf16_cfg(gemm_cfg(N, T, c, oc, n, c, oc, c, 1.0, 0.0));
    unsafe { blas.gemm(cfg, &inp16.slice(0..n * c), &dout16.slice(0..n * oc), &mut dw16) }?;
    from_bf16(gpu, dweight, &dw16.as_view(), true)?;
    if let Some(db) = dbias {
        assert_eq!(db.len(), oc, "matmul_backward_bf16: dbias must be [OC]");
        let f = gpu.function("matmul", "column_sum_accumulate_f32")?;
        let (nn, oci) = (n as i64, oc as i32);
        let cfg =
            LaunchConfig { grid_dim: (oc.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        unsafe { gpu.stream.launch_builder(&f).arg(db).arg(dout).arg(&nn).arg(&oci).launch(cfg) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_keep_source_order_within_a_destination() {
        let g = RowGroups::new([Some(3), Some(1), None, Some(3), Some(1), Some(0)]);
        assert_eq!(g.keys, vec![0, 1, 3]);
        assert_eq!(g.offsets, vec![0, 1, 3, 5]);
        assert_eq!(g.rows, vec![5, 1, 4, 0, 3]);
    }
}
