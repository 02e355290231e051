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

use multiversion::multiversion;
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
    let f = Factors {
        decay: (hp.weight_decay != 0.0).then_some(decay),
        one_minus_b1,
        b2,
        one_minus_b2,
        step_size,
        bias_c2_sqrt,
        eps,
    };
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| update_run(p, g, m, v, f));
}

/// The step's f32 factors.
#[derive(Clone, Copy)]
struct Factors {
    decay: Option<f32>,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    bias_c2_sqrt: f32,
    eps: f32,
}

/// The update on one run of elements, compiled for each SIMD level (the same bits on each).
#[multiversion(targets = "simd")]
fn update_run(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], f: Factors) {
    if let Some(decay) = f.decay {
        p.iter_mut().for_each(|p| *p *= decay);
    }
    for (((p, &gi), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m += f.one_minus_b1 * (gi - *m);
        *v = *v * f.b2 + f.one_minus_b2 * gi * gi;
        let denom = v.sqrt() / f.bias_c2_sqrt + f.eps;
        *p += -f.step_size * (*m / denom);
    }
}
