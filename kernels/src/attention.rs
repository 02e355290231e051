//! Multi-head scaled dot-product attention with an additive padding mask, as BERT's
//! `BertSelfAttention` (eager implementation) computes it, per example `b` and head `h`:
//!
//! ```text
//! S  = (Q K^T) * scale + mask[b, None, :]      [T, T]   scale = 1/sqrt(HD)
//! P  = softmax(S, over keys)                   [T, T]   saved as `probs`
//! P' = dropout(P)                              [T, T]   saved as `probs_drop` when p > 0
//! O  = P' V                                    [T, HD]
//! ```
//!
//! The [`Mask`] is additive over keys: 0 for a real token, a large negative number (the model
//! uses `f32::MIN`, like `transformers`) for padding, so padded keys get exactly zero weight.
//! A row that packs several documents also gives each token's segment: a query's scores
//! against the keys of other segments are set to `f32::MIN` (after the padding is added), so
//! each document attends only to itself, as a block-diagonal 4-D mask does in `transformers`.
//!
//! The batch is a list of sequences ([`Seqs`]): the CPU runs on unpadded batches (each example,
//! or each packed document, its own sequence, as varlen attention does), a padded batch is `B`
//! sequences of `T`. Q, K, V and O are head-major per sequence, `[S][NH, len, HD]` (for a padded
//! batch `[B, NH, T, HD]`), so each (sequence, head) pair owns one contiguous block and runs as
//! one task; [`split_heads`] and [`merge_heads`] convert from and to the `[N, C]` rows of the
//! dense layers (`C = NH * HD`, head `h` in columns `h*HD..(h+1)*HD`). The probabilities are
//! `[S][NH, len, len]`.
//!
//! Backward, with `dP' = dO V^T`: `dV = P'^T dO`; `dP = dropout_mask * dP'`;
//! `dS = P * (dP - rowsum(P * dP))`; `dQ = scale * dS K`; `dK = scale * dS^T Q`.
//! The dropout mask is regenerated from its Philox counters, never stored.

use crate::dropout::{mask_run, DropoutSpec, LogicalDims};
use crate::gelu::exp_fast;
use crate::lanes::{self, LANES};
use crate::matmul::{gemm, Mat};
use crate::seqs::{blocks_mut, Seqs};
use multiversion::multiversion;
use rayon::prelude::*;

/// The shape of one attention call on a padded batch (the GPU's launchers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub b: usize,
    pub nh: usize,
    pub t: usize,
    pub hd: usize,
}

/// Heads and head size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadDims {
    pub nh: usize,
    pub hd: usize,
}

/// Dropout on the attention probabilities: the spec and the logical extents that number the
/// elements (`t_max = w_max = max_position_embeddings`); each sequence's example id keys it.
#[derive(Clone, Copy, Debug)]
pub struct AttnDropout {
    pub spec: DropoutSpec,
    pub logical: LogicalDims,
}

/// Each (sequence, head) block of a `[S][NH, len, HD]` tensor, in order.
fn head_blocks<'a>(buf: &'a mut [f32], d: HeadDims, seqs: &Seqs<'_>) -> Vec<&'a mut [f32]> {
    blocks_mut(buf, (0..seqs.count()).flat_map(|s| std::iter::repeat_n(seqs.len(s) * d.hd, d.nh)))
}

/// (sequence, head) of each block of [`head_blocks`].
fn block_index(d: HeadDims, seqs: &Seqs<'_>) -> Vec<(usize, usize)> {
    (0..seqs.count()).flat_map(|s| (0..d.nh).map(move |h| (s, h))).collect()
}

/// `[N, NH*HD]` rows to head-major `[S][NH, len, HD]`: `dst[s][h, t, d] = src[cu[s] + t, h * HD
/// + d]`. A permutation, so it is also the backward of [`merge_heads`].
pub fn split_heads(dst: &mut [f32], src: &[f32], d: HeadDims, seqs: Seqs<'_>) {
    seqs.check();
    let c = d.nh * d.hd;
    assert!(dst.len() == seqs.tokens() * c && src.len() == seqs.tokens() * c, "split_heads: shapes");
    let index = block_index(d, &seqs);
    head_blocks(dst, d, &seqs).into_par_iter().zip(index).for_each(|(blk, (s, h))| {
        for t in 0..seqs.len(s) {
            let from = (seqs.cu[s] + t) * c + h * d.hd;
            blk[t * d.hd..(t + 1) * d.hd].copy_from_slice(&src[from..from + d.hd]);
        }
    });
}

/// Head-major `[S][NH, len, HD]` back to `[N, NH*HD]` rows: `dst[cu[s] + t, h * HD + d] =
/// src[s][h, t, d]`. The backward of [`split_heads`].
pub fn merge_heads(dst: &mut [f32], src: &[f32], d: HeadDims, seqs: Seqs<'_>) {
    seqs.check();
    let c = d.nh * d.hd;
    assert!(dst.len() == seqs.tokens() * c && src.len() == seqs.tokens() * c, "merge_heads: shapes");
    let owner: Vec<usize> = (0..seqs.count()).flat_map(|s| std::iter::repeat_n(s, seqs.len(s))).collect();
    dst.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
        let s = owner[r];
        let (t, len) = (r - seqs.cu[s], seqs.len(s));
        for h in 0..d.nh {
            let from = (seqs.cu[s] * d.nh + h * len + t) * d.hd;
            row[h * d.hd..(h + 1) * d.hd].copy_from_slice(&src[from..from + d.hd]);
        }
    });
}

/// Which keys each query sees, besides its own sequence's.
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// `[N]`: added to every query's score of that key (0, or `f32::MIN` for padding); empty
    /// when nothing is padded.
    pub add: &'a [f32],
    /// `[N]`: each token's segment (document) in its sequence; empty for one segment each.
    pub segments: &'a [u32],
}

fn check(d: HeadDims, seqs: &Seqs<'_>, q: &[f32], k: &[f32], v: &[f32]) {
    seqs.check();
    let n = seqs.tokens() * d.nh * d.hd;
    assert!(q.len() == n && k.len() == n && v.len() == n, "attention: q/k/v must be [S][NH, len, HD]");
}

/// Calls `f(j, multiplier)` for dropout's multipliers of query `i` (keys `0..len`) of head `h` of
/// sequence `s`: the elements of its batch row, numbered by column.
#[inline]
fn drop_row(dr: &AttnDropout, seqs: &Seqs<'_>, s: usize, h: usize, i: usize, f: impl FnMut(usize, f32)) {
    let col = seqs.cols[s];
    let base = ((h * dr.logical.t_max + col + i) * dr.logical.w_max + col) as u64;
    mask_run(&dr.spec, seqs.example_ids[s], base, seqs.len(s), f);
}

/// `row = softmax(row)` in place. The exponentials are [`exp_fast`]'s (exactly 0 below
/// `exp`'s normal range, so masked keys weigh nothing), the sum runs in fixed lanes.
#[multiversion(targets = "simd")]
fn softmax_row(row: &mut [f32]) {
    let max = lanes::max(row);
    let exp = |s: f32| {
        let x = s - max;
        if x < -87.0 {
            0.0
        } else {
            exp_fast(x)
        }
    };
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l]);
            acc[l] += c[l];
        }
    }
    for (l, s) in chunks.into_remainder().iter_mut().enumerate() {
        *s = exp(*s);
        acc[l] += *s;
    }
    let inv = 1.0 / lanes::fold(acc);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// The softmax's backward on one row: `dp = p * (dp - sum(p * dp))`.
#[multiversion(targets = "simd")]
fn softmax_row_backward(dp: &mut [f32], p: &[f32]) {
    let dot = lanes::dot(p, dp);
    for (g, &a) in dp.iter_mut().zip(p) {
        *g = a * (*g - dot);
    }
}

/// Forward. `out: [S][NH, len, HD]`; `probs: [S][NH, len, len]`; `probs_drop` is the same shape
/// as `probs` when `dropout` is given with `p > 0`, otherwise empty.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    probs_drop: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Mask<'_>,
    d: HeadDims,
    seqs: Seqs<'_>,
    dropout: Option<&AttnDropout>,
) {
    check(d, &seqs, q, k, v);
    let n = seqs.tokens();
    assert!(mask.add.is_empty() || mask.add.len() == n, "attention: mask must be [N]");
    assert!(mask.segments.is_empty() || mask.segments.len() == n, "attention: segments must be [N]");
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    assert_eq!(out.len(), q.len(), "attention_forward: out must be [S][NH, len, HD]");
    assert_eq!(probs.len(), seqs.probs_len(d.nh), "attention_forward: probs must be [S][NH, len, len]");
    if let Some(dr) = dropout {
        assert_eq!(probs_drop.len(), probs.len(), "attention_forward: probs_drop must be probs' shape");
        let max = (0..seqs.count()).map(|s| seqs.cols[s] + seqs.len(s)).max().unwrap_or(0);
        assert!(max <= dr.logical.t_max && max <= dr.logical.w_max, "attention: rows exceed logical extents");
    }
    let scale = 1.0 / (d.hd as f32).sqrt();
    let sq = |s: usize| seqs.len(s) * seqs.len(s);
    let p_sizes = (0..seqs.count()).flat_map(|s| std::iter::repeat_n(sq(s), d.nh));
    let p_blocks = blocks_mut(probs, p_sizes.clone());
    let pd_blocks: Vec<Option<&mut [f32]>> = match dropout {
        Some(_) => blocks_mut(probs_drop, p_sizes).into_iter().map(Some).collect(),
        None => p_blocks.iter().map(|_| None).collect(),
    };
    let index = block_index(d, &seqs);
    let tasks = head_blocks(out, d, &seqs).into_iter().zip(p_blocks).zip(pd_blocks).zip(index);
    tasks.collect::<Vec<_>>().into_par_iter().for_each(|(((o, p), pd), (s, h))| {
        let (t, start) = (seqs.len(s), seqs.cu[s]);
        let off = (start * d.nh + h * t) * d.hd;
        let r = off..off + t * d.hd;
        let (qs, ks, vs) = (&q[r.clone()], &k[r.clone()], &v[r]);
        let m = (!mask.add.is_empty()).then(|| &mask.add[start..start + t]);
        let segs = (!mask.segments.is_empty()).then(|| &mask.segments[start..start + t]);
        gemm(p, t, t, d.hd, Mat { data: qs, rs: d.hd, cs: 1 }, Mat { data: ks, rs: 1, cs: d.hd }, scale, false, false);
        for (i, row) in p.chunks_mut(t).enumerate() {
            if let Some(m) = m {
                row.iter_mut().zip(m).for_each(|(s, &mk)| *s += mk);
            }
            if let Some(sg) = segs {
                row.iter_mut().zip(sg).filter(|(_, &g)| g != sg[i]).for_each(|(s, _)| *s = f32::MIN);
            }
            softmax_row(row);
        }
        let weights: &[f32] = match (dropout, pd) {
            (Some(dr), Some(pd)) => {
                for i in 0..t {
                    drop_row(dr, &seqs, s, h, i, |j, m| pd[i * t + j] = p[i * t + j] * m);
                }
                pd
            }
            _ => p,
        };
        gemm(o, t, d.hd, t, Mat { data: weights, rs: t, cs: 1 }, Mat { data: vs, rs: d.hd, cs: 1 }, 1.0, false, false);
    });
}

/// Backward; writes `dq`, `dk`, `dv` (all `[S][NH, len, HD]`). `probs`/`probs_drop`
/// are the buffers saved by [`attention_forward`] with the same `dropout`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    probs_drop: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: HeadDims,
    seqs: Seqs<'_>,
    dropout: Option<&AttnDropout>,
) {
    check(d, &seqs, q, k, v);
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let n = q.len();
    assert!(dq.len() == n && dk.len() == n && dv.len() == n && dout.len() == n, "attention_backward: [S][NH, len, HD]");
    assert_eq!(probs.len(), seqs.probs_len(d.nh), "attention_backward: probs must be [S][NH, len, len]");
    if dropout.is_some() {
        assert_eq!(probs_drop.len(), probs.len(), "attention_backward: probs_drop must be probs' shape");
    }
    let scale = 1.0 / (d.hd as f32).sqrt();
    let index = block_index(d, &seqs);
    // Where each (sequence, head) block of the probabilities starts.
    let mut p_off = Vec::with_capacity(index.len());
    let mut at = 0;
    for &(s, _) in &index {
        p_off.push(at);
        at += seqs.len(s) * seqs.len(s);
    }
    let tasks = head_blocks(dq, d, &seqs).into_iter().zip(head_blocks(dk, d, &seqs)).zip(head_blocks(dv, d, &seqs));
    tasks.zip(index.into_iter().zip(p_off)).collect::<Vec<_>>().into_par_iter().for_each(
        |(((dqs, dks), dvs), ((s, h), po))| {
            let t = seqs.len(s);
            let off = (seqs.cu[s] * d.nh + h * t) * d.hd;
            let r = off..off + t * d.hd;
            let (qs, ks, vs, go) = (&q[r.clone()], &k[r.clone()], &v[r.clone()], &dout[r]);
            let p = &probs[po..po + t * t];
            let weights = if dropout.is_some() { &probs_drop[po..po + t * t] } else { p };
            // dV = P'^T dO
            gemm(
                dvs,
                t,
                d.hd,
                t,
                Mat { data: weights, rs: 1, cs: t },
                Mat { data: go, rs: d.hd, cs: 1 },
                1.0,
                false,
                false,
            );
            // dP' = dO V^T
            let mut dp = vec![0.0f32; t * t];
            gemm(
                &mut dp,
                t,
                t,
                d.hd,
                Mat { data: go, rs: d.hd, cs: 1 },
                Mat { data: vs, rs: 1, cs: d.hd },
                1.0,
                false,
                false,
            );
            if let Some(dr) = dropout {
                for i in 0..t {
                    drop_row(dr, &seqs, s, h, i, |j, m| dp[i * t + j] *= m);
                }
            }
            // dS = P * (dP - rowsum(P * dP)), reusing dp
            for (prow, dprow) in p.chunks(t).zip(dp.chunks_mut(t)) {
                softmax_row_backward(dprow, prow);
            }
            gemm(
                dqs,
                t,
                d.hd,
                t,
                Mat { data: &dp, rs: t, cs: 1 },
                Mat { data: ks, rs: d.hd, cs: 1 },
                scale,
                false,
                false,
            );
            gemm(
                dks,
                t,
                d.hd,
                t,
                Mat { data: &dp, rs: 1, cs: t },
                Mat { data: qs, rs: d.hd, cs: 1 },
                scale,
                false,
                false,
            );
        },
    );
}
