//! AdamW, computed exactly as `torch.optim.AdamW` (single-tensor path, `amsgrad=False`,
//! `maximize=False`) computes it, element by element:
//!
//! ```text
//! p  = p * (1 - lr * weight_decay)                     decoupled weight decay
//! m  = m + (1 - beta1) * (g - m)                       torch's lerp_(g, 1 - beta1)
//! v  = v * beta2 + (1 - beta2) * g * g
//! p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! The scalar factors are formed in f64, as Python floats are in torch, then rounded to f32.
//! `t` is the 1-based step count after increment.

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

const CHUNK: usize = 4096;

/// One AdamW step over a flat range: `params`, `grads`, `m`, `v` all of the same length. `t >= 1`.
pub fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWParams, t: u64) {
    let len = params.len();
    assert!(grads.len() == len && m.len() == len && v.len() == len, "adamw_update: buffers differ in length");
    assert!(t >= 1, "adamw_update: step count starts at 1");
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let one_minus_b1 = (1.0 - hp.beta1) as f32;
    let b2 = hp.beta2 as f32;
    let one_minus_b2 = (1.0 - hp.beta2) as f32;
    let bias_c1 = 1.0 - hp.beta1.powi(t as i32);
    let bias_c2 = 1.0 - hp.beta2.powi(t as i32);
    let step_size = (hp.lr / bias_c1) as f32;
    let bias_c2_sqrt = bias_c2.sqrt() as f32;
    let eps = hp.eps as f32;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i];
                if hp.weight_decay != 0.0 {
                    p[i] *= decay;
                }
                m[i] += one_minus_b1 * (gi - m[i]);
                v[i] = v[i] * b2 + one_minus_b2 * gi * gi;
                let denom = v[i].sqrt() / bias_c2_sqrt + eps;
                p[i] += -step_size * (m[i] / denom);
            }
        });
}
