//! `config.json` of a Hugging Face BERT checkpoint: the fields that fix the architecture.

use serde::Deserialize;
use std::path::Path;

use crate::ModelError;

fn default_eps() -> f64 {
    1e-12
}
fn default_init() -> f64 {
    0.02
}
fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_pos() -> String {
    "absolute".into()
}

/// The architecture of a BERT model, read from `config.json`. Other keys in the file are kept
/// verbatim in [`BertConfig::raw`] and written back on save.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f32,
    #[serde(default)]
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io(path.to_owned(), e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(_, msg) => ModelError::Config(path.to_owned(), msg),
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let here = || std::path::PathBuf::from("config.json");
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| ModelError::Config(here(), e.to_string()))?;
        let mut cfg: BertConfig = serde_json::from_value(serde_json::Value::Object(raw.clone()))
            .map_err(|e| ModelError::Config(here(), e.to_string()))?;
        cfg.raw = raw;
        cfg.validate().map_err(|msg| ModelError::Config(here(), msg))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act = {:?} is not supported (only \"gelu\", the exact erf form)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!("position_embedding_type = {:?} is not supported", self.position_embedding_type));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} = {p} is outside [0, 1)"));
            }
        }
        Ok(())
    }

    /// Turns every dropout of the model off (the job's `train.dropout = false`).
    pub fn disable_dropout(&mut self) {
        self.hidden_dropout_prob = 0.0;
        self.attention_probs_dropout_prob = 0.0;
        self.classifier_dropout = Some(0.0);
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Dropout before the classifier: `classifier_dropout`, or `hidden_dropout_prob` when unset.
    pub fn classifier_dropout_prob(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}
