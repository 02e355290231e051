//! Dynamic masking for masked-LM pretraining, as BERT and `transformers`'
//! `DataCollatorForLanguageModeling` do it: each token (with whole-word masking, each word) is
//! selected with probability `prob`; a selected token becomes `[MASK]` 80% of the time, a random
//! token 10%, and stays itself 10%; the loss reads the original id at the selected tokens only.
//!
//! Every draw is a pure function of (seed, epoch, row, position): token `t` of row `row` in epoch
//! `epoch` draws Philox counter `(t, row, epoch, "MLMK")` under the job's seed, word 0 deciding
//! the selection, word 1 the 80/10/10 choice and word 2 the random token. A row is numbered by
//! its place in the corpus (`pack::RowIndex`), not by which worker holds it, so the masks, and
//! with them the number of masked tokens the loss divides by, are the same for any world size,
//! micro-batch split or restart, and a new epoch masks afresh. With whole-word masking every token of a word
//! takes the selection drawn at the word's first token.

use philox::{key_from_seed, philox4x32_10, u32_to_unit_f32};

/// The label of a token the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;
const TAG: u32 = 0x4d4c_4d4b; // "MLMK"

/// How a row is masked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskSpec {
    /// The probability that a token (or word) is selected (BERT: 0.15).
    pub prob: f32,
    pub mask_id: u32,
    /// Random replacements are drawn from `0..vocab`.
    pub vocab: u32,
    pub whole_word: bool,
    pub seed: u64,
}

/// A masked row: what the model reads and what the loss compares with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masked {
    pub inputs: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Masked {
    /// The tokens the loss counts.
    pub fn count(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Masks one row: `ids` as packed (special tokens included), `special[t]` for the tokens never
/// masked (`[CLS]`, `[SEP]`, padding), `word_start[t]` for the tokens that begin a word.
pub fn mask_row(spec: &MaskSpec, epoch: u32, row: u64, ids: &[u32], special: &[bool], word_start: &[bool]) -> Masked {
    assert!(ids.len() == special.len() && ids.len() == word_start.len(), "one flag of each per token");
    let row = u32::try_from(row).expect("at most 2^32 rows an epoch");
    assert!(u32::try_from(ids.len()).is_ok(), "a row of at most 2^32 tokens");
    let key = key_from_seed(spec.seed);
    let draw = |t: usize| philox4x32_10([t as u32, row, epoch, TAG], key);
    let mut inputs = ids.to_vec();
    let mut labels = vec![IGNORE; ids.len()];
    // The position whose draw selects token t: its own, or its word's first token's.
    let mut word_head = 0;
    for t in 0..ids.len() {
        if special[t] {
            continue;
        }
        if !spec.whole_word || word_start[t] || t == 0 || special[t - 1] {
            word_head = t;
        }
        let r = draw(t);
        let selection = if word_head == t { r[0] } else { draw(word_head)[0] };
        if u32_to_unit_f32(selection) >= spec.prob {
            continue;
        }
        labels[t] = i64::from(ids[t]);
        let choice = u32_to_unit_f32(r[1]);
        if choice < 0.8 {
            inputs[t] = spec.mask_id;
        } else if choice < 0.9 {
            inputs[t] = ((u64::from(r[2]) * u64::from(spec.vocab)) >> 32) as u32;
        }
    }
    Masked { inputs, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: MaskSpec = MaskSpec { prob: 0.15, mask_id: 103, vocab: 30522, whole_word: false, seed: 5 };

    /// A row of `n` tokens: [CLS] at 0, [SEP] at the end, words of 1-3 pieces between.
    fn row(n: usize) -> (Vec<u32>, Vec<bool>, Vec<bool>) {
        let ids: Vec<u32> = (0..n as u32).map(|t| 1000 + (t * 7919) % 20000).collect();
        let special: Vec<bool> = (0..n).map(|t| t == 0 || t == n - 1).collect();
        let words: Vec<bool> = (0..n).map(|t| (t * 2654435761) % 5 < 3).collect();
        (ids, special, words)
    }

    #[test]
    fn rates_are_bert_s_and_labels_hold_the_selected_originals() {
        let (ids, special, words) = row(512);
        let (mut selected, mut masked, mut random, mut kept, mut tokens) = (0, 0, 0, 0, 0);
        for r in 0..200u64 {
            let m = mask_row(&SPEC, 0, r, &ids, &special, &words);
            tokens += ids.len() - 2;
            for t in 0..ids.len() {
                if m.labels[t] == IGNORE {
                    assert_eq!(m.inputs[t], ids[t], "an unselected token changed");
                    continue;
                }
                assert!(!special[t], "a special token was selected");
                assert_eq!(m.labels[t], i64::from(ids[t]));
                selected += 1;
                match m.inputs[t] {
                    103 => masked += 1,
                    x if x == ids[t] => kept += 1,
                    x => {
                        assert!(x < SPEC.vocab);
                        random += 1
                    }
                }
            }
        }
        let frac = |a: usize, b: usize| a as f64 / b as f64;
        assert!((frac(selected, tokens) - 0.15).abs() < 0.005, "selected {}", frac(selected, tokens));
        assert!((frac(masked, selected) - 0.8).abs() < 0.015, "[MASK] {}", frac(masked, selected));
        assert!((frac(random, selected) - 0.1).abs() < 0.01, "random {}", frac(random, selected));
        assert!((frac(kept, selected) - 0.1).abs() < 0.01, "kept {}", frac(kept, selected));
    }

    #[test]
    fn masks_are_a_pure_function_of_seed_epoch_row_and_position() {
        let (ids, special, words) = row(128);
        let m = mask_row(&SPEC, 3, 77, &ids, &special, &words);
        assert_eq!(m, mask_row(&SPEC, 3, 77, &ids, &special, &words));
        assert_ne!(m, mask_row(&SPEC, 4, 77, &ids, &special, &words), "a new epoch masks afresh");
        assert_ne!(m, mask_row(&SPEC, 3, 78, &ids, &special, &words), "rows share masks");
        assert_ne!(m, mask_row(&MaskSpec { seed: 6, ..SPEC }, 3, 77, &ids, &special, &words));
        // A shorter row of the same tokens draws the same masks where it has them.
        let short = mask_row(&SPEC, 3, 77, &ids[..64], &[&special[..63], &[true]].concat(), &words[..64]);
        assert_eq!(short.labels[..63], m.labels[..63]);
        assert_eq!(m.count(), m.labels.iter().filter(|&&l| l != IGNORE).count());
    }

    #[test]
    fn whole_word_masking_selects_every_piece_of_a_word_together() {
        let spec = MaskSpec { whole_word: true, ..SPEC };
        let (ids, special, words) = row(512);
        let mut words_selected = 0;
        for r in 0..50u64 {
            let m = mask_row(&spec, 1, r, &ids, &special, &words);
            let mut t = 1;
            while t < ids.len() - 1 {
                let end = (t + 1..ids.len() - 1).find(|&u| words[u]).unwrap_or(ids.len() - 1);
                let chosen: Vec<bool> = (t..end).map(|u| m.labels[u] != IGNORE).collect();
                assert!(chosen.iter().all(|&c| c == chosen[0]), "row {r}: word {t}..{end} split: {chosen:?}");
                words_selected += usize::from(chosen[0]);
                t = end;
            }
        }
        assert!(words_selected > 100, "only {words_selected} words selected");
    }
}
