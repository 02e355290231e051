//! How a batch's tokens form sequences: the rows of the `[N, C]` activations that attend to each
//! other. A padded batch is `B` sequences of `T` rows each (padding included, masked in attention);
//! an unpadded one holds only real tokens, each sequence as long as its example (or, where a row
//! packs several documents, its document). Dropout numbers an element by its column in the batch
//! row it came from, so a sequence's masks are the same in either layout.

/// The sequences of one batch, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Seqs<'a> {
    /// `[S + 1]`: sequence `s` is the rows `cu[s]..cu[s + 1]`.
    pub cu: &'a [usize],
    /// `[S]`: the column of its batch row where each sequence starts (0 unless the row packs
    /// several documents).
    pub cols: &'a [usize],
    /// `[S]`: the dataset index that keys each sequence's dropout masks.
    pub example_ids: &'a [u32],
}

impl Seqs<'_> {
    /// How many sequences.
    pub fn count(&self) -> usize {
        self.example_ids.len()
    }

    /// Rows (tokens) over all sequences.
    pub fn tokens(&self) -> usize {
        self.cu.last().copied().unwrap_or(0)
    }

    pub fn len(&self, s: usize) -> usize {
        self.cu[s + 1] - self.cu[s]
    }

    pub fn is_empty(&self) -> bool {
        self.tokens() == 0
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        (0..self.count()).map(|s| self.len(s)).max().unwrap_or(0)
    }

    /// Elements of the attention probabilities `[S][NH, len, len]`.
    pub fn probs_len(&self, nh: usize) -> usize {
        (0..self.count()).map(|s| nh * self.len(s) * self.len(s)).sum()
    }

    /// Asserts the shape invariants (called by every op that takes sequences).
    pub fn check(&self) {
        assert_eq!(self.cu.len(), self.count() + 1, "seqs: cu must be [S + 1]");
        assert_eq!(self.cols.len(), self.count(), "seqs: cols must be [S]");
        assert!(self.cu[0] == 0 && self.cu.windows(2).all(|w| w[0] <= w[1]), "seqs: cu must rise from 0");
    }
}

/// Owned [`Seqs`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqsBuf {
    pub cu: Vec<usize>,
    pub cols: Vec<usize>,
    pub example_ids: Vec<u32>,
}

impl SeqsBuf {
    /// `b` rows of `t` tokens each, row `i` keyed by `example_ids[i]`: a padded batch.
    pub fn regular(t: usize, example_ids: &[u32]) -> Self {
        SeqsBuf {
            cu: (0..=example_ids.len()).map(|i| i * t).collect(),
            cols: vec![0; example_ids.len()],
            example_ids: example_ids.to_vec(),
        }
    }

    pub fn view(&self) -> Seqs<'_> {
        Seqs { cu: &self.cu, cols: &self.cols, example_ids: &self.example_ids }
    }
}

/// Splits `buf` into consecutive blocks of the given sizes (the rest is not returned).
pub(crate) fn blocks_mut(mut buf: &mut [f32], sizes: impl IntoIterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for n in sizes {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = tail;
    }
    out
}
