//! Dropout whose mask is a pure function of (seed, step, example, element).
//!
//! `x` is viewed as `[B, H, T, W]`: B examples, each an `[H, T, W]` block (hidden states are
//! `[1, T, C]`; attention probabilities are `[NH, T, T]`). Element `(b, h, t, w)` draws from the
//! Philox counter `(idx / 4, example_ids[b], step, site)` under the key `seed`, and uses word
//! `idx % 4` of the output, where `idx = (h * t_max + t) * w_max + w` is the element's *logical*
//! index. `t_max`/`w_max` are fixed extents (the model's maximum positions, or the hidden size),
//! so an example's mask does not depend on how far its batch was padded, which worker holds it, or
//! which micro-batch it sits in. The element is kept when its uniform draw `u >= p` and is then
//! scaled by `1 / (1 - p)` (inverted dropout, as `torch.nn.Dropout`).
//!
//! Backward multiplies the incoming gradient by the very same mask, regenerated rather than
//! stored, so forward and backward are one function.

use philox::{key_from_seed, philox4x32_10, u32_to_unit_f32};
use rayon::prelude::*;

/// Where a dropout mask comes from. `site` separates the dropout layers of one network.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutSpec {
    pub p: f32,
    pub seed: u64,
    pub step: u32,
    pub site: u32,
}

/// The logical extents used to number elements; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogicalDims {
    pub t_max: usize,
    pub w_max: usize,
}

/// The multiplier (0 or `1/(1-p)`) that dropout applies to one element.
#[inline]
pub fn mask_value(spec: &DropoutSpec, example: u32, idx: u64) -> f32 {
    let r = philox4x32_10([(idx >> 2) as u32, example, spec.step, spec.site], key_from_seed(spec.seed));
    let u = u32_to_unit_f32(r[(idx & 3) as usize]);
    if u >= spec.p {
        1.0 / (1.0 - spec.p)
    } else {
        0.0
    }
}

/// Calls `f(j, multiplier)` for the run of elements `base..base + n` of one example (a row):
/// the multipliers of [`mask_value`], drawing each block of four from Philox once.
#[inline]
pub fn mask_run(spec: &DropoutSpec, example: u32, base: u64, n: usize, mut f: impl FnMut(usize, f32)) {
    let key = key_from_seed(spec.seed);
    let keep = 1.0 / (1.0 - spec.p);
    let mut j = 0;
    while j < n {
        let idx = base + j as u64;
        let r = philox4x32_10([(idx >> 2) as u32, example, spec.step, spec.site], key);
        for &word in &r[(idx & 3) as usize..] {
            if j == n {
                break;
            }
            f(j, if u32_to_unit_f32(word) >= spec.p { keep } else { 0.0 });
            j += 1;
        }
    }
}

/// Applies the mask in place: forward on activations, backward on their gradients.
/// `x`: `[B, H, T, W]`, `example_ids`: `[B]`.
pub fn dropout_forward(
    x: &mut [f32],
    example_ids: &[u32],
    h: usize,
    t: usize,
    w: usize,
    logical: LogicalDims,
    spec: &DropoutSpec,
) {
    let b = example_ids.len();
    assert_eq!(x.len(), b * h * t * w, "dropout: x must be [B, H, T, W]");
    assert!(t <= logical.t_max && w <= logical.w_max, "dropout: dims exceed logical extents");
    assert!((0.0..1.0).contains(&spec.p), "dropout: p must be in [0, 1)");
    if spec.p == 0.0 {
        return;
    }
    x.par_chunks_mut(w).enumerate().for_each(|(row, xs)| {
        let bi = row / (h * t);
        let hi = (row / t) % h;
        let ti = row % t;
        let base = ((hi * logical.t_max + ti) * logical.w_max) as u64;
        mask_run(spec, example_ids[bi], base, xs.len(), |wi, m| xs[wi] *= m);
    });
}

/// Backward of [`dropout_forward`]: `dx` is multiplied in place by the same mask. Unlike the
/// other ops this does not accumulate: the gradient flowing through dropout is rescaled where it
/// stands.
pub fn dropout_backward(
    dx: &mut [f32],
    example_ids: &[u32],
    h: usize,
    t: usize,
    w: usize,
    logical: LogicalDims,
    spec: &DropoutSpec,
) {
    dropout_forward(dx, example_ids, h, t, w, logical, spec);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_draws_the_masks_of_its_elements() {
        let spec = DropoutSpec { p: 0.3, seed: 7, step: 2, site: 5 };
        for (base, n) in [(0u64, 13usize), (1, 1), (2, 9), (3, 4), (1021, 70), (4, 0)] {
            let mut got = vec![f32::NAN; n];
            mask_run(&spec, 11, base, n, |j, m| got[j] = m);
            let want: Vec<f32> = (0..n as u64).map(|j| mask_value(&spec, 11, base + j)).collect();
            assert_eq!(got, want, "base {base}, n {n}");
        }
    }

    #[test]
    fn rate_and_scale() {
        let spec = DropoutSpec { p: 0.1, seed: 42, step: 3, site: 1 };
        let mut x = vec![1.0f32; 4 * 64 * 96];
        let ids: Vec<u32> = (0..4).collect();
        dropout_forward(&mut x, &ids, 1, 64, 96, LogicalDims { t_max: 512, w_max: 96 }, &spec);
        let dropped = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped fraction {dropped}");
        assert!(x.iter().all(|&v| v == 0.0 || v == 1.0 / 0.9));
    }

    #[test]
    fn mask_does_not_depend_on_padding_or_batch_position() {
        let spec = DropoutSpec { p: 0.5, seed: 9, step: 11, site: 2 };
        let logical = LogicalDims { t_max: 16, w_max: 16 };
        // Example 5 alone, padded to 6 positions, in [NH=2, T, T] attention layout...
        let (nh, t_short, t_long) = (2, 6, 9);
        let mut alone = vec![1.0f32; nh * t_short * t_short];
        dropout_forward(&mut alone, &[5], nh, t_short, t_short, logical, &spec);
        // ...and second in a batch padded to 9 positions.
        let mut batch = vec![1.0f32; 2 * nh * t_long * t_long];
        dropout_forward(&mut batch, &[4, 5], nh, t_long, t_long, logical, &spec);
        for h in 0..nh {
            for i in 0..t_short {
                for j in 0..t_short {
                    let a = alone[(h * t_short + i) * t_short + j];
                    let b = batch[((nh + h) * t_long + i) * t_long + j];
                    assert_eq!(a, b, "h {h} i {i} j {j}");
                }
            }
        }
        // A different step or site gives a different mask.
        let mut other = vec![1.0f32; nh * t_short * t_short];
        dropout_forward(&mut other, &[5], nh, t_short, t_short, logical, &DropoutSpec { step: 12, ..spec });
        assert_ne!(alone, other);
    }
}
