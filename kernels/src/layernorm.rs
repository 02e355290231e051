//! Layer normalisation over the last dimension:
//! `out = (x - mean) * rstd * weight + bias`, `rstd = 1 / sqrt(var + eps)`, with the biased
//! variance, as `torch.nn.LayerNorm`. Forward saves `mean` and `rstd` per row for backward.
//!
//! Backward, with `n = (x - mean) * rstd` and `g = weight * dout`:
//! `dx = rstd * (g - mean(g) - n * mean(g * n))`, `dweight += sum_rows(dout * n)`,
//! `dbias += sum_rows(dout)`. The parameter sums are formed per fixed block of rows and then
//! added in block order, so they are deterministic.

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
    out.par_chunks_mut(c).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).zip(inp.par_chunks(c)).for_each(
        |((o, (m, r)), x)| {
            let mu = x.iter().sum::<f32>() / c as f32;
            let var = x.iter().map(|&v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for i in 0..c {
                o[i] = (x[i] - mu) * rs * weight[i] + bias[i];
            }
            *m = mu;
            *r = rs;
        },
    );
}

/// Rows per block of the parameter-gradient partial sums.
const PARAM_BLOCK: usize = 64;

/// Backward of [`layernorm_forward`]; accumulates into `dinp`, `dweight`, `dbias`.
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
        let (mu, rs) = (mean[row], rstd[row]);
        let mut g_mean = 0.0f32;
        let mut gn_mean = 0.0f32;
        for i in 0..c {
            let norm = (x[i] - mu) * rs;
            let wg = weight[i] * g[i];
            g_mean += wg;
            gn_mean += wg * norm;
        }
        g_mean /= c as f32;
        gn_mean /= c as f32;
        for i in 0..c {
            let norm = (x[i] - mu) * rs;
            dx[i] += rs * (weight[i] * g[i] - g_mean - norm * gn_mean);
        }
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
