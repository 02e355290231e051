//! `worker train`: a job in one process, a world of one through the same loop as a distributed
//! rank (`train::run`). Its I/O is local: the splits read and tokenized up front, the epoch
//! order of the job's sharding (a world of one), evaluations printed and kept, checkpoints in
//! the job's checkpoint directory (resumed from, as a distributed job does), the progress board
//! and `loss.jsonl`, and `metrics.json` at the end.

use crate::checkpoint;
use crate::engine::{Device, Engine, Peers};
use crate::tokenize::TextEncoder;
use crate::train::{self, CheckpointAt, EvalSplit, Example, JobIo, Resume, RunInfo, Split};
use anyhow::Context;
use job::checkpoints::{self, Cursor, Manifest, Store};
use job::config::{JobConfig, Task};
use job::eval::EvalMetrics;
use job::pack::{Corpora, CorpusRows};
use job::progress::{ProgressBoard, StepRecord, Summary};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Runs the whole job on `device`; `progress` draws a progress bar on stderr.
pub fn train(job: &JobConfig, progress: bool, device: Device) -> anyhow::Result<Summary> {
    let mut io = LocalIo::new(job, progress)?;
    train::run(&mut io, job, &device.open()?, Peers::Alone)?;
    io.summary.take().context("the run ended without a summary")
}

pub struct LocalIo<'a> {
    job: &'a JobConfig,
    info: RunInfo,
    enc: TextEncoder,
    train: TrainData,
    dev: Option<Split>,
    test: Option<Split>,
    store: Store,
    resume_from: Option<(PathBuf, Manifest)>,
    /// Where the next examples come from: (epoch, its order, the position in it).
    order: (u32, Vec<usize>, usize),
    board: Option<ProgressBoard>,
    /// Every evaluation so far, by split and step.
    evals: BTreeMap<(EvalSplit, u64), EvalMetrics>,
    summary: Option<Summary>,
}

impl<'a> LocalIo<'a> {
    fn new(job: &'a JobConfig, progress: bool) -> anyhow::Result<Self> {
        let enc = TextEncoder::from_file(&job.tokenizer_path(), job.model.max_seq_len)?;
        let (train, dev, test, labels) = match job.train.task {
            Task::Classification => {
                let data = job::data::load(job)?;
                let train = train::tokenize_split(&job.data.train, &data.train, &enc)?;
                let split = |path: &Option<PathBuf>, records: &Option<Vec<job::data::Record>>| match (path, records) {
                    (Some(p), Some(r)) => train::tokenize_split(p, r, &enc).map(Some),
                    _ => Ok(None),
                };
                let (dev, test) = (split(&job.data.dev, &data.dev)?, split(&job.data.test, &data.test)?);
                (TrainData::Texts(train), dev, test, data.labels.names)
            }
            Task::Mlm => {
                let c = Corpora::open(job, Some((&enc.content_hash(), &job.tokenizer_path())))?;
                let split = |rows: Option<CorpusRows>, path: &Option<PathBuf>| {
                    rows.map(|r| all_rows(&r, &enc, path.clone().unwrap_or_default())).transpose()
                };
                let (dev, test) = (split(c.dev, &job.data.dev)?, split(c.test, &job.data.test)?);
                (TrainData::Corpus(c.train), dev, test, Vec::new())
            }
        };
        tracing::info!(
            train = train.len(),
            dev = dev.as_ref().map(|s| s.examples.len()),
            test = test.as_ref().map(|s| s.examples.len()),
            labels = ?labels,
            "data loaded"
        );
        let info = RunInfo {
            rank: 0,
            world: 1,
            train_examples: train.len(),
            labels,
            pad_id: enc.pad_id,
            mask: train::mask_spec(job, &enc)?,
            has_dev: dev.is_some(),
            has_test: test.is_some(),
        };
        let (store, resume_from) = checkpoints::open_for(job, 1..=1)?;
        let loss_log = job.output.dir.join("loss.jsonl");
        let show_bar = progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let board = ProgressBoard::new(show_bar, Some((loss_log.clone(), resume_from.is_some())))
            .with_context(|| format!("opening {}", loss_log.display()))?;
        Ok(LocalIo {
            job,
            info,
            enc,
            train,
            dev,
            test,
            store,
            resume_from,
            order: (0, Vec::new(), 0),
            board: Some(board),
            evals: BTreeMap::new(),
            summary: None,
        })
    }

    fn board(&self) -> &ProgressBoard {
        self.board.as_ref().expect("the board lives until finish")
    }

    /// The epoch's order of the training set: the job's shard of a world of one.
    fn epoch_order(&self, epoch: u32) -> Vec<usize> {
        job::shard::train_indices(self.train.len(), 1, 0, self.job.train.seed, epoch, None)
    }
}

impl JobIo for LocalIo<'_> {
    fn info(&self) -> &RunInfo {
        &self.info
    }

    fn resume(&mut self) -> anyhow::Result<Option<Resume>> {
        let Some((dir, m)) = &self.resume_from else { return Ok(None) };
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(Some(Resume {
            origin: dir.clone(),
            step: m.step,
            cursor: m.cursor.clone(),
            weights: read(checkpoint::WEIGHTS_FILE)?,
            optimizer: read(checkpoint::OPTIMIZER_FILE)?,
        }))
    }

    fn start(&mut self, _step: u64, (epoch, position): (u32, u64)) -> anyhow::Result<()> {
        self.order = (epoch, self.epoch_order(epoch), position as usize);
        Ok(())
    }

    fn next_examples(&mut self, n: usize) -> anyhow::Result<Vec<Example>> {
        if self.order.2 >= self.order.1.len() {
            let epoch = self.order.0 + 1;
            self.order = (epoch, self.epoch_order(epoch), 0);
        }
        let (_, order, at) = &mut self.order;
        let take = &order[*at..(*at + n).min(order.len())];
        *at += take.len();
        take.iter().map(|&i| self.train.example(i, &self.enc)).collect()
    }

    fn step_done(&mut self, _engine: &mut dyn Engine, rec: &StepRecord, total_steps: u64) -> anyhow::Result<()> {
        let board = self.board.as_mut().expect("the board lives until finish");
        let rec = StepRecord { time_s: board.now_s(), ..rec.clone() };
        board.record(&rec, total_steps);
        job::fault::worker_point(0, 0, "step", rec.step);
        Ok(())
    }

    fn evaluate(&mut self, engine: &mut dyn Engine, split: EvalSplit, step: u64) -> anyhow::Result<()> {
        let data = match split {
            EvalSplit::Dev => self.dev.as_ref(),
            EvalSplit::Test => self.test.as_ref(),
        }
        .with_context(|| format!("the job has no {} split", split.name()))?;
        let (batch, mask) = (self.job.train.eval_batch_size, self.info.mask.as_ref());
        let m = train::evaluate(engine, data, batch, mask, self.enc.pad_id)?;
        let counted = if mask.is_some() { "masked tokens" } else { "examples" };
        let line = format!("step {step}: {} {}  ({} {counted})", split.name(), m.summary(), m.examples);
        // Above the bar when there is one, else on stdout.
        let board = self.board();
        if board.is_hidden() {
            println!("{line}");
        } else {
            board.println(&line);
        }
        self.evals.insert((split, step), m);
        Ok(())
    }

    fn checkpoint(&mut self, engine: &mut dyn Engine, at: &CheckpointAt) -> anyhow::Result<()> {
        let (model, opt) = engine.host()?.context("a world of one holds its whole optimizer state")?;
        let files = checkpoint::state_files(model, opt, &self.info.labels, self.job.tokenizer_path().parent())?;
        let mut partial = self.store.begin(at.step)?;
        for (name, bytes) in &files {
            partial.write(name, bytes)?;
        }
        let cursor = Cursor { epoch: at.epoch, position: at.position, world_size: 1 };
        let evals = self.evals.iter().filter(|((_, s), _)| *s == at.step).map(|((split, _), m)| (split.name(), m));
        let metrics = checkpoints::step_metrics(at.train_loss, evals);
        let config = serde_json::to_value(self.job)?;
        let manifest = Manifest::new(at.step, cursor, self.job.train.seed, at.is_final, config, metrics);
        let path = self.store.commit(partial, manifest, &[])?;
        tracing::info!(step = at.step, path = %path.display(), "checkpoint saved");
        if at.is_final {
            let model_dir = self.model_dir();
            let from = self
                .store
                .publish_end(&path, self.job.checkpoint.publish, &model_dir)
                .with_context(|| format!("publishing the model to {}", model_dir.display()))?;
            tracing::info!(checkpoint = %from.display(), model = %model_dir.display(), "model published");
        }
        Ok(())
    }

    fn end_of_training(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn finish(&mut self, steps: u64) -> anyhow::Result<()> {
        let board = self.board.take().expect("the board lives until finish");
        board.finish();
        let last = |split| self.evals.iter().rev().find(|((s, _), _)| *s == split).map(|(_, m)| m.clone());
        let summary =
            Summary::new(steps, board.totals(), last(EvalSplit::Dev), last(EvalSplit::Test), self.model_dir());
        summary.write(&self.job.output.dir)?;
        self.summary = Some(summary);
        Ok(())
    }
}

impl LocalIo<'_> {
    fn model_dir(&self) -> PathBuf {
        self.job.output.dir.join("model")
    }
}

/// What `worker train` trains on: a labelled split tokenized up front, or a corpus's rows read
/// from its memory-mapped shards as they are needed.
enum TrainData {
    Texts(Split),
    Corpus(CorpusRows),
}

impl TrainData {
    fn len(&self) -> usize {
        match self {
            TrainData::Texts(s) => s.examples.len(),
            TrainData::Corpus(c) => c.rows() as usize,
        }
    }

    fn example(&self, i: usize, enc: &TextEncoder) -> anyhow::Result<Example> {
        Ok(match self {
            TrainData::Texts(s) => s.examples[i].clone(),
            TrainData::Corpus(c) => train::row_example(c, i as u64, enc)?,
        })
    }
}

/// Every row of an evaluation corpus.
fn all_rows(rows: &CorpusRows, enc: &TextEncoder, path: PathBuf) -> anyhow::Result<Split> {
    let examples = (0..rows.rows()).map(|r| train::row_example(rows, r, enc)).collect::<anyhow::Result<_>>()?;
    Ok(Split { path, examples })
}
