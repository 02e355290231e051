//! `worker preprocess`: a raw text corpus into token shards (`job::tokens`), streaming.
//!
//! Inputs are files or directories (every file below, in path order): plain text with one
//! document per line or, with `blank_lines`, documents separated by blank lines; JSON Lines
//! (`.jsonl`, `.json`), the document in one string field of each object; any of them gzip-
//! compressed (`.gz`); Parquet (`.parquet`, as `datasets` writes a split: the document in one
//! string column, read a row group at a time). Documents are read in order in chunks of about [`CHUNK_BYTES`], each chunk
//! tokenized in parallel and written in order (shards stream to disk, see `job::tokens`), so
//! memory stays at a chunk whatever the corpus size, and the output is the same bytes for any
//! thread count. A document
//! is tokenized without special tokens and without truncation (packing adds `[CLS]`/`[SEP]` and
//! cuts rows); a token starts a word where the tokenizer's word id changes. Shards take whole
//! documents up to `shard_tokens` each; `corpus.json` lists them with the tokenizer's content
//! hash, and is written last: an output directory with a `corpus.json` is complete.

use anyhow::Context;
use job::tokens::{Corpus, ShardEntry, ShardWriter};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Bytes of text tokenized at a time.
pub const CHUNK_BYTES: usize = 1 << 20;
pub use job::tokens::MANIFEST;

pub struct Options {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub blank_lines: bool,
    pub text_field: String,
    pub shard_tokens: u64,
    pub progress: bool,
}

/// One document as read: where it starts (file and 1-based line) and its text.
struct Doc {
    file: usize,
    line: usize,
    text: String,
}

/// The files of `inputs`, directories expanded to every file below them in path order.
fn files(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        if !meta.is_dir() {
            out.push(p.to_owned());
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("listing {}", p.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", p.display()))?;
        entries.sort();
        entries.iter().try_for_each(|e| walk(e, out))
    }
    let mut out = Vec::new();
    for p in inputs {
        walk(p, &mut out)?;
    }
    Ok(out)
}

/// The tokenizer as preprocessing uses it: no truncation, no padding.
fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    let mut tok = crate::tokenize::load_tokenizer(path)?;
    tok.with_truncation(None).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tok.with_padding(None);
    Ok(tok)
}

/// Reads `path`'s documents in order, handing each to `doc` (which may stop the read with an
/// error).
fn read_docs(
    path: &Path,
    file: usize,
    o: &Options,
    read: &mut dyn FnMut(u64),
    doc: &mut dyn FnMut(Doc) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let raw = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".parquet") {
        #[cfg(feature = "parquet")]
        return read_parquet(path, raw, file, o, read, doc);
        #[cfg(not(feature = "parquet"))]
        anyhow::bail!("{}: this worker was built without Parquet (the `parquet` feature)", path.display());
    }
    let counted = Counted { inner: raw, read };
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_owned(), true),
        None => (name.clone(), false),
    };
    let reader: Box<dyn BufRead + '_> = if gz {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(counted)))
    } else {
        Box::new(BufReader::new(counted))
    };
    let json = stem.ends_with(".jsonl") || stem.ends_with(".json");
    let mut pending: Option<Doc> = None;
    for (k, line) in reader.lines().enumerate() {
        let at = k + 1;
        let line = line.with_context(|| format!("{}:{at}: not UTF-8 text", path.display()))?;
        if json {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("{}:{at}: not a JSON object", path.display()))?;
            let text = v.get(&o.text_field).and_then(|t| t.as_str()).with_context(|| {
                format!("{}:{at}: no string field {:?} (--text-field)", path.display(), o.text_field)
            })?;
            doc(Doc { file, line: at, text: text.to_owned() })?;
        } else if !o.blank_lines {
            if !line.trim().is_empty() {
                doc(Doc { file, line: at, text: line })?;
            }
        } else if line.trim().is_empty() {
            if let Some(d) = pending.take() {
                doc(d)?;
            }
        } else {
            match &mut pending {
                Some(d) => {
                    d.text.push('\n');
                    d.text.push_str(&line);
                }
                None => pending = Some(Doc { file, line: at, text: line }),
            }
        }
    }
    if let Some(d) = pending {
        doc(d)?;
    }
    Ok(())
}

#[cfg(feature = "parquet")]
/// A Parquet file's documents: the string column `o.text_field` of every row, in order (row `k`,
/// from 1, where a text file would name a line). Only that column is read.
fn read_parquet(
    path: &Path,
    raw: std::fs::File,
    file: usize,
    o: &Options,
    read: &mut dyn FnMut(u64),
    doc: &mut dyn FnMut(Doc) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let bytes = raw.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = SerializedFileReader::new(raw).with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let column = fields.iter().find(|f| f.name() == o.text_field).with_context(|| {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        format!("{}: no column {:?} (--text-field); its columns: {}", path.display(), o.text_field, names.join(", "))
    })?;
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![column.clone()])
        .build()
        .with_context(|| format!("{}: reading column {:?}", path.display(), o.text_field))?;
    let rows = reader.get_row_iter(Some(projection)).with_context(|| format!("reading {}", path.display()))?;
    for (k, row) in rows.enumerate() {
        let at = k + 1;
        let row = row.with_context(|| format!("{}: row {at}", path.display()))?;
        match row.get_column_iter().next().map(|(_, f)| f) {
            Some(Field::Str(text)) => doc(Doc { file, line: at, text: text.clone() })?,
            other => anyhow::bail!(
                "{}:{at}: column {:?} holds {}, not a string (--text-field)",
                path.display(),
                o.text_field,
                other.map_or("nothing".to_string(), |f| f.to_string())
            ),
        }
    }
    read(bytes);
    Ok(())
}

/// A reader that reports the bytes it reads (the progress bar counts compressed bytes).
struct Counted<'a, R> {
    inner: R,
    read: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.read)(n as u64);
        Ok(n)
    }
}

/// The output so far: the open shard and the finished ones.
struct Output<'a> {
    o: &'a Options,
    hash: [u8; 32],
    id_bytes: u32,
    open: Option<ShardWriter>,
    shards: Vec<ShardEntry>,
}

impl Output<'_> {
    fn shard_name(k: usize) -> String {
        format!("shard-{k:05}.tok")
    }

    fn push(&mut self, ids: &[u32], words: &[bool]) -> anyhow::Result<()> {
        let n = ids.len() as u64;
        if self.open.as_ref().is_some_and(|w| w.tokens() + n > self.o.shard_tokens) {
            self.close()?;
        }
        if self.open.is_none() {
            let path = self.o.out.join(Self::shard_name(self.shards.len()));
            self.open = Some(ShardWriter::create(&path, self.hash, self.id_bytes)?);
        }
        self.open.as_mut().expect("opened above").push(ids, words)?;
        Ok(())
    }

    fn close(&mut self) -> anyhow::Result<()> {
        if let Some(w) = self.open.take() {
            let h = w.finish()?;
            let file = Self::shard_name(self.shards.len());
            self.shards.push(ShardEntry { file, documents: h.documents, tokens: h.tokens });
        }
        Ok(())
    }
}

/// Tokenizes `o.inputs` into shards in `o.out`; the manifest it wrote.
pub fn run(o: &Options) -> anyhow::Result<Corpus> {
    anyhow::ensure!(o.shard_tokens > 0, "--shard-tokens must be positive");
    let tok = load_tokenizer(&o.tokenizer)?;
    let hash = crate::tokenize::content_hash(&tok);
    let inputs = files(&o.inputs)?;
    anyhow::ensure!(!inputs.is_empty(), "no input files");
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let manifest = o.out.join(MANIFEST);
    anyhow::ensure!(
        !manifest.exists() && !o.out.join(Output::shard_name(0)).exists(),
        "{} already holds a corpus: give another --out (nothing was changed)",
        o.out.display()
    );
    let total: u64 = inputs.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let bar = if o.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "preprocess {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let id_bytes = if tok.get_vocab_size(true) <= 1 << 16 { 2 } else { 4 };
    let mut out = Output { o, hash, id_bytes, open: None, shards: Vec::new() };
    let mut chunk: Vec<Doc> = Vec::new();
    let mut chunk_bytes = 0usize;
    let flush = |chunk: &mut Vec<Doc>, out: &mut Output<'_>| -> anyhow::Result<()> {
        let done: Vec<(Vec<u32>, Vec<bool>)> = chunk
            .par_iter()
            .map(|d| {
                let enc = tok
                    .encode(d.text.as_str(), false)
                    .map_err(|e| anyhow::anyhow!("{}:{}: tokenizing: {e}", inputs[d.file].display(), d.line))?;
                let words = enc.get_word_ids();
                let starts =
                    (0..words.len()).map(|t| words[t].is_none() || t == 0 || words[t] != words[t - 1]).collect();
                Ok((enc.get_ids().to_vec(), starts))
            })
            .collect::<anyhow::Result<_>>()?;
        for (d, (ids, words)) in chunk.iter().zip(&done) {
            if ids.is_empty() {
                continue;
            }
            anyhow::ensure!(
                ids.len() as u64 <= o.shard_tokens,
                "{}:{}: a document of {} tokens, more than a shard holds (--shard-tokens {})",
                inputs[d.file].display(),
                d.line,
                ids.len(),
                o.shard_tokens
            );
            out.push(ids, words)?;
        }
        chunk.clear();
        Ok(())
    };
    for (k, path) in inputs.iter().enumerate() {
        read_docs(path, k, o, &mut |n| bar.inc(n), &mut |d| {
            chunk_bytes += d.text.len();
            chunk.push(d);
            if chunk_bytes >= CHUNK_BYTES {
                chunk_bytes = 0;
                flush(&mut chunk, &mut out)?;
            }
            Ok(())
        })?;
    }
    flush(&mut chunk, &mut out)?;
    out.close()?;
    bar.finish_and_clear();
    let names: Vec<String> = o.inputs.iter().map(|p| p.display().to_string()).collect();
    anyhow::ensure!(!out.shards.is_empty(), "no documents in {}", names.join(", "));
    let corpus = Corpus {
        format: job::tokens::VERSION,
        tokenizer_sha256: job::fingerprint::hex(&hash),
        documents: out.shards.iter().map(|s| s.documents).sum(),
        tokens: out.shards.iter().map(|s| s.tokens).sum(),
        shards: out.shards,
    };
    let partial = o.out.join(format!("{MANIFEST}.partial"));
    std::fs::write(&partial, serde_json::to_string_pretty(&corpus)? + "\n")
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &manifest).with_context(|| format!("writing {}", manifest.display()))?;
    Ok(corpus)
}
