//! The schedule of a run, a function of the training set's size and the config alone: steps per
//! epoch, total and warmup steps, and the data cursor of each step. The worker trains by it;
//! the coordinator accepts only checkpoints that fit it.

use crate::config::TrainSection;

/// Where training stands at a checkpoint: its step, the data cursor of that step in this
/// world's shards, the training loss of the step, and whether it is the end.
#[derive(Clone, Debug)]
pub struct CheckpointAt {
    pub step: u64,
    pub epoch: u32,
    pub position: u64,
    pub train_loss: f64,
    pub is_final: bool,
}

/// Steps per epoch, total steps, and the steps of linear warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// ceil(n / batch): for any world whose size divides the batch, ceil(ceil(n / world) /
    /// (batch / world)) is the same number, so an elastic job keeps its schedule.
    pub per_epoch: u64,
    /// `train.epochs` of `per_epoch` steps, capped by `train.max_steps` when set.
    pub total: u64,
    /// ceil(total * warmup_ratio), as `transformers` computes it.
    pub warmup: u64,
}

impl Schedule {
    pub fn new(t: &TrainSection, train_examples: usize) -> anyhow::Result<Schedule> {
        anyhow::ensure!(train_examples > 0, "the training split is empty");
        anyhow::ensure!(t.batch_size > 0, "train.batch_size is 0");
        let per_epoch = train_examples.div_ceil(t.batch_size) as u64;
        let mut total = per_epoch * u64::from(t.epochs);
        if t.max_steps > 0 && (total == 0 || t.max_steps < total) {
            total = t.max_steps;
        }
        Ok(Schedule { per_epoch, total, warmup: (total as f64 * t.warmup_ratio).ceil() as u64 })
    }

    /// The data cursor of `step` in a rank's shard when each rank takes `local_batch` examples a
    /// step: (epoch, position).
    pub fn cursor(&self, step: u64, local_batch: usize) -> (u32, u64) {
        ((step / self.per_epoch) as u32, (step % self.per_epoch) * local_batch as u64)
    }

    /// Whether a checkpoint `at`, written by ranks of `local_batch` examples a step in a
    /// generation that started at step `start`, is one the training loop writes: a step of
    /// `checkpoint.every` (`every`), or the last, which alone is final, within the run and with
    /// that step's cursor. The error says what does not fit.
    pub fn check_checkpoint(
        &self,
        every: u64,
        local_batch: usize,
        start: u64,
        at: &CheckpointAt,
    ) -> Result<(), String> {
        let step = at.step;
        if step > self.total {
            return Err(format!("step {step} is past the job's last step {}", self.total));
        }
        if step < start {
            return Err(format!("step {step} is before step {start}, where this generation started"));
        }
        if at.is_final != (step == self.total) {
            return Err(if at.is_final {
                format!("a final checkpoint of step {step}: the job ends at step {}", self.total)
            } else {
                format!("step {step} is the job's last: its checkpoint is the final one")
            });
        }
        if !at.is_final && (every == 0 || !step.is_multiple_of(every)) {
            return Err(format!("step {step} is not a checkpoint step (checkpoint.every = {every})"));
        }
        let expected = self.cursor(step, local_batch);
        if (at.epoch, at.position) != expected {
            return Err(format!(
                "the data cursor (epoch {}, position {}) is not step {step}'s (epoch {}, position {}) with {local_batch} \
                 examples a rank",
                at.epoch, at.position, expected.0, expected.1
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(epochs: u32, max_steps: u64, batch_size: usize) -> TrainSection {
        TrainSection { epochs, max_steps, batch_size, warmup_ratio: 0.1, ..TrainSection::default() }
    }

    #[test]
    fn steps_and_cursor() {
        let s = Schedule::new(&train(3, 0, 8), 20).unwrap();
        assert_eq!(s, Schedule { per_epoch: 3, total: 9, warmup: 1 });
        assert_eq!(Schedule::new(&train(3, 5, 8), 20).unwrap().total, 5);
        assert_eq!(Schedule::new(&train(0, 5, 8), 20).unwrap().total, 5);
        // Step 4 is epoch 1's second step: position 4 in a rank's shard of a world of 2.
        assert_eq!(s.cursor(4, 4), (1, 4));
        assert!(Schedule::new(&train(3, 0, 8), 0).is_err());
    }

    #[test]
    fn only_checkpoints_of_the_schedule_fit() {
        let s = Schedule::new(&train(3, 0, 8), 20).unwrap(); // 9 steps, 3 an epoch
        let check = |start, step, (epoch, position): (u32, u64), is_final| {
            s.check_checkpoint(2, 4, start, &CheckpointAt { step, epoch, position, train_loss: 0.5, is_final })
        };
        assert_eq!(check(0, 4, (1, 4), false), Ok(()));
        assert_eq!(check(0, 9, (3, 0), true), Ok(()));
        assert_eq!(check(9, 9, (3, 0), true), Ok(()), "a finished job run again saves its last step");
        for (start, step, cursor, fin, why) in [
            (0, 10, (3, 4), false, "past the job's last step 9"),
            (0, 1_000_000, (333_333, 4), true, "past the job's last step 9"),
            (6, 4, (1, 4), false, "before step 6"),
            (0, 3, (1, 0), false, "not a checkpoint step"),
            (0, 4, (1, 0), false, "is not step 4's (epoch 1, position 4)"),
            (0, 4, (1, 4), true, "the job ends at step 9"),
            (0, 9, (3, 0), false, "its checkpoint is the final one"),
        ] {
            let e = check(start, step, cursor, fin).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
