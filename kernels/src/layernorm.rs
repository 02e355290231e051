//! Layer normalisation over the last dimension:
//! `out = (x - mean) * rstd * weight + bias`, `rstd = 1 / sqrt(var + eps)`, with the biased
//! variance, as `torch.nn.LayerNorm`. Forward saves `mean` and `rstd` per row for backward.
//!
//! Backward, with `n = (x - mean) * rstd` and `g = weight * dout`:
//! `dx = rstd * (g - mean(g) - n * mean(g * n))`, `dweight += sum_rows(dout * n)`,
//! `dbias += sum_rows(dout)`. The parameter sums are formed per fixed block of rows and then
//! added in block order, so they are deterministic. The row sums run in 16 fixed lanes
//! ([`crate::lanes`]), the same bits on every SIMD level.

use crate::lanes::{self, fold, LANES};
use multiversion::multiversion;
use rayon::prelude::*;

/// `out, inp: [N, C]`, `mean, rstd: [N]`, `weight, bias: [C]`.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    assert!(out.len() == n * c && inp.len() == n * c, "layernorm_forward: out/inp must be [N, C]");
    assert!(mean.len() == n && rstd.len() == n, "layernorm_forward: mean/rstd must be [N]");
    assert!(weight.len() == c && bias.len() == c, "layernorm_forward: weight/bias must be [C]");
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .zip(inp.par_chunks(c))
        .for_each(|((o, (m, r)), x)| (*m, *r) = forward_row(o, x, weight, bias, eps));
}

/// One row of [`layernorm_forward`]; returns its mean and rstd.
#[multiversion(targets = "simd")]
fn forward_row(o: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mu = lanes::sum(x) / c;
    let var = lanes::sum_map(x, |v| (v - mu) * (v - mu)) / c;
    let rs = 1.0 / (var + eps).sqrt();
    for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (x - mu) * rs * w + b;
    }
    (mu, rs)
}

/// One row of the input gradient of [`layernorm_backward`].
#[multiversion(targets = "simd")]
fn backward_row(dx: &mut [f32], x: &[f32], g: &[f32], weight: &[f32], mu: f32, rs: f32) {
    let c = x.len();
    assert!(g.len() == c && weight.len() == c && dx.len() == c, "layernorm_backward: row shapes");
    let (mut acc_g, mut acc_gn) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut add = |base: usize, len: usize| {
        let (x, g, w) = (&x[base..base + len], &g[base..base + len], &weight[base..base + len]);
        for l in 0..len {
            let wg = w[l] * g[l];
            acc_g[l] += wg;
            acc_gn[l] += wg * ((x[l] - mu) * rs);
        }
    };
    let full = c / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        add(base, LANES);
    }
    add(full, c - full);
    let g_mean = fold(acc_g) / c as f32;
    let gn_mean = fold(acc_gn) / c as f32;
    for i in 0..c {
        let norm = (x[i] - mu) * rs;
        dx[i] = rs * (weight[i] * g[i] - g_mean - norm * gn_mean);
    }
}

/// Rows per block of the parameter-gradient partial sums.
const PARAM_BLOCK: usize = 64;

/// Backward of [`layernorm_forward`]: writes `dinp`, accumulates into `dweight` and `dbias`.
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert!(dinp.len() == n * c && dout.len() == n * c && inp.len() == n * c, "layernorm_backward: [N, C]");
    assert!(dweight.len() == c && dbias.len() == c && weight.len() == c, "layernorm_backward: [C]");
    dinp.par_chunks_mut(c).enumerate().for_each(|(row, dx)| {
        let (x, g) = (&inp[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
        backward_row(dx, x, g, weight, mean[row], rstd[row]);
    });
    let partials: Vec<Vec<f32>> = (0..n.div_ceil(PARAM_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![0.0f32; 2 * c];
            for row in blk * PARAM_BLOCK..((blk + 1) * PARAM_BLOCK).min(n) {
                let (x, g) = (&inp[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
                let (mu, rs) = (mean[row], rstd[row]);
                for i in 0..c {
                    acc[i] += g[i] * (x[i] - mu) * rs;
                    acc[c + i] += g[i];
                }
            }
            acc
        })
        .collect();
    for p in &partials {
        for i in 0..c {
            dweight[i] += p[i];
            dbias[i] += p[c + i];
        }
    }
}
