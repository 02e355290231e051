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
//! Q, K, V and O are head-major, `[B, NH, T, HD]`, so each (b, h) pair owns one contiguous
//! block and runs as one task; [`split_heads`] and [`merge_heads`] convert from and to the
//! `[B, T, C]` layout of the dense layers (`C = NH * HD`, head `h` in columns `h*HD..(h+1)*HD`).
//!
//! Backward, with `dP' = dO V^T`: `dV += P'^T dO`; `dP = dropout_mask * dP'`;
//! `dS = P * (dP - rowsum(P * dP))`; `dQ += scale * dS K`; `dK += scale * dS^T Q`.
//! The dropout mask is regenerated from its Philox counters, never stored.

use crate::dropout::{mask_run, DropoutSpec, LogicalDims};
use crate::matmul::{gemm, Mat};
use rayon::prelude::*;

/// The shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub b: usize,
    pub nh: usize,
    pub t: usize,
    pub hd: usize,
}

/// Dropout on the attention probabilities: the spec, the dataset index of each example, and the
/// logical extents that number the elements (`t_max = w_max = max_position_embeddings`).
#[derive(Clone, Copy, Debug)]
pub struct AttnDropout<'a> {
    pub spec: DropoutSpec,
    pub example_ids: &'a [u32],
    pub logical: LogicalDims,
}

/// `dst[b, h, t, d] = src[b, t, h * HD + d]`.
pub fn split_heads(dst: &mut [f32], src: &[f32], d: AttnDims) {
    let c = d.nh * d.hd;
    assert!(dst.len() == d.b * d.t * c && src.len() == d.b * d.t * c, "split_heads: shapes");
    dst.par_chunks_mut(d.t * d.hd).enumerate().for_each(|(bh, blk)| {
        let (b, h) = (bh / d.nh, bh % d.nh);
        for t in 0..d.t {
            let s = (b * d.t + t) * c + h * d.hd;
            blk[t * d.hd..(t + 1) * d.hd].copy_from_slice(&src[s..s + d.hd]);
        }
    });
}

/// `dst[b, t, h * HD + d] = src[b, h, t, d]`.
pub fn merge_heads(dst: &mut [f32], src: &[f32], d: AttnDims) {
    let c = d.nh * d.hd;
    assert!(dst.len() == d.b * d.t * c && src.len() == d.b * d.t * c, "merge_heads: shapes");
    dst.par_chunks_mut(c).enumerate().for_each(|(bt, row)| {
        let (b, t) = (bt / d.t, bt % d.t);
        for h in 0..d.nh {
            let s = ((b * d.nh + h) * d.t + t) * d.hd;
            row[h * d.hd..(h + 1) * d.hd].copy_from_slice(&src[s..s + d.hd]);
        }
    });
}

/// Backward of [`split_heads`]: `dsrc[b, t, h*HD + d] += ddst[b, h, t, d]`.
pub fn split_heads_backward(dsrc: &mut [f32], ddst: &[f32], d: AttnDims) {
    let c = d.nh * d.hd;
    dsrc.par_chunks_mut(c).enumerate().for_each(|(bt, row)| {
        let (b, t) = (bt / d.t, bt % d.t);
        for h in 0..d.nh {
            let s = ((b * d.nh + h) * d.t + t) * d.hd;
            for (o, &g) in row[h * d.hd..(h + 1) * d.hd].iter_mut().zip(&ddst[s..s + d.hd]) {
                *o += g;
            }
        }
    });
}

/// Backward of [`merge_heads`]: `dsrc[b, h, t, d] += ddst[b, t, h*HD + d]`.
pub fn merge_heads_backward(dsrc: &mut [f32], ddst: &[f32], d: AttnDims) {
    let c = d.nh * d.hd;
    dsrc.par_chunks_mut(d.t * d.hd).enumerate().for_each(|(bh, blk)| {
        let (b, h) = (bh / d.nh, bh % d.nh);
        for t in 0..d.t {
            let s = (b * d.t + t) * c + h * d.hd;
            for (o, &g) in blk[t * d.hd..(t + 1) * d.hd].iter_mut().zip(&ddst[s..s + d.hd]) {
                *o += g;
            }
        }
    });
}

/// Which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// `[B, T]`: added to every query's score of that key (0, or `f32::MIN` for padding).
    pub add: &'a [f32],
    /// `[B, T]`: each token's segment (document) in its row; empty for one segment per row.
    pub segments: &'a [u32],
}

fn check(d: AttnDims, q: &[f32], k: &[f32], v: &[f32]) {
    let n = d.b * d.nh * d.t * d.hd;
    assert!(q.len() == n && k.len() == n && v.len() == n, "attention: q/k/v must be [B, NH, T, HD]");
}

/// Calls `f(j, multiplier)` for dropout's multipliers of row `i` (keys `0..t`) of head `h` of
/// example `b`.
#[inline]
fn drop_row(dr: &AttnDropout<'_>, b: usize, h: usize, i: usize, t: usize, f: impl FnMut(usize, f32)) {
    let base = ((h * dr.logical.t_max + i) * dr.logical.w_max) as u64;
    mask_run(&dr.spec, dr.example_ids[b], base, t, f);
}

/// Forward. `out: [B, NH, T, HD]`; `probs: [B, NH, T, T]`; `probs_drop` is `[B, NH, T, T]` when
/// `dropout` is given with `p > 0`, otherwise empty.
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    probs_drop: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Mask<'_>,
    d: AttnDims,
    dropout: Option<&AttnDropout<'_>>,
) {
    check(d, q, k, v);
    assert_eq!(mask.add.len(), d.b * d.t, "attention: mask must be [B, T]");
    assert!(mask.segments.is_empty() || mask.segments.len() == d.b * d.t, "attention: segments must be [B, T]");
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let (tt, th) = (d.t * d.t, d.t * d.hd);
    assert_eq!(out.len(), d.b * d.nh * th, "attention_forward: out must be [B, NH, T, HD]");
    assert_eq!(probs.len(), d.b * d.nh * tt, "attention_forward: probs must be [B, NH, T, T]");
    if let Some(dr) = dropout {
        assert_eq!(probs_drop.len(), probs.len(), "attention_forward: probs_drop must be [B, NH, T, T]");
        assert!(dr.example_ids.len() == d.b && d.t <= dr.logical.t_max && d.t <= dr.logical.w_max);
    }
    let scale = 1.0 / (d.hd as f32).sqrt();
    let drop_blocks: Vec<Option<&mut [f32]>> = if dropout.is_some() {
        probs_drop.chunks_mut(tt).map(Some).collect()
    } else {
        (0..d.b * d.nh).map(|_| None).collect()
    };
    out.par_chunks_mut(th).zip(probs.par_chunks_mut(tt)).zip(drop_blocks.into_par_iter()).enumerate().for_each(
        |(bh, ((o, p), pd))| {
            let (b, h) = (bh / d.nh, bh % d.nh);
            let (qs, ks, vs) = (&q[bh * th..(bh + 1) * th], &k[bh * th..(bh + 1) * th], &v[bh * th..(bh + 1) * th]);
            let m = &mask.add[b * d.t..(b + 1) * d.t];
            let segs = if mask.segments.is_empty() { None } else { Some(&mask.segments[b * d.t..(b + 1) * d.t]) };
            gemm(
                p,
                d.t,
                d.t,
                d.hd,
                Mat { data: qs, rs: d.hd, cs: 1 },
                Mat { data: ks, rs: 1, cs: d.hd },
                scale,
                false,
                false,
            );
            for (i, row) in p.chunks_mut(d.t).enumerate() {
                let mut max = f32::NEG_INFINITY;
                for (j, (s, &mk)) in row.iter_mut().zip(m).enumerate() {
                    *s += mk;
                    if segs.is_some_and(|sg| sg[j] != sg[i]) {
                        *s = f32::MIN;
                    }
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for s in row.iter_mut() {
                    *s *= inv;
                }
            }
            let weights: &[f32] = match (dropout, pd) {
                (Some(dr), Some(pd)) => {
                    for i in 0..d.t {
                        drop_row(dr, b, h, i, d.t, |j, m| pd[i * d.t + j] = p[i * d.t + j] * m);
                    }
                    pd
                }
                _ => p,
            };
            gemm(
                o,
                d.t,
                d.hd,
                d.t,
                Mat { data: weights, rs: d.t, cs: 1 },
                Mat { data: vs, rs: d.hd, cs: 1 },
                1.0,
                false,
                false,
            );
        },
    );
}

/// Backward; accumulates into `dq`, `dk`, `dv` (all `[B, NH, T, HD]`). `probs`/`probs_drop` are
/// the buffers saved by [`attention_forward`] with the same `dropout`.
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
    d: AttnDims,
    dropout: Option<&AttnDropout<'_>>,
) {
    check(d, q, k, v);
    let dropout = dropout.filter(|dr| dr.spec.p > 0.0);
    let (tt, th) = (d.t * d.t, d.t * d.hd);
    let n = d.b * d.nh * th;
    assert!(dq.len() == n && dk.len() == n && dv.len() == n && dout.len() == n, "attention_backward: [B, NH, T, HD]");
    assert_eq!(probs.len(), d.b * d.nh * tt, "attention_backward: probs must be [B, NH, T, T]");
    if dropout.is_some() {
        assert_eq!(probs_drop.len(), probs.len(), "attention_backward: probs_drop must be [B, NH, T, T]");
    }
    let scale = 1.0 / (d.hd as f32).sqrt();
    dq.par_chunks_mut(th).zip(dk.par_chunks_mut(th)).zip(dv.par_chunks_mut(th)).enumerate().for_each(
        |(bh, ((dqs, dks), dvs))| {
            let (b, h) = (bh / d.nh, bh % d.nh);
            let r = bh * th..(bh + 1) * th;
            let (qs, ks, vs, go) = (&q[r.clone()], &k[r.clone()], &v[r.clone()], &dout[r]);
            let p = &probs[bh * tt..(bh + 1) * tt];
            let weights = if dropout.is_some() { &probs_drop[bh * tt..(bh + 1) * tt] } else { p };
            // dV += P'^T dO
            gemm(
                dvs,
                d.t,
                d.hd,
                d.t,
                Mat { data: weights, rs: 1, cs: d.t },
                Mat { data: go, rs: d.hd, cs: 1 },
                1.0,
                true,
                false,
            );
            // dP' = dO V^T
            let mut dp = vec![0.0f32; tt];
            gemm(
                &mut dp,
                d.t,
                d.t,
                d.hd,
                Mat { data: go, rs: d.hd, cs: 1 },
                Mat { data: vs, rs: 1, cs: d.hd },
                1.0,
                false,
                false,
            );
            if let Some(dr) = dropout {
                for i in 0..d.t {
                    drop_row(dr, b, h, i, d.t, |j, m| dp[i * d.t + j] *= m);
                }
            }
            // dS = P * (dP - rowsum(P * dP)), reusing dp
            for (prow, dprow) in p.chunks(d.t).zip(dp.chunks_mut(d.t)) {
                let dot: f32 = prow.iter().zip(dprow.iter()).map(|(&a, &g)| a * g).sum();
                for (g, &a) in dprow.iter_mut().zip(prow) {
                    *g = a * (*g - dot);
                }
            }
            gemm(
                dqs,
                d.t,
                d.hd,
                d.t,
                Mat { data: &dp, rs: d.t, cs: 1 },
                Mat { data: ks, rs: d.hd, cs: 1 },
                scale,
                true,
                false,
            );
            gemm(
                dks,
                d.t,
                d.hd,
                d.t,
                Mat { data: &dp, rs: 1, cs: d.t },
                Mat { data: qs, rs: d.hd, cs: 1 },
                scale,
                true,
                false,
            );
        },
    );
}
