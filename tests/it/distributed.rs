//! The distributed job end to end, with real processes on loopback: `coordinator --spawn-local`
//! with 1, 2 and 3 workers, and single-process `worker train`, on the same global batch, produce
//! the same parameters after 20 steps, with dropout off and on.
//!
//! Why they agree: every layout gives each optimizer step the same examples (the ranks'
//! micro-batches partition the single worker's batch, see coordinator/src/shard.rs), the same
//! dropout masks (keyed by the example's dataset index), and the same loss normalisation (the
//! mean over the global batch). What differs is only the order of the float sums in the weight
//! gradients: one GEMM reduction over all rows of the batch, versus a reduction over each rank's
//! rows followed by the ring's sum in rank order. Those differences are rounding-sized, so the
//! parameters agree to 1e-5 relative (||a - b|| / ||a||) but not bit for bit across world sizes.

use crate::support::fixtures;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    // target/debug/deps/it-<hash> -> target/debug/<name>, built by `cargo test --workspace`.
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`)", p.display());
    p
}

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("tandem-dist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

const WORDS: [&str; 12] =
    ["good", "bad", "film", "movie", "funny", "boring", "story", "great", "dull", "best", "worst", "fun"];

fn write_data(dir: &Path) -> PathBuf {
    let mut s = String::from("text,label\n");
    for i in 0..240usize {
        let words: Vec<&str> = (0..3 + i % 5).map(|k| WORDS[(i * 7 + k * 5) % WORDS.len()]).collect();
        let label = ["negative", "positive", "neutral"][i % 3];
        s.push_str(&format!("\"{}\",{label}\n", words.join(" ")));
    }
    let p = dir.join("train.csv");
    std::fs::write(&p, s).unwrap();
    p
}

/// The tiny fixture model, with the dropout probabilities set to `p`.
fn model_with_dropout(dir: &Path, p: f64) -> PathBuf {
    let m = dir.join("model-in");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-cls").join(f), m.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-cls/config.json")).unwrap()).unwrap();
    cfg["hidden_dropout_prob"] = p.into();
    cfg["attention_probs_dropout_prob"] = p.into();
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    m
}

fn job(dir: &Path, model: &Path, data: &Path) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {model:?}\nmax_seq_len = 16\n[data]\ntrain = {data:?}\ntest = {data:?}\n\
             labels = [\"negative\", \"positive\", \"neutral\"]\n[train]\nseed = 5\nepochs = 1\nmax_steps = 20\n\
             batch_size = 12\nlr = 2e-3\n"
        ),
    )
    .unwrap();
    p
}

fn params(model_dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    names
        .into_iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn run_distributed(cfg: &Path, world: usize, out: &Path) -> Vec<f32> {
    let o = Command::new(bin("coordinator"))
        .args([
            "--world-size",
            &world.to_string(),
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--spawn-local",
        ])
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(["--gather-timeout-s", "60"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "world {world} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("trained 20 steps on {world} workers")), "{stdout}");
    assert!(stdout.contains("test accuracy"), "{stdout}");
    params(&out.join("model"))
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt();
    d / a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

fn equivalence(p_drop: f64) {
    let dir = scratch(&format!("p{p_drop}"));
    let data = write_data(&dir);
    let model = model_with_dropout(&dir, p_drop);
    let cfg = job(&dir, &model, &data);
    let single_out = dir.join("single");
    let o = Command::new(bin("worker"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--no-progress"])
        .args(["--set", &format!("output.dir={}", single_out.display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let single = params(&single_out.join("model"));
    let initial = params(&fixtures().join("tiny-cls"));
    assert!(rel_diff(&initial, &single) > 1e-3, "training moved the parameters");
    for world in 1..=3 {
        let got = run_distributed(&cfg, world, &dir.join(format!("w{world}")));
        let d = rel_diff(&single, &got);
        println!("dropout {p_drop}: {world} worker(s) vs single process: relative difference {d:.2e}");
        if world == 1 {
            assert_eq!(got, single, "one worker through the coordinator is bit-identical to worker train");
        }
        assert!(d < 1e-5, "world {world}: relative difference {d}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn n_workers_equal_one_worker_dropout_off() {
    equivalence(0.0);
}

#[test]
fn n_workers_equal_one_worker_dropout_on() {
    equivalence(0.1);
}

#[test]
fn a_worker_that_fails_stops_the_job_with_a_clear_error() {
    let dir = scratch("fail");
    let data = write_data(&dir);
    let cfg = job(&dir, &dir.join("no-such-model"), &data);
    let start = std::time::Instant::now();
    let o = Command::new(bin("coordinator"))
        .args(["--world-size", "2", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0", "--spawn-local"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no-such-model"), "the worker's own error names the missing model:\n{err}");
    assert!(err.contains("exited with") && err.contains("the job is stopped"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "took {:?}", start.elapsed());
    std::fs::remove_dir_all(&dir).ok();
}
