//! GELU, the exact form BERT uses (`hidden_act = "gelu"`): `y = x * Phi(x)
//! = 0.5 * x * (1 + erf(x / sqrt(2)))`, not the tanh approximation.
//! Its derivative is `Phi(x) + x * phi(x)` with `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`.

use rayon::prelude::*;

const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;
const CHUNK: usize = 4096;

#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * INV_SQRT2))
}

/// `out[i] = gelu(inp[i])`.
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len(), "gelu_forward: shapes differ");
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (o, &x) in o.iter_mut().zip(i) {
            *o = gelu(x);
        }
    });
}

/// `dinp[i] += gelu'(inp[i]) * dout[i]`.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert!(dinp.len() == inp.len() && inp.len() == dout.len(), "gelu_backward: shapes differ");
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK))).for_each(|(d, (i, g))| {
        for ((d, &x), &g) in d.iter_mut().zip(i).zip(g) {
            let cdf = 0.5 * (1.0 + libm::erff(x * INV_SQRT2));
            let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
            *d += (cdf + x * pdf) * g;
        }
    });
}
