//! AdamW over the flat parameter buffer, with the learning-rate schedule of `transformers`'
//! `get_linear_schedule_with_warmup`: the update after `s` completed steps uses
//! `lr * s / warmup` during warmup, then `lr * (total - s) / (total - warmup)`.
//! Weight decay skips biases and layer-norm weights (the layout marks which), as the
//! `transformers` Trainer does.

use crate::layout::Layout;
use kernels::adamw::{adamw_update, AdamWParams};

/// AdamW's state: the moments (host buffers here; `cuda_ops::GpuAdamW` holds device ones), the
/// step count and the hyperparameters.
pub struct AdamW<B = Vec<f32>> {
    pub m: B,
    pub v: B,
    /// Completed steps.
    pub t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl<B> AdamW<B> {
    /// The arithmetic of a step at `lr` for a tensor with or without weight decay.
    pub fn tensor_params(&self, lr: f64, decay: bool) -> AdamWParams {
        AdamWParams {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: if decay { self.weight_decay } else { 0.0 },
        }
    }

    /// The same optimizer (step count, hyperparameters) over the moments `m` and `v`.
    pub fn with_moments<C>(&self, m: C, v: C) -> AdamW<C> {
        let AdamW { t, beta1, beta2, eps, weight_decay, .. } = *self;
        AdamW { m, v, t, beta1, beta2, eps, weight_decay }
    }
}

impl AdamW {
    pub fn new(n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW { m: vec![0.0; n], v: vec![0.0; n], t: 0, beta1, beta2, eps, weight_decay }
    }

    /// One step at learning rate `lr` over every tensor of `layout`.
    pub fn step(&mut self, layout: &Layout, params: &mut [f32], grads: &[f32], lr: f64) {
        self.step_shard(layout, params, grads, lr, 0..params.len());
    }

    /// One step at `lr` over `shard` of the flat buffers only, whose moments these are (ZeRO-1:
    /// each rank steps its own shard). AdamW is elementwise, so the shards' steps together are
    /// the whole step, bit for bit.
    pub fn step_shard(
        &mut self,
        layout: &Layout,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        shard: std::ops::Range<usize>,
    ) {
        assert_eq!(self.m.len(), shard.len(), "AdamW's moments are not those of shard {shard:?}");
        self.t += 1;
        for e in &layout.entries {
            let r = e.range();
            let r = r.start.max(shard.start)..r.end.min(shard.end);
            if r.is_empty() {
                continue;
            }
            let hp = self.tensor_params(lr, e.decay);
            let own = r.start - shard.start..r.end - shard.start;
            adamw_update(&mut params[r.clone()], &grads[r], &mut self.m[own.clone()], &mut self.v[own], &hp, self.t);
        }
    }

    /// The same optimizer over the moments of `shard` only.
    pub fn shard(&self, shard: std::ops::Range<usize>) -> AdamW {
        self.with_moments(self.m[shard.clone()].to_vec(), self.v[shard].to_vec())
    }
}

/// The learning rate of the update that follows `done` completed steps.
pub fn linear_schedule(base: f64, done: u64, warmup: u64, total: u64) -> f64 {
    if done < warmup {
        return base * done as f64 / warmup.max(1) as f64;
    }
    base * (total.saturating_sub(done) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::linear_schedule;

    #[test]
    fn schedule_matches_transformers() {
        // get_linear_schedule_with_warmup(opt, 2, 10): lambdas 0, .5, 1, 7/8, ..., 1/8, 0.
        let lrs: Vec<f64> = (0..11).map(|s| linear_schedule(1.0, s, 2, 10)).collect();
        assert_eq!(lrs, vec![0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]);
        assert_eq!(linear_schedule(2.0, 3, 0, 4), 0.5);
    }
}
