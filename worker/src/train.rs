//! The training loop, once: [`run`] trains `worker train` (a world of one whose I/O is local
//! files, see `local`) and every rank of a distributed job (whose I/O is the coordinator, see
//! `distributed`). Top to bottom: the schedule, the model and the resume point, the steps (each
//! a shuffle-ordered batch, forward, backward, gradient sum, global-norm clip, schedule, AdamW,
//! a progress record), the evaluations and checkpoints when due, and at the end the final
//! evaluations and checkpoint. Where the data, the counts, the checkpoints and the progress go
//! is the [`JobIo`] seam; where the model computes is the [`Engine`] seam.
//!
//! Everything a step depends on is a function of the step number and the restored tensors: the
//! data cursor (epoch, position) of step `s` is `(s / per_epoch, (s % per_epoch) * local_batch)`,
//! the learning rate is the schedule at `s`, the dropout masks are keyed by `(seed, s, example)`.
//! That is why a resumed run continues bit for bit.

use crate::checkpoint;
use crate::engine::{self, Compute, Engine, Peers};
use crate::layout::Head;
use crate::model::{Batch, DropoutCtx};
use crate::optim::{linear_schedule, AdamW};
use crate::tokenize::{collate, collate_rows, Encoded, TextEncoder};
use anyhow::Context;
use job::checkpoints::Cursor;
use job::config::{JobConfig, Task, TrainSection};
use job::data::Record;
pub use job::eval::EvalSplit;
use job::eval::{Counts, EvalCounts, EvalMetrics, MlmCounts};
use job::mlm::MaskSpec;
use job::pack::Row;
use job::progress::StepRecord;
pub use job::schedule::{CheckpointAt, Schedule};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A split of examples, tokenized (an evaluation split, or a worker's shard of one).
pub struct Split {
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

/// What the model reads of one example: a labelled text (fine-tuning), or a packed row of a
/// corpus (pretraining; masked when it is batched).
#[derive(Clone, Debug)]
pub enum Item {
    Text { encoded: Encoded, label: i64 },
    Row(Row),
}

/// One example as the job's I/O delivers it.
#[derive(Clone, Debug)]
pub struct Example {
    /// Its index in the dataset (the row's in the corpus): it keys the dropout masks and a
    /// row's masked-LM masks.
    pub index: u32,
    pub item: Item,
}

/// The batch of `examples`: texts padded to the longest; rows masked for epoch `epoch` by
/// `mask` (the masks a pure function of the row's index and the epoch), then padded.
pub fn collate_examples(examples: &[Example], epoch: u32, mask: Option<&MaskSpec>, pad_id: u32) -> Batch {
    let ids: Vec<u32> = examples.iter().map(|e| e.index).collect();
    let (mut texts, mut labels, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        match &e.item {
            Item::Text { encoded, label } => {
                texts.push(encoded);
                labels.push(*label);
            }
            Item::Row(r) => rows.push(r),
        }
    }
    if rows.is_empty() {
        return collate(&texts, &ids, &labels, pad_id);
    }
    assert!(texts.is_empty(), "a batch of texts and rows");
    let spec = mask.expect("rows are batched with a mask spec");
    let masked: Vec<_> = rows
        .iter()
        .zip(&ids)
        .map(|(r, &i)| job::mlm::mask_row(spec, epoch, u64::from(i), &r.ids, &r.special, &r.word_start))
        .collect();
    collate_rows(&rows, &masked, &ids, pad_id)
}

/// Row `r` of a corpus, ready for the model.
pub fn row_example(rows: &job::pack::CorpusRows, r: u64, enc: &TextEncoder) -> anyhow::Result<Example> {
    let segments = rows.segments(r);
    let row = enc.row(segments.iter().map(|(ids, words)| (&ids[..], &words[..])))?;
    Ok(Example { index: u32::try_from(r).context("more than 2^32 rows")?, item: Item::Row(row) })
}

/// The masking of a pretraining job (`None` for fine-tuning): the `[MASK]` id of `enc`, random
/// replacements from its whole vocabulary (as `DataCollatorForLanguageModeling` draws them).
pub fn mask_spec(job: &JobConfig, enc: &TextEncoder) -> anyhow::Result<Option<MaskSpec>> {
    if job.train.task != Task::Mlm {
        return Ok(None);
    }
    let m = &job.mlm;
    Ok(Some(MaskSpec {
        prob: m.mask_prob as f32,
        mask_id: enc.special("[MASK]")?,
        vocab: enc.vocab_size() as u32,
        whole_word: m.whole_word,
        seed: job.train.seed,
    }))
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
    /// This rank's time in forward passes, in backward passes, and in clipping and AdamW.
    pub forward: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
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
    let (mut forward, mut backward) = (Duration::ZERO, Duration::ZERO);
    for (i, batch) in micro_batches.iter().enumerate() {
        let started = Instant::now();
        let out = engine.forward(batch, Some(DropoutCtx { seed: t.seed, step: step as u32 }))?;
        forward += started.elapsed();
        let started = Instant::now();
        engine.backward(batch, 1.0 / global_count as f32, i + 1 == micro_batches.len())?;
        backward += started.elapsed();
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
    let started = Instant::now();
    let grad_norm = engine.clip_grad_norm(t.max_grad_norm as f32)?;
    engine.optimizer_step(lr)?;
    let optimizer = started.elapsed();
    Ok(StepReport {
        loss_sum,
        grad_norm,
        tokens,
        allreduce: sums.busy,
        allreduce_wait: sums.waited,
        forward,
        backward,
        optimizer,
    })
}

/// The tokens the masked-LM loss counts in the global batch: each rank's labelled tokens, summed
/// over the ranks before backward (f32 sums of counts, exact below 2^24), so that the loss is the
/// global sum over the global count and N workers equal one however unevenly the masks fall.
pub fn global_masked_count(engine: &mut dyn Engine, micro_batches: &[Batch]) -> anyhow::Result<usize> {
    let local: usize = micro_batches.iter().map(|b| b.labels.iter().filter(|&&l| l != job::mlm::IGNORE).count()).sum();
    let mut count = [local as f32];
    engine.sum_values(&mut count)?;
    anyhow::ensure!(count[0] < (1 << 24) as f32, "more masked tokens in one step than an f32 counts exactly");
    Ok(count[0] as usize)
}

/// Tokenizes a labelled split.
pub fn tokenize_split(path: &Path, records: &[Record], enc: &TextEncoder) -> anyhow::Result<Split> {
    let texts: Vec<(&str, Option<&str>)> = records.iter().map(|r| (r.text.as_str(), r.text_pair.as_deref())).collect();
    let encoded = enc.encode_all(&texts).with_context(|| format!("tokenizing {}", path.display()))?;
    let examples = (0u32..)
        .zip(encoded.into_iter().zip(records))
        .map(|(index, (encoded, r))| Example { index, item: Item::Text { encoded, label: r.label } })
        .collect();
    Ok(Split { path: path.to_owned(), examples })
}

/// The evaluation counts of a split (or of one worker's shard of it), without dropout: a
/// confusion matrix and the loss sum of a classifier; the masked tokens, those predicted right
/// and their loss sum of a masked-LM (rows masked as in epoch 0, the same at every evaluation).
pub fn count_split(
    engine: &mut dyn Engine,
    split: &Split,
    batch_size: usize,
    mask: Option<&MaskSpec>,
    pad_id: u32,
) -> anyhow::Result<Counts> {
    let mut counts = match engine.model().layout.head {
        Head::Classification { num_labels } => Counts::Classes(EvalCounts::new(num_labels)),
        Head::MaskedLm => Counts::Tokens(MlmCounts::default()),
    };
    for (chunk_i, chunk) in split.examples.chunks(batch_size).enumerate() {
        let batch = collate_examples(chunk, 0, mask, pad_id);
        let (predicted, losses) = engine
            .forward(&batch, None)
            .and_then(|_| engine.predictions())
            .with_context(|| format!("evaluating batch {chunk_i} of {}", split.path.display()))?;
        match &mut counts {
            Counts::Classes(c) => {
                for ((&p, &y), &loss) in predicted.iter().zip(&batch.labels).zip(&losses) {
                    c.add(y as usize, p as usize, f64::from(loss));
                }
            }
            Counts::Tokens(c) => {
                // The head's rows are the labelled tokens, in batch order.
                let labels = batch.labels.iter().filter(|&&l| l != job::mlm::IGNORE);
                for ((&p, &y), &loss) in predicted.iter().zip(labels).zip(&losses) {
                    c.add(i64::from(p) == y, f64::from(loss));
                }
            }
        }
    }
    Ok(counts)
}

/// Evaluates without dropout: the metrics of the whole split.
pub fn evaluate(
    engine: &mut dyn Engine,
    split: &Split,
    batch_size: usize,
    mask: Option<&MaskSpec>,
    pad_id: u32,
) -> anyhow::Result<EvalMetrics> {
    Ok(count_split(engine, split, batch_size, mask, pad_id)?.metrics())
}

/// The checkpoint a run resumes from, as its I/O found it.
pub struct Resume {
    /// Where it came from (named in errors).
    pub origin: PathBuf,
    pub step: u64,
    /// The data cursor it recorded, in shards of the world that wrote it.
    pub cursor: Cursor,
    pub weights: Vec<u8>,
    pub optimizer: Vec<u8>,
}

/// What a run is, as its I/O knows it before training starts.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub rank: usize,
    pub world: usize,
    /// Examples (a corpus's rows) in the whole training split.
    pub train_examples: usize,
    /// The class names (none for pretraining).
    pub labels: Vec<String>,
    pub pad_id: u32,
    /// A pretraining job's masking; `None` for fine-tuning.
    pub mask: Option<MaskSpec>,
    pub has_dev: bool,
    pub has_test: bool,
}

/// The job's I/O, the loop's second seam: where the training examples come from, where the
/// evaluation counts, the checkpoints and the progress records go, and how the run ends. Local
/// files for `worker train` (`local::LocalIo`), the coordinator for a distributed rank
/// (`distributed::RankIo`).
pub trait JobIo {
    fn info(&self) -> &RunInfo;
    /// The checkpoint to resume from, if any.
    fn resume(&mut self) -> anyhow::Result<Option<Resume>>;
    /// Training starts (or resumes) at `step`, whose data cursor is `(epoch, position)` in this
    /// rank's shard.
    fn start(&mut self, step: u64, cursor: (u32, u64)) -> anyhow::Result<()>;
    /// What the run is doing now (a distributed rank heartbeats it).
    fn phase(&self, _what: &str) {}
    /// Fails when the run was interrupted from outside (a distributed rank: the coordinator
    /// restarts or stops the job).
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// This rank's next `n` training examples, fewer at the end of an epoch (the next call then
    /// starts the next epoch).
    fn next_examples(&mut self, n: usize) -> anyhow::Result<Vec<Example>>;
    /// A step is done: `rec` is its record (rank 0's, over the global batch).
    fn step_done(&mut self, engine: &mut dyn Engine, rec: &StepRecord, total_steps: u64) -> anyhow::Result<()>;
    /// Evaluates `split` (this rank's share of it) at `step`.
    fn evaluate(&mut self, engine: &mut dyn Engine, split: EvalSplit, step: u64) -> anyhow::Result<()>;
    /// Saves the training state as a checkpoint (the final one publishes the model).
    fn checkpoint(&mut self, engine: &mut dyn Engine, at: &CheckpointAt) -> anyhow::Result<()>;
    /// The last step is done: stop the data and let the work in flight (an upload) land.
    fn end_of_training(&mut self) -> anyhow::Result<()>;
    /// The run is over after `steps` steps (its final evaluations and checkpoint are done).
    fn finish(&mut self, steps: u64) -> anyhow::Result<()>;
}

/// The schedule of a run (a function of the training set's size and the config) and this rank's
/// share of each step.
#[derive(Clone, Debug)]
pub struct Plan {
    pub sched: Schedule,
    /// This rank's share of the global batch, and the micro-batch it computes at a time.
    pub local_batch: usize,
    pub micro: usize,
}

impl Plan {
    pub fn new(t: &TrainSection, train_examples: usize, world: usize) -> anyhow::Result<Plan> {
        anyhow::ensure!(
            t.batch_size.is_multiple_of(world),
            "train.batch_size {} is not a multiple of the world {world}",
            t.batch_size
        );
        let local_batch = t.batch_size / world;
        let micro = if t.micro_batch_size == 0 { local_batch } else { t.micro_batch_size.min(local_batch) };
        Ok(Plan { sched: Schedule::new(t, train_examples)?, local_batch, micro })
    }

    /// The data cursor of `step` in a rank's shard: (epoch, position).
    pub fn cursor(&self, step: u64) -> (u32, u64) {
        self.sched.cursor(step, self.local_batch)
    }
}

/// Trains the job from start (or its resume point) to end, on `compute` with the gradient sums
/// of `peers`, its data and results going through `io`.
pub fn run(io: &mut dyn JobIo, job: &JobConfig, compute: &Compute, peers: Peers) -> anyhow::Result<()> {
    let t = &job.train;
    let info = io.info().clone();
    let plan = Plan::new(t, info.train_examples, info.world)?;

    // The model, and where it resumes.
    io.phase("loading the model");
    let resume = io.resume()?;
    let (model, opt, mut step) = load_start(job, &info, &plan, resume)?;
    io.start(step, plan.cursor(step))?;
    let mut engine = engine::open(compute, model, opt, engine::Options::of(t), peers)?;
    let engine = &mut *engine;

    // The steps, with the evaluations and checkpoints due between them.
    let mut train_loss = f64::NAN;
    while step < plan.sched.total {
        train_loss = train_step(io, engine, t, &plan, step)?;
        step += 1;
        if step < plan.sched.total {
            evaluate_and_save(io, engine, job, &plan, step, train_loss)?;
        }
    }
    io.end_of_training()?;

    // The end: every evaluation split, then the final checkpoint.
    for (split, has) in [(EvalSplit::Dev, info.has_dev), (EvalSplit::Test, info.has_test)] {
        if has {
            io.evaluate(engine, split, step)?;
        }
    }
    let (epoch, position) = plan.cursor(step);
    io.checkpoint(engine, &CheckpointAt { step, epoch, position, train_loss, is_final: true })?;
    io.finish(step)
}

/// The model and optimizer a run starts from, and the step: the base checkpoint with the
/// task's head, then, when resuming, the checkpoint's weights and optimizer state.
fn load_start(
    job: &JobConfig,
    info: &RunInfo,
    plan: &Plan,
    resume: Option<Resume>,
) -> anyhow::Result<(crate::model::Bert, AdamW, u64)> {
    let t = &job.train;
    let head = match t.task {
        Task::Classification => Head::Classification { num_labels: info.labels.len() },
        Task::Mlm => Head::MaskedLm,
    };
    let (mut model, report) = if job.model.from_scratch {
        let cfg = crate::bert_config::BertConfig::from_file(&job.model.path.join(checkpoint::CONFIG_FILE))?;
        let model = checkpoint::init_model(cfg, head, t.seed);
        let config = job.model.path.join(checkpoint::CONFIG_FILE);
        tracing::info!(config = %config.display(), params = model.layout.total, "initialised from scratch");
        (model, checkpoint::LoadReport::default())
    } else {
        let (model, report) = checkpoint::load(&job.model.path, head, t.seed)
            .with_context(|| format!("loading checkpoint {}", job.model.path.display()))?;
        let (initialized, skipped) = (&report.initialized, &report.skipped);
        tracing::info!(?initialized, ?skipped, params = model.layout.total, "checkpoint loaded");
        (model, report)
    };
    if report.skipped.iter().any(|k| k.starts_with("cls.seq_relationship.")) {
        tracing::info!("the checkpoint's next-sentence-prediction head (BertForPreTraining) is not used");
    }
    anyhow::ensure!(
        job.model.max_seq_len <= model.cfg.max_position_embeddings,
        "model.max_seq_len = {} exceeds the checkpoint's max_position_embeddings = {} ({})",
        job.model.max_seq_len,
        model.cfg.max_position_embeddings,
        job.model.path.join("config.json").display()
    );
    if !t.dropout {
        model.cfg.disable_dropout();
    }
    let mut opt = AdamW::new(model.layout.total, t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay);
    let Some(r) = resume else { return Ok((model, opt, 0)) };
    // The checkpoint's cursor is a position in the shard of the world that wrote it; the same
    // global position, position * world, is where every world resumes.
    let (world, written_by) = (info.world as u64, u64::from(r.cursor.world_size).max(1));
    let (epoch, position) = plan.cursor(r.step);
    anyhow::ensure!(
        (epoch, position * world) == (r.cursor.epoch, r.cursor.position * written_by),
        "checkpoint {} says step {} is at epoch {} position {} of a world of {written_by}, but this job's schedule \
         puts it at {:?} of a world of {world}",
        r.origin.display(),
        r.step,
        r.cursor.epoch,
        r.cursor.position,
        (epoch, position)
    );
    let loaded = checkpoint::load_weights(&mut model, &r.weights, &r.origin.join(checkpoint::WEIGHTS_FILE))?;
    anyhow::ensure!(loaded.initialized.is_empty(), "checkpoint {} lacks {:?}", r.origin.display(), loaded.initialized);
    checkpoint::load_optimizer(&model.layout, &mut opt, &r.optimizer, &r.origin.join(checkpoint::OPTIMIZER_FILE))?;
    anyhow::ensure!(
        opt.t == r.step,
        "checkpoint {}: the optimizer has taken {} steps, the manifest says {}",
        r.origin.display(),
        opt.t,
        r.step
    );
    tracing::info!(step = r.step, checkpoint = %r.origin.display(), "resumed");
    Ok((model, opt, r.step))
}

/// Step `step + 1`: this rank's next batch, the optimizer step over the global batch, the
/// record. Returns the step's loss (the mean over the global batch).
fn train_step(
    io: &mut dyn JobIo,
    engine: &mut dyn Engine,
    t: &TrainSection,
    plan: &Plan,
    step: u64,
) -> anyhow::Result<f64> {
    io.check()?;
    let started = Instant::now();
    io.phase("waiting for data");
    let local = io.next_examples(plan.local_batch)?;
    let data_wait = started.elapsed();
    io.phase("training");
    let (world, pad_id, mask) = (io.info().world, io.info().pad_id, io.info().mask);
    let lr = linear_schedule(t.lr, step, plan.sched.warmup, plan.sched.total);
    let epoch = plan.cursor(step).0;
    let batches: Vec<Batch> =
        local.chunks(plan.micro).map(|m| collate_examples(m, epoch, mask.as_ref(), pad_id)).collect();
    // The loss is a mean over the global batch's examples, or its masked tokens: a count every
    // rank knows before backward (the examples by the schedule, the tokens summed over the ranks).
    let global = match mask {
        None => local.len() * world,
        Some(_) => global_masked_count(engine, &batches)?,
    };
    let r = optimizer_step(engine, &batches, global, t, step, lr);
    io.check()?; // an interrupted all-reduce fails the step: say why
    let r = r?;
    let loss = r.loss_sum / global as f64;
    let rec = StepRecord {
        step: step + 1,
        epoch,
        loss,
        lr,
        grad_norm: f64::from(r.grad_norm),
        tokens: r.tokens as u64,
        allreduce_s: r.allreduce.as_secs_f64(),
        allreduce_wait_s: r.allreduce_wait.as_secs_f64(),
        data_wait_s: data_wait.as_secs_f64(),
        step_s: started.elapsed().as_secs_f64(),
        forward_s: r.forward.as_secs_f64(),
        backward_s: r.backward.as_secs_f64(),
        optimizer_s: r.optimizer.as_secs_f64(),
        time_s: 0.0,
    };
    io.step_done(engine, &rec, plan.sched.total)?;
    Ok(loss)
}

/// The evaluations and the checkpoint due after `step` (not the last one, which ends the run):
/// the evaluation split (dev, else test) every `train.eval_every` steps or each epoch, and a
/// checkpoint every `checkpoint.every` steps, judged by `checkpoint.best_metric` at its own step.
fn evaluate_and_save(
    io: &mut dyn JobIo,
    engine: &mut dyn Engine,
    job: &JobConfig,
    plan: &Plan,
    step: u64,
    train_loss: f64,
) -> anyhow::Result<()> {
    let info = io.info();
    let eval_split = if info.has_dev {
        Some(EvalSplit::Dev)
    } else if info.has_test {
        Some(EvalSplit::Test)
    } else {
        None
    };
    let best_split = job.checkpoint.best_metric.split_once('/').and_then(|(s, _)| match s {
        "dev" if info.has_dev => Some(EvalSplit::Dev),
        "test" if info.has_test => Some(EvalSplit::Test),
        _ => None,
    });
    let t = &job.train;
    let ckpt_due = job.checkpoint.every > 0 && step.is_multiple_of(job.checkpoint.every);
    let eval_due =
        if t.eval_every > 0 { step.is_multiple_of(t.eval_every) } else { step.is_multiple_of(plan.sched.per_epoch) };
    let mut evaluated = None;
    if let (true, Some(split)) = (eval_due, eval_split) {
        io.evaluate(engine, split, step)?;
        evaluated = Some(split);
    }
    if let (true, Some(split)) = (ckpt_due, best_split) {
        if evaluated != Some(split) {
            io.evaluate(engine, split, step)?;
        }
    }
    if ckpt_due {
        let (epoch, position) = plan.cursor(step);
        io.checkpoint(engine, &CheckpointAt { step, epoch, position, train_loss, is_final: false })?;
    }
    Ok(())
}
