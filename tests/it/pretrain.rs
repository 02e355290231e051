//! Masked-LM pretraining over the real CPU ring (one thread per rank, in process): N workers equal
//! one worker on the same global batch even when the ranks hold very different numbers of masked
//! tokens, because the loss is the global sum over the global count of masked tokens, summed
//! over the ranks before backward (`train::global_masked_count`), never a mean of the ranks'
//! means.

use crate::support::fixtures;
use job::mlm::{mask_row, MaskSpec};
use job::pack::{Cursor, Packer, Row};
use kernels::tolerance::norm_diff;
use std::net::TcpListener;
use std::time::Duration;
use worker::checkpoint;
use worker::collective::{Overlapped, Ring, RingOptions};
use worker::engine::{self, Compute, Peers};
use worker::layout::Head;
use worker::model::Batch;
use worker::optim::AdamW;
use worker::tokenize::collate_rows;

/// Rank `rank`'s rows of the global batch, numbered from `first` in the epoch: rank 0 short rows
/// (a handful of masked tokens in all), the others full 32-token rows (hundreds).
fn rows(rank: usize, first: u64) -> (Vec<Row>, Vec<u32>) {
    let len = if rank == 0 { 2 } else { 30 };
    let mut p = Packer::new(len + 2, 2, 3, Cursor::default());
    let mut out = Vec::new();
    for d in 0..12u32 {
        let doc: Vec<u32> = (0..len as u32).map(|i| 5 + (d * 31 + i * 7 + rank as u32 * 13) % 240).collect();
        p.push(&doc, &vec![true; doc.len()], |r, _| out.push(r));
    }
    p.finish(|r, _| out.push(r));
    let ids = (0..out.len() as u32).map(|k| first as u32 + k).collect();
    (out, ids)
}

fn batch(rows: &[Row], ids: &[u32]) -> Batch {
    let spec = MaskSpec { prob: 0.4, mask_id: 4, vocab: 250, whole_word: false, seed: 11 };
    let masked: Vec<_> = rows
        .iter()
        .zip(ids)
        .map(|(r, &n)| mask_row(&spec, 0, u64::from(n), &r.ids, &r.special, &r.word_start))
        .collect();
    collate_rows(rows, &masked, ids, 0)
}

/// Every rank's batch for a global batch spread over `ranks` ranks.
fn batches(ranks: usize) -> Vec<Batch> {
    (0..ranks)
        .map(|r| {
            let (rows, ids) = rows(r, 100 * r as u64);
            batch(&rows, &ids)
        })
        .collect()
}

fn masked(b: &Batch) -> usize {
    b.labels.iter().filter(|&&l| l != job::mlm::IGNORE).count()
}

/// One batch of all of `parts`' rows (a world of one taking the whole global batch).
fn concat(parts: &[Batch]) -> Batch {
    let t = parts.iter().map(|b| b.t).max().unwrap();
    let mut out = Batch { t, ..Batch::default() };
    for b in parts {
        for i in 0..b.b {
            let (row, pad) = (i * b.t..(i + 1) * b.t, t - b.t);
            out.input_ids.extend(b.input_ids[row.clone()].iter().copied().chain(std::iter::repeat_n(0, pad)));
            out.token_type_ids.extend(std::iter::repeat_n(0, t));
            out.attention_mask.extend(b.attention_mask[row.clone()].iter().copied().chain(std::iter::repeat_n(0, pad)));
            out.position_ids.extend(b.position_ids[row.clone()].iter().copied().chain(std::iter::repeat_n(0, pad)));
            out.segment_ids.extend(b.segment_ids[row.clone()].iter().copied().chain(std::iter::repeat_n(0, pad)));
            out.labels.extend(b.labels[row].iter().copied().chain(std::iter::repeat_n(job::mlm::IGNORE, pad)));
        }
        out.example_ids.extend(&b.example_ids);
        out.b += b.b;
    }
    out
}

/// The parameters after `steps` steps of the ranks of `parts` (one thread and engine each, on a
/// real ring; a world of one when there is one part), and each step's loss normaliser. With
/// `mean_of_means`, each rank divides by its own count (and the sum by the world), as a per-rank
/// mean would.
fn train(parts: Vec<Batch>, steps: u64, mean_of_means: bool) -> (Vec<f32>, Vec<usize>) {
    let world = parts.len();
    let run = move |engine: &mut dyn engine::Engine, b: &Batch| -> (Vec<f32>, Vec<usize>) {
        let t = job::config::TrainSection::default();
        let mut counts = Vec::new();
        for s in 0..steps {
            let batches = std::slice::from_ref(b);
            let count = match mean_of_means {
                false => worker::train::global_masked_count(engine, batches).unwrap(),
                true => masked(b) * world,
            };
            worker::train::optimizer_step(engine, batches, count, &t, s, 1e-3).unwrap();
            counts.push(count);
        }
        (engine.host_params().unwrap().params.clone(), counts)
    };
    let open = |peers| {
        let (model, _) = checkpoint::load(&fixtures().join("tiny-cls"), Head::MaskedLm, 3).unwrap();
        let opt = AdamW::new(model.layout.total, 0.9, 0.999, 1e-8, 0.01);
        let how = engine::Options { precision: job::config::Precision::Fp32, zero: false };
        engine::open(&Compute::Cpu, model, opt, how, peers).unwrap()
    };
    if world == 1 {
        return run(open(Peers::Alone).as_mut(), &parts[0]);
    }
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = ls
        .into_iter()
        .zip(parts)
        .enumerate()
        .map(|(rank, (l, b))| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let ring = Ring::connect(rank, &addrs, l, &RingOptions::new(Duration::from_secs(20))).unwrap();
                let mut engine = open(Peers::Ring(Overlapped::new(Box::new(ring))));
                run(engine.as_mut(), &b)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "the ranks' parameters differ");
    }
    results.into_iter().next().unwrap()
}

#[test]
fn masked_lm_on_uneven_masks_two_and_three_workers_equal_one() {
    for world in [2, 3] {
        let parts = batches(world);
        let counts: Vec<usize> = parts.iter().map(masked).collect();
        assert!(counts[0] <= 20 && counts[1..].iter().all(|&c| c >= 100), "not uneven enough: {counts:?}");
        let (one, one_counts) = train(vec![concat(&parts)], 2, false);
        let (many, many_counts) = train(parts.clone(), 2, false);
        assert_eq!(many_counts, one_counts, "world {world}: the global count");
        assert_eq!(one_counts[0], counts.iter().sum::<usize>());
        let d = norm_diff(&one, &many);
        println!("masked LM, {world} workers {counts:?} against 1: relative difference {d:.2e}");
        assert!(d < 1e-5, "world {world}: relative difference {d}");
        // A mean of the ranks' means weighs rank 0's few tokens far more: the test tells it apart.
        let (biased, _) = train(parts, 2, true);
        assert!(norm_diff(&one, &biased) > 1e-4, "world {world}: a mean of means passed");
    }
}
