//! Softmax cross-entropy over logits, fused, with `ignore_index = -100` as in
//! `torch.nn.CrossEntropyLoss`: classification uses one target per example, masked LM one per
//! token with -100 on the tokens that carry no label.
//!
//! Forward writes the per-row loss `logsumexp(z) - z[target]` (0 for ignored rows) and returns
//! how many rows count; the mean loss is `sum(losses) / count`. Backward adds
//! `dloss_scale * (softmax(z) - onehot(target))` to `dlogits` for the counted rows, where the
//! caller passes `dloss_scale = 1 / count` for a mean.

use rayon::prelude::*;

/// Targets equal to this carry no loss and no gradient.
pub const IGNORE_INDEX: i64 = -100;

fn check(logits: &[f32], targets: &[i64], n: usize, v: usize) {
    assert_eq!(logits.len(), n * v, "crossentropy: logits must be [N, V]");
    assert_eq!(targets.len(), n, "crossentropy: targets must be [N]");
    for (i, &t) in targets.iter().enumerate() {
        assert!(t == IGNORE_INDEX || (0..v as i64).contains(&t), "crossentropy: target {t} of row {i} outside 0..{v}");
    }
}

fn row_max_lse(z: &[f32]) -> (f32, f32) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|&x| (x - max).exp()).sum();
    (max, sum.ln())
}

/// `losses: [N]`, `logits: [N, V]`, `targets: [N]`. Returns the number of counted rows.
pub fn crossentropy_forward(losses: &mut [f32], logits: &[f32], targets: &[i64], n: usize, v: usize) -> usize {
    check(logits, targets, n, v);
    assert_eq!(losses.len(), n, "crossentropy_forward: losses must be [N]");
    losses.par_iter_mut().zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each(|((l, z), &t)| {
        *l = if t == IGNORE_INDEX {
            0.0
        } else {
            let (max, lse) = row_max_lse(z);
            lse - (z[t as usize] - max)
        };
    });
    targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
}

/// `dlogits[i, :] = dloss_scale * (softmax(logits[i, :]) - onehot(targets[i]))`, 0 for ignored rows.
pub fn crossentropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[i64],
    dloss_scale: f32,
    n: usize,
    v: usize,
) {
    check(logits, targets, n, v);
    assert_eq!(dlogits.len(), n * v, "crossentropy_backward: dlogits must be [N, V]");
    dlogits.par_chunks_mut(v).zip(logits.par_chunks(v)).zip(targets.par_iter()).for_each(|((d, z), &t)| {
        if t == IGNORE_INDEX {
            d.fill(0.0);
            return;
        }
        let (max, lse) = row_max_lse(z);
        for (j, (d, &x)) in d.iter_mut().zip(z).enumerate() {
            let p = (x - max - lse).exp();
            let y = if j as i64 == t { 1.0 } else { 0.0 };
            *d = dloss_scale * (p - y);
        }
    });
}
