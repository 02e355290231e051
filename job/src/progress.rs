//! The job's progress as the coordinator shows it: one progress bar on stderr (step, loss,
//! tokens/s, ETA) when stderr is a terminal, a `tracing` line every few steps otherwise, and the
//! loss curve in `loss.jsonl` (one JSON object per step) in the output directory; for a
//! distributed job in the coordinator, for `worker train` in the worker.
//!
//! Rank 0 reports after every step; its loss is the mean over the global batch (the ranks
//! all-reduce it with the gradients), so the curve does not depend on the world size.

use crate::eval::EvalMetrics;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u32,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    /// Seconds in gradient all-reduces, and the part the step waited for after backward.
    pub allreduce_s: f64,
    pub allreduce_wait_s: f64,
    /// Seconds rank 0 waited for its batch, and the step's wall time (data wait included).
    pub data_wait_s: f64,
    pub step_s: f64,
    /// Seconds in forward passes, in backward passes, and in clipping and the optimizer.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// When the coordinator received the report: seconds since the job started.
    pub time_s: f64,
}

/// What a finished run reports in `<output.dir>/metrics.json`, single-process or distributed.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    /// The smoothed training loss at the end (the progress bar's moving average).
    pub final_train_loss: f64,
    /// The last evaluation of each split.
    pub dev: Option<EvalMetrics>,
    pub test: Option<EvalMetrics>,
    pub model_dir: PathBuf,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
}

impl Summary {
    /// The summary of a run of `steps` whose progress board gave `totals` (see
    /// [`ProgressBoard::totals`]).
    pub fn new(
        steps: u64,
        (final_train_loss, train_seconds, tokens): (f64, f64, u64),
        dev: Option<EvalMetrics>,
        test: Option<EvalMetrics>,
        model_dir: PathBuf,
    ) -> Self {
        let tokens_per_second = if train_seconds > 0.0 { tokens as f64 / train_seconds } else { 0.0 };
        Summary { steps, final_train_loss, dev, test, model_dir, train_seconds, tokens_per_second }
    }

    /// Writes `dir/metrics.json` and returns its path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("metrics.json");
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&path, json + "\n")
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(path)
    }
}

pub struct ProgressBoard {
    bar: indicatif::ProgressBar,
    log: Option<(PathBuf, std::fs::File)>,
    created: Instant,
    started: Option<(Instant, u64)>,
    /// When the last record came, and the first record's own step time.
    last: Option<(Instant, f64)>,
    tokens: u64,
    ema: f64,
    /// Log a line every this many steps when the bar is hidden.
    log_every: u64,
}

impl ProgressBoard {
    /// `loss_log`: the file the loss curve goes to (None: keep no file), and whether the run
    /// resumes: a resumed run appends to it (the steps it repeats after the checkpoint appear
    /// twice, and the last record of a step wins), a fresh one starts it anew.
    pub fn new(show_bar: bool, loss_log: Option<(PathBuf, bool)>) -> std::io::Result<Self> {
        let bar = if show_bar {
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        let log = match loss_log {
            Some((p, resumed)) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let f = std::fs::OpenOptions::new().create(true).append(true).truncate(false).open(&p)?;
                if !resumed {
                    f.set_len(0)?;
                }
                Some((p, f))
            }
            None => None,
        };
        Ok(ProgressBoard {
            bar,
            log,
            created: Instant::now(),
            started: None,
            last: None,
            tokens: 0,
            ema: f64::NAN,
            log_every: 50,
        })
    }

    /// Seconds since the board was made (the job's start).
    pub fn now_s(&self) -> f64 {
        self.created.elapsed().as_secs_f64()
    }

    pub fn record(&mut self, r: &StepRecord, total_steps: u64) {
        let (t0, step0) = *self.started.get_or_insert((Instant::now(), r.step.saturating_sub(1)));
        self.tokens += r.tokens;
        let first_step_s = self.last.map_or(r.step_s, |(_, s)| s);
        self.last = Some((Instant::now(), first_step_s));
        self.ema = if self.ema.is_nan() { r.loss } else { 0.95 * self.ema + 0.05 * r.loss };
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let tps = self.tokens as f64 / secs;
        if self.bar.length() != Some(total_steps) {
            self.bar.set_length(total_steps);
        }
        self.bar.set_position(r.step);
        self.bar.set_message(format!(
            "epoch {}  loss {:.4}  lr {:.2e}  |g| {:.2}  {tps:.0} tok/s  all-reduce {:.0} ms ({:.0} ms exposed)",
            r.epoch,
            self.ema,
            r.lr,
            r.grad_norm,
            r.allreduce_s * 1e3,
            r.allreduce_wait_s * 1e3
        ));
        if self.bar.is_hidden() && (r.step.is_multiple_of(self.log_every) || r.step == total_steps) {
            let done = r.step.saturating_sub(step0).max(1);
            let eta_s = secs / done as f64 * total_steps.saturating_sub(r.step) as f64;
            tracing::info!(
                step = r.step,
                total_steps,
                epoch = r.epoch,
                loss = self.ema,
                lr = r.lr,
                grad_norm = r.grad_norm,
                tokens_per_s = tps as u64,
                allreduce_ms = (r.allreduce_s * 1e3) as u64,
                allreduce_exposed_ms = (r.allreduce_wait_s * 1e3) as u64,
                eta_s = eta_s as u64,
                "train"
            );
        }
        if let Some((path, f)) = &mut self.log {
            let line = serde_json::to_string(r).expect("record serialises") + "\n";
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to the loss log");
            }
        }
    }

    /// The smoothed loss, the seconds from the first recorded step's start to the last one's
    /// end, and the tokens of the recorded steps.
    pub fn totals(&self) -> (f64, f64, u64) {
        let secs = match (self.started, self.last) {
            (Some((t0, _)), Some((t1, first_step_s))) => (t1 - t0).as_secs_f64() + first_step_s,
            _ => 0.0,
        };
        (self.ema, secs, self.tokens)
    }

    /// Whether no bar is drawn.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Prints a line above the bar (or plainly, when there is no bar).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
