//! Products with bf16 inputs and f32 accumulation on CPUs with AVX512_BF16 (`vdpbf16ps`): what
//! `train.precision = "bf16"` runs for the dense layers, as torch's CPU autocast does for
//! `nn.Linear` and as the GPU path does with cuBLAS.
//!
//! `dst[m, n] (+)= scale * bf16(lhs) @ bf16(rhs)`, the same operands and strides as
//! [`crate::matmul::gemm`]: inputs stay f32 in memory and are rounded to bf16 (to nearest, ties
//! to even, as `half::bf16::from_f32` and the GPU's cast do) while they are packed, so no bf16
//! copy of the weights or the activations is kept. The `gemm` crate has no bf16 kernels (its
//! maintainer declined them) and no library here has a kept one; this is one micro-kernel.
//!
//! The loop nest is BLIS's: blocks of `NC` columns and `KC` of the inner dimension; each block
//! of `rhs` is packed once into panels of `NR` columns, each block of `lhs` rows into panels of
//! `MR` rows, both as bf16 pairs along the inner dimension (what `vdpbf16ps` multiplies and adds
//! into one f32 lane); the micro-kernel keeps an `MR x NR` tile of f32 sums in registers. Each
//! output element's sum runs on one thread in a fixed order (inner blocks in order, pairs in
//! order within a block), so results are deterministic and independent of the thread count.
//! Threads split the rows of `lhs`.

use crate::matmul::Mat;
use rayon::prelude::*;
use std::cell::Cell;

/// Rows of the register tile.
const MR: usize = 8;
/// 16-lane vectors across the register tile's columns.
const NV: usize = 3;
/// Columns of the register tile.
const NR: usize = 16 * NV;
/// Inner-dimension block (even: whole pairs).
const KC: usize = 512;
/// Column block (a multiple of `NR`).
const NC: usize = NR * 32;
/// Largest row block one task packs.
const MC: usize = 192;

/// Whether this CPU runs [`gemm_bf16`] (AVX512F and AVX512_BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32` to bf16 (to nearest, ties to even; NaN stays a quiet NaN), in the upper 16 bits.
#[inline(always)]
fn round_hi(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    let nan = (b | 0x0040_0000) & 0xffff_0000;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// The bf16 of `x`'s rounding, as bits.
pub fn to_bf16_bits(x: f32) -> u16 {
    (round_hi(x) >> 16) as u16
}

/// Two values as one bf16 pair: `lo` in the low half (the lower index of a pair).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (round_hi(lo) >> 16) | round_hi(hi)
}

/// `dst[m, n] = accumulate ? dst + scale * lhs @ rhs : scale * lhs @ rhs` with both operands
/// rounded to bf16 and the products summed in f32; `dst` row-major contiguous. With `bias`
/// (`[n]`, only without `accumulate`), `dst = bias + scale * lhs @ rhs`: the bias joins each tile
/// where it is stored, the same single rounding as accumulating onto rows that hold the bias,
/// without writing those rows first or reading them back. Panics where [`supported`] is false:
/// callers check once and refuse bf16 with a clear error.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    scale: f32,
    accumulate: bool,
    bias: Option<&[f32]>,
    threaded: bool,
) {
    if let Some(b) = bias {
        assert!(!accumulate && b.len() == n, "gemm_bf16: a bias is [n], and only without accumulate");
        if k == 0 {
            dst[..m * n].chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
            return;
        }
    }
    assert!(supported(), "gemm_bf16: this CPU has no AVX512_BF16");
    if crate::matmul::trivial(dst, m, n, k, lhs, rhs, accumulate) {
        return;
    }
    let dst = &mut dst[..m * n];
    // Rows per task: at least two tasks per thread where the rows allow, whole tiles, at most MC.
    let tasks = if threaded { 2 * rayon::current_num_threads() } else { 1 };
    let mc = m.div_ceil(tasks).next_multiple_of(MR).clamp(MR, MC);
    let mut bpack = BPACK.take();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let kp = kc.div_ceil(2);
            let panels = nc.div_ceil(NR);
            // Not cleared: the packs write every pair a stored result reads (an odd last index
            // pairs with 0); lanes past a tile's rows or columns may hold an earlier product's
            // values, and their sums are never stored.
            bpack.resize(panels * kp * NR, 0u32);
            // SAFETY: `supported()` was asserted above.
            #[allow(unsafe_code)]
            let pack_b =
                |(q, out): (usize, &mut [u32])| unsafe { pack_rhs(out, rhs, pc, kc, jc + q * NR, NR.min(nc - q * NR)) };
            if threaded {
                bpack.par_chunks_mut(kp * NR).enumerate().for_each(pack_b);
            } else {
                bpack.chunks_mut(kp * NR).enumerate().for_each(pack_b);
            }
            let first = pc == 0 && !accumulate;
            let layout = lhs_layout(lhs);
            let bpack = &bpack;
            let block = |(ib, rows): (usize, &mut [f32])| {
                let ic = ib * mc;
                let mrows = rows.len() / n;
                let mut apack = APACK.take();
                apack.resize(mrows.div_ceil(MR) * kp * MR, 0u32);
                for (r, out) in apack.chunks_mut(kp * MR).enumerate() {
                    // SAFETY: `supported()` was asserted above.
                    #[allow(unsafe_code)]
                    unsafe {
                        pack_lhs(out, lhs, ic + r * MR, MR.min(mrows - r * MR), pc, kc)
                    };
                }
                for q in 0..panels {
                    let b = &bpack[q * kp * NR..(q + 1) * kp * NR];
                    let cols = NR.min(nc - q * NR);
                    for (r, a) in apack.chunks(kp * MR).enumerate() {
                        let nrows = MR.min(mrows - r * MR);
                        let out = &mut rows[(r * MR) * n + jc + q * NR..];
                        let bias = bias.filter(|_| first).map(|b| &b[jc + q * NR..jc + q * NR + cols]);
                        let tile = Tile { n, rows: nrows, cols, scale, first, bias };
                        // SAFETY: `supported()` was asserted above; `a` holds `kp * MR` and `b`
                        // `kp * NR` packed pairs; `out` starts the tile's first element and
                        // holds its last, `(nrows - 1) * n + cols` on.
                        #[allow(unsafe_code)]
                        unsafe {
                            match layout {
                                Lhs::RowMajor => micro::<true>(kp, a, b, out, tile),
                                Lhs::PairMajor => micro::<false>(kp, a, b, out, tile),
                            }
                        };
                    }
                }
                APACK.set(apack);
            };
            if threaded {
                dst.par_chunks_mut(mc * n).enumerate().for_each(block);
            } else {
                dst.chunks_mut(mc * n).enumerate().for_each(block);
            }
        }
    }
    BPACK.set(bpack);
}

thread_local! {
    // The packed panels, kept per thread between calls: fresh ones of this size (up to 1.5 MiB)
    // come from mmap and cost a page fault per 4 KiB on every product. Taken out while in use,
    // so that a nested call on the same thread just allocates its own.
    static APACK: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static BPACK: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// How a packed panel of `lhs` is laid out: `[kc/2][MR]` pairs (from memory where rows are
/// contiguous) or `[MR][kc/2]` (where the inner index is, a plain conversion).
#[derive(Clone, Copy, PartialEq)]
enum Lhs {
    PairMajor,
    RowMajor,
}

/// `out[p] = pair(src[2p], src[2p + 1])` (an odd tail pairs with 0).
#[inline(always)]
fn run_to_pairs(out: &mut [u32], src: &[f32]) {
    let (full, tail) = src.split_at(src.len() & !1);
    for (o, s) in out.iter_mut().zip(full.chunks_exact(2)) {
        *o = pair(s[0], s[1]);
    }
    if let [last] = tail {
        out[full.len() / 2] = pair(*last, 0.0);
    }
}

/// `out[j] = pair(lo[j], hi[j])`.
#[inline(always)]
fn zip_to_pairs(out: &mut [u32], lo: &[f32], hi: &[f32]) {
    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
        *o = pair(l, h);
    }
}

/// Packs `rows` rows of `lhs` from `row0`, inner indices `pc..pc + kc`, in the layout
/// [`lhs_layout`] chose (an odd last index pairs with zero; rows past `rows` are left as they
/// are).
///
/// # Safety
/// The CPU must have AVX512F (the loops are compiled for it).
#[allow(unsafe_code)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_lhs(out: &mut [u32], lhs: Mat<'_>, row0: usize, rows: usize, pc: usize, kc: usize) {
    let kp = kc.div_ceil(2);
    let d = lhs.data;
    match lhs_layout(lhs) {
        Lhs::RowMajor => {
            for i in 0..rows {
                let start = (row0 + i) * lhs.rs + pc;
                run_to_pairs(&mut out[i * kp..(i + 1) * kp], &d[start..start + kc]);
            }
        }
        Lhs::PairMajor if lhs.rs == 1 => {
            for p in 0..kc / 2 {
                let lo = &d[row0 + (pc + 2 * p) * lhs.cs..][..rows];
                let hi = &d[row0 + (pc + 2 * p + 1) * lhs.cs..][..rows];
                zip_to_pairs(&mut out[p * MR..p * MR + rows], lo, hi);
            }
            if kc % 2 == 1 {
                let lo = &d[row0 + (pc + kc - 1) * lhs.cs..][..rows];
                out[kc / 2 * MR..kc / 2 * MR + rows].iter_mut().zip(lo).for_each(|(o, &l)| *o = pair(l, 0.0));
            }
        }
        Lhs::PairMajor => {
            let at = |i: usize, q: usize| if q < kc { d[(row0 + i) * lhs.rs + (pc + q) * lhs.cs] } else { 0.0 };
            for p in 0..kp {
                for i in 0..rows {
                    out[p * MR + i] = pair(at(i, 2 * p), at(i, 2 * p + 1));
                }
            }
        }
    }
}

fn lhs_layout(lhs: Mat<'_>) -> Lhs {
    if lhs.cs == 1 {
        Lhs::RowMajor
    } else {
        Lhs::PairMajor
    }
}

/// Packs `cols` columns of `rhs` from `col0`, inner indices `pc..pc + kc`, as `[kc/2][NR]` pairs.
///
/// # Safety
/// The CPU must have AVX512F (the loops are compiled for it).
#[allow(unsafe_code)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn pack_rhs(out: &mut [u32], rhs: Mat<'_>, pc: usize, kc: usize, col0: usize, cols: usize) {
    let kp = kc.div_ceil(2);
    let d = rhs.data;
    if rhs.cs == 1 {
        // Columns contiguous: each pair comes from two inner indices' rows.
        for p in 0..kc / 2 {
            let lo = &d[(pc + 2 * p) * rhs.rs + col0..][..cols];
            let hi = &d[(pc + 2 * p + 1) * rhs.rs + col0..][..cols];
            zip_to_pairs(&mut out[p * NR..p * NR + cols], lo, hi);
        }
        if kc % 2 == 1 {
            let lo = &d[(pc + kc - 1) * rhs.rs + col0..][..cols];
            out[kc / 2 * NR..kc / 2 * NR + cols].iter_mut().zip(lo).for_each(|(o, &l)| *o = pair(l, 0.0));
        }
    } else if rhs.rs == 1 {
        // The inner index contiguous per column (a transposed weight): convert each column's
        // run, then write it down the panel.
        let mut run = vec![0u32; kp];
        for j in 0..cols {
            let start = (col0 + j) * rhs.cs + pc;
            run_to_pairs(&mut run, &d[start..start + kc]);
            for (p, &r) in run.iter().enumerate() {
                out[p * NR + j] = r;
            }
        }
    } else {
        let at = |q: usize, j: usize| if q < kc { d[(pc + q) * rhs.rs + (col0 + j) * rhs.cs] } else { 0.0 };
        for p in 0..kp {
            for j in 0..cols {
                out[p * NR + j] = pair(at(2 * p, j), at(2 * p + 1, j));
            }
        }
    }
}

/// Where a micro-kernel's tile goes: `rows x cols` of a row-major matrix of `n` columns,
/// written as `scale * sum` (plus the tile's columns of `bias`, when given) when `first`, else
/// added.
#[derive(Clone, Copy)]
struct Tile<'a> {
    n: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    first: bool,
    bias: Option<&'a [f32]>,
}

/// `out[i, j] (+)= scale * sum over kp pairs of a(i, p) . b[p][j]` (each a bf16 pair dot
/// product, summed in f32) for the tile's rows and columns, with `a(i, p)` at `a[i * kp + p]`
/// when `ROWS` (a row-major panel) and at `a[p * MR + i]` otherwise.
///
/// # Safety
/// The CPU must have AVX512F and AVX512_BF16; `a` must hold `kp * MR` and `b` `kp * NR` values.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro<const ROWS: bool>(kp: usize, a: &[u32], b: &[u32], out: &mut [f32], t: Tile<'_>) {
    use std::arch::x86_64::*;
    assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    assert!(t.rows >= 1 && t.rows <= MR && t.cols >= 1 && t.cols <= NR);
    assert!(out.len() >= (t.rows - 1) * t.n + t.cols);
    assert!(t.bias.is_none_or(|b| b.len() >= t.cols));
    let (si, sp) = if ROWS { (kp, 1) } else { (1, MR) };
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (mut pa, mut pb) = (a.as_ptr(), b.as_ptr());
    for _ in 0..kp {
        // SAFETY (the loads): after p pairs pa is at p * sp and pb at p * NR; the largest index
        // read is (MR - 1) * si + (kp - 1) * sp < kp * MR of a, and kp * NR of b.
        let bv: [__m512bh; NV] =
            std::array::from_fn(|v| unsafe { std::mem::transmute(_mm512_loadu_si512(pb.add(16 * v).cast())) });
        for (i, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(*pa.add(i * si) as i32)) };
            for (s, &bv) in row.iter_mut().zip(&bv) {
                *s = _mm512_dpbf16_ps(*s, av, bv);
            }
        }
        pa = unsafe { pa.add(sp) };
        pb = unsafe { pb.add(NR) };
    }
    let scale = _mm512_set1_ps(t.scale);
    let masks: [__mmask16; NV] = std::array::from_fn(|v| {
        let live = t.cols.saturating_sub(16 * v).min(16);
        ((1u32 << live) - 1) as __mmask16
    });
    // SAFETY: the masked lanes are columns 16 v .. min(cols, 16 (v + 1)), inside `bias` (asserted
    // above to hold `cols`).
    let bias: Option<[__m512; NV]> =
        t.bias.map(|b| std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], b.as_ptr().add(16 * v)) }));
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        for (v, s) in row.iter().enumerate() {
            if masks[v] == 0 {
                continue;
            }
            // SAFETY: the masked lanes are columns 16 v .. min(cols, 16 (v + 1)) of row i, at
            // most (rows - 1) * n + cols - 1, inside `out` (asserted above).
            unsafe {
                let p = out.as_mut_ptr().add(i * t.n + 16 * v);
                let sum = if t.first {
                    match &bias {
                        Some(bias) => _mm512_fmadd_ps(scale, *s, bias[v]),
                        None => _mm512_mul_ps(scale, *s),
                    }
                } else {
                    _mm512_fmadd_ps(scale, *s, _mm512_maskz_loadu_ps(masks[v], p))
                };
                _mm512_mask_storeu_ps(p, masks[v], sum);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn micro<const ROWS: bool>(_: usize, _: &[u32], _: &[u32], _: &mut [f32], _: Tile<'_>) {
    unreachable!("gemm_bf16 asserts supported() first")
}
