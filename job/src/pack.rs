//! Packing documents into rows for masked-LM pretraining.
//!
//! Documents arrive in corpus order and leave as rows of at most `max_len` tokens, each row a run
//! of segments `[CLS] tokens [SEP]`: a segment is a document, or a piece of one that did not fit
//! (a document longer than a row, or the part of one that fills the rest of a row, continued in
//! the next). Within a row, positions restart at 0 for every segment and every segment has its
//! own segment id (1, 2, ... ; 0 is padding), so that the attention keeps each segment to itself
//! (block-diagonal) and a token's output does not depend on what else was packed beside it. Rows
//! are filled: a new row starts only when fewer than 3 places are left (no room for a token
//! between `[CLS]` and `[SEP]`), so at most 2 places of a row are padding. With `one_per_row`, a
//! row holds one segment (a document, or a row-long piece of a longer one) and is as long as it.
//!
//! Where the rows break depends on the documents' lengths only ([`next_row`]), so a corpus's rows
//! are numbered without reading a token ([`RowIndex`], built from the document lengths), and row
//! `r` is read by itself, from anywhere, without reading what came before ([`CorpusRows`]): what a
//! shuffled epoch and a resumed job need.

use crate::tokens::{CorpusReader, ShardError};
use std::path::Path;

/// Where the packer stands in the document stream: the next token to pack is token `offset` of
/// document `document` (counted over the whole stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub document: u64,
    pub offset: u64,
}

/// Tokens `start .. start + len` of `document`: one segment of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub document: u64,
    pub start: u64,
    pub len: u64,
}

/// The row that starts at `at`, as pieces of documents, and where the next row starts; `None` at
/// the end of the stream. `doc_len(d)` is document `d`'s length, `None` past the last; empty
/// documents are skipped.
pub fn next_row(
    max_len: usize,
    one_per_row: bool,
    mut at: Cursor,
    doc_len: impl Fn(u64) -> Option<u64>,
) -> Option<(Vec<Piece>, Cursor)> {
    assert!(max_len >= 3, "a row needs room for [CLS], a token and [SEP]");
    let mut pieces = Vec::new();
    let mut room = max_len as u64;
    while room >= 3 {
        let Some(n) = doc_len(at.document) else { break };
        assert!(at.offset <= n, "the cursor is past the document's end");
        if at.offset == n {
            at = Cursor { document: at.document + 1, offset: 0 };
            continue;
        }
        let len = (n - at.offset).min(room - 2);
        pieces.push(Piece { document: at.document, start: at.offset, len });
        room -= len + 2;
        at.offset += len;
        if at.offset == n {
            at = Cursor { document: at.document + 1, offset: 0 };
        }
        if one_per_row {
            break;
        }
    }
    (!pieces.is_empty()).then_some((pieces, at))
}

/// One packed row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub ids: Vec<u32>,
    /// Position of each token within its segment.
    pub positions: Vec<u32>,
    /// Each token's segment, from 1.
    pub segments: Vec<u32>,
    /// `[CLS]` and `[SEP]`: never masked.
    pub special: Vec<bool>,
    /// Tokens that begin a word (a segment's first token always does).
    pub word_start: Vec<bool>,
}

impl Row {
    /// The row of `segments` (each a piece's ids and word starts), each wrapped in `cls` .. `sep`.
    pub fn build<'a>(segments: impl IntoIterator<Item = (&'a [u32], &'a [bool])>, cls: u32, sep: u32) -> Row {
        let mut r = Row::default();
        for (segment, (ids, words)) in (1..).zip(segments) {
            assert_eq!(ids.len(), words.len(), "one word flag per token");
            let n = ids.len();
            r.ids.push(cls);
            r.ids.extend_from_slice(ids);
            r.ids.push(sep);
            r.positions.extend(0..n as u32 + 2);
            r.segments.extend(std::iter::repeat_n(segment, n + 2));
            r.special.push(true);
            r.special.extend(std::iter::repeat_n(false, n));
            r.special.push(true);
            r.word_start.push(true);
            if n > 0 {
                r.word_start.push(true); // a segment's first token starts a word even mid-word
                r.word_start.extend_from_slice(&words[1..]);
            }
            r.word_start.push(true);
        }
        r
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Packs documents held in memory (`(ids, word starts)` each) into rows.
pub fn pack(max_len: usize, one_per_row: bool, docs: &[(&[u32], &[bool])], cls: u32, sep: u32) -> Vec<Row> {
    let doc_len = |d: u64| docs.get(d as usize).map(|(ids, _)| ids.len() as u64);
    let mut rows = Vec::new();
    let mut at = Cursor::default();
    while let Some((pieces, next)) = next_row(max_len, one_per_row, at, doc_len) {
        let segments = pieces.iter().map(|p| {
            let (ids, words) = docs[p.document as usize];
            let r = p.start as usize..(p.start + p.len) as usize;
            (&ids[r.clone()], &words[r])
        });
        rows.push(Row::build(segments, cls, sep));
        at = next;
    }
    rows
}

/// Every [`STRIDE`]-th row's start, so that any row is found by packing at most `STRIDE - 1` rows
/// of lengths from the nearest: 1 MiB of index per 4M rows (0.5G tokens of 128-token rows).
pub const STRIDE: u64 = 64;

/// A corpus's rows, numbered: the start of every [`STRIDE`]-th, built from the document lengths.
#[derive(Clone, Debug)]
pub struct RowIndex {
    max_len: usize,
    one_per_row: bool,
    starts: Vec<Cursor>,
    rows: u64,
}

impl RowIndex {
    pub fn build(max_len: usize, one_per_row: bool, doc_len: impl Fn(u64) -> Option<u64>) -> RowIndex {
        let (mut starts, mut rows, mut at) = (Vec::new(), 0u64, Cursor::default());
        while let Some((_, next)) = next_row(max_len, one_per_row, at, &doc_len) {
            if rows.is_multiple_of(STRIDE) {
                starts.push(at);
            }
            rows += 1;
            at = next;
        }
        RowIndex { max_len, one_per_row, starts, rows }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Row `r`'s pieces.
    pub fn pieces(&self, r: u64, doc_len: impl Fn(u64) -> Option<u64>) -> Vec<Piece> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let mut at = self.starts[(r / STRIDE) as usize];
        for _ in 0..r % STRIDE {
            at = next_row(self.max_len, self.one_per_row, at, &doc_len).expect("indexed").1;
        }
        next_row(self.max_len, self.one_per_row, at, &doc_len).expect("indexed").0
    }
}

/// A preprocessed corpus read as numbered rows: what a pretraining job trains and evaluates on.
pub struct CorpusRows {
    reader: CorpusReader,
    index: RowIndex,
}

impl CorpusRows {
    /// Opens the corpus in `dir` (see [`CorpusReader::open`]) and numbers its rows.
    pub fn open(
        dir: &Path,
        tokenizer: Option<(&[u8; 32], &Path)>,
        max_len: usize,
        one_per_row: bool,
    ) -> Result<CorpusRows, ShardError> {
        let reader = CorpusReader::open(dir, tokenizer)?;
        let index = RowIndex::build(max_len, one_per_row, |d| reader.doc_len(d));
        Ok(CorpusRows { reader, index })
    }

    pub fn reader(&self) -> &CorpusReader {
        &self.reader
    }

    pub fn rows(&self) -> u64 {
        self.index.rows()
    }

    /// Row `r`'s segments: each piece's ids and word starts, without `[CLS]` and `[SEP]`.
    pub fn segments(&self, r: u64) -> Vec<(Vec<u32>, Vec<bool>)> {
        let pieces = self.index.pieces(r, |d| self.reader.doc_len(d));
        pieces.iter().map(|p| self.reader.piece(p.document, p.start..p.start + p.len)).collect()
    }
}

/// A pretraining job's corpora: `data.train`, and `data.dev` / `data.test` where set, as rows of
/// `model.max_seq_len` (`mlm.pack` chooses packed rows or one document a row).
pub struct Corpora {
    pub train: CorpusRows,
    pub dev: Option<CorpusRows>,
    pub test: Option<CorpusRows>,
    /// `data.shared_storage`: every worker reads the rows itself.
    pub shared: bool,
}

impl Corpora {
    /// The corpus of a split: `train`, `dev` or `test`.
    pub fn split(&self, name: &str) -> Option<&CorpusRows> {
        match name {
            "train" => Some(&self.train),
            "dev" => self.dev.as_ref(),
            "test" => self.test.as_ref(),
            _ => None,
        }
    }

    /// Opens the job's corpora, all written by `tokenizer` where it is given (a worker), else by
    /// the tokenizer that wrote the training corpus (the coordinator).
    pub fn open(job: &crate::config::JobConfig, tokenizer: Option<(&[u8; 32], &Path)>) -> Result<Corpora, ShardError> {
        let (max_len, one_per_row) = (job.model.max_seq_len, !job.mlm.pack);
        let train = CorpusRows::open(&job.data.train, tokenizer, max_len, one_per_row)?;
        let hash = train.reader.tokenizer_hash();
        let named = job.data.train.join(crate::tokens::MANIFEST);
        let same = Some((&hash, named.as_path()));
        let open = |dir: &Option<std::path::PathBuf>| {
            dir.as_ref().map(|d| CorpusRows::open(d, same, max_len, one_per_row)).transpose()
        };
        let (dev, test) = (open(&job.data.dev)?, open(&job.data.test)?);
        if train.rows() == 0 {
            let msg = "holds no tokens: nothing to train on".into();
            return Err(ShardError { path: job.data.train.clone(), msg });
        }
        Ok(Corpora { train, dev, test, shared: job.data.shared_storage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLS: u32 = 101;
    const SEP: u32 = 102;

    /// Documents of assorted lengths, the long ones longer than a row; ids say (document, index).
    fn docs() -> Vec<(Vec<u32>, Vec<bool>)> {
        [5usize, 1, 40, 0, 13, 90, 2, 29, 30, 31, 7, 0]
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                ((0..n as u32).map(|i| 1000 * (d as u32 + 1) + i).collect(), (0..n).map(|i| i % 3 == 0).collect())
            })
            .collect()
    }

    fn rows_of(max_len: usize, one_per_row: bool) -> Vec<Row> {
        let docs = docs();
        let refs: Vec<(&[u32], &[bool])> = docs.iter().map(|(i, w)| (&i[..], &w[..])).collect();
        pack(max_len, one_per_row, &refs, CLS, SEP)
    }

    #[test]
    fn rows_hold_every_token_once_in_order_as_segments_of_their_own() {
        for (max_len, one_per_row) in [3, 4, 16, 32, 64].into_iter().flat_map(|m| [(m, false), (m, true)]) {
            let rows = rows_of(max_len, one_per_row);
            let mut seen = Vec::new();
            for (k, r) in rows.iter().enumerate() {
                assert!(r.len() <= max_len);
                if k + 1 < rows.len() && !one_per_row {
                    assert!(r.len() + 2 >= max_len, "max_len {max_len}: row {k} of {} left room", r.len());
                }
                let n = r.len();
                assert!(
                    r.positions.len() == n && r.segments.len() == n && r.special.len() == n && r.word_start.len() == n
                );
                for t in 0..n {
                    let starts = t == 0 || r.segments[t] != r.segments[t - 1];
                    assert_eq!(r.positions[t] == 0, starts, "positions restart per segment");
                    if starts {
                        assert_eq!(r.ids[t], CLS);
                        assert_eq!(r.segments[t], if t == 0 { 1 } else { r.segments[t - 1] + 1 });
                        assert!(r.word_start[t] && r.word_start[t + 1], "a segment starts a word");
                    }
                    let ends = t + 1 == n || r.segments[t + 1] != r.segments[t];
                    assert_eq!(r.special[t], starts || ends);
                    if ends {
                        assert_eq!(r.ids[t], SEP);
                    }
                    if !r.special[t] {
                        seen.push(r.ids[t]);
                    }
                }
                if one_per_row {
                    assert!(r.segments.iter().all(|&s| s == 1), "one segment a row");
                }
            }
            let all: Vec<u32> = docs().into_iter().flat_map(|(ids, _)| ids).collect();
            assert_eq!(seen, all, "max_len {max_len}");
        }
    }

    #[test]
    fn the_index_finds_every_row_by_itself() {
        let docs = docs();
        let doc_len = |d: u64| docs.get(d as usize).map(|(ids, _)| ids.len() as u64);
        for (max_len, one_per_row) in [(3, false), (16, false), (16, true), (40, false)] {
            let rows = rows_of(max_len, one_per_row);
            let index = RowIndex::build(max_len, one_per_row, doc_len);
            assert_eq!(index.rows(), rows.len() as u64);
            for (r, row) in rows.iter().enumerate() {
                let pieces = index.pieces(r as u64, doc_len);
                let segments = pieces.iter().map(|p| {
                    let (ids, words) = &docs[p.document as usize];
                    let s = p.start as usize..(p.start + p.len) as usize;
                    (&ids[s.clone()], &words[s])
                });
                assert_eq!(&Row::build(segments, CLS, SEP), row, "row {r} of max_len {max_len}");
            }
        }
        assert!(rows_of(3, false).len() as u64 > 2 * STRIDE, "the index's stride is crossed");
    }
}
