//! Packing documents into rows for masked-LM pretraining.
//!
//! Documents arrive in corpus order and leave as rows of at most `max_len` tokens, each row a run
//! of segments `[CLS] tokens [SEP]`: a segment is a document, or a piece of one that did not fit
//! (a document longer than a row, or the part of one that fills the rest of a row, continued in
//! the next). Within a row, positions restart at 0 for every segment and every segment has its
//! own segment id (1, 2, ... ; 0 is padding), so that the attention keeps each segment to itself
//! (block-diagonal) and a token's output does not depend on what else was packed beside it. Rows
//! are filled: a new row starts only when fewer than 3 places are left (no room for a token
//! between `[CLS]` and `[SEP]`), so at most 2 places of a row are padding.
//!
//! The rows are a pure function of the document stream: a row's content depends on the documents
//! before it only through where the previous row stopped ([`Cursor`]), which is what a resumed
//! job needs to continue at the exact row without reading what came before.

/// Where the packer stands in the document stream: the next token to pack is token `offset` of
/// document `document` (counted over the whole stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub document: u64,
    pub offset: u64,
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
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Packs documents into rows; see the module documentation.
#[derive(Clone, Debug)]
pub struct Packer {
    max_len: usize,
    cls: u32,
    sep: u32,
    row: Row,
    cursor: Cursor,
}

impl Packer {
    /// A packer for rows of `max_len` (at least 3) tokens, starting at `cursor`.
    pub fn new(max_len: usize, cls: u32, sep: u32, cursor: Cursor) -> Self {
        assert!(max_len >= 3, "a row needs room for [CLS], a token and [SEP]");
        Packer { max_len, cls, sep, row: Row::default(), cursor }
    }

    /// Where the next row starts when no row is being filled.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Packs document `cursor().document` (`ids` with its word starts) from `cursor().offset` on,
    /// calling `emit(row, cursor after it)` for each row it completes. Empty documents are
    /// skipped.
    pub fn push(&mut self, ids: &[u32], word_start: &[bool], mut emit: impl FnMut(Row, Cursor)) {
        assert_eq!(ids.len(), word_start.len(), "one word flag per token");
        let mut at = self.cursor.offset as usize;
        assert!(at <= ids.len(), "the cursor is past the document's end");
        while at < ids.len() {
            let room = self.max_len - self.row.len();
            if room < 3 {
                self.flush(&mut emit);
                continue;
            }
            let take = (ids.len() - at).min(room - 2);
            let segment = self.row.segments.last().map_or(1, |s| s + 1);
            let r = &mut self.row;
            r.ids.push(self.cls);
            r.ids.extend_from_slice(&ids[at..at + take]);
            r.ids.push(self.sep);
            r.positions.extend(0..take as u32 + 2);
            r.segments.extend(std::iter::repeat_n(segment, take + 2));
            r.special.push(true);
            r.special.extend(std::iter::repeat_n(false, take));
            r.special.push(true);
            r.word_start.push(true);
            r.word_start.push(true); // a segment's first token starts a word even mid-word
            r.word_start.extend_from_slice(&word_start[at + 1..at + take]);
            r.word_start.push(true);
            at += take;
            self.cursor.offset = at as u64;
        }
        self.cursor = Cursor { document: self.cursor.document + 1, offset: 0 };
        if self.max_len - self.row.len() < 3 {
            self.flush(&mut emit);
        }
    }

    /// Emits the row being filled, if any (the end of the stream).
    pub fn finish(&mut self, mut emit: impl FnMut(Row, Cursor)) {
        self.flush(&mut emit);
    }

    fn flush(&mut self, emit: &mut impl FnMut(Row, Cursor)) {
        if !self.row.is_empty() {
            emit(std::mem::take(&mut self.row), self.cursor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLS: u32 = 101;
    const SEP: u32 = 102;

    /// Documents of assorted lengths, the long ones longer than a row; ids say (document, index).
    fn docs() -> Vec<Vec<u32>> {
        [5usize, 1, 40, 0, 13, 90, 2, 29, 30, 31, 7]
            .iter()
            .enumerate()
            .map(|(d, &n)| (0..n as u32).map(|i| 1000 * (d as u32 + 1) + i).collect())
            .collect()
    }

    fn pack(max_len: usize, docs: &[Vec<u32>], from: Cursor) -> Vec<(Row, Cursor)> {
        let mut p = Packer::new(max_len, CLS, SEP, from);
        let mut rows = Vec::new();
        for d in &docs[from.document as usize..] {
            let words: Vec<bool> = (0..d.len()).map(|i| i % 3 == 0).collect();
            p.push(d, &words, |r, c| rows.push((r, c)));
        }
        p.finish(|r, c| rows.push((r, c)));
        rows
    }

    #[test]
    fn rows_hold_every_token_once_in_order_as_segments_of_their_own() {
        for max_len in [3, 4, 16, 32, 64] {
            let rows = pack(max_len, &docs(), Cursor::default());
            let mut seen = Vec::new();
            for (k, (r, _)) in rows.iter().enumerate() {
                assert!(r.len() <= max_len);
                if k + 1 < rows.len() {
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
            }
            assert_eq!(seen, docs().concat(), "max_len {max_len}");
        }
    }

    #[test]
    fn a_cursor_resumes_at_the_exact_row() {
        let all = pack(16, &docs(), Cursor::default());
        for k in 0..all.len() - 1 {
            let resumed = pack(16, &docs(), all[k].1);
            assert_eq!(
                resumed.iter().map(|r| &r.0).collect::<Vec<_>>(),
                all[k + 1..].iter().map(|r| &r.0).collect::<Vec<_>>(),
                "from row {k}"
            );
        }
    }
}
