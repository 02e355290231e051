//! What the coordinator tells the outside world about a running job: the step history (loss,
//! learning rate, throughput, all-reduce and data-wait times from rank 0's progress reports),
//! the evaluations, and a snapshot of the whole job ([`JobStatus`]) that the HTTP endpoints
//! serve as JSON (the status page) and as Prometheus text (`/metrics`, [`prometheus_text`]).
//! Scalars also go to TensorBoard event files when a directory is set.
//!
//! A restarted generation replays steps after its checkpoint: the history keeps what the job
//! last did, so a step record that is not past the newest one first drops the records it
//! replaces (the curves show the run that produced the final model).

use crate::plot::{line_chart_png, Series, Style};
use crate::tensorboard::EventWriter;
use job::eval::EvalMetrics;
use job::progress::StepRecord;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// One finished evaluation of a split.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalPoint {
    pub split: String,
    pub step: u64,
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

/// Running totals over the job (Prometheus counters): they only grow, replays included.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub steps: u64,
    pub tokens: u64,
    pub allreduce_s: f64,
    pub allreduce_exposed_s: f64,
    pub data_wait_s: f64,
    pub step_s: f64,
}

/// The most points of a curve [`Telemetry::curve`] hands out (a long job's history is thinned).
pub const CURVE_POINTS: usize = 2000;
/// The window of recent steps over which tokens/s is measured.
const RATE_STEPS: usize = 20;

pub struct Telemetry {
    created: Instant,
    steps: Vec<StepRecord>,
    evals: Vec<EvalPoint>,
    total_steps: u64,
    totals: Totals,
    tensorboard: Option<EventWriter>,
    /// Records taken so far ([`Telemetry::changes`]).
    changes: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            created: Instant::now(),
            steps: Vec::new(),
            evals: Vec::new(),
            total_steps: 0,
            totals: Totals::default(),
            tensorboard: None,
            changes: 0,
        }
    }
}

impl Telemetry {
    /// Also writes every scalar to a TensorBoard event file in `dir`.
    pub fn with_tensorboard(mut self, dir: &Path) -> std::io::Result<Self> {
        self.tensorboard = Some(EventWriter::create(dir)?);
        Ok(self)
    }

    /// Seconds since the job started.
    pub fn now_s(&self) -> f64 {
        self.created.elapsed().as_secs_f64()
    }

    /// Rank 0's report of a completed step (`r.time_s` already set).
    pub fn record_step(&mut self, r: StepRecord, total_steps: u64) {
        self.changes += 1;
        self.total_steps = total_steps;
        let t = &mut self.totals;
        t.steps += 1;
        t.tokens += r.tokens;
        t.allreduce_s += r.allreduce_s;
        t.allreduce_exposed_s += r.allreduce_wait_s;
        t.data_wait_s += r.data_wait_s;
        t.step_s += r.step_s;
        if self.steps.last().is_some_and(|last| last.step >= r.step) {
            self.steps.retain(|s| s.step < r.step);
        }
        if let Some(tb) = &mut self.tensorboard {
            let tps = if r.step_s > 0.0 { r.tokens as f64 / r.step_s } else { 0.0 };
            let scalars = [
                ("train/loss", r.loss),
                ("train/learning_rate", r.lr),
                ("train/grad_norm", r.grad_norm),
                ("perf/tokens_per_second", tps),
                ("perf/allreduce_seconds", r.allreduce_s),
                ("perf/allreduce_exposed_seconds", r.allreduce_wait_s),
                ("perf/data_wait_seconds", r.data_wait_s),
                ("perf/forward_seconds", r.forward_s),
                ("perf/backward_seconds", r.backward_s),
                ("perf/optimizer_seconds", r.optimizer_s),
            ];
            tb.scalars(r.step, &scalars);
        }
        self.steps.push(r);
    }

    /// A split's evaluation at a step, once every rank has reported.
    pub fn record_eval(&mut self, split: &str, step: u64, m: &EvalMetrics) {
        self.changes += 1;
        self.evals.retain(|e| !(e.split == split && e.step >= step));
        if let Some(tb) = &mut self.tensorboard {
            let named: Vec<(String, f64)> = m.named().into_iter().map(|(k, v)| (format!("{split}/{k}"), v)).collect();
            let scalars: Vec<(&str, f64)> = named.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            tb.scalars(step, &scalars);
        }
        self.evals.push(EvalPoint {
            split: split.to_string(),
            step,
            examples: m.examples,
            loss: m.loss,
            accuracy: m.accuracy,
            macro_f1: m.macro_f1,
            perplexity: m.perplexity,
        });
    }

    /// The job restarts from the checkpoint of `step`: TensorBoard drops what it shows past it.
    pub fn record_restart(&mut self, step: u64, checkpoint: &str) {
        self.changes += 1;
        if let Some(tb) = &mut self.tensorboard {
            tb.session_start(step, checkpoint);
        }
    }

    /// How many records have changed the history: a version for what is drawn from it.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn last(&self) -> Option<&StepRecord> {
        self.steps.last()
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    pub fn evals(&self) -> &[EvalPoint] {
        &self.evals
    }

    /// The step history, every record when it is short, else every k-th (always with the last).
    pub fn curve(&self, max_points: usize) -> Vec<&StepRecord> {
        let n = self.steps.len();
        let stride = n.div_ceil(max_points.max(1)).max(1);
        let mut out: Vec<&StepRecord> = self.steps.iter().step_by(stride).collect();
        if let Some(last) = self.steps.last() {
            if out.last().map(|r| r.step) != Some(last.step) {
                out.push(last);
            }
        }
        out
    }

    /// Tokens per second over the last few steps (their tokens over their step times).
    pub fn tokens_per_s(&self) -> f64 {
        let recent = &self.steps[self.steps.len().saturating_sub(RATE_STEPS)..];
        let secs: f64 = recent.iter().map(|r| r.step_s).sum();
        let tokens: u64 = recent.iter().map(|r| r.tokens).sum();
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    }

    /// The loss curve and the evaluation accuracies: what [`loss_chart`] draws (copied, so that
    /// it is drawn without the telemetry's lock).
    pub fn plot_series(&self) -> Vec<Series> {
        let loss: Vec<(f64, f64)> = self.steps.iter().map(|r| (r.step as f64, r.loss)).collect();
        let mut series = vec![Series { name: "train loss".into(), points: loss, style: Style::Noisy }];
        let mut splits: Vec<&str> = self.evals.iter().map(|e| e.split.as_str()).collect();
        splits.dedup();
        splits.sort_unstable();
        splits.dedup();
        for split in splits {
            let points = self.evals.iter().filter(|e| e.split == split).map(|e| (e.step as f64, e.accuracy)).collect();
            series.push(Series { name: format!("{} accuracy", split.to_lowercase()), points, style: Style::Marked });
        }
        series
    }
}

/// Draws the loss curve (and the evaluation accuracy) as a PNG.
pub fn loss_chart(series: &[Series]) -> Vec<u8> {
    line_chart_png(series, "step", "loss", "accuracy")
}

/// A worker of the current generation as the coordinator last heard from it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    pub rank: usize,
    pub host: String,
    pub step: u64,
    pub phase: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
    pub finished: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckpointStatus {
    pub step: u64,
    pub path: String,
}

/// One point of the loss curve: `[step, loss, learning rate, seconds since start]`.
pub type CurvePoint = [f64; 4];

/// Everything the status page and `/metrics` show, taken at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    /// `gathering` (waiting for workers), `training`, `restarting`, `finished`, `failed`, or
    /// `stopped` (by a signal).
    pub state: &'static str,
    /// Why the job failed, or what it waits for.
    pub message: String,
    pub output_dir: String,
    pub generation: u64,
    pub world_size: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    pub joined: usize,
    pub restarts: u32,
    pub max_restarts: u32,
    pub elapsed_s: f64,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    pub last: Option<StepRecord>,
    pub tokens_per_s: f64,
    pub totals: Totals,
    pub workers: Vec<WorkerStatus>,
    pub checkpoints: Vec<CheckpointStatus>,
    pub final_model: Option<String>,
    pub curve: Vec<CurvePoint>,
    pub evals: Vec<EvalPoint>,
}

const STATES: [&str; 6] = ["gathering", "training", "restarting", "finished", "failed", "stopped"];

/// The job's status in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus_text(s: &JobStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP tandem_{name} {help}");
        let _ = writeln!(out, "# TYPE tandem_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "tandem_{name}{labels} {}", number(*v));
        }
    };
    let one = |v: f64| [(String::new(), v)];
    let state: Vec<(String, f64)> =
        STATES.iter().map(|st| (label("state", st), f64::from(u8::from(*st == s.state)))).collect();
    metric("job_state", "gauge", "1 for the state the job is in.", &state);
    metric("step", "gauge", "Completed optimizer steps.", &one(s.step as f64));
    metric("total_steps", "gauge", "Optimizer steps the job will take.", &one(s.total_steps as f64));
    metric("epoch", "gauge", "The epoch of the last step.", &one(f64::from(s.epoch)));
    if let Some(r) = &s.last {
        metric("train_loss", "gauge", "Mean training loss over the global batch of the last step.", &one(r.loss));
        metric("learning_rate", "gauge", "Learning rate of the last step.", &one(r.lr));
        metric("grad_norm", "gauge", "Gradient norm of the last step (before clipping).", &one(r.grad_norm));
        metric(
            "allreduce_seconds",
            "gauge",
            "Rank 0's time in gradient all-reduces in the last step.",
            &one(r.allreduce_s),
        );
        metric(
            "allreduce_exposed_seconds",
            "gauge",
            "The part of the last step's all-reduce time not hidden behind backward.",
            &one(r.allreduce_wait_s),
        );
        metric("data_wait_seconds", "gauge", "Rank 0's wait for its next batch in the last step.", &one(r.data_wait_s));
        metric("step_seconds", "gauge", "Wall time of the last step on rank 0.", &one(r.step_s));
        metric("forward_seconds", "gauge", "Rank 0's time in forward passes in the last step.", &one(r.forward_s));
        metric(
            "backward_seconds",
            "gauge",
            "Rank 0's time in backward passes (all-reduce overlapped) in the last step.",
            &one(r.backward_s),
        );
        metric(
            "optimizer_seconds",
            "gauge",
            "Rank 0's time in clipping and AdamW in the last step.",
            &one(r.optimizer_s),
        );
    }
    metric(
        "tokens_per_second",
        "gauge",
        "Real tokens per second over the last steps, all ranks.",
        &one(s.tokens_per_s),
    );
    let t = &s.totals;
    metric("tokens_total", "counter", "Real (unpadded) tokens trained on, all ranks.", &one(t.tokens as f64));
    metric("steps_total", "counter", "Steps trained, replays after restarts included.", &one(t.steps as f64));
    metric("allreduce_seconds_total", "counter", "Rank 0's time in gradient all-reduces.", &one(t.allreduce_s));
    metric("data_wait_seconds_total", "counter", "Rank 0's time waiting for data.", &one(t.data_wait_s));
    let eval = |f: fn(&EvalPoint) -> Option<f64>| -> Vec<(String, f64)> {
        let mut latest: Vec<&EvalPoint> = Vec::new();
        for e in &s.evals {
            match latest.iter_mut().find(|l| l.split == e.split) {
                Some(l) if l.step <= e.step => *l = e,
                Some(_) => {}
                None => latest.push(e),
            }
        }
        latest.iter().filter_map(|e| Some((label("split", &e.split), f(e)?))).collect()
    };
    metric("eval_accuracy", "gauge", "Accuracy of the latest evaluation of each split.", &eval(|e| Some(e.accuracy)));
    metric("eval_macro_f1", "gauge", "Macro-F1 of the latest evaluation of each split.", &eval(|e| e.macro_f1));
    metric(
        "eval_perplexity",
        "gauge",
        "Masked-LM perplexity of the latest evaluation of each split.",
        &eval(|e| e.perplexity),
    );
    metric("eval_loss", "gauge", "Mean loss of the latest evaluation of each split.", &eval(|e| Some(e.loss)));
    metric("eval_step", "gauge", "The step of the latest evaluation of each split.", &eval(|e| Some(e.step as f64)));
    metric(
        "workers",
        "gauge",
        "Workers in the current generation (joined so far while gathering).",
        &one(s.joined as f64),
    );
    metric("world_size", "gauge", "The current generation's world size.", &one(s.world_size as f64));
    metric("generation", "gauge", "The job's generation (one more after every restart).", &one(s.generation as f64));
    metric(
        "restarts_total",
        "counter",
        "Restarts of the job by this coordinator process.",
        &one(f64::from(s.restarts)),
    );
    let ages: Vec<(String, f64)> =
        s.workers.iter().map(|w| (label("rank", &w.rank.to_string()), w.heartbeat_age_s)).collect();
    metric("worker_heartbeat_age_seconds", "gauge", "Seconds since each rank's last heartbeat.", &ages);
    let steps: Vec<(String, f64)> =
        s.workers.iter().map(|w| (label("rank", &w.rank.to_string()), w.step as f64)).collect();
    metric("worker_step", "gauge", "The last step each rank reported.", &steps);
    metric(
        "checkpoints",
        "gauge",
        "Checkpoints this coordinator saved that are still kept.",
        &one(s.checkpoints.len() as f64),
    );
    let last_ckpt = s.checkpoints.iter().map(|c| c.step).max().unwrap_or(0);
    metric("checkpoint_step", "gauge", "The step of the newest checkpoint saved (0: none).", &one(last_ckpt as f64));
    out
}

/// A sample value as Prometheus writes it (NaN and infinities by name).
/// `{name="value"}` with the value escaped as the exposition format requires (backslash,
/// double quote and line feed), so that no label value can break a line or forge a sample.
fn label(name: &str, value: &str) -> String {
    let mut out = format!("{{{name}=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out + "\"}"
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> StepRecord {
        StepRecord {
            step,
            epoch: 0,
            loss,
            lr: 1e-4,
            grad_norm: 1.0,
            tokens: 100,
            allreduce_s: 0.01,
            allreduce_wait_s: 0.001,
            data_wait_s: 0.002,
            step_s: 0.5,
            forward_s: 0.1,
            backward_s: 0.3,
            optimizer_s: 0.05,
            time_s: step as f64,
        }
    }

    #[test]
    fn a_replayed_step_replaces_the_history_from_it_on() {
        let mut t = Telemetry::default();
        for s in 1..=10 {
            t.record_step(rec(s, 1.0), 20);
        }
        t.record_step(rec(6, 0.5), 20);
        let steps: Vec<u64> = t.curve(100).iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(t.last().unwrap().loss, 0.5);
        assert_eq!(t.totals().steps, 11, "counters count the replay too");
        assert!((t.tokens_per_s() - 200.0).abs() < 1e-9);
    }

    #[test]
    fn a_long_curve_is_thinned_and_keeps_its_last_point() {
        let mut t = Telemetry::default();
        for s in 1..=4999 {
            t.record_step(rec(s, 1.0), 5000);
        }
        let c = t.curve(1000);
        assert!(c.len() <= 1001, "{}", c.len());
        assert_eq!(c.last().unwrap().step, 4999);
        assert_eq!(c[0].step, 1);
    }

    #[test]
    fn numbers_are_written_as_prometheus_reads_them() {
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(3.0), "3");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("split", "dev"), r#"{split="dev"}"#);
        assert_eq!(label("host", "a\"b\\c\nd"), r#"{host="a\"b\\c\nd"}"#);
    }
}
