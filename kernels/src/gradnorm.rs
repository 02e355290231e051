//! The global L2 norm of all gradients and clipping by it, as
//! `torch.nn.utils.clip_grad_norm_(params, max_norm)`: `coef = max_norm / (norm + 1e-6)`,
//! and gradients are scaled by `coef` when it is below 1.
//!
//! The sum of squares is taken in f64 over fixed blocks, added in block order: deterministic, and
//! exact enough that the order of summation does not show in the f32 result. Each block sums in
//! 8 fixed lanes, so that it vectorizes with the same bits on every SIMD level.

use multiversion::multiversion;
use rayon::prelude::*;

const BLOCK: usize = 1 << 14;

/// `sqrt(sum_i g[i]^2)` over the whole flat gradient buffer.
pub fn global_norm(grads: &[f32]) -> f32 {
    sum_of_squares(grads).sqrt() as f32
}

/// `sum_i g[i]^2` in f64: the square of [`global_norm`], or one shard's share of it.
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    let partials: Vec<f64> = grads.par_chunks(BLOCK).map(squares_run).collect();
    partials.iter().sum::<f64>()
}

/// One block's sum of squares in 8 fixed f64 lanes (one AVX-512 register), added in lane order.
#[multiversion(targets = "simd")]
fn squares_run(block: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += f64::from(c[l]) * f64::from(c[l]);
        }
    }
    for (l, &g) in chunks.remainder().iter().enumerate() {
        acc[l] += f64::from(g) * f64::from(g);
    }
    acc.iter().sum()
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
