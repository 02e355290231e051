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
//!   .partial-step-00000300-<pid>/   a checkpoint being written (deleted on the next start)
//!   .lock                     held (flock) by the one live process that uses the directory
//! ```
//!
//! **Architecture Invariant:** a directory named `step-*` is complete. A checkpoint is written
//! under a `.partial-*` name; its files and then the manifest are fsynced, the directory is
//! renamed to its final name, and the parent directory is fsynced. A crash at any moment leaves
//! either the whole checkpoint or a `.partial-*` directory that nothing reads. Pruning deletes
//! only after the new checkpoint is in place, and never the newest one.
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
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        File::create(&probe).and_then(|mut f| f.write_all(b"probe")).map_err(not_writable)?;
        std::fs::remove_file(&probe).map_err(not_writable)?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".coordinator.json.") {
                let _ = std::fs::remove_file(entry.path()); // a state file whose write was cut off
                continue;
            }
            if name.starts_with(".partial-") || name.starts_with(".replaced-") {
                tracing::info!(path = %entry.path().display(), "removing an incomplete checkpoint");
                std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
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
        let dir = self.dir.join(format!(".partial-{}-{}", dir_name(step), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(Partial { dir, step, files: BTreeMap::new(), committed: false })
    }

    /// Completes a checkpoint: checks that it holds the required files, fsyncs them, writes the
    /// manifest (with the files' sizes and hashes filled in), renames the directory into place,
    /// and prunes old checkpoints. Returns the checkpoint's directory.
    pub fn commit(&self, mut partial: Partial, mut manifest: Manifest) -> Result<PathBuf, CheckpointError> {
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
        let target = self.dir.join(dir_name(partial.step));
        if target.exists() {
            // A damaged checkpoint of the same step (`latest` skipped it): set it aside only now
            // that its replacement is complete.
            let aside = self.dir.join(format!(".replaced-{}-{}", dir_name(partial.step), std::process::id()));
            std::fs::rename(&target, &aside).map_err(io(&target))?;
            std::fs::rename(&partial.dir, &target).map_err(io(&target))?;
            let _ = std::fs::remove_dir_all(&aside);
        } else {
            std::fs::rename(&partial.dir, &target).map_err(io(&target))?;
        }
        partial.committed = true;
        sync_dir(&self.dir)?;
        self.prune()?;
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

    /// Keeps the `keep_last` newest checkpoints and the best by `best_metric`; deletes the rest.
    pub fn prune(&self) -> Result<Vec<PathBuf>, CheckpointError> {
        let all = self.list()?;
        let keep_from = all.len().saturating_sub(self.keep_last);
        let best = self.best(&all);
        let mut removed = Vec::new();
        for (i, (dir, _)) in all.iter().enumerate() {
            if i >= keep_from || Some(dir) == best.as_ref() {
                continue;
            }
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
            removed.push(dir.clone());
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
/// made under a temporary name and renamed into place; an older model directory there is
/// replaced only once the new one is complete.
pub fn publish_model(checkpoint: &Path, to: &Path) -> Result<(), CheckpointError> {
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".partial-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
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
    if to.exists() {
        let old = parent.join(format!(".replaced-{name}-{}", std::process::id()));
        std::fs::rename(to, &old).map_err(io(to))?;
        std::fs::rename(&tmp, to).map_err(io(to))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, to).map_err(io(to))?;
    }
    sync_dir(parent)
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
        store.commit(p, manifest(step, acc)).unwrap()
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
        let e = store.commit(p, manifest(20, None)).unwrap_err();
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
