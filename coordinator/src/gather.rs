//! The coordinator's side of evaluation: each rank's counts for a (split, step) gathered until
//! the world has reported, then merged in rank order into the metrics of the whole split.

pub use job::eval::EvalSplit;
use job::eval::{Counts, EvalMetrics};
use std::collections::BTreeMap;

/// Gathers (evaluations here, checksums in the state) that may be incomplete at once: the ranks
/// move in step, so a real job has one or two; a member that reports step after step nobody else
/// reaches is refused past this, instead of piling up memory.
pub const MAX_PENDING: usize = 8;

/// Collects the ranks' counts per (split, step) and says when a set is complete. Refusals (a rank
/// outside the world, a second report, counts of another shape) change nothing.
#[derive(Debug)]
pub struct EvalBoard {
    world: usize,
    pending: BTreeMap<(EvalSplit, u64), Vec<Option<Counts>>>,
    /// Finished evaluations: (split, step) -> metrics of the whole split.
    pub done: BTreeMap<(EvalSplit, u64), EvalMetrics>,
}

impl EvalBoard {
    pub fn new(world: usize) -> Self {
        EvalBoard { world, pending: BTreeMap::new(), done: BTreeMap::new() }
    }

    /// Records `rank`'s counts for `(split, step)`; returns the metrics once all ranks reported.
    pub fn report(
        &mut self,
        rank: usize,
        split: EvalSplit,
        step: u64,
        counts: Counts,
    ) -> Result<Option<EvalMetrics>, String> {
        if rank >= self.world {
            return Err(format!("rank {rank} is outside the world of {}", self.world));
        }
        if let Counts::Classes(c) = &counts {
            if c.confusion.len() != c.classes * c.classes {
                return Err(format!(
                    "a confusion matrix for {} classes needs {} entries, got {}",
                    c.classes,
                    c.classes * c.classes,
                    c.confusion.len()
                ));
            }
        }
        // A restarted job evaluates a step again: the new counts replace the old result.
        if !self.pending.contains_key(&(split, step)) {
            if self.pending.len() >= MAX_PENDING {
                return Err(format!(
                    "rank {rank}: {MAX_PENDING} evaluations are incomplete already; the {} split at step {step} is not \
                     one the other ranks have reached",
                    split.name()
                ));
            }
            self.done.remove(&(split, step));
        }
        let slots = self.pending.entry((split, step)).or_insert_with(|| vec![None; self.world]);
        if let Some(other) = slots.iter().flatten().next() {
            // Counts of another shape cannot be merged: refuse them now, not when the set is full.
            other.clone().merge(&counts).map_err(|e| format!("rank {rank}: {e}"))?;
        }
        let Some(slot) = slots.get_mut(rank) else {
            return Err(format!("rank {rank} is outside the world of {}", slots.len()));
        };
        if slot.is_some() {
            return Err(format!("rank {rank} already reported the {} split at step {step}", split.name()));
        }
        *slot = Some(counts);
        if slots.iter().any(Option::is_none) {
            return Ok(None);
        }
        let slots = self.pending.remove(&(split, step)).expect("present");
        let mut slots = slots.into_iter().flatten();
        let mut total = slots.next().expect("complete");
        for c in slots {
            total.merge(&c)?;
        }
        let m = total.metrics();
        self.done.insert((split, step), m.clone());
        Ok(Some(m))
    }

    /// The world of the generation that reports from now on: a new generation of the job drops
    /// the reports of the last one still in flight (the finished ones are kept).
    pub fn set_world(&mut self, world: usize) {
        self.pending.clear();
        self.world = world;
    }

    /// The metrics of a finished evaluation.
    pub fn result(&self, split: EvalSplit, step: u64) -> Option<&EvalMetrics> {
        self.done.get(&(split, step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use job::eval::{EvalCounts, MlmCounts};

    fn classes(k: usize, pairs: &[(usize, usize, f64)]) -> Counts {
        let mut c = EvalCounts::new(k);
        pairs.iter().for_each(|&(a, p, l)| c.add(a, p, l));
        Counts::Classes(c)
    }

    #[test]
    fn the_board_completes_when_every_rank_reported() {
        let mut b = EvalBoard::new(2);
        let (c0, c1) = (classes(2, &[(0, 0, 1.0)]), classes(2, &[(1, 0, 3.0)]));
        assert_eq!(b.report(1, EvalSplit::Test, 10, c1.clone()), Ok(None));
        assert!(b.report(1, EvalSplit::Test, 10, c1.clone()).unwrap_err().contains("already reported"));
        assert!(b.report(2, EvalSplit::Test, 10, c1.clone()).unwrap_err().contains("outside the world"));
        assert!(b.report(0, EvalSplit::Test, 10, classes(3, &[])).unwrap_err().contains("3 classes"));
        let mlm = Counts::Tokens(MlmCounts { tokens: 5, correct: 1, loss_sum: 2.0 });
        assert!(b.report(0, EvalSplit::Test, 10, mlm).unwrap_err().contains("cannot be added"));
        let bad = Counts::Classes(EvalCounts { classes: 2, confusion: vec![1], loss_sum: 0.0 });
        assert!(b.report(0, EvalSplit::Test, 10, bad).unwrap_err().contains("needs 4 entries"));
        let m = b.report(0, EvalSplit::Test, 10, c0).unwrap().unwrap();
        assert_eq!((m.examples, m.accuracy, m.loss), (2, 0.5, 2.0));
        assert_eq!(b.result(EvalSplit::Test, 10), Some(&m));
        // Evaluated again (a restarted generation): the new counts replace the old result.
        assert_eq!(b.report(0, EvalSplit::Test, 10, classes(2, &[])), Ok(None));
        assert_eq!(b.result(EvalSplit::Test, 10), None);
        // One rank reporting steps nobody else reaches is bounded.
        for step in 11..10 + MAX_PENDING as u64 {
            assert_eq!(b.report(0, EvalSplit::Test, step, classes(2, &[])), Ok(None));
        }
        let e = b.report(0, EvalSplit::Test, 1_000_000, classes(2, &[])).unwrap_err();
        assert!(e.contains("8 evaluations are incomplete already"), "{e}");
    }

    #[test]
    fn masked_lm_counts_add_up_over_the_ranks() {
        let mut b = EvalBoard::new(2);
        let (c0, c1) =
            (MlmCounts { tokens: 4, correct: 1, loss_sum: 8.0 }, MlmCounts { tokens: 96, correct: 49, loss_sum: 92.0 });
        assert_eq!(b.report(0, EvalSplit::Dev, 5, Counts::Tokens(c0)), Ok(None));
        let m = b.report(1, EvalSplit::Dev, 5, Counts::Tokens(c1)).unwrap().unwrap();
        assert_eq!((m.examples, m.accuracy, m.loss, m.macro_f1), (100, 0.5, 1.0, None));
        assert_eq!(m.perplexity, Some(1f64.exp()));
    }
}
