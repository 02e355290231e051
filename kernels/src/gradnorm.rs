//! The global L2 norm of all gradients and clipping by it, as
//! `torch.nn.utils.clip_grad_norm_(params, max_norm)`: `coef = max_norm / (norm + 1e-6)`,
//! and gradients are scaled by `coef` when it is below 1.
//!
//! The sum of squares is taken in f64 over fixed blocks, added in block order: deterministic, and
//! exact enough that the order of summation does not show in the f32 result.

use rayon::prelude::*;

const BLOCK: usize = 1 << 14;

/// `sqrt(sum_i g[i]^2)` over the whole flat gradient buffer.
pub fn global_norm(grads: &[f32]) -> f32 {
    sum_of_squares(grads).sqrt() as f32
}

/// `sum_i g[i]^2` in f64: the square of [`global_norm`], or one shard's share of it.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    let partials: Vec<f64> =
        grads.par_chunks(BLOCK).map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>()).collect();
    partials.iter().sum::<f64>()
}

/// Scales `grads` so that their global norm is at most `max_norm`, given `norm` from
/// [`global_norm`]. Returns the factor applied (1 when nothing was clipped).
pub fn clip_grad_norm(grads: &mut [f32], norm: f32, max_norm: f32) -> f32 {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads.par_chunks_mut(BLOCK).for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
        coef
    } else {
        1.0
    }
}
