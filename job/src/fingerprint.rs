//! What every worker of a job must agree on before it is admitted: the job config it was handed
//! and the model files it will load (a node with another version of the checkpoint would train
//! a different model and poison the others' gradients). Both are SHA-256 digests, hex.

use crate::config::JobConfig;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha256(bytes))
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files a worker loads the model from: the checkpoint's config and weights (or the index of
/// a sharded checkpoint and its files), and the tokenizer (its tokenizer.json or, where there is
/// none, BertTokenizer's files beside it).
pub fn model_files(job: &JobConfig) -> Vec<PathBuf> {
    let mut files = vec![job.model.path.join("config.json")];
    let (weights, index) =
        (job.model.path.join("model.safetensors"), job.model.path.join("model.safetensors.index.json"));
    if job.model.from_scratch {
        // No weights are read: the model is its config (and the seed, in the job config).
    } else if !weights.exists() && index.exists() {
        // A sharded checkpoint: the index and the files it names (the load reports a bad index).
        let named: std::collections::BTreeSet<String> = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("weight_map").and_then(|m| m.as_object()).cloned())
            .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        files.push(index.clone());
        files.extend(named.iter().map(|f| index.with_file_name(f)));
    } else {
        files.push(weights);
    }
    let tok = job.tokenizer_path();
    let bert: Vec<PathBuf> =
        ["vocab.txt", "tokenizer_config.json"].iter().map(|f| tok.with_file_name(f)).filter(|p| p.exists()).collect();
    if tok.exists() || bert.is_empty() {
        files.push(tok);
    } else {
        files.extend(bert);
    }
    files
}

/// One digest over the model files (each file's name, length and bytes, in order).
pub fn model_sha256(job: &JobConfig) -> std::io::Result<String> {
    let mut h = Sha256::new();
    for path in model_files(job) {
        hash_file(&mut h, &path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    Ok(hex(&h.finalize()))
}

fn hash_file(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(f.metadata()?.len().to_le_bytes());
    feed(h, f)
}

/// The SHA-256 of a file's bytes, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    feed(&mut h, std::fs::File::open(path)?)?;
    Ok(hex(&h.finalize()))
}

fn feed(h: &mut Sha256, mut r: impl Read) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_files_are_the_json_or_else_bert_s() {
        let dir = std::env::temp_dir().join(format!("tandem-model-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut job = JobConfig::default();
        job.model.path = dir.clone();
        let names = |job: &JobConfig| -> Vec<String> {
            model_files(job).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        // Nothing there: tokenizer.json, so that the error names it.
        assert_eq!(names(&job), ["config.json", "model.safetensors", "tokenizer.json"]);
        std::fs::write(dir.join("vocab.txt"), "[PAD]\n").unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        assert_eq!(names(&job), ["config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"]);
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(names(&job), ["config.json", "model.safetensors", "tokenizer.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digests_are_hex_sha256() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
