//! The flat parameter buffer's layout: every tensor of the model as (name, shape, offset), in
//! the order of a Hugging Face BERT state dict. Names are the Hugging Face keys without the
//! `bert.` prefix of the body (`embeddings.word_embeddings.weight`,
//! `encoder.layer.0.attention.self.query.weight`, ..., `pooler.dense.weight`), and the head
//! keys as `transformers` names them (`classifier.weight`, `cls.predictions.bias`).
//!
//! The masked-LM decoder is tied to the word embeddings, so it has no entry of its own.

use crate::bert_config::BertConfig;
use std::collections::HashMap;
use std::ops::Range;

/// Which head sits on the encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// `BertForSequenceClassification`: pooler (dense + tanh on `[CLS]`), dropout, classifier.
    Classification { num_labels: usize },
    /// `BertForMaskedLM`: transform (dense, GELU, layer norm) and a decoder tied to the word
    /// embeddings, plus its own output bias.
    MaskedLm,
}

/// How a tensor is initialised when the checkpoint lacks it, as `transformers`' `_init_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    Normal,
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
    /// Whether AdamW applies weight decay (not to biases and layer-norm weights, as the
    /// `transformers` Trainer does).
    pub decay: bool,
    /// Part of the head rather than the pretrained body: may be absent from a checkpoint.
    pub head: bool,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Offsets of one encoder layer's tensors.
#[derive(Clone, Debug)]
pub struct LayerParams {
    pub q_w: Range<usize>,
    pub q_b: Range<usize>,
    pub k_w: Range<usize>,
    pub k_b: Range<usize>,
    pub v_w: Range<usize>,
    pub v_b: Range<usize>,
    pub ao_w: Range<usize>,
    pub ao_b: Range<usize>,
    pub ln1_w: Range<usize>,
    pub ln1_b: Range<usize>,
    pub i_w: Range<usize>,
    pub i_b: Range<usize>,
    pub o_w: Range<usize>,
    pub o_b: Range<usize>,
    pub ln2_w: Range<usize>,
    pub ln2_b: Range<usize>,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub entries: Vec<Entry>,
    pub total: usize,
    pub head: Head,
    index: HashMap<String, usize>,
}

impl Layout {
    pub fn new(cfg: &BertConfig, head: Head) -> Self {
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let mut l = Layout { entries: Vec::new(), total: 0, head: head.clone(), index: HashMap::new() };
        l.push("embeddings.word_embeddings.weight", &[v, c], Init::Normal, true, false);
        l.push("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, c], Init::Normal, true, false);
        l.push("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, c], Init::Normal, true, false);
        l.layer_norm("embeddings.LayerNorm", c, false);
        for layer in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            l.linear(&format!("{p}.attention.self.query"), c, c, false);
            l.linear(&format!("{p}.attention.self.key"), c, c, false);
            l.linear(&format!("{p}.attention.self.value"), c, c, false);
            l.linear(&format!("{p}.attention.output.dense"), c, c, false);
            l.layer_norm(&format!("{p}.attention.output.LayerNorm"), c, false);
            l.linear(&format!("{p}.intermediate.dense"), c, i, false);
            l.linear(&format!("{p}.output.dense"), i, c, false);
            l.layer_norm(&format!("{p}.output.LayerNorm"), c, false);
        }
        match head {
            Head::Classification { num_labels } => {
                l.linear("pooler.dense", c, c, true);
                l.linear("classifier", c, num_labels, true);
            }
            Head::MaskedLm => {
                l.linear("cls.predictions.transform.dense", c, c, true);
                l.layer_norm("cls.predictions.transform.LayerNorm", c, true);
                l.push("cls.predictions.bias", &[v], Init::Zeros, false, true);
            }
        }
        l
    }

    fn push(&mut self, name: &str, shape: &[usize], init: Init, decay: bool, head: bool) {
        let e = Entry { name: name.to_owned(), shape: shape.to_vec(), offset: self.total, init, decay, head };
        self.total += e.numel();
        self.index.insert(e.name.clone(), self.entries.len());
        self.entries.push(e);
    }

    /// A `torch.nn.Linear(inp, out)`: weight `[out, inp]`, bias `[out]`.
    fn linear(&mut self, prefix: &str, inp: usize, out: usize, head: bool) {
        self.push(&format!("{prefix}.weight"), &[out, inp], Init::Normal, true, head);
        self.push(&format!("{prefix}.bias"), &[out], Init::Zeros, false, head);
    }

    fn layer_norm(&mut self, prefix: &str, c: usize, head: bool) {
        self.push(&format!("{prefix}.weight"), &[c], Init::Ones, false, head);
        self.push(&format!("{prefix}.bias"), &[c], Init::Zeros, false, head);
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The range of a tensor that the layout is known to hold.
    pub fn range(&self, name: &str) -> Range<usize> {
        self.get(name).unwrap_or_else(|| panic!("layout has no tensor {name}")).range()
    }

    pub fn layer(&self, l: usize) -> LayerParams {
        let r = |s: &str| self.range(&format!("encoder.layer.{l}.{s}"));
        LayerParams {
            q_w: r("attention.self.query.weight"),
            q_b: r("attention.self.query.bias"),
            k_w: r("attention.self.key.weight"),
            k_b: r("attention.self.key.bias"),
            v_w: r("attention.self.value.weight"),
            v_b: r("attention.self.value.bias"),
            ao_w: r("attention.output.dense.weight"),
            ao_b: r("attention.output.dense.bias"),
            ln1_w: r("attention.output.LayerNorm.weight"),
            ln1_b: r("attention.output.LayerNorm.bias"),
            i_w: r("intermediate.dense.weight"),
            i_b: r("intermediate.dense.bias"),
            o_w: r("output.dense.weight"),
            o_b: r("output.dense.bias"),
            ln2_w: r("output.LayerNorm.weight"),
            ln2_b: r("output.LayerNorm.bias"),
        }
    }

    /// The flat buffer cut where backward finishes with a group of tensors, in the order backward
    /// finishes them: the head, the last encoder layer, ..., the first, then the embeddings. The
    /// segments tile `0..total`; a segment's gradient is final once backward has passed it (the
    /// masked-LM head's tied decoder writes into the word embeddings, which come last).
    pub fn backward_segments(&self, num_layers: usize) -> Vec<Range<usize>> {
        let layer_start = |l: usize| self.range(&format!("encoder.layer.{l}.attention.self.query.weight")).start;
        let head_start = if num_layers == 0 {
            self.range("embeddings.LayerNorm.bias").end
        } else {
            self.range(&format!("encoder.layer.{}.output.LayerNorm.bias", num_layers - 1)).end
        };
        let mut out = Vec::with_capacity(num_layers + 2);
        out.push(head_start..self.total);
        for l in (0..num_layers).rev() {
            let end = if l + 1 == num_layers { head_start } else { layer_start(l + 1) };
            out.push(layer_start(l)..end);
        }
        out.push(0..if num_layers == 0 { head_start } else { layer_start(0) });
        out
    }

    /// The key under which `transformers` stores a tensor in a `BertFor*` checkpoint.
    pub fn hf_key(name: &str) -> String {
        if name.starts_with("classifier.") || name.starts_with("cls.") {
            name.to_owned()
        } else {
            format!("bert.{name}")
        }
    }
}
