//! Single-process fine-tuning of a sequence classifier (`worker train`), top to bottom:
//! read data, tokenize, load the checkpoint, then for each step: shuffle-ordered batch, forward,
//! backward, global-norm clip, schedule, AdamW, log; evaluate on dev; save; test.

use crate::checkpoint;
use crate::engine::{self, Device, Engine, Peers};
use crate::layout::Head;
use crate::model::{Batch, DropoutCtx};
use crate::optim::{linear_schedule, schedule_steps, AdamW};
use crate::tokenize::{collate, Encoded, TextEncoder};
use anyhow::Context;
use job::config::{JobConfig, TrainSection};
use job::data::{self, Record};
use job::eval::{EvalCounts, EvalMetrics};
use job::progress::{StepRecord, Summary};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tokenized, labelled split.
pub struct Split {
    pub path: PathBuf,
    pub examples: Vec<Encoded>,
    pub labels: Vec<i64>,
}

/// The batch of the examples at `positions` of `split`; `index` gives each one's dataset index.
pub fn batch_of(split: &Split, positions: &[usize], index: impl Fn(usize) -> u32, pad_id: u32) -> Batch {
    let exs: Vec<&Encoded> = positions.iter().map(|&i| &split.examples[i]).collect();
    let ys: Vec<i64> = positions.iter().map(|&i| split.labels[i]).collect();
    let ids: Vec<u32> = positions.iter().map(|&i| index(i)).collect();
    collate(&exs, &ids, &ys, pad_id)
}

/// What one optimizer step did, over all ranks.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Sum of the per-example losses of the global batch.
    pub loss_sum: f64,
    pub grad_norm: f32,
    /// Real (unpadded) tokens of the global batch.
    pub tokens: usize,
    /// Time spent in gradient all-reduces (on the all-reduce thread, mostly hidden behind
    /// backward), and the part of it the step waited for after backward.
    pub allreduce: Duration,
    pub allreduce_wait: Duration,
}

/// One optimizer step, as single-process and distributed training both run it, on any engine:
/// forward and backward over this rank's micro-batches, each backward scaled by
/// `1 / global_count` so that the summed gradient is that of the mean loss over the global
/// batch. With other ranks, the last micro-batch's backward starts each finished segment's
/// all-reduce as it goes (earlier micro-batches only accumulate), the step waits for the sums,
/// then sums the loss and token counts, so that every rank reports the loss of the global batch.
/// Then clipping by the global norm, after the all-reduce, and AdamW at `lr`.
pub fn optimizer_step(
    engine: &mut dyn Engine,
    micro_batches: &[Batch],
    global_count: usize,
    t: &TrainSection,
    step: u64,
    lr: f64,
) -> anyhow::Result<StepReport> {
    engine.zero_grads()?;
    let (mut loss_sum, mut tokens) = (0.0, 0);
    for (i, batch) in micro_batches.iter().enumerate() {
        let out = engine.forward(batch, Some(DropoutCtx { seed: t.seed, step: step as u32 }))?;
        engine.backward(batch, 1.0 / global_count as f32, i + 1 == micro_batches.len())?;
        loss_sum += out.loss_sum;
        tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
    }
    let mut sums = engine::SumTimes::default();
    if engine.has_peers() {
        sums = engine.finish_sums()?;
        let mut values = [loss_sum as f32, tokens as f32];
        engine.sum_values(&mut values)?;
        (loss_sum, tokens) = (f64::from(values[0]), values[1] as usize);
    }
    let grad_norm = engine.clip_grad_norm(t.max_grad_norm as f32)?;
    engine.optimizer_step(lr)?;
    Ok(StepReport { loss_sum, grad_norm, tokens, allreduce: sums.busy, allreduce_wait: sums.waited })
}

/// Tokenizes a labelled split.
pub fn tokenize_split(path: &Path, records: &[Record], enc: &TextEncoder) -> anyhow::Result<Split> {
    let texts: Vec<(&str, Option<&str>)> = records.iter().map(|r| (r.text.as_str(), r.text_pair.as_deref())).collect();
    let examples = enc.encode_all(&texts).with_context(|| format!("tokenizing {}", path.display()))?;
    Ok(Split { path: path.to_owned(), examples, labels: records.iter().map(|r| r.label).collect() })
}

/// Evaluates without dropout: mean loss, accuracy and macro-F1 over the whole split.
pub fn evaluate(engine: &mut dyn Engine, split: &Split, batch_size: usize, pad_id: u32) -> anyhow::Result<EvalMetrics> {
    Ok(count_split(engine, split, batch_size, pad_id)?.metrics())
}

/// The evaluation counts of a split (or of one worker's shard of it).
pub fn count_split(
    engine: &mut dyn Engine,
    split: &Split,
    batch_size: usize,
    pad_id: u32,
) -> anyhow::Result<EvalCounts> {
    let classes = match engine.model().layout.head {
        Head::Classification { num_labels } => num_labels,
        Head::MaskedLm => anyhow::bail!("evaluation needs a classification head"),
    };
    count_batches(split, batch_size, pad_id, classes, |batch| {
        engine.forward(batch, None)?;
        engine.outputs()
    })
}

/// Runs `forward` (giving each batch's logits `[B, classes]` and per-example losses) over the
/// split in batches without dropout, and counts predictions against the labels.
fn count_batches(
    split: &Split,
    batch_size: usize,
    pad_id: u32,
    classes: usize,
    mut forward: impl FnMut(&Batch) -> anyhow::Result<(Vec<f32>, Vec<f32>)>,
) -> anyhow::Result<EvalCounts> {
    let mut counts = EvalCounts::new(classes);
    for (chunk_i, idx) in (0..split.examples.len()).collect::<Vec<_>>().chunks(batch_size).enumerate() {
        let batch = batch_of(split, idx, |i| i as u32, pad_id);
        let (logits, losses) = forward(&batch).with_context(|| format!("evaluating batch {chunk_i}"))?;
        for ((row, &y), &loss) in logits.chunks(classes).zip(&batch.labels).zip(&losses) {
            counts.add(y as usize, argmax(row), f64::from(loss));
        }
    }
    Ok(counts)
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Runs the whole job on `device`; `progress` draws a progress bar on stderr.
pub fn run(job: &JobConfig, progress: bool, device: Device) -> anyhow::Result<Summary> {
    let t = &job.train;
    let enc = TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?;
    let data = data::load(job)?;
    let labels = data.labels.clone();
    let train = tokenize_split(&job.data.train, &data.train, &enc)?;
    let dev = match (&job.data.dev, &data.dev) {
        (Some(p), Some(r)) => Some(tokenize_split(p, r, &enc)?),
        _ => None,
    };
    let test = match (&job.data.test, &data.test) {
        (Some(p), Some(r)) => Some(tokenize_split(p, r, &enc)?),
        _ => None,
    };
    tracing::info!(
        train = train.examples.len(),
        dev = dev.as_ref().map(|s| s.examples.len()),
        test = test.as_ref().map(|s| s.examples.len()),
        labels = ?labels.names,
        "data loaded"
    );

    let head = Head::Classification { num_labels: labels.names.len() };
    let (mut model, report) = checkpoint::load(&job.model.path, head, t.seed)
        .with_context(|| format!("loading checkpoint {}", job.model.path.display()))?;
    tracing::info!(initialized = ?report.initialized, skipped = ?report.skipped, params = model.layout.total, "checkpoint loaded");
    if !t.dropout {
        model.cfg.disable_dropout();
    }

    let n = train.examples.len();
    let per_epoch = n.div_ceil(t.batch_size) as u64;
    let (total, warmup) = schedule_steps(per_epoch, t);
    let micro = if t.micro_batch_size == 0 { t.batch_size } else { t.micro_batch_size };
    let opt = AdamW::new(model.layout.total, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay);
    let mut engine = engine::open(&device.open()?, model, opt, t.precision, Peers::Alone)?;
    let engine = &mut *engine;

    let bar = if progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    std::fs::create_dir_all(&job.output.dir).with_context(|| format!("creating {}", job.output.dir.display()))?;
    let loss_log_path = job.output.dir.join("loss.jsonl");
    let mut loss_log =
        std::fs::File::create(&loss_log_path).with_context(|| format!("creating {}", loss_log_path.display()))?;
    let started = Instant::now();
    let (mut step, mut tokens, mut ema_loss) = (0u64, 0usize, f64::NAN);
    let mut last_dev = None;
    'epochs: for epoch in 0.. {
        let order = philox::permutation(n, t.seed, epoch);
        for idx in order.chunks(t.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let step_started = Instant::now();
            let lr = linear_schedule(t.lr, step, warmup, total);
            let batches: Vec<Batch> =
                idx.chunks(micro).map(|m| batch_of(&train, m, |i| i as u32, enc.pad_id)).collect();
            let r = optimizer_step(engine, &batches, idx.len(), t, step, lr)?;
            let (loss_sum, norm) = (r.loss_sum, r.grad_norm);
            tokens += r.tokens;
            step += 1;
            let loss = loss_sum / idx.len() as f64;
            let rec = StepRecord {
                step,
                epoch,
                loss,
                lr,
                grad_norm: f64::from(norm),
                tokens: r.tokens as u64,
                allreduce_s: 0.0,
                allreduce_wait_s: 0.0,
                data_wait_s: 0.0,
                step_s: step_started.elapsed().as_secs_f64(),
                time_s: started.elapsed().as_secs_f64(),
            };
            writeln!(loss_log, "{}", serde_json::to_string(&rec)?)
                .with_context(|| format!("writing {}", loss_log_path.display()))?;
            ema_loss = if ema_loss.is_nan() { loss } else { 0.95 * ema_loss + 0.05 * loss };
            let tps = tokens as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!("epoch {epoch}  loss {ema_loss:.4}  lr {lr:.2e}  |g| {norm:.2}  {tps:.0} tok/s"));
            bar.inc(1);
            if bar.is_hidden() && (step % 50 == 0 || step == total) {
                tracing::info!(step, epoch, loss = ema_loss, lr, grad_norm = norm, tokens_per_s = tps as u64, "train");
            }
            let end_of_epoch = step % per_epoch == 0;
            let due = if t.eval_every > 0 { step % t.eval_every == 0 } else { end_of_epoch };
            if let (true, Some(d)) = (due || step == total, dev.as_ref()) {
                let m = evaluate(engine, d, t.eval_batch_size, enc.pad_id)?;
                let line = format!(
                    "step {step}: dev loss {:.4}  accuracy {:.4}  macro-F1 {:.4}  ({} examples)",
                    m.loss, m.accuracy, m.macro_f1, m.examples
                );
                // A hidden bar (no terminal, or --no-progress) drops its println.
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
                last_dev = Some(m);
            }
        }
        if n == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();

    let model_dir = job.output.dir.join("model");
    let (model, _) = engine.host()?;
    checkpoint::save(model, &model_dir, Some(&labels.names), job.tokenizer_path().parent())
        .with_context(|| format!("saving the model to {}", model_dir.display()))?;
    let test_metrics = test.as_ref().map(|s| evaluate(engine, s, t.eval_batch_size, enc.pad_id)).transpose()?;
    let summary = Summary {
        steps: step,
        final_train_loss: ema_loss,
        dev: last_dev,
        test: test_metrics,
        model_dir,
        train_seconds,
        tokens_per_second: tokens as f64 / train_seconds,
    };
    summary.write(&job.output.dir)?;
    Ok(summary)
}
