//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` (or a sharded
//! checkpoint's `model.safetensors.index.json` and the files it names, read one at a time).
//!
//! Loading maps every tensor of the file onto the layout: names with or without the `bert.`
//! prefix, f32 (or f16/bf16, widened). Buffers such as `embeddings.position_ids` and the tied
//! decoder weight are skipped, and so are the tensors of heads this model does not have (the
//! NSP head, a classifier when fine-tuning for masked LM, ...). A tensor the layout does not
//! know, or one of the wrong shape, is an error that names it; so is a missing body tensor.
//! Missing head tensors are initialised as `transformers` does: normal(0, initializer_range) for
//! weights, zeros for biases, ones/zeros for layer norms, from the seed.
//!
//! Saving writes a directory that `transformers.BertForSequenceClassification.from_pretrained`
//! (or `BertForMaskedLM`) loads: the keys it expects, `config.json` with the architecture and
//! the label names, and the tokenizer files copied alongside.

use crate::bert_config::BertConfig;
use crate::layout::{Head, Init, Layout};
use crate::model::Bert;
use crate::ModelError;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

// Tensors are written as their in-memory bytes; safetensors is little-endian.
#[cfg(target_endian = "big")]
compile_error!("checkpoints are written in native byte order, which must be little-endian");

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// What a load did besides copying tensors: which tensors it initialised and which it skipped.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub initialized: Vec<String>,
    pub skipped: Vec<String>,
}

/// Tensors that are never parameters of ours: buffers and the tied decoder copy.
fn is_ignored_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
        || name == "cls.predictions.decoder.weight"
        || name == "cls.predictions.decoder.bias"
        || name.starts_with("cls.seq_relationship.")
}

/// Tensors that belong to a head this model does not have.
fn is_other_head(name: &str, head: &Head) -> bool {
    match head {
        Head::Classification { .. } => name.starts_with("cls."),
        Head::MaskedLm => name.starts_with("classifier.") || name.starts_with("pooler."),
    }
}

fn to_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, ModelError> {
    let data = view.data();
    let out = match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(ModelError::Tensor {
                file: path.to_owned(),
                name: name.to_owned(),
                msg: format!("dtype {other:?} is not a floating-point type we read (F32, F16, BF16)"),
            })
        }
    };
    Ok(out)
}

/// Fills the tensors named in `names` from their `Init`, keyed by `seed` and the tensor's index
/// in the layout, so that the same seed always gives the same head.
pub fn init_tensors(model: &mut Bert, names: &[String], seed: u64) {
    let std = model.cfg.initializer_range as f32;
    let pad = model.cfg.pad_token_id;
    for (idx, e) in model.layout.entries.iter().enumerate() {
        if !names.contains(&e.name) {
            continue;
        }
        let dst = &mut model.params[e.range()];
        match e.init {
            Init::Zeros => dst.fill(0.0),
            Init::Ones => dst.fill(1.0),
            Init::Normal => {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = philox::normal(seed, idx as u32, i as u64) * std;
                }
                // `nn.Embedding(padding_idx=...)` rows start at zero.
                if e.name == "embeddings.word_embeddings.weight" {
                    if let Some(p) = pad {
                        let c = e.shape[1];
                        dst[p as usize * c..(p as usize + 1) * c].fill(0.0);
                    }
                }
            }
        }
    }
}

/// A model with every tensor initialised from `seed` (pretraining from scratch, tests).
pub fn init_model(cfg: BertConfig, head: Head, seed: u64) -> Bert {
    let mut m = Bert::zeros(cfg, head);
    let names: Vec<String> = m.layout.entries.iter().map(|e| e.name.clone()).collect();
    init_tensors(&mut m, &names, seed);
    m
}

/// The index of a checkpoint sharded over several safetensors files, as `transformers` writes one
/// past its `max_shard_size`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads `dir/config.json` and `dir/model.safetensors` (or the files of
/// `model.safetensors.index.json`, one at a time) into a model with the given head.
pub fn load(dir: &Path, head: Head, seed: u64) -> Result<(Bert, LoadReport), ModelError> {
    let cfg = BertConfig::from_file(&dir.join(CONFIG_FILE))?;
    let mut model = Bert::zeros(cfg, head);
    let (path, index) = (dir.join(WEIGHTS_FILE), dir.join(INDEX_FILE));
    let files = if !path.exists() && index.exists() { shard_files(&index)? } else { vec![path.clone()] };
    let (mut report, mut loaded) = (LoadReport::default(), BTreeSet::new());
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| ModelError::Io(file.clone(), e))?;
        copy_tensors(&mut model, &bytes, file, &mut loaded, &mut report)?;
    }
    let origin = if files.len() > 1 { index } else { path };
    report.initialized = missing_head_tensors(&model, &loaded, &origin)?;
    init_tensors(&mut model, &report.initialized, seed);
    Ok((model, report))
}

/// The files an index names in its `weight_map`, each once, in order of name.
fn shard_files(index: &Path) -> Result<Vec<std::path::PathBuf>, ModelError> {
    let bad = |msg: String| ModelError::Safetensors(index.to_owned(), msg);
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::Io(index.to_owned(), e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no weight_map".into()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("the file of {tensor} is not a string")))?;
        // A bare file name beside the index: nothing else may be read through it.
        if file.is_empty() || file.contains(['/', '\\']) || file == ".." {
            return Err(bad(format!("names the file {file:?} for {tensor}, not a file beside it")));
        }
        files.insert(file.to_owned());
    }
    if files.is_empty() {
        return Err(bad("names no files".into()));
    }
    Ok(files.into_iter().map(|f| index.with_file_name(f)).collect())
}

/// Copies the tensors of a safetensors file (`bytes`, read from `path`) into `model`. Returns
/// which head tensors were missing (not initialised here) and which tensors were skipped.
pub fn load_weights(model: &mut Bert, bytes: &[u8], path: &Path) -> Result<LoadReport, ModelError> {
    let (mut report, mut loaded) = (LoadReport::default(), BTreeSet::new());
    copy_tensors(model, bytes, path, &mut loaded, &mut report)?;
    report.initialized = missing_head_tensors(model, &loaded, path)?;
    Ok(report)
}

/// Copies one file's tensors into `model`, adding their names to `loaded` and the skipped ones to
/// `report`.
fn copy_tensors(
    model: &mut Bert,
    bytes: &[u8],
    path: &Path,
    loaded: &mut BTreeSet<String>,
    report: &mut LoadReport,
) -> Result<(), ModelError> {
    let path = path.to_owned();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::Safetensors(path.clone(), format!("{e} (is the file complete?)")))?;
    let head = model.layout.head.clone();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    for key in names {
        let name = key.strip_prefix("bert.").unwrap_or(&key).to_owned();
        if is_ignored_buffer(&name) || is_other_head(&name, &head) {
            report.skipped.push(key.clone());
            continue;
        }
        let entry = model.layout.get(&name).ok_or_else(|| ModelError::Tensor {
            file: path.clone(),
            name: key.clone(),
            msg: "is not a tensor of a BERT model with this config and head".into(),
        })?;
        let view = st.tensor(&key).map_err(|e| ModelError::Safetensors(path.clone(), e.to_string()))?;
        if view.shape() != entry.shape.as_slice() {
            return Err(ModelError::Tensor {
                file: path.clone(),
                name: key.clone(),
                msg: format!("has shape {:?} in the file but the model expects {:?}", view.shape(), entry.shape),
            });
        }
        if !loaded.insert(name.clone()) {
            return Err(ModelError::Tensor {
                file: path.clone(),
                name: key.clone(),
                msg: "appears twice (with and without the `bert.` prefix)".into(),
            });
        }
        let range = entry.range();
        let data = to_f32(&path, &key, &view)?;
        model.params[range].copy_from_slice(&data);
    }
    Ok(())
}

/// The head tensors no file held (to be initialised); a missing body tensor is an error.
fn missing_head_tensors(model: &Bert, loaded: &BTreeSet<String>, path: &Path) -> Result<Vec<String>, ModelError> {
    let missing: Vec<_> = model.layout.entries.iter().filter(|e| !loaded.contains(&e.name)).collect();
    if let Some(e) = missing.iter().find(|e| !e.head) {
        return Err(ModelError::Tensor {
            file: path.to_owned(),
            name: e.name.clone(),
            msg: "is missing from the checkpoint (only head tensors may be missing)".into(),
        });
    }
    Ok(missing.iter().map(|e| e.name.clone()).collect())
}

fn serialize(
    tensors: Vec<(String, Vec<usize>, &[f32])>,
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>, ModelError> {
    // safetensors is little-endian, as every target we build for: the f32s are its bytes as they
    // lie in memory, viewed in place, not copied (the copies were a full extra state at peak).
    const _: () = assert!(cfg!(target_endian = "little"), "safetensors stores little-endian f32");
    let mut views = Vec::new();
    for (name, shape, d) in tensors {
        let v = TensorView::new(Dtype::F32, shape, bytemuck::cast_slice::<f32, u8>(d))
            .map_err(|err| ModelError::Safetensors(path.to_owned(), err.to_string()))?;
        views.push((name, v));
    }
    safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Safetensors(path.to_owned(), e.to_string()))
}

/// `model.safetensors`: every parameter under its Hugging Face key, f32.
pub fn weights_bytes(model: &Bert) -> Result<Vec<u8>, ModelError> {
    let tensors = model
        .layout
        .entries
        .iter()
        .map(|e| (Layout::hf_key(&e.name), e.shape.clone(), &model.params[e.range()]))
        .collect();
    serialize(tensors, HashMap::from([("format".to_string(), "pt".to_string())]), Path::new(WEIGHTS_FILE))
}

/// `config.json` for `transformers`: the checkpoint's config with the architecture and, for a
/// classifier, the label names (index = class id) as `id2label` / `label2id`.
pub fn config_json(model: &Bert, labels: Option<&[String]>) -> String {
    let mut cfg = model.cfg.raw.clone();
    let arch = match model.layout.head {
        Head::Classification { .. } => "BertForSequenceClassification",
        Head::MaskedLm => "BertForMaskedLM",
    };
    cfg.insert("architectures".into(), serde_json::json!([arch]));
    cfg.insert("model_type".into(), serde_json::json!("bert"));
    if let Head::Classification { num_labels } = model.layout.head {
        let names: Vec<String> = match labels {
            Some(l) => l.to_vec(),
            None => (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
        };
        let id2label: serde_json::Map<_, _> =
            names.iter().enumerate().map(|(i, n)| (i.to_string(), serde_json::json!(n))).collect();
        let label2id: serde_json::Map<_, _> =
            names.iter().enumerate().map(|(i, n)| (n.clone(), serde_json::json!(i))).collect();
        cfg.insert("id2label".into(), id2label.into());
        cfg.insert("label2id".into(), label2id.into());
        cfg.insert("problem_type".into(), serde_json::json!("single_label_classification"));
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).expect("config serialises") + "\n"
}

/// The tokenizer files a model directory carries, as found in `dir`.
pub const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"];

/// Writes a model directory that `transformers.BertForSequenceClassification.from_pretrained`
/// (or `BertForMaskedLM`) loads, with the tokenizer files of `tokenizer_from` copied alongside.
pub fn save(
    model: &Bert,
    dir: &Path,
    labels: Option<&[String]>,
    tokenizer_from: Option<&Path>,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io(dir.to_owned(), e))?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
    std::fs::write(&tmp, weights_bytes(model)?).map_err(|e| ModelError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, &weights).map_err(|e| ModelError::Io(weights.clone(), e))?;
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, config_json(model, labels)).map_err(|e| ModelError::Io(cfg_path.clone(), e))?;
    if let Some(src) = tokenizer_from {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.exists() {
                std::fs::copy(&from, dir.join(f)).map_err(|e| ModelError::Io(from.clone(), e))?;
            }
        }
    }
    Ok(())
}

/// The files of a checkpoint of the training state: the weights, the optimizer state, the config
/// with the label names, and the tokenizer files found in `tokenizer_dir`.
pub fn state_files(
    model: &Bert,
    opt: &crate::optim::AdamW,
    labels: &[String],
    tokenizer_dir: Option<&Path>,
) -> Result<Vec<(String, Vec<u8>)>, ModelError> {
    let mut files = vec![
        (WEIGHTS_FILE.to_string(), weights_bytes(model)?),
        (OPTIMIZER_FILE.to_string(), optimizer_bytes(&model.layout, opt)?),
        (CONFIG_FILE.to_string(), config_json(model, Some(labels)).into_bytes()),
    ];
    if let Some(dir) = tokenizer_dir {
        for f in TOKENIZER_FILES {
            let p = dir.join(f);
            if p.exists() {
                files.push((f.to_string(), std::fs::read(&p).map_err(|e| ModelError::Io(p.clone(), e))?));
            }
        }
    }
    Ok(files)
}

/// `optimizer.safetensors`: AdamW's first and second moments per tensor (`<hf key>.exp_avg`,
/// `<hf key>.exp_avg_sq`), and the completed step count in the metadata.
pub fn optimizer_bytes(layout: &Layout, opt: &crate::optim::AdamW) -> Result<Vec<u8>, ModelError> {
    let mut tensors = Vec::new();
    for e in &layout.entries {
        let key = Layout::hf_key(&e.name);
        tensors.push((format!("{key}.exp_avg"), e.shape.clone(), &opt.m[e.range()]));
        tensors.push((format!("{key}.exp_avg_sq"), e.shape.clone(), &opt.v[e.range()]));
    }
    let meta =
        HashMap::from([("format".to_string(), "tandem-adamw-1".to_string()), ("step".to_string(), opt.t.to_string())]);
    serialize(tensors, meta, Path::new(OPTIMIZER_FILE))
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Restores AdamW's state from `optimizer_bytes` output: every tensor must be there, f32, with
/// the layout's shape.
pub fn load_optimizer(
    layout: &Layout,
    opt: &mut crate::optim::AdamW,
    bytes: &[u8],
    path: &Path,
) -> Result<(), ModelError> {
    let bad = |name: &str, msg: String| ModelError::Tensor { file: path.to_owned(), name: name.to_owned(), msg };
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| ModelError::Safetensors(path.to_owned(), format!("{e} (is the file complete?)")))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ModelError::Safetensors(path.to_owned(), "no step count in the metadata".into()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::Safetensors(path.to_owned(), e.to_string()))?;
    for e in &layout.entries {
        let key = Layout::hf_key(&e.name);
        for (suffix, dst) in [("exp_avg", &mut opt.m), ("exp_avg_sq", &mut opt.v)] {
            let name = format!("{key}.{suffix}");
            let view = st.tensor(&name).map_err(|_| bad(&name, "is missing from the optimizer state".into()))?;
            if view.dtype() != Dtype::F32 || view.shape() != e.shape.as_slice() {
                return Err(bad(
                    &name,
                    format!("is {:?} {:?}; expected F32 {:?}", view.dtype(), view.shape(), e.shape),
                ));
            }
            let data = to_f32(path, &name, &view)?;
            dst[e.range()].copy_from_slice(&data);
        }
    }
    opt.t = step;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::to_f32;
    use safetensors::tensor::{Dtype, TensorView};

    fn widen(dtype: Dtype, halves: &[u16]) -> Vec<f32> {
        let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        let view = TensorView::new(dtype, vec![halves.len()], &bytes).unwrap();
        to_f32(std::path::Path::new("m.safetensors"), "t", &view).unwrap()
    }

    #[test]
    fn half_precision_tensors_widen_exactly() {
        let f16 = widen(Dtype::F16, &[0x3c00, 0xc000, 0x3555, 0x0001, 0x7c00]);
        assert_eq!(&f16[..4], &[1.0, -2.0, 0.333_251_95, 5.960_464_5e-8]);
        assert!(f16[4].is_infinite());
        assert_eq!(widen(Dtype::BF16, &[0x3f80, 0xc000, 0x3eab]), vec![1.0, -2.0, 0.333_984_38]);
    }
}
