//! Tokenization with the `tokenizers` crate from a `tokenizer.json`, and padding into batches.
//!
//! The packaged MiniLM `tokenizer.json` fixes truncation and padding at 128; we replace both:
//! truncation to the job's `max_seq_len` (special tokens included), and no padding in the
//! tokenizer, because batches are padded by [`collate`] to their longest member, which keeps CPU
//! work proportional to the real tokens.

use crate::model::Batch;
use crate::ModelError;
use job::pack::Row;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

pub struct TextEncoder {
    tok: Tokenizer,
    path: PathBuf,
    pub max_len: usize,
    pub pad_id: u32,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Tokenizer(path.to_owned(), msg);
        if max_len < 2 {
            return Err(err(format!("max_seq_len {max_len} leaves no room for [CLS] and [SEP]")));
        }
        let mut tok = load_tokenizer(path)?;
        tok.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| err(e.to_string()))?;
        tok.with_padding(None);
        let pad_id = tok.token_to_id("[PAD]").unwrap_or(0);
        Ok(TextEncoder { tok, path: path.to_owned(), max_len, pad_id })
    }

    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoded, ModelError> {
        let enc = match pair {
            Some(p) => self.tok.encode((text, p), true),
            None => self.tok.encode(text, true),
        }
        .map_err(|e| ModelError::Tokenizer(self.path.clone(), e.to_string()))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), type_ids: enc.get_type_ids().to_vec() })
    }

    /// The id of a token of the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// The id of a special token the job needs (`[CLS]`, `[SEP]`, `[MASK]`), or an error naming
    /// the tokenizer.
    pub fn special(&self, token: &str) -> Result<u32, ModelError> {
        self.token_id(token).ok_or_else(|| {
            ModelError::Tokenizer(self.path.clone(), format!("has no {token} token, which the job needs"))
        })
    }

    /// The vocabulary's size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The row of a corpus's `segments` (each a piece's ids and word starts), wrapped in this
    /// tokenizer's `[CLS]` .. `[SEP]`.
    pub fn row<'a>(&self, segments: impl IntoIterator<Item = (&'a [u32], &'a [bool])>) -> Result<Row, ModelError> {
        Ok(Row::build(segments, self.special("[CLS]")?, self.special("[SEP]")?))
    }

    /// Ids back to text, special tokens left out (as `transformers` decodes a fill).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tok.decode(ids, true).map_err(|e| ModelError::Tokenizer(self.path.clone(), e.to_string()))
    }

    /// [`content_hash`] of this tokenizer.
    pub fn content_hash(&self) -> [u8; 32] {
        content_hash(&self.tok)
    }

    /// Encodes many texts, in order.
    pub fn encode_all(&self, texts: &[(&str, Option<&str>)]) -> Result<Vec<Encoded>, ModelError> {
        texts.iter().map(|(t, p)| self.encode(t, *p)).collect()
    }
}

/// Pads `examples` to the longest of them. `example_ids` key the dropout masks; `labels` is
/// copied as is (one per example for classification).
pub fn collate(examples: &[&Encoded], example_ids: &[u32], labels: &[i64], pad_id: u32) -> Batch {
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut batch = Batch {
        b,
        t,
        input_ids: vec![pad_id; b * t],
        token_type_ids: vec![0; b * t],
        attention_mask: vec![0; b * t],
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: example_ids.to_vec(),
        labels: labels.to_vec(),
    };
    for (i, e) in examples.iter().enumerate() {
        let n = e.ids.len();
        batch.input_ids[i * t..i * t + n].copy_from_slice(&e.ids);
        batch.token_type_ids[i * t..i * t + n].copy_from_slice(&e.type_ids);
        batch.attention_mask[i * t..i * t + n].fill(1);
    }
    batch
}

/// Loads a tokenizer: `path`'s tokenizer.json or, where a checkpoint ships only BertTokenizer's
/// files, the `vocab.txt` beside it with the settings of `tokenizer_config.json` (lowercasing,
/// accent stripping, Chinese characters, the special tokens), built as `transformers` converts a
/// BertTokenizer to its fast form: BERT's normaliser and pre-tokenizer, WordPiece, `[CLS] .. [SEP]`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    let vocab = path.with_file_name("vocab.txt");
    if path.exists() || !vocab.exists() {
        return Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer(path.to_owned(), e.to_string()));
    }
    bert_from_vocab(&vocab)
}

fn bert_from_vocab(vocab: &Path) -> Result<Tokenizer, ModelError> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::AddedToken;
    let config_path = vocab.with_file_name("tokenizer_config.json");
    let cfg: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer(config_path.clone(), e.to_string()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(ModelError::Io(config_path, e)),
    };
    let flag = |key: &str, default: bool| cfg.get(key).and_then(serde_json::Value::as_bool).unwrap_or(default);
    let token = |key: &str, default: &str| {
        // A special token is a string, or (older configs) an AddedToken object with its content.
        let v = cfg.get(key);
        let s = v.and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str())));
        s.unwrap_or(default).to_owned()
    };
    let bad = |msg: String| ModelError::Tokenizer(vocab.to_owned(), msg);
    let unk = token("unk_token", "[UNK]");
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(unk.clone())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    let lowercase = flag("do_lower_case", true);
    let strip_accents = cfg.get("strip_accents").and_then(serde_json::Value::as_bool);
    let normalizer = BertNormalizer::new(true, flag("tokenize_chinese_chars", true), strip_accents, lowercase);
    tok.with_normalizer(Some(normalizer)).map_err(|e| bad(e.to_string()))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let id = |t: &str| tok.token_to_id(t).ok_or_else(|| bad(format!("the special token {t} is not in the vocabulary")));
    let (cls, sep) = (token("cls_token", "[CLS]"), token("sep_token", "[SEP]"));
    let processing = BertProcessing::new((sep.clone(), id(&sep)?), (cls.clone(), id(&cls)?));
    let specials = [token("pad_token", "[PAD]"), unk, cls, sep, token("mask_token", "[MASK]")];
    for t in &specials {
        id(t)?;
    }
    tok.with_post_processor(Some(processing));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    tok.add_special_tokens(specials.iter().map(|t| AddedToken::from(t.clone(), true)))
        .map_err(|e| bad(e.to_string()))?;
    Ok(tok)
}

/// A masked-LM batch of packed rows ([`job::pack::Row`], masked by [`job::mlm::mask_row`]),
/// padded to the longest: the masked inputs, each token's position and segment (0 for padding),
/// and per-token labels (`-100` where the loss does not look). `example_ids` key the dropout
/// masks (the rows' numbers in the epoch).
pub fn collate_rows<R: std::borrow::Borrow<Row>>(
    rows: &[R],
    masked: &[job::mlm::Masked],
    example_ids: &[u32],
    pad_id: u32,
) -> Batch {
    assert_eq!(rows.len(), masked.len(), "one masking per row");
    let b = rows.len();
    let t = rows.iter().map(|r| r.borrow().len()).max().unwrap_or(0);
    let mut batch = Batch {
        b,
        t,
        input_ids: vec![pad_id; b * t],
        token_type_ids: vec![0; b * t],
        attention_mask: vec![0; b * t],
        position_ids: vec![0; b * t],
        segment_ids: vec![0; b * t],
        example_ids: example_ids.to_vec(),
        labels: vec![job::mlm::IGNORE; b * t],
    };
    for (i, (r, m)) in rows.iter().zip(masked).enumerate() {
        let r = r.borrow();
        let (at, n) = (i * t, r.len());
        assert_eq!(m.inputs.len(), n, "a masking of another row");
        batch.input_ids[at..at + n].copy_from_slice(&m.inputs);
        batch.attention_mask[at..at + n].fill(1);
        batch.position_ids[at..at + n].copy_from_slice(&r.positions);
        batch.segment_ids[at..at + n].copy_from_slice(&r.segments);
        batch.labels[at..at + n].copy_from_slice(&m.labels);
    }
    batch
}

/// SHA-256 of the tokenizer's content, what a token shard records: every token of the
/// vocabulary with its id (added tokens included) and the normalisation (BERT's by its four
/// settings, accent stripping resolved as BERT resolves it; another normaliser by its
/// serialised settings). Truncation, padding and the file's form do not enter, so the same
/// vocabulary and normalisation hash the same from tokenizer.json or vocab.txt.
pub fn content_hash(tok: &Tokenizer) -> [u8; 32] {
    use tokenizers::normalizers::NormalizerWrapper;
    let mut vocab: Vec<(u32, String)> = tok.get_vocab(true).into_iter().map(|(t, id)| (id, t)).collect();
    vocab.sort();
    let mut canon = String::from("tandem tokenizer content 1\n");
    for (id, token) in &vocab {
        canon.push_str(&format!("{id}\t{token}\n"));
    }
    let normalizer = match tok.get_normalizer() {
        None => "none".to_string(),
        Some(NormalizerWrapper::BertNormalizer(b)) => format!(
            "bert clean_text={} chinese_chars={} strip_accents={} lowercase={}",
            b.clean_text,
            b.handle_chinese_chars,
            b.strip_accents.unwrap_or(b.lowercase),
            b.lowercase
        ),
        Some(other) => serde_json::to_string(other).unwrap_or_else(|e| format!("unserialisable: {e}")),
    };
    canon.push_str(&format!("normalizer {normalizer}\n"));
    job::fingerprint::sha256(canon.as_bytes())
}
