//! The model-level checks of `worker gpu-check` (scripts/gpu-check.sh), on a machine with a GPU:
//!
//! - [`training_parity`]: the same model, batches and dropout keys trained for a few steps on
//!   the CPU (`model::Bert` + `optim::AdamW`) and on the GPU (`GpuBert` + `GpuAdamW`); the
//!   gradients of the first step and every step's loss are compared.
//! - [`throughput`]: timed GPU training steps (forward, backward, clip, AdamW) of a preset's
//!   shapes, as tokens/s and model FLOPs utilization against a peak the caller gives.
//!
//! Built everywhere; nothing here has run on a GPU yet (see the README's GPU section).

use crate::bert_config::BertConfig;
use crate::checkpoint;
use crate::cuda_ops::{GpuAdamW, GpuBert};
use crate::engine::Peers;
use crate::layout::Head;
use crate::model::{Batch, DropoutCtx};
use crate::optim::AdamW;
use job::config::Precision;
use kernels::gpu::Gpu;
use std::sync::Arc;
use std::time::Instant;

/// (layers, hidden, heads, intermediate) of the presets.
pub fn preset(name: &str) -> anyhow::Result<(usize, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (2, 128, 2, 512),
        "minilm" => (6, 384, 12, 1536),
        "base" => (12, 768, 12, 3072),
        other => anyhow::bail!("unknown preset {other:?} (tiny, minilm, base)"),
    })
}

/// A BERT config of a preset's shapes (vocabulary 30522, dropout `p`).
pub fn preset_config(name: &str, p: f32) -> anyhow::Result<BertConfig> {
    let (layers, hidden, heads, inter) = preset(name)?;
    Ok(BertConfig::from_json_str(&format!(
        r#"{{"vocab_size": 30522, "hidden_size": {hidden}, "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "intermediate_size": {inter}, "max_position_embeddings": 512, "type_vocab_size": 2,
            "hidden_dropout_prob": {p}, "attention_probs_dropout_prob": {p}, "pad_token_id": 0}}"#
    ))?)
}

/// A classification batch of `b` examples padded to `t`, example k with `t - (k % 4) * t / 8`
/// real tokens (so padding and masking are exercised), tokens and labels varying with `step`.
pub fn batch(b: usize, t: usize, step: usize) -> Batch {
    let len = |k: usize| t - (k % 4) * t / 8;
    let mut input_ids = Vec::with_capacity(b * t);
    let mut attention_mask = Vec::with_capacity(b * t);
    for k in 0..b {
        for i in 0..t {
            let real = i < len(k);
            let id = if i == 0 { 101 } else { 1000 + ((k * 7919 + i * 104_729 + step * 15_485_863) % 20_000) as u32 };
            input_ids.push(if real { id } else { 0 });
            attention_mask.push(u8::from(real));
        }
    }
    Batch {
        b,
        t,
        input_ids,
        token_type_ids: (0..b * t).map(|i| u32::from(i % t >= t / 2)).collect(),
        attention_mask,
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: (0..b as u32).map(|k| k + (step * b) as u32).collect(),
        labels: (0..b).map(|k| ((k + step) % 2) as i64).collect(),
    }
}

/// What [`training_parity`] measured.
#[derive(Clone, Debug)]
pub struct TrainParity {
    pub preset: String,
    /// Per step: (CPU loss, GPU loss).
    pub losses: Vec<(f64, f64)>,
    /// max |g_gpu - g_cpu| / (|g_cpu| + rms(g_cpu)) over the whole gradient of the first step.
    pub grad_rel_error: f64,
    /// The largest relative loss difference over the steps.
    pub loss_rel_error: f64,
}

/// Trains a preset's model `steps` steps on CPU and GPU from the same initialisation.
pub fn training_parity(
    gpu: &Arc<Gpu>,
    name: &str,
    precision: job::config::Precision,
    steps: usize,
    b: usize,
    t: usize,
) -> anyhow::Result<TrainParity> {
    let cfg = preset_config(name, 0.1)?;
    let head = Head::Classification { num_labels: 2 };
    let mut cpu = checkpoint::init_model(cfg.clone(), head, 7);
    let mut dev = GpuBert::new(Arc::clone(gpu), cfg, cpu.layout.clone(), &cpu.params)?;
    dev.set_precision(precision)?;
    let (lr, wd) = (1e-4, 0.01);
    let mut opt = AdamW::new(cpu.layout.total, 0.9, 0.999, 1e-8, wd);
    let mut dopt = GpuAdamW::zeros(gpu, cpu.layout.total, 0.9, 0.999, 1e-8, wd)?;
    let (mut losses, mut grad_rel_error) = (Vec::new(), 0.0);
    for step in 0..steps {
        let bt = batch(b, t, step);
        let drop = Some(DropoutCtx { seed: 42, step: step as u32 });
        cpu.zero_grads()?;
        let out = cpu.forward(&bt, drop)?;
        cpu.backward(&bt, 1.0 / out.count as f32)?;
        let norm = kernels::gradnorm::global_norm(&cpu.grads);
        kernels::gradnorm::clip_grad_norm(&mut cpu.grads, norm, 1.0);
        dev.zero_grads()?;
        let dout = dev.forward(&bt, drop)?;
        dev.backward(&bt, 1.0 / dout.count as f32)?;
        dev.clip_grad_norm(1.0)?;
        if step == 0 {
            grad_rel_error = kernels::tolerance::rel_error(&dev.download_grads()?, &cpu.grads);
        }
        opt.step(&cpu.layout, &mut cpu.params, &cpu.grads, lr);
        dopt.step(&mut dev, lr)?;
        losses.push((out.loss_sum / out.count as f64, dout.loss_sum / dout.count as f64));
    }
    let loss_rel_error = losses
        .iter()
        .map(|(c, g)| if g.is_finite() { (g - c).abs() / c.abs().max(1e-12) } else { f64::INFINITY })
        .fold(0.0, f64::max);
    Ok(TrainParity { preset: name.into(), losses, grad_rel_error, loss_rel_error })
}

/// The distributed GPU step with a 1-rank NCCL communicator on its own stream (gradient
/// buckets copied out during backward, summed, copied back) against the same step without
/// one: a sum over one rank changes nothing, so after `steps` steps the parameters must be
/// equal bit for bit. Returns how many parameters differ.
pub fn nccl_step_parity(gpu: &Arc<Gpu>, steps: usize) -> anyhow::Result<usize> {
    let cfg = preset_config("tiny", 0.1)?;
    let t = job::config::TrainSection { seed: 3, ..Default::default() };
    let compute = crate::engine::Compute::Gpu(Arc::clone(gpu));
    let engine = |peers| {
        let model = checkpoint::init_model(cfg.clone(), Head::Classification { num_labels: 2 }, 11);
        let opt = AdamW::new(model.layout.total, 0.9, 0.999, 1e-8, 0.01);
        crate::engine::open(
            &compute,
            model,
            opt,
            crate::engine::Options { precision: Precision::Fp32, zero: false },
            peers,
        )
    };
    let watchdog = crate::watchdog::Watchdog::new(std::time::Duration::from_secs(60), crate::watchdog::abort_process());
    let ring = crate::nccl::NcclRing::connect(gpu.ctx.new_stream()?, 0, 1, &crate::nccl::new_id()?, watchdog)?;
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut plain, mut synced) = (engine(Peers::Alone)?, engine(Peers::Nccl(ring, cancel))?);
    for step in 0..steps {
        // Two micro-batches: the buckets go out on the last one only.
        let micro = [batch(4, 32, 2 * step), batch(4, 32, 2 * step + 1)];
        crate::train::optimizer_step(&mut *plain, &micro, 8, &t, step as u64, 1e-3)?;
        crate::train::optimizer_step(&mut *synced, &micro, 8, &t, step as u64, 1e-3)?;
    }
    let (a, b) = (&plain.host_params()?.params.clone(), &synced.host_params()?.params);
    Ok(a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count())
}

/// What [`throughput`] measured.
#[derive(Clone, Debug)]
pub struct Throughput {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per step: 6 x parameters x tokens (forward + backward of the dense layers)
    /// plus the attention products, 12 x layers x B x T^2 x hidden.
    pub flops_per_step: f64,
    pub mfu: f64,
}

/// Times `steps` GPU training steps (after 2 warm-up steps) of a preset at batch `b`, length `t`.
pub fn throughput(
    gpu: &Arc<Gpu>,
    name: &str,
    precision: job::config::Precision,
    b: usize,
    t: usize,
    steps: usize,
    peak_flops: f64,
) -> anyhow::Result<Throughput> {
    let cfg = preset_config(name, 0.1)?;
    let (layers, hidden) = (cfg.num_hidden_layers, cfg.hidden_size);
    let cpu = checkpoint::init_model(cfg.clone(), Head::Classification { num_labels: 2 }, 3);
    let n_params = cpu.layout.total;
    let mut dev = GpuBert::new(Arc::clone(gpu), cfg, cpu.layout.clone(), &cpu.params)?;
    dev.set_precision(precision)?;
    drop(cpu);
    let mut opt = GpuAdamW::zeros(gpu, n_params, 0.9, 0.999, 1e-8, 0.01)?;
    let bt = batch(b, t, 0);
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        gpu.stream.synchronize()?;
        let start = Instant::now();
        dev.zero_grads()?;
        let out = dev.forward(&bt, Some(DropoutCtx { seed: 1, step: step as u32 }))?;
        dev.backward(&bt, 1.0 / out.count as f32)?;
        dev.clip_grad_norm(1.0)?;
        opt.step(&mut dev, 1e-5)?;
        gpu.stream.synchronize()?;
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let step_s = times[times.len() / 2];
    let tokens = (b * t) as f64;
    let flops_per_step = 6.0 * n_params as f64 * tokens + 12.0 * (layers * b * t * t * hidden) as f64;
    Ok(Throughput {
        preset: name.into(),
        batch: b,
        seq: t,
        step_s,
        tokens_per_s: tokens / step_s,
        flops_per_step,
        mfu: flops_per_step / step_s / peak_flops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_batches_are_valid_and_padded() {
        let b = batch(8, 32, 3);
        assert_eq!(b.input_ids.len(), 8 * 32);
        assert!(b.attention_mask.contains(&0), "some padding");
        assert!(b.input_ids.iter().all(|&id| id < 30522));
        let mut m =
            checkpoint::init_model(preset_config("tiny", 0.1).unwrap(), Head::Classification { num_labels: 2 }, 1);
        let out = m.forward(&b, Some(DropoutCtx { seed: 1, step: 0 })).unwrap();
        assert_eq!(out.count, 8);
        assert!(out.loss_sum.is_finite());
    }
}
