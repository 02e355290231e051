//! Masked-LM pretraining over the real CPU ring (one thread per rank, in process): N workers equal
//! one worker on the same global batch even when the ranks hold very different numbers of masked
//! tokens, because the loss is the global sum over the global count of masked tokens, summed
//! over the ranks before backward (`train::global_masked_count`), never a mean of the ranks'
//! means.

use crate::support::fixtures;
use job::mlm::{mask_row, MaskSpec};
use job::pack::{pack, Row};
use kernels::tolerance::norm_diff;
use std::net::TcpListener;
use std::time::Duration;
use worker::checkpoint;
use worker::collective::{Neighbours, Overlapped, Ring, RingOptions};
use worker::engine::{self, Compute, Peers};
use worker::layout::Head;
use worker::model::Batch;
use worker::optim::AdamW;
use worker::tokenize::collate_rows;

/// Rank `rank`'s rows of the global batch, numbered from `first` in the epoch: rank 0 short rows
/// (a handful of masked tokens in all), the others full 32-token rows (hundreds).
fn rows(rank: usize, first: u64) -> (Vec<Row>, Vec<u32>) {
    let len = if rank == 0 { 2 } else { 30 };
    let docs: Vec<Vec<u32>> =
        (0..12u32).map(|d| (0..len as u32).map(|i| 5 + (d * 31 + i * 7 + rank as u32 * 13) % 240).collect()).collect();
    let words = vec![true; len];
    let refs: Vec<(&[u32], &[bool])> = docs.iter().map(|d| (&d[..], &words[..])).collect();
    let out = pack(len + 2, false, &refs, 2, 3);
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
                let ring =
                    Ring::connect(Neighbours::of(rank, &addrs), l, &RingOptions::new(Duration::from_secs(20))).unwrap();
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

/// A pretraining job end to end, as a user runs it: a generated corpus preprocessed by the real
/// `worker preprocess` (a training corpus and a held-out one), then `train.task = "mlm"` through
/// the one training loop: single-process `worker train` and `coordinator --spawn-local` with 1
/// and 2 workers (the coordinator reading the memory-mapped shards and streaming rows) on the
/// same global batch, the rows packed from many documents, dynamic masks per epoch, dropout on,
/// a checkpoint every 4 steps and the held-out corpus evaluated at each (exact counts over the
/// ranks); then a run resumed from step 4 in a fresh directory.
mod job_end_to_end {
    use crate::distributed::{assert_bits_eq, checkpoint_steps, coordinator, loss_by_step, params, run_ok, scratch};
    use crate::support::fixtures;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Words of one token each in the fixture's vocabulary.
    const WORDS: [&str; 12] =
        ["good", "bad", "film", "movie", "funny", "story", "great", "best", "fun", "the", "a", "is"];

    /// Documents of `lengths` tokens, one per line: one-token words, and "dull", which the
    /// fixture's WordPiece splits into 4 pieces (d ##u ##l ##l: whole-word masking takes them
    /// together).
    fn corpus(dir: &Path, name: &str, lengths: &[usize], salt: usize) -> PathBuf {
        corpus_with(dir, name, lengths, salt, &fixtures().join("tiny-cls/tokenizer.json"))
    }

    fn corpus_with(dir: &Path, name: &str, lengths: &[usize], salt: usize, tokenizer: &Path) -> PathBuf {
        let text: String = (0..lengths.len())
            .map(|i| {
                let (mut words, mut left) = (Vec::new(), lengths[i]);
                for k in 0.. {
                    if left == 0 {
                        break;
                    }
                    if left >= 4 && (i + k) % 4 == 0 {
                        words.push("dull");
                        left -= 4;
                    } else {
                        words.push(WORDS[(i * 7 + k * k * 3 + salt) % WORDS.len()]);
                        left -= 1;
                    }
                }
                words.join(" ") + "\n"
            })
            .collect();
        let (txt, out) = (dir.join(format!("{name}.txt")), dir.join(name));
        std::fs::write(&txt, text).unwrap();
        let o = Command::new(crate::distributed::bin("worker"))
            .arg("preprocess")
            .arg(&txt)
            .arg("--tokenizer")
            .arg(tokenizer)
            .arg("--out")
            .arg(&out)
            .arg("--no-progress")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    }

    fn job(dir: &Path) -> PathBuf {
        // Documents that fill rows of 32 exactly, four rows at a time (one document of 30 tokens,
        // two of 14, four of 6, one of 9 and one of 19, each with its [CLS] and [SEP]): 48 rows,
        // 6 steps of 8 an epoch, so that every world size takes the same global batches (with
        // a partial last step a world of 2 would pad it with a repeated row, as
        // DistributedSampler does). Long documents are split across rows.
        let train: Vec<usize> = [30, 14, 14, 6, 6, 6, 6, 9, 19].repeat(12);
        let dev: Vec<usize> = (0..40).map(|i| 2 + i * 13 % 60).collect();
        // The tiny fixture with dropout 0.1: it has no masked-LM head, which starts freshly
        // initialised, the decoder tied to the word embeddings.
        let model = crate::distributed::model_with_dropout(dir, 0.1);
        let (train, dev) = (corpus(dir, "train", &train, 0), corpus(dir, "dev", &dev, 5));
        let p = dir.join("job.toml");
        std::fs::write(
            &p,
            format!(
                "[model]\npath = {model:?}\nmax_seq_len = 32\n[data]\ntrain = {train:?}\ndev = {dev:?}\n\
                 [train]\ntask = \"mlm\"\nseed = 3\nepochs = 20\nmax_steps = 12\nbatch_size = 8\nlr = 2e-3\n\
                 warmup_ratio = 0.0\n[mlm]\nwhole_word = true\n\
                 [checkpoint]\nevery = 4\nkeep_last = 100\nbest_metric = \"dev/loss\"\n"
            ),
        )
        .unwrap();
        p
    }

    fn rows_of(cfg: &Path) -> u64 {
        let job = job::config::JobConfig::load(Some(cfg), &[]).unwrap();
        job::pack::Corpora::open(&job, None).unwrap().train.rows()
    }

    #[test]
    fn pretraining_trains_n_workers_equal_one_and_a_resumed_run_is_bit_identical() {
        let dir = scratch("mlm-job");
        let cfg = job(&dir);
        let rows = rows_of(&cfg);
        // Two epochs of packed rows in 12 steps of 8: the masks are redrawn in the second.
        assert_eq!(rows, 48);

        let single = dir.join("single");
        let (stdout, _) = run_ok({
            let mut c = Command::new(crate::distributed::bin("worker"));
            c.args(["train", "--config", cfg.to_str().unwrap(), "--no-progress"])
                .args(["--set", &format!("output.dir={}", single.display())]);
            c
        });
        assert!(stdout.contains("trained 12 steps") && stdout.contains("perplexity"), "{stdout}");
        let want = params(&single.join("model"));
        let curve = loss_by_step(&single);
        assert_eq!(curve.len(), 12);
        assert!(curve.values().all(|l| l.is_finite() && *l > 0.0));
        let first: f64 = curve.range(..=3).map(|(_, l)| l).sum();
        let last: f64 = curve.range(10..).map(|(_, l)| l).sum();
        assert!(last < first, "the masked-LM loss went down: {curve:?}");
        // The published model is a BertForMaskedLM with its head.
        let config = std::fs::read_to_string(single.join("model/config.json")).unwrap();
        assert!(config.contains("BertForMaskedLM"), "{config}");
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(single.join("metrics.json")).unwrap()).unwrap();
        assert!(metrics["dev"]["perplexity"].as_f64().is_some_and(|p| p > 1.0), "{metrics}");

        // One worker through the coordinator: the same bits; two: the same parameters to 1e-5.
        let one = dir.join("w1");
        run_ok(coordinator(&cfg, 1, &one));
        assert_bits_eq(&params(&one.join("model")), &want, "one worker through the coordinator vs worker train");
        assert_eq!(loss_by_step(&one), curve);
        let two = dir.join("w2");
        let (stdout, _) = run_ok(coordinator(&cfg, 2, &two));
        assert!(stdout.contains("dev") && stdout.contains("perplexity"), "{stdout}");
        let got = params(&two.join("model"));
        let d = crate::distributed::norm_diff(&want, &got);
        println!("masked-LM job: 2 workers vs worker train: parameters {d:.2e}");
        assert!(d < 1e-5, "2 workers: relative difference {d}");
        // Workers that read the shards themselves (a shared volume), handed only row numbers:
        // the same bits as rows streamed by the coordinator.
        let shared = dir.join("w2-shared");
        let mut c = coordinator(&cfg, 2, &shared);
        c.args(["--set", "data.shared_storage=true"]);
        run_ok(c);
        assert_bits_eq(&params(&shared.join("model")), &got, "rows read by the workers vs streamed");
        // The held-out evaluation, counted over two shards, equals one worker's.
        let eval = |out: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
        };
        let (m1, m2) = (eval(&one), eval(&two));
        assert_eq!(m1["dev"]["examples"], m2["dev"]["examples"], "the same masked tokens counted");
        let rel = (m1["dev"]["loss"].as_f64().unwrap() - m2["dev"]["loss"].as_f64().unwrap()).abs();
        assert!(rel < 1e-4, "dev loss {} vs {}", m1["dev"]["loss"], m2["dev"]["loss"]);

        // A second phase is a new job initialised from the first one's model: the masked-LM head
        // comes with it (nothing initialised afresh), and it trains on.
        let phase2 = dir.join("phase2");
        let (_, err) = run_ok({
            let mut c = Command::new(crate::distributed::bin("worker"));
            c.args(["train", "--config", cfg.to_str().unwrap(), "--no-progress"])
                .args(["--set", &format!("model.path={}", two.join("model").display())])
                .args(["--set", "train.max_steps=2", "--set", &format!("output.dir={}", phase2.display())]);
            c
        });
        assert!(err.contains("initialized=[]"), "{err}");
        assert!(crate::distributed::norm_diff(&got, &params(&phase2.join("model"))) > 0.0);

        // Resumed from step 4 in a fresh directory: the same bits as the uninterrupted 2 workers.
        let resumed = dir.join("resumed");
        let step = resumed.join("checkpoints/step-00000004");
        std::fs::create_dir_all(&step).unwrap();
        for f in std::fs::read_dir(two.join("checkpoints/step-00000004")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), step.join(f.file_name())).unwrap();
        }
        let (_, err) = run_ok(coordinator(&cfg, 2, &resumed));
        assert!(err.contains("resuming") && err.contains("step-00000004"), "{err}");
        assert_eq!(checkpoint_steps(&resumed), vec![4, 8, 12]);
        assert_bits_eq(&params(&resumed.join("model")), &got, "the resumed run vs the uninterrupted run");
        let tail: std::collections::BTreeMap<u64, f64> = loss_by_step(&two).range(5..).map(|(k, v)| (*k, *v)).collect();
        assert_eq!(loss_by_step(&resumed), tail, "steps 5..=12, bit for bit");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A corpus preprocessed with another tokenizer (the fixture's without lowercasing: other
    /// ids for the same text) is refused by `worker train`, naming the shard and the model's
    /// tokenizer, and by a distributed worker, naming the corpus; nothing is written.
    #[test]
    fn a_corpus_of_another_tokenizer_is_refused() {
        let dir = scratch("mlm-tokenizer");
        let mut tok: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-cls/tokenizer.json")).unwrap())
                .unwrap();
        tok["normalizer"]["lowercase"] = false.into();
        let other = dir.join("cased.json");
        std::fs::write(&other, tok.to_string()).unwrap();
        let cfg = job(&dir);
        let cased = corpus_with(&dir, "cased", &[30, 14, 14], 0, &other);
        let set = format!("data.train={}", cased.display());
        let out = dir.join("single");
        let o = Command::new(crate::distributed::bin("worker"))
            .args(["train", "--no-progress", "--config", cfg.to_str().unwrap(), "--set", &set])
            .args(["--set", &format!("output.dir={}", out.display())])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("shard-00000.tok") && err.contains("another tokenizer"), "{err}");
        assert!(!out.join("checkpoints").exists(), "nothing is written");
        let out = dir.join("w1");
        let mut c = coordinator(&cfg, 1, &out);
        c.args(["--set", &set, "--set", &format!("data.dev={}", cased.display()), "--set", "elastic.max_restarts=0"]);
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains(&format!("the corpus {} was preprocessed with another tokenizer", cased.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// `model.from_scratch`: a model directory with only config.json (the tokenizer given apart)
    /// pretrains from weights initialised by the seed, the same bits every time; no weights file
    /// is read or needed.
    #[test]
    fn a_model_pretrains_from_scratch_from_its_config_alone() {
        let dir = scratch("mlm-scratch");
        let cfg = job(&dir);
        let bare = dir.join("bare");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::copy(fixtures().join("tiny-cls/config.json"), bare.join("config.json")).unwrap();
        let sets = [
            format!("model.path={}", bare.display()),
            format!("model.tokenizer={}", fixtures().join("tiny-cls/tokenizer.json").display()),
            "model.from_scratch=true".to_string(),
            "train.max_steps=4".to_string(),
        ];
        let run = |out: &Path| {
            let mut c = Command::new(crate::distributed::bin("worker"));
            c.args(["train", "--no-progress", "--config", cfg.to_str().unwrap()])
                .args(["--set", &format!("output.dir={}", out.display())]);
            for s in &sets {
                c.args(["--set", s]);
            }
            run_ok(c)
        };
        let (stdout, err) = run(&dir.join("a"));
        assert!(stdout.contains("trained 4 steps") && err.contains("initialised from scratch"), "{stdout}{err}");
        run(&dir.join("b"));
        let a = params(&dir.join("a/model"));
        assert_bits_eq(&params(&dir.join("b/model")), &a, "two runs from scratch");
        let pretrained = params(&fixtures().join("tiny-cls"));
        assert!(a.len() != pretrained.len() || crate::distributed::norm_diff(&pretrained, &a) > 0.5);
        // Without from_scratch the missing weights are an error naming the file.
        let mut c = Command::new(crate::distributed::bin("worker"));
        c.args(["train", "--no-progress", "--config", cfg.to_str().unwrap()]);
        c.args(["--set", &sets[0], "--set", &sets[1], "--set", &format!("output.dir={}", dir.join("c").display())]);
        let err = crate::distributed::run_err(c);
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
