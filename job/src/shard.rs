//! Which examples each worker sees: `torch.utils.data.DistributedSampler` semantics, deterministic
//! from the seed.
//!
//! Training, epoch `e`: the dataset's indices are shuffled with `philox::permutation(n, seed, e)`
//! (the order single-process `worker train` uses too), padded by repeating its head until the
//! length is a multiple of the world size, and dealt out round-robin: rank `r` takes positions
//! `r, r + W, r + 2W, ...`. Every rank gets `ceil(n / W)` indices; an example appears once per
//! epoch, plus at most `W - 1` repeats of the padding.
//!
//! Because of the round-robin deal, the union of the ranks' k-th micro-batches of size `b` is
//! exactly positions `k*b*W .. (k+1)*b*W` of the padded order: the global batch one worker would
//! take with batch size `b * W`. That is what makes N workers equal to one.
//!
//! Evaluation: no shuffle and no padding, so that no example counts twice: rank `r` takes
//! indices `r, r + W, ...` of `0..n`, and shards differ in length by at most one.

/// The training indices of `rank` in a world of `world` for `epoch`.
pub fn train_indices(n: usize, world: usize, rank: usize, seed: u64, epoch: u32) -> Vec<usize> {
    assert!(world >= 1 && rank < world, "rank {rank} outside a world of {world}");
    if n == 0 {
        return Vec::new();
    }
    let mut order = philox::permutation(n, seed, epoch);
    let total = n.div_ceil(world) * world;
    let mut i = 0;
    while order.len() < total {
        order.push(order[i]);
        i += 1;
    }
    order.into_iter().skip(rank).step_by(world).collect()
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

    #[test]
    fn training_covers_every_example_once_plus_declared_padding() {
        for world in 1..=5 {
            for &n in &SIZES {
                for epoch in 0..2 {
                    let shards: Vec<Vec<usize>> = (0..world).map(|r| train_indices(n, world, r, 9, epoch)).collect();
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
        for world in 1..=5 {
            let shards: Vec<Vec<usize>> = (0..world).map(|r| train_indices(n, world, r, 3, 1)).collect();
            let single = train_indices(n, 1, 0, 3, 1);
            let steps = n / (b * world); // full global batches, before any padding
            for k in 0..steps {
                let mut union: Vec<usize> = shards.iter().flat_map(|s| s[k * b..(k + 1) * b].to_vec()).collect();
                let mut want = single[k * b * world..(k + 1) * b * world].to_vec();
                union.sort();
                want.sort();
                assert_eq!(union, want, "world {world} step {k}");
            }
        }
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
        assert!(train_indices(0, 3, 1, 0, 0).is_empty());
        assert!(eval_indices(0, 3, 2).is_empty());
    }
}
