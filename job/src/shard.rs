//! Which examples each worker sees: `torch.utils.data.DistributedSampler` semantics, deterministic
//! from the seed, with each step's examples dealt so that the ranks' work is even.
//!
//! Training, epoch `e`: the dataset's indices are shuffled with `philox::permutation(n, seed, e)`
//! (the order single-process `worker train` uses too) and padded by repeating its head until the
//! length is a multiple of the world size. Step `k` of the epoch takes positions `k*B .. (k+1)*B`
//! of that order (`B` the global batch): the global batch one worker would take, whatever the
//! world size. That is what makes N workers equal to one. Within a step the `B` examples are
//! dealt `B / W` to each rank: with a [`Balance`], longest first, each to the rank with the least
//! length so far (ties to the lower rank), so that no rank waits at the gradient sums for one that
//! drew the long examples (dynamic padding makes a rank's time follow its lengths); without
//! one, and for the epoch's last, partial step, round-robin: rank `r` takes positions `r, r + W,
//! ...`. A rank keeps its examples in epoch order. Every rank gets `ceil(n / W)` indices; an
//! example appears once per epoch, plus at most `W - 1` repeats of the padding.
//!
//! Evaluation: no shuffle and no padding, so that no example counts twice: rank `r` takes
//! indices `r, r + W, ...` of `0..n`, and shards differ in length by at most one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// How to even out the ranks' work within a step: each example's cost (its length) and the
/// examples per rank per step.
#[derive(Clone, Copy, Debug)]
pub struct Balance<'a> {
    pub cost: &'a [u32],
    pub batch: usize,
}

/// An example's cost for [`Balance`]: its length in bytes (text and pair), capped at 8 bytes a
/// position of `max_seq_len`, past which truncation cuts it. Bytes follow tokens closely enough
/// to even out a step, and the coordinator, which deals, has no tokenizer.
pub fn cost(text: &str, pair: Option<&str>, max_seq_len: usize) -> u32 {
    let bytes = text.len() + pair.map_or(0, str::len);
    u32::try_from(bytes.min(max_seq_len.saturating_mul(8))).unwrap_or(u32::MAX)
}

/// The training indices of `rank` in a world of `world` for `epoch`.
pub fn train_indices(
    n: usize,
    world: usize,
    rank: usize,
    seed: u64,
    epoch: u32,
    balance: Option<Balance<'_>>,
) -> Vec<usize> {
    assert!(world >= 1 && rank < world, "rank {rank} outside a world of {world}");
    train_shards(n, world, seed, epoch, balance).swap_remove(rank)
}

/// Every rank's [`train_indices`] at once, by rank: one permutation and one deal of each step
/// for the whole world (a coordinator serving thousands of ranks computes the epoch once).
pub fn train_shards(n: usize, world: usize, seed: u64, epoch: u32, balance: Option<Balance<'_>>) -> Vec<Vec<usize>> {
    assert!(world >= 1, "a world of {world}");
    let mut shards = vec![Vec::with_capacity(n.div_ceil(world)); world];
    if n == 0 {
        return shards;
    }
    let mut order = philox::permutation(n, seed, epoch);
    let total = n.div_ceil(world) * world;
    let mut i = 0;
    while order.len() < total {
        order.push(order[i]);
        i += 1;
    }
    let round_robin = |shards: &mut Vec<Vec<usize>>, examples: &[usize]| {
        for (k, &e) in examples.iter().enumerate() {
            shards[k % world].push(e);
        }
    };
    let Some(bal) = balance.filter(|b| world > 1 && b.batch > 0) else {
        round_robin(&mut shards, &order);
        return shards;
    };
    assert_eq!(bal.cost.len(), n, "one cost per example");
    for step in order.chunks(bal.batch * world) {
        if step.len() < bal.batch * world {
            round_robin(&mut shards, step);
        } else {
            for (&e, owner) in step.iter().zip(deal(step, bal, world)) {
                shards[owner].push(e);
            }
        }
    }
    shards
}

/// The rank that takes each of one step's examples under [`Balance`] (each rank takes its
/// examples in their order within the step).
fn deal(step: &[usize], bal: Balance<'_>, world: usize) -> Vec<usize> {
    let mut longest_first: Vec<usize> = (0..step.len()).collect();
    longest_first.sort_by_key(|&p| (Reverse(bal.cost[step[p]]), p));
    // The ranks that still take examples, least loaded (then lowest) first.
    let mut open: BinaryHeap<Reverse<(u64, usize)>> = (0..world).map(|r| Reverse((0, r))).collect();
    let mut taken = vec![0usize; world];
    let mut owner = vec![0usize; step.len()];
    for p in longest_first {
        let Reverse((load, r)) = open.pop().expect("a rank with room: the step holds batch * world");
        owner[p] = r;
        taken[r] += 1;
        if taken[r] < bal.batch {
            open.push(Reverse((load + u64::from(bal.cost[step[p]]), r)));
        }
    }
    owner
}

/// The evaluation indices of `rank`: strided, unshuffled, unpadded.
pub fn eval_indices(n: usize, world: usize, rank: usize) -> Vec<usize> {
    assert!(world >= 1 && rank < world, "rank {rank} outside a world of {world}");
    (rank..n).step_by(world).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: [usize; 9] = [1, 2, 3, 4, 5, 7, 12, 60, 101];

    /// Lengths of 5 to 68 that do not follow the index.
    fn costs(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 5 + (i.wrapping_mul(2_654_435_761) >> 7) % 64).collect()
    }

    /// Every rank's shard, dealt round-robin or, with `batch`, balanced over steps of `batch`
    /// examples per rank.
    fn shards(n: usize, world: usize, seed: u64, epoch: u32, batch: Option<usize>, cost: &[u32]) -> Vec<Vec<usize>> {
        let balance = batch.map(|batch| Balance { cost, batch });
        (0..world).map(|r| train_indices(n, world, r, seed, epoch, balance)).collect()
    }

    #[test]
    fn training_covers_every_example_once_plus_declared_padding() {
        for world in 1..=5 {
            for &n in &SIZES {
                let cost = costs(n);
                for (epoch, batch) in [(0, None), (1, None), (0, Some(1)), (1, Some(2)), (1, Some(3))] {
                    let shards = shards(n, world, 9, epoch, batch, &cost);
                    let per_rank = n.div_ceil(world);
                    assert!(shards.iter().all(|s| s.len() == per_rank), "world {world} n {n}: uneven shards");
                    let mut counts = vec![0usize; n];
                    shards.iter().flatten().for_each(|&i| counts[i] += 1);
                    let padding = per_rank * world - n;
                    assert!(counts.iter().all(|&c| c >= 1), "world {world} n {n}: an example was never seen");
                    assert_eq!(counts.iter().sum::<usize>(), n + padding);
                    // Padding repeats the head of the epoch order, each at most ceil(padding/n) times.
                    let order = philox::permutation(n, 9, epoch);
                    for (pos, &idx) in order.iter().enumerate() {
                        let want = 1 + padding / n + usize::from(pos < padding % n);
                        assert_eq!(counts[idx], want, "world {world} n {n}: example {idx}");
                    }
                }
            }
        }
    }

    #[test]
    fn micro_batches_of_the_ranks_form_the_single_worker_global_batch() {
        let (n, b) = (101, 4);
        let cost = costs(n);
        for world in 1..=5 {
            let single = train_indices(n, 1, 0, 3, 1, None);
            for batch in [None, Some(b)] {
                let shards = shards(n, world, 3, 1, batch, &cost);
                // Every step of the epoch, the last one partial.
                for k in 0..n.div_ceil(world).div_ceil(b) {
                    let take = |s: &Vec<usize>| s[k * b..((k + 1) * b).min(s.len())].to_vec();
                    let mut union: Vec<usize> = shards.iter().flat_map(take).collect();
                    let mut want: Vec<usize> = (k * b * world..((k + 1) * b * world).min(n.div_ceil(world) * world))
                        .map(|pos| single[pos % n])
                        .collect();
                    union.sort();
                    want.sort();
                    assert_eq!(union, want, "world {world} step {k} {batch:?}");
                }
            }
        }
    }

    #[test]
    fn balancing_evens_out_the_ranks_lengths_and_keeps_epoch_order() {
        let (n, b, world) = (4000, 16, 4);
        let cost = costs(n);
        let order = philox::permutation(n, 5, 0);
        let position: std::collections::HashMap<usize, usize> =
            order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        // The slowest rank's excess over the step's mean, summed over the epoch's steps.
        let excess = |shards: &[Vec<usize>]| -> u64 {
            (0..n / (b * world))
                .map(|k| {
                    let loads: Vec<u64> = shards
                        .iter()
                        .map(|s| s[k * b..(k + 1) * b].iter().map(|&i| u64::from(cost[i])).sum())
                        .collect();
                    world as u64 * loads.iter().max().unwrap() - loads.iter().sum::<u64>()
                })
                .sum()
        };
        let plain = shards(n, world, 5, 0, None, &cost);
        let even = shards(n, world, 5, 0, Some(b), &cost);
        let (plain, even_excess) = (excess(&plain), excess(&even));
        assert!(even_excess * 20 < plain, "balanced {even_excess} against round-robin {plain}");
        for s in &even {
            assert!(s.windows(2).all(|w| position[&w[0]] < position[&w[1]]), "a rank's examples out of epoch order");
        }
        // The same deal wherever it is computed.
        assert_eq!(even, shards(n, world, 5, 0, Some(b), &cost));
    }

    #[test]
    fn evaluation_counts_every_example_exactly_once() {
        for world in 1..=5 {
            for &n in &SIZES {
                let shards: Vec<Vec<usize>> = (0..world).map(|r| eval_indices(n, world, r)).collect();
                let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "world {world} n {n}");
                let (min, max) =
                    (shards.iter().map(Vec::len).min().unwrap(), shards.iter().map(Vec::len).max().unwrap());
                assert!(max - min <= 1);
            }
        }
    }

    #[test]
    fn an_empty_dataset_gives_empty_shards() {
        assert!(train_indices(0, 3, 1, 0, 0, None).is_empty());
        assert!(eval_indices(0, 3, 2).is_empty());
    }
}
