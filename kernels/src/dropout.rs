//! Dropout whose mask is a pure function of (seed, step, example, element).
//!
//! An element is numbered as if in a `[B, H, T, W]` tensor: B examples, each an `[H, T, W]` block
//! (hidden states are `[1, T, C]`; attention probabilities are `[NH, T, T]`, drawn by
//! [`crate::attention`]). Element `(b, h, t, w)` draws from the
//! Philox counter `(idx / 4, example_ids[b], step, site)` under the key `seed`, and uses word
//! `idx % 4` of the output, where `idx = (h * t_max + t) * w_max + w` is the element's *logical*
//! index. `t_max`/`w_max` are fixed extents (the model's maximum positions, or the hidden size),
//! so an example's mask does not depend on how far its batch was padded, which worker holds it, or
//! which micro-batch it sits in. The element is kept when its uniform draw `u >= p` and is then
//! scaled by `1 / (1 - p)` (inverted dropout, as `torch.nn.Dropout`).
//!
//! Backward multiplies the incoming gradient by the very same mask, regenerated rather than
//! stored, so forward and backward are one function.

use crate::seqs::{blocks_mut, Seqs};
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

/// Applies the mask in place: forward on activations, backward on their gradients (the same
/// mask). `x`: `[N, W]` rows, grouped into `seqs`; row `r` of sequence `s` is column
/// `cols[s] + r - cu[s]` of its batch row, so element `w` of it draws at logical index
/// `column * w_max + w` under `example_ids[s]` (a padded batch: `B` sequences of `T`).
pub fn dropout_forward(x: &mut [f32], seqs: Seqs<'_>, w: usize, logical: LogicalDims, spec: &DropoutSpec) {
    seqs.check();
    assert_eq!(x.len(), seqs.tokens() * w, "dropout: x must be [N, W]");
    assert!(w <= logical.w_max, "dropout: width exceeds the logical extent");
    assert!((0.0..1.0).contains(&spec.p), "dropout: p must be in [0, 1)");
    if spec.p == 0.0 {
        return;
    }
    let sizes = (0..seqs.count()).map(|s| seqs.len(s) * w);
    blocks_mut(x, sizes).into_par_iter().enumerate().for_each(|(s, xs)| {
        assert!(seqs.cols[s] + seqs.len(s) <= logical.t_max, "dropout: a row exceeds the logical extent");
        for (t, row) in xs.chunks_mut(w).enumerate() {
            let base = ((seqs.cols[s] + t) * logical.w_max) as u64;
            mask_run(spec, seqs.example_ids[s], base, w, |wi, m| row[wi] *= m);
        }
    });
}

/// Backward of [`dropout_forward`]: `dx` is multiplied in place by the same mask. Unlike the
/// other ops this does not accumulate: the gradient flowing through dropout is rescaled where it
/// stands.
pub fn dropout_backward(dx: &mut [f32], seqs: Seqs<'_>, w: usize, logical: LogicalDims, spec: &DropoutSpec) {
    dropout_forward(dx, seqs, w, logical, spec);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seqs::SeqsBuf;

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
        let seqs = SeqsBuf::regular(64, &[0, 1, 2, 3]);
        dropout_forward(&mut x, seqs.view(), 96, LogicalDims { t_max: 512, w_max: 96 }, &spec);
        let dropped = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped fraction {dropped}");
        assert!(x.iter().all(|&v| v == 0.0 || v == 1.0 / 0.9));
    }

    #[test]
    fn mask_does_not_depend_on_padding_packing_or_batch_position() {
        let spec = DropoutSpec { p: 0.5, seed: 9, step: 11, site: 2 };
        let (w, logical) = (5, LogicalDims { t_max: 16, w_max: 8 });
        // Example 5 alone, padded to 6 positions...
        let mut alone = vec![1.0f32; 6 * w];
        dropout_forward(&mut alone, SeqsBuf::regular(6, &[5]).view(), w, logical, &spec);
        // ...second in a batch padded to 9 positions...
        let mut batch = vec![1.0f32; 2 * 9 * w];
        dropout_forward(&mut batch, SeqsBuf::regular(9, &[4, 5]).view(), w, logical, &spec);
        assert_eq!(alone, batch[9 * w..15 * w]);
        // ...its 4 real tokens unpadded, after a 3-token example...
        let seqs = SeqsBuf { cu: vec![0, 3, 7], cols: vec![0, 0], example_ids: vec![4, 5] };
        let mut unpadded = vec![1.0f32; 7 * w];
        dropout_forward(&mut unpadded, seqs.view(), w, logical, &spec);
        assert_eq!(unpadded[3 * w..], alone[..4 * w]);
        // ...and as the second document of a packed row, from column 2: that row's columns.
        let seqs = SeqsBuf { cu: vec![0, 2, 6], cols: vec![0, 2], example_ids: vec![5, 5] };
        let mut packed = vec![1.0f32; 6 * w];
        dropout_forward(&mut packed, seqs.view(), w, logical, &spec);
        assert_eq!(packed, alone);
        // A different step or site gives a different mask.
        let mut other = vec![1.0f32; 6 * w];
        dropout_forward(&mut other, SeqsBuf::regular(6, &[5]).view(), w, logical, &DropoutSpec { step: 12, ..spec });
        assert_ne!(alone, other);
    }
}
