//! The coordinator's side of evaluation: each rank's counts for a (split, step) gathered until
//! the world has reported, then merged in rank order into the metrics of the whole split.

pub use job::eval::EvalSplit;
use job::eval::{EvalCounts, EvalMetrics};
use std::collections::BTreeMap;

/// Collects the ranks' counts per (split, step) and says when a set is complete. Refusals (a rank
/// outside the world, a second report, counts of another shape) change nothing.
#[derive(Debug)]
pub struct EvalBoard {
    world: usize,
    pending: BTreeMap<(EvalSplit, u64), Vec<Option<EvalCounts>>>,
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
        counts: EvalCounts,
    ) -> Result<Option<EvalMetrics>, String> {
        if rank >= self.world {
            return Err(format!("rank {rank} is outside the world of {}", self.world));
        }
        if counts.confusion.len() != counts.classes * counts.classes {
            return Err(format!(
                "a confusion matrix for {} classes needs {} entries, got {}",
                counts.classes,
                counts.classes * counts.classes,
                counts.confusion.len()
            ));
        }
        // A restarted job evaluates a step again: the new counts replace the old result.
        if !self.pending.contains_key(&(split, step)) {
            self.done.remove(&(split, step));
        }
        let slots = self.pending.entry((split, step)).or_insert_with(|| vec![None; self.world]);
        if let Some(other) = slots.iter().flatten().next() {
            if other.classes != counts.classes {
                return Err(format!("rank {rank} reports {} classes, others {}", counts.classes, other.classes));
            }
        }
        if slots[rank].is_some() {
            return Err(format!("rank {rank} already reported the {} split at step {step}", split.name()));
        }
        slots[rank] = Some(counts);
        if slots.iter().any(Option::is_none) {
            return Ok(None);
        }
        let slots = self.pending.remove(&(split, step)).expect("present");
        let mut total = EvalCounts::new(slots[0].as_ref().expect("complete").classes);
        for c in slots.iter().flatten() {
            total.merge(c)?;
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

    #[test]
    fn the_board_completes_when_every_rank_reported() {
        let mut b = EvalBoard::new(2);
        let mut c0 = EvalCounts::new(2);
        c0.add(0, 0, 1.0);
        let mut c1 = EvalCounts::new(2);
        c1.add(1, 0, 3.0);
        assert_eq!(b.report(1, EvalSplit::Test, 10, c1.clone()), Ok(None));
        assert!(b.report(1, EvalSplit::Test, 10, c1.clone()).unwrap_err().contains("already reported"));
        assert!(b.report(2, EvalSplit::Test, 10, c1.clone()).unwrap_err().contains("outside the world"));
        assert!(b.report(0, EvalSplit::Test, 10, EvalCounts::new(3)).unwrap_err().contains("3 classes"));
        let bad = EvalCounts { classes: 2, confusion: vec![1], loss_sum: 0.0 };
        assert!(b.report(0, EvalSplit::Test, 10, bad).unwrap_err().contains("needs 4 entries"));
        let m = b.report(0, EvalSplit::Test, 10, c0).unwrap().unwrap();
        assert_eq!((m.examples, m.accuracy, m.loss), (2, 0.5, 2.0));
        assert_eq!(b.result(EvalSplit::Test, 10), Some(&m));
        // Evaluated again (a restarted generation): the new counts replace the old result.
        assert_eq!(b.report(0, EvalSplit::Test, 10, EvalCounts::new(2)), Ok(None));
        assert_eq!(b.result(EvalSplit::Test, 10), None);
    }
}
