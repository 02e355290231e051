//! The checkpoint directory: complete checkpoints only, ever.
//!
//! ```text
//! <checkpoint.dir>/
//!   step-00000200/            a complete checkpoint (a Hugging Face model directory plus state)
//!     model.safetensors       the weights, HF keys: `transformers` loads the directory as is
//!     config.json             the model config with the label names
//!     optimizer.safetensors   AdamW moments per tensor; the step count in the metadata
//!     tokenizer.json ...      the tokenizer files, when rank 0 sent them
//!     manifest.json           step, data cursor, RNG keys, job config, metrics, file sizes + SHA-256
//!   .partial-step-00000300-<unique>/   a checkpoint being written (deleted on the next start)
//!   .lock                     held (flock) by the one live process that uses the directory
//! ```
//!
//! **Architecture Invariant:** a directory named `step-*` is complete. A checkpoint is written
//! under a `.partial-*` name (unique across processes and hosts: not the PID, which is 1 in every
//! container); its files and then the manifest are fsynced, the directory is renamed to its
//! final name (exchanged with a damaged one of the same step), and the parent directory is
//! fsynced. A crash at any moment leaves either the whole checkpoint or a `.partial-*` directory
//! that nothing reads. Pruning deletes only checkpoints older than the one just committed, after
//! it is in place, and never the one a new generation is fetching. The published model directory
//! is replaced the same way, in one step.
//!
//! Plain file-system logic: no gRPC here (the service module streams into [`Partial`]).

use crate::config::{JobConfig, Publish};
use crate::eval::EvalMetrics;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
/// The manifest's format version; a checkpoint of another version is not resumed from.
pub const FORMAT_VERSION: u32 = 1;
/// The only file names a checkpoint may hold: a worker cannot write anywhere else.
pub const ALLOWED_FILES: &[&str] = &[
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
/// What a checkpoint must hold to be resumed from.
pub const REQUIRED_FILES: &[&str] = &["model.safetensors", "optimizer.safetensors", "config.json"];
/// The largest file a checkpoint may hold (a bound on what a message stream can make us write).
pub const MAX_FILE_BYTES: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("checkpoint directory {dir} is not writable: {source}")]
    NotWritable { dir: PathBuf, source: std::io::Error },
    #[error(
        "checkpoint directory {0} is in use by another live process (a second coordinator, or worker train, on the \
         same checkpoint.dir); stop it, or choose another checkpoint.dir or output.dir"
    )]
    Locked(PathBuf),
    #[error("checkpoint {0}: {1}")]
    Invalid(PathBuf, String),
    #[error("{0:?} is not a file a checkpoint may hold (one of {ALLOWED_FILES:?})")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io(path.to_owned(), e)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// Where the data stream stands: the next example of this epoch is at `position` in each rank's
/// shard (a shard of a world of `world_size`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u32,
    pub position: u64,
    pub world_size: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Completed optimizer steps.
    pub step: u64,
    pub cursor: Cursor,
    /// Every random choice of a job is a counter-based function of these keys: the epoch shuffle
    /// of (seed, epoch), the dropout masks of (seed, step, example index), the head
    /// initialisation of the seed. So they are the RNG state.
    pub rng: Rng,
    /// Whether this is the end of training.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// The resolved job config that wrote it.
    pub config: serde_json::Value,
    /// `train/loss` and the evaluation metrics at this step (`dev/accuracy`, ...).
    pub metrics: BTreeMap<String, f64>,
    pub files: BTreeMap<String, FileEntry>,
    pub created_unix_s: u64,
}

impl Manifest {
    /// The manifest of the checkpoint of `step` (its files are filled in by [`Store::commit`]).
    pub fn new(
        step: u64,
        cursor: Cursor,
        seed: u64,
        is_final: bool,
        config: serde_json::Value,
        metrics: BTreeMap<String, f64>,
    ) -> Self {
        let created_unix_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let rng = Rng { seed, step, epoch: cursor.epoch };
        Manifest {
            format: FORMAT_VERSION,
            step,
            cursor,
            rng,
            is_final,
            config,
            metrics,
            files: BTreeMap::new(),
            created_unix_s,
        }
    }
}

/// What a manifest records of a step: `train/loss` and each evaluation of the step, as
/// `<split>/<metric>` (what `checkpoint.best_metric` names).
pub fn step_metrics<'a>(
    train_loss: f64,
    evals: impl IntoIterator<Item = (&'a str, &'a EvalMetrics)>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if train_loss.is_finite() {
        out.insert("train/loss".to_string(), train_loss);
    }
    for (split, m) in evals {
        for (name, v) in m.named() {
            out.insert(format!("{split}/{name}"), v);
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rng {
    pub seed: u64,
    pub step: u64,
    pub epoch: u32,
}

/// The file in a checkpoint directory that its one live user holds an OS lock on (`flock`,
/// released when the process dies, so a restarted coordinator is never locked out).
pub const LOCK_FILE: &str = ".lock";

/// The checkpoint directory and its retention policy.
#[derive(Debug)]
pub struct Store {
    /// The directory's lock, held while the store lives (`None` where the file system has no
    /// locks).
    _lock: Option<File>,
    dir: PathBuf,
    keep_last: usize,
    /// `split/metric`; empty for none.
    best_metric: String,
}

pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// A checkpoint being written. Dropped before [`Store::commit`], it deletes itself.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    step: u64,
    files: BTreeMap<String, (File, Sha256, u64)>,
    committed: bool,
}

impl Partial {
    /// Appends `data` to the file `name`.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<(), CheckpointError> {
        if !ALLOWED_FILES.contains(&name) {
            return Err(CheckpointError::BadName(name.to_string()));
        }
        if !self.files.contains_key(name) {
            let path = self.dir.join(name);
            let f = File::create(&path).map_err(io(&path))?;
            self.files.insert(name.to_string(), (f, Sha256::new(), 0));
        }
        let (f, hash, len) = self.files.get_mut(name).expect("inserted above");
        *len += data.len() as u64;
        if *len > MAX_FILE_BYTES {
            return Err(CheckpointError::Invalid(self.dir.clone(), format!("{name} exceeds {MAX_FILE_BYTES} bytes")));
        }
        hash.update(data);
        f.write_all(data).map_err(io(&self.dir.join(name)))
    }

    pub fn step(&self) -> u64 {
        self.step
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    crate::fingerprint::sha256_file(path).map_err(io(path))
}

impl Store {
    /// Opens (creating) the directory, checks that it is writable, and deletes the `.partial-*`
    /// leftovers of a crash.
    pub fn open(dir: &Path, keep_last: usize, best_metric: &str) -> Result<Self, CheckpointError> {
        let not_writable = |source| CheckpointError::NotWritable { dir: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(not_writable)?;
        // Before anything is cleaned up: another live user's partial checkpoints are its own.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(not_writable)?;
        let lock = match lock.try_lock() {
            Ok(()) => Some(lock),
            Err(std::fs::TryLockError::WouldBlock) => return Err(CheckpointError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot lock the checkpoint directory; going on without");
                None
            }
        };
        let probe = dir.join(format!(".probe-{}", unique()));
        File::create(&probe).and_then(|mut f| f.write_all(b"probe")).map_err(not_writable)?;
        std::fs::remove_file(&probe).map_err(not_writable)?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".coordinator.json.") {
                let _ = std::fs::remove_file(entry.path()); // a state file whose write was cut off
                continue;
            }
            if name.starts_with(".partial-") {
                tracing::info!(path = %entry.path().display(), "removing an incomplete checkpoint");
                std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            } else if let Some((target, _)) = name.strip_prefix(".replaced-").and_then(|n| n.rsplit_once('-')) {
                recover(&dir.join(target))?;
            }
        }
        Ok(Store {
            _lock: lock,
            dir: dir.to_owned(),
            keep_last: keep_last.max(1),
            best_metric: best_metric.to_string(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every complete checkpoint, oldest first. A `step-*` directory whose manifest does not
    /// parse (written by someone else, or damaged on disk) is reported and left alone.
    pub fn list(&self) -> Result<Vec<(PathBuf, Manifest)>, CheckpointError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("step-") {
                continue;
            }
            match read_manifest(&entry.path()) {
                Ok(m) => out.push((entry.path(), m)),
                Err(e) => tracing::warn!(error = %e, "skipping a checkpoint that cannot be read"),
            }
        }
        out.sort_by_key(|(_, m)| m.step);
        Ok(out)
    }

    /// The checkpoint to resume from: the newest complete one whose files match its manifest.
    pub fn latest(&self) -> Result<Option<(PathBuf, Manifest)>, CheckpointError> {
        for (dir, m) in self.list()?.into_iter().rev() {
            match verify(&dir, &m) {
                Ok(()) => return Ok(Some((dir, m))),
                Err(e) => tracing::warn!(error = %e, "skipping a damaged checkpoint"),
            }
        }
        Ok(None)
    }

    /// Starts writing the checkpoint of `step`.
    pub fn begin(&self, step: u64) -> Result<Partial, CheckpointError> {
        let dir = self.dir.join(format!(".partial-{}-{}", dir_name(step), unique()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(Partial { dir, step, files: BTreeMap::new(), committed: false })
    }

    /// Completes a checkpoint: checks that it holds the required files, fsyncs them, writes the
    /// manifest (with the files' sizes and hashes filled in), renames the directory into place,
    /// and prunes old checkpoints (never one of `protect`: the one a new generation is fetching).
    /// Returns the checkpoint's directory.
    pub fn commit(
        &self,
        mut partial: Partial,
        mut manifest: Manifest,
        protect: &[&Path],
    ) -> Result<PathBuf, CheckpointError> {
        for req in REQUIRED_FILES {
            if !partial.files.contains_key(*req) {
                return Err(CheckpointError::Invalid(partial.dir.clone(), format!("{req} was not sent")));
            }
        }
        manifest.files.clear();
        for (name, (f, hash, len)) in std::mem::take(&mut partial.files) {
            f.sync_all().map_err(io(&partial.dir.join(&name)))?;
            manifest.files.insert(name, FileEntry { bytes: len, sha256: crate::fingerprint::hex(&hash.finalize()) });
        }
        let mpath = partial.dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises") + "\n";
        let mut f = File::create(&mpath).map_err(io(&mpath))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io(&mpath))?;
        sync_dir(&partial.dir)?;
        // A damaged checkpoint of the same step (`latest` skipped it) is replaced only now that
        // its replacement is complete.
        let target = self.dir.join(dir_name(partial.step));
        install_dir(&partial.dir, &target)?;
        partial.committed = true;
        self.prune(&target, protect)?;
        Ok(target)
    }

    /// Publishes the job's model as `to` at the end of training: the final checkpoint, or with
    /// [`Publish::Best`] the best by `best_metric` (the final one when none has the metric).
    /// Returns the checkpoint published.
    pub fn publish_end(&self, final_checkpoint: &Path, choice: Publish, to: &Path) -> Result<PathBuf, CheckpointError> {
        let from = match choice {
            Publish::Final => None,
            Publish::Best => self.best(&self.list()?),
        }
        .unwrap_or_else(|| final_checkpoint.to_owned());
        publish_model(&from, to)?;
        Ok(from)
    }

    /// Prunes after `just` was committed: keeps it, the `keep_last - 1` newest complete ones
    /// before it, the best by `best_metric`, and `protect`; deletes the other checkpoints older
    /// than `just`. Newer ones (left by an earlier run and skipped on resume as damaged, or from
    /// steps the job will write again) are neither counted nor deleted: a damaged newer
    /// checkpoint can never make pruning delete the one just written. "Complete" is checked by
    /// the files' sizes against the manifest (no hashing here: that is `latest`'s job).
    pub fn prune(&self, just: &Path, protect: &[&Path]) -> Result<Vec<PathBuf>, CheckpointError> {
        let all = self.list()?;
        let Some(at) = all.iter().find(|(d, _)| d == just).map(|(_, m)| m.step) else {
            return Ok(Vec::new()); // not a listed checkpoint: nothing is judged against it
        };
        let best = self.best(&all);
        let older: Vec<&(PathBuf, Manifest)> = all.iter().filter(|(_, m)| m.step < at).collect();
        let complete = |d: &Path, m: &Manifest| {
            m.files.iter().all(|(name, f)| std::fs::metadata(d.join(name)).is_ok_and(|md| md.len() == f.bytes))
        };
        let mut kept = 1; // `just`
        let mut removed = Vec::new();
        for (dir, m) in older.into_iter().rev() {
            if Some(dir) == best.as_ref() || protect.contains(&dir.as_path()) {
                continue;
            }
            if kept < self.keep_last && complete(dir, m) {
                kept += 1;
                continue;
            }
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
            removed.push(dir.clone());
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// The checkpoint with the best `best_metric` (the earliest of equals), if any has it.
    pub fn best(&self, all: &[(PathBuf, Manifest)]) -> Option<PathBuf> {
        if self.best_metric.is_empty() {
            return None;
        }
        let lower_is_better = self.best_metric.ends_with("loss") || self.best_metric.ends_with("perplexity");
        let mut best: Option<(&PathBuf, f64)> = None;
        for (dir, m) in all {
            let Some(&v) = m.metrics.get(&self.best_metric) else { continue };
            let better = match best {
                None => true,
                Some((_, b)) => {
                    if lower_is_better {
                        v < b
                    } else {
                        v > b
                    }
                }
            };
            if better && v.is_finite() {
                best = Some((dir, v));
            }
        }
        best.map(|(d, _)| d.clone())
    }
}

/// The checkpoint directory of `job`, opened, and the checkpoint the job resumes from when there
/// is one that it may continue: the newest complete one, written by a world of a size in
/// `worlds` under a config that differs from this one only in what does not change the
/// computation. Checkpoints there with `checkpoint.resume = false` are an error, not overwritten.
pub fn open_for(
    job: &JobConfig,
    worlds: std::ops::RangeInclusive<usize>,
) -> anyhow::Result<(Store, Option<(PathBuf, Manifest)>)> {
    let c = &job.checkpoint;
    let store = Store::open(&job.checkpoint_dir(), c.keep_last, &c.best_metric)?;
    recover(&job.output.dir.join("model"))?;
    let resume = match store.latest()? {
        None => None,
        Some((dir, _)) if !c.resume => anyhow::bail!(
            "{} holds checkpoints of an earlier run (newest: {}); set checkpoint.resume = true to continue it, or \
             choose another checkpoint.dir or output.dir",
            store.dir().display(),
            dir.display()
        ),
        Some((dir, m)) => {
            let then: JobConfig = serde_json::from_value(m.config.clone())
                .with_context(|| format!("the job config recorded in {}", dir.display()))?;
            let diff = job.differences_that_matter(&then);
            anyhow::ensure!(
                diff.is_empty(),
                "cannot resume from {}: it was written by a job with another config ({}); use another output.dir \
                 (or checkpoint.dir) for a new job",
                dir.display(),
                diff.join("; ")
            );
            anyhow::ensure!(
                worlds.contains(&(m.cursor.world_size as usize)),
                "cannot resume from {}: it was written by a world of {} workers and this job has {}",
                dir.display(),
                m.cursor.world_size,
                if worlds.start() == worlds.end() {
                    worlds.start().to_string()
                } else {
                    format!("{}..={}", worlds.start(), worlds.end())
                }
            );
            tracing::info!(checkpoint = %dir.display(), step = m.step, epoch = m.cursor.epoch, "resuming");
            Some((dir, m))
        }
    };
    Ok((store, resume))
}

/// Publishes the model files of a checkpoint (weights, config, tokenizer: not the optimizer
/// state or the manifest) as the model directory `to`, which `transformers` loads. The copy is
/// made under a temporary name, fsynced, and put in place in one step ([`install_dir`]): a crash
/// at any moment leaves the old model directory or the new one, whole.
pub fn publish_model(checkpoint: &Path, to: &Path) -> Result<(), CheckpointError> {
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    recover(to)?;
    let tmp = parent.join(format!(".partial-{}-{}", file_name(to), unique()));
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    for f in ALLOWED_FILES.iter().filter(|f| **f != "optimizer.safetensors") {
        let src = checkpoint.join(f);
        if src.exists() {
            let dst = tmp.join(f);
            std::fs::copy(&src, &dst).map_err(io(&src))?;
            File::open(&dst).and_then(|f| f.sync_all()).map_err(io(&dst))?;
        }
    }
    sync_dir(&tmp)?;
    crate::fault::coordinator_point("publish-copied", 0);
    install_dir(&tmp, to)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

/// A name no other process or host picks: the PID is 1 in every container, so it is mixed with
/// the time and a per-process random key (std's `RandomState`), and a counter.
pub fn unique() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", KEY.get_or_init(Default::default).hash_one((std::process::id(), nanos, n)))
}

/// Puts the complete directory `new` at `target` in one step, then fsyncs their parent: a
/// rename when nothing is at `target`, else an exchange of the two (`renameat2` with
/// `RENAME_EXCHANGE`), after which the old directory, now at `new`'s name, is deleted. Where
/// the file system cannot exchange, the old one is first renamed to `.replaced-<name>-*`: a
/// crash between the two renames leaves no `target`, and [`recover`] puts the old one back.
fn install_dir(new: &Path, target: &Path) -> Result<(), CheckpointError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !target.exists() {
        std::fs::rename(new, target).map_err(io(target))?;
        return sync_dir(parent);
    }
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, new, CWD, target, RenameFlags::EXCHANGE) {
        Ok(()) => {
            sync_dir(parent)?;
            crate::fault::coordinator_point("install-swapped", 0);
            std::fs::remove_dir_all(new).map_err(io(new))?;
        }
        Err(e) => {
            tracing::debug!(error = %e, target = %target.display(), "cannot exchange directories here; two renames");
            let aside = parent.join(format!(".replaced-{}-{}", file_name(target), unique()));
            std::fs::rename(target, &aside).map_err(io(target))?;
            std::fs::rename(new, target).map_err(io(target))?;
            sync_dir(parent)?;
            std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
        }
    }
    sync_dir(parent)
}

/// Cleans up what a crash of [`publish_model`] or [`install_dir`] left beside `target`:
/// `.partial-<name>-*` copies are deleted; a `.replaced-<name>-*` directory is put back when
/// `target` is missing (the crash fell between the two renames), else deleted.
pub fn recover(target: &Path) -> Result<(), CheckpointError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = file_name(target);
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    for entry in entries {
        let entry = entry.map_err(io(parent))?;
        let n = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if n.starts_with(&format!(".partial-{name}-")) {
            tracing::info!(path = %path.display(), "removing an incomplete copy");
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        } else if n.starts_with(&format!(".replaced-{name}-")) {
            if target.exists() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                tracing::warn!(path = %path.display(), target = %target.display(), "putting back what a crash left aside");
                std::fs::rename(&path, target).map_err(io(target))?;
                sync_dir(parent)?;
            }
        }
    }
    Ok(())
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid(path.clone(), format!("manifest: {e}")))?;
    if m.format != FORMAT_VERSION {
        return Err(CheckpointError::Invalid(
            path,
            format!("format {} (this build reads format {FORMAT_VERSION})", m.format),
        ));
    }
    Ok(m)
}

/// Checks every file of a checkpoint against the size and SHA-256 its manifest records.
pub fn verify(dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    for req in REQUIRED_FILES {
        if !m.files.contains_key(*req) {
            return Err(CheckpointError::Invalid(dir.to_owned(), format!("the manifest lists no {req}")));
        }
    }
    for (name, entry) in &m.files {
        let path = dir.join(name);
        let len = std::fs::metadata(&path).map_err(io(&path))?.len();
        if len != entry.bytes {
            return Err(CheckpointError::Invalid(
                path,
                format!("{len} bytes on disk, {} in the manifest", entry.bytes),
            ));
        }
        if sha256_file(&path)? != entry.sha256 {
            return Err(CheckpointError::Invalid(path, "SHA-256 differs from the manifest".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tandem-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn manifest(step: u64, acc: Option<f64>) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            step,
            cursor: Cursor { epoch: 0, position: step * 4, world_size: 2 },
            rng: Rng { seed: 1, step, epoch: 0 },
            is_final: false,
            config: serde_json::json!({}),
            metrics: acc.map(|a| BTreeMap::from([("dev/accuracy".to_string(), a)])).unwrap_or_default(),
            files: BTreeMap::new(),
            created_unix_s: 0,
        }
    }

    fn save(store: &Store, step: u64, acc: Option<f64>) -> PathBuf {
        let mut p = store.begin(step).unwrap();
        for f in REQUIRED_FILES {
            p.write(f, format!("{f} at {step}").as_bytes()).unwrap();
        }
        store.commit(p, manifest(step, acc), &[]).unwrap()
    }

    fn steps(store: &Store) -> Vec<u64> {
        store.list().unwrap().iter().map(|(_, m)| m.step).collect()
    }

    #[test]
    fn keeps_the_last_k_and_the_best() {
        let dir = scratch("keep");
        let store = Store::open(&dir, 2, "dev/accuracy").unwrap();
        save(&store, 10, Some(0.7));
        save(&store, 20, Some(0.9));
        save(&store, 30, Some(0.8));
        save(&store, 40, Some(0.85));
        assert_eq!(steps(&store), vec![20, 30, 40]);
        save(&store, 50, None);
        assert_eq!(steps(&store), vec![20, 40, 50]);
        let (latest, m) = store.latest().unwrap().unwrap();
        assert_eq!((latest.file_name().unwrap().to_str().unwrap(), m.step), ("step-00000050", 50));
        assert_eq!(m.files["model.safetensors"].bytes, "model.safetensors at 50".len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_partial_checkpoint_never_replaces_a_complete_one() {
        let dir = scratch("partial");
        let store = Store::open(&dir, 3, "").unwrap();
        save(&store, 10, None);
        // The writer dies mid-stream: dropped, the partial directory disappears.
        let mut p = store.begin(20).unwrap();
        p.write("model.safetensors", b"half a mod").unwrap();
        drop(p);
        // The writer forgets a file: the commit is refused, nothing changes.
        let mut p = store.begin(20).unwrap();
        p.write("model.safetensors", b"x").unwrap();
        let e = store.commit(p, manifest(20, None), &[]).unwrap_err();
        assert!(e.to_string().contains("optimizer.safetensors was not sent"), "{e}");
        // A crash of the whole process leaves a .partial directory: the next open removes it.
        let crashed = dir.join(".partial-step-00000030-1");
        std::fs::create_dir(&crashed).unwrap();
        std::fs::write(crashed.join("model.safetensors"), b"torn").unwrap();
        drop(store); // the crashed process's lock went with it
        let store = Store::open(&dir, 3, "").unwrap();
        assert!(!crashed.exists());
        assert_eq!(steps(&store), vec![10]);
        let names: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n != LOCK_FILE).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("step-00000010")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_checkpoint_is_not_resumed_from() {
        let dir = scratch("damaged");
        let store = Store::open(&dir, 3, "").unwrap();
        save(&store, 10, None);
        let newest = save(&store, 20, None);
        std::fs::write(newest.join("optimizer.safetensors"), b"optimizer.safetensors at 2X").unwrap();
        let (_, m) = store.latest().unwrap().unwrap();
        assert_eq!(m.step, 10, "the newest checkpoint's hash no longer matches");
        // Re-reaching step 20 replaces the damaged one.
        save(&store, 20, None);
        assert_eq!(store.latest().unwrap().unwrap().1.step, 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One live user per checkpoint directory: a second store on it is refused, naming it, and
    /// leaves the first one's partial checkpoint alone; once the first is gone, it opens.
    #[test]
    fn a_second_live_store_on_the_same_directory_is_refused() {
        let dir = scratch("locked");
        let first = Store::open(&dir, 3, "").unwrap();
        let mut partial = first.begin(7).unwrap();
        partial.write("model.safetensors", b"being written").unwrap();
        let e = Store::open(&dir, 3, "").unwrap_err();
        assert!(matches!(&e, CheckpointError::Locked(d) if d == &dir), "{e}");
        assert!(e.to_string().contains("in use by another live process"), "{e}");
        let partials = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
            .count();
        assert_eq!(partials, 1, "the refused store cleaned up the live one's partial checkpoint");
        drop(partial);
        drop(first);
        Store::open(&dir, 3, "").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An earlier run left a newer checkpoint whose bytes were damaged (`latest` skipped it, so
    /// the job resumed from an older one): pruning after the next commit keeps the checkpoint
    /// just committed (and one a new generation is fetching), whatever the damaged one holds.
    #[test]
    fn prune_with_a_damaged_newer_checkpoint_keeps_the_one_just_committed() {
        let dir = scratch("prune-damaged");
        let store = Store::open(&dir, 1, "").unwrap();
        save(&store, 10, None);
        let newer = save(&store, 20, None);
        assert_eq!(steps(&store), vec![20]);
        save(&store, 10, None);
        std::fs::write(newer.join("model.safetensors"), b"model.safetensors at 2X").unwrap(); // same size
        assert_eq!(store.latest().unwrap().unwrap().1.step, 10, "the damaged one is skipped");
        let just = save(&store, 12, None);
        assert!(just.join(MANIFEST).exists(), "the checkpoint just committed was pruned");
        assert_eq!(steps(&store), vec![12, 20], "older ones pruned; the newer one neither counted nor deleted");
        assert_eq!(store.latest().unwrap().unwrap().0, just);
        // A checkpoint being fetched is kept past keep_last.
        let mut p = store.begin(14).unwrap();
        for f in REQUIRED_FILES {
            p.write(f, b"x").unwrap();
        }
        store.commit(p, manifest(14, None), &[just.as_path()]).unwrap();
        assert_eq!(steps(&store), vec![12, 14, 20]);
        save(&store, 16, None);
        assert_eq!(steps(&store), vec![16, 20]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The model files of `dir` (a checkpoint or a published model), by name.
    fn model_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .filter(|(n, _)| n != MANIFEST && n != "optimizer.safetensors")
            .collect()
    }

    /// Run by `publish_killed_at_every_step_leaves_a_complete_model` in a child process, which
    /// `TANDEM_FAULT` kills at the point under test.
    #[test]
    #[ignore = "a child process of publish_killed_at_every_step_leaves_a_complete_model"]
    fn publish_child() {
        let dir = PathBuf::from(std::env::var("TANDEM_TEST_PUBLISH").unwrap());
        publish_model(&dir.join("checkpoints/step-00000020"), &dir.join("model")).unwrap();
    }

    /// The coordinator is SIGKILLed at every point of publishing a model over an older one:
    /// `model/` is afterwards the old model or the new one, whole, and the next publish (after
    /// the start's clean-up) leaves the new one and no leftovers.
    #[test]
    fn publish_killed_at_every_step_leaves_a_complete_model() {
        for point in ["publish-copied", "install-swapped"] {
            let dir = scratch(&format!("publish-{point}"));
            let store = Store::open(&dir.join("checkpoints"), 3, "").unwrap();
            let (old, new) = (save(&store, 10, None), save(&store, 20, None));
            let model = dir.join("model");
            publish_model(&old, &model).unwrap();
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "checkpoints::tests::publish_child", "--ignored", "--quiet"])
                .env("TANDEM_FAULT", format!("coordinator:{point}@0"))
                .env("TANDEM_TEST_PUBLISH", &dir)
                .output()
                .unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&child.status),
                Some(9),
                "{point}: the child was not killed: {}",
                String::from_utf8_lossy(&child.stderr)
            );
            let after = model_files(&model);
            assert!(after == model_files(&old) || after == model_files(&new), "{point}: a torn model: {after:?}");
            let leftovers = |d: &Path| {
                std::fs::read_dir(d)
                    .unwrap()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            };
            assert_eq!(leftovers(&dir), 1, "{point}: the killed publish left its copy behind");
            recover(&model).unwrap();
            assert_eq!(leftovers(&dir), 0, "{point}: the start's clean-up");
            publish_model(&new, &model).unwrap();
            assert_eq!(model_files(&model), model_files(&new));
            assert_eq!(leftovers(&dir), 0);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// A crash between the two renames of the fallback (file systems without an exchange)
    /// leaves no model directory: the next start puts the old one back.
    #[test]
    fn a_model_set_aside_by_a_crash_is_put_back() {
        let dir = scratch("put-back");
        std::fs::create_dir_all(dir.join(".replaced-model-1")).unwrap();
        std::fs::write(dir.join(".replaced-model-1/config.json"), b"{}").unwrap();
        std::fs::create_dir_all(dir.join(".partial-model-2")).unwrap();
        recover(&dir.join("model")).unwrap();
        assert_eq!(std::fs::read(dir.join("model/config.json")).unwrap(), b"{}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only model/ is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_outside_the_allowed_set_are_refused() {
        let dir = scratch("names");
        let store = Store::open(&dir, 1, "").unwrap();
        let mut p = store.begin(1).unwrap();
        for bad in ["../escape", "/etc/passwd", "model.safetensors/../../x", "manifest.json"] {
            assert!(matches!(p.write(bad, b"x"), Err(CheckpointError::BadName(_))), "{bad}");
        }
        drop(p);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let dir = scratch("unwritable");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a-file");
        std::fs::write(&file, b"").unwrap();
        let e = Store::open(&file.join("checkpoints"), 1, "").unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("checkpoint directory {} is not writable", file.join("checkpoints").display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
