//! `worker train` / `worker predict` as a user runs them: the real binary, real files, the tiny
//! fixture model (tests/fixtures/tiny-cls: a 3-way classifier with a 250-token WordPiece
//! tokenizer) on small CSV and JSON Lines files. Bad input must give a non-zero exit and a message naming the file, line,
//! tensor or key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-cls")
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tandem-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POSITIVE: [&str; 4] =
    ["a good and funny film", "the best movie of the year", "great fun", "a beautiful story, well worth it"];
const NEGATIVE: [&str; 4] =
    ["a bad and boring film", "the worst movie of the year", "dull and too long", "nothing works in this mess"];

fn csv_rows(n: usize) -> String {
    let mut s = String::from("text,label\n");
    for i in 0..n {
        let (t, l) = if i % 2 == 0 { (POSITIVE[i / 2 % 4], "positive") } else { (NEGATIVE[i / 2 % 4], "negative") };
        s.push_str(&format!("\"{t}\",{l}\n"));
    }
    s
}

fn job(dir: &TempDir, model: &Path, train: &Path, extra: &str) -> PathBuf {
    dir.write(
        "job.toml",
        &format!(
            "[model]\npath = {:?}\nmax_seq_len = 32\n\n[data]\ntrain = {:?}\ndev = {:?}\ntest = {:?}\nlabels = [\"negative\", \"positive\", \"neutral\"]\n\n[train]\nepochs = 1\nbatch_size = 8\nlr = 1e-3\n\n[output]\ndir = {:?}\n{extra}",
            model,
            train,
            train,
            train,
            dir.path().join("out")
        ),
    )
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).env_remove("RUST_LOG").output().expect("worker runs")
}

/// `worker predict` on `file` in batches of 2, and on each of `texts` alone: (batched, alone),
/// one JSON answer per text each.
fn predict_batched_and_alone(model: &Path, file: &Path, texts: &[&str]) -> Vec<(serde_json::Value, serde_json::Value)> {
    let model = model.to_str().unwrap();
    let out = worker(&["predict", "--model", model, "--file", file.to_str().unwrap(), "--batch-size", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let batched: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(batched.len(), texts.len());
    let alone = texts
        .iter()
        .map(|t| serde_json::from_slice(&worker(&["predict", "--model", model, "--text", t]).stdout).unwrap());
    batched.into_iter().zip(alone).collect()
}

fn train(job: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", job.to_str().unwrap(), "--no-progress"];
    args.extend_from_slice(extra);
    worker(&args)
}

fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "a panic is not a clear error:\n{err}");
}

#[test]
fn trains_saves_and_predicts_the_tiny_model() {
    let dir = TempDir::new("train");
    let train_csv = dir.write("train.csv", &csv_rows(32));
    let cfg = job(&dir, &fixture_model(), &train_csv, "");
    let out = train(&cfg, &["--set", "train.epochs=3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "train failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("trained 12 steps"), "{stdout}");
    assert!(stdout.contains("test accuracy"), "{stdout}");
    let model_dir = dir.path().join("out/model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model_dir.join(f).exists(), "{f} not saved");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["steps"], 12);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["id2label"]["1"], "positive");

    let out = worker(&["predict", "--model", model_dir.to_str().unwrap(), "--text", "great fun", "--text", "dull"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["logits"].as_array().unwrap().len(), 3);
    for l in &lines {
        // The label is id2label's name of the largest logit; the score its softmax probability.
        let logits: Vec<f64> = l["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let top = (0..3).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(l["label"], cfg["id2label"][top.to_string()]);
        let z: f64 = logits.iter().map(|x| x.exp()).sum();
        assert!((l["score"].as_f64().unwrap() - logits[top].exp() / z).abs() < 1e-6, "{l}");
    }

    // A file, in batches of 2 (padded to each batch's longest): the answers of one text at a time.
    let texts = ["great fun", "dull", "the best film of the year and a great story", "bad", "funny"];
    let csv: String = std::iter::once("id,text\n".to_string())
        .chain(texts.iter().enumerate().map(|(i, t)| format!("{i},\"{t}\"\n")))
        .collect();
    let file = dir.write("predict.csv", &csv);
    for (t, (b, one)) in texts.iter().zip(predict_batched_and_alone(&model_dir, &file, &texts)) {
        assert_eq!((&b["text"], &b["label"]), (&one["text"], &one["label"]));
        for (x, y) in b["logits"].as_array().unwrap().iter().zip(one["logits"].as_array().unwrap()) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{t}: batched {x} vs alone {y}");
        }
    }
    let bad = dir.write("bad.jsonl", "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n");
    let out = worker(&["predict", "--model", model_dir.to_str().unwrap(), "--file", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl:2") && err.contains("`text`"), "{err}");
}

#[test]
fn micro_batches_give_the_same_training() {
    let dir = TempDir::new("micro");
    let train_csv = dir.write("train.csv", &csv_rows(32));
    let metrics = |extra: &[&str], out: &str| -> serde_json::Value {
        let cfg = job(&dir, &fixture_model(), &train_csv, "");
        let mut args = vec!["--set", "train.epochs=2"];
        let out_set = format!("output.dir={}", dir.path().join(out).display());
        args.extend_from_slice(&["--set", &out_set]);
        args.extend_from_slice(extra);
        let o = train(&cfg, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(out).join("metrics.json")).unwrap()).unwrap()
    };
    let whole = metrics(&[], "whole");
    let micro = metrics(&["--set", "train.micro_batch_size=3"], "micro");
    assert_eq!(whole["steps"], micro["steps"]);
    let (a, b) = (whole["test"]["loss"].as_f64().unwrap(), micro["test"]["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-5 * a.abs(), "test loss {a} vs {b}");
    assert_eq!(whole["test"]["accuracy"], micro["test"]["accuracy"]);
}

#[test]
fn reads_json_lines_and_the_environment_layer() {
    let dir = TempDir::new("jsonl");
    let mut body = String::new();
    for i in 0..16 {
        let (t, l) = if i % 2 == 0 { (POSITIVE[i % 4], "positive") } else { (NEGATIVE[i % 4], "negative") };
        body.push_str(&serde_json::json!({"text": t, "label": l}).to_string());
        body.push('\n');
    }
    let train_jsonl = dir.write("train.jsonl", &body);
    let cfg = job(&dir, &fixture_model(), &train_jsonl, "");
    // The environment overrides the file (8 -> 4 per batch: 16 examples = 4 steps), flags override both.
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--no-progress", "--set", "train.max_steps=3"])
        .env("TANDEM_TRAIN__BATCH_SIZE", "4")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--print-config"])
        .env("TANDEM_TRAIN__BATCH_SIZE", "4")
        .output()
        .unwrap();
    let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resolved["train"]["batch_size"], 4);
    assert_eq!(resolved["train"]["lr"], 1e-3);
}

#[test]
fn missing_config_file() {
    let out = worker(&["train", "--config", "/nonexistent/job.toml"]);
    assert_fails_with(&out, &["/nonexistent/job.toml", "no such config file"]);
}

#[test]
fn a_job_without_training_data_says_so() {
    let dir = TempDir::new("notrain");
    let cfg = dir.write("job.toml", "[train]\nepochs = 1\n");
    assert_fails_with(&train(&cfg, &[]), &["data.train is not set"]);
}

#[test]
fn unknown_config_key_is_named() {
    let dir = TempDir::new("key");
    let train_csv = dir.write("train.csv", &csv_rows(8));
    let cfg = job(&dir, &fixture_model(), &train_csv, "");
    let body = std::fs::read_to_string(&cfg).unwrap().replace("lr = 1e-3", "lr = 1e-3\nlearning_rte = 2e-5");
    std::fs::write(&cfg, body).unwrap();
    assert_fails_with(&train(&cfg, &[]), &["learning_rte", "job.toml"]);
    // The same from a flag and from the environment.
    let cfg = job(&dir, &fixture_model(), &train_csv, "");
    assert_fails_with(&train(&cfg, &["--set", "train.bogus=1"]), &["bogus"]);
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("TANDEM_DATA__TEXT_COLUM", "x")
        .output()
        .unwrap();
    assert_fails_with(&out, &["text_colum"]);
}

#[test]
fn missing_data_file() {
    let dir = TempDir::new("nodata");
    let cfg = job(&dir, &fixture_model(), &dir.path().join("absent.csv"), "");
    assert_fails_with(&train(&cfg, &[]), &["absent.csv"]);
}

#[test]
fn data_row_without_label_names_file_and_line() {
    let dir = TempDir::new("nolabel");
    let train_csv = dir.write("train.csv", "text,label\n\"fine\",positive\n\"no label here\",\n\"ok\",negative\n");
    let cfg = job(&dir, &fixture_model(), &train_csv, "");
    assert_fails_with(&train(&cfg, &[]), &["train.csv:3", "no label"]);

    let train_jsonl =
        dir.write("train.jsonl", "{\"text\": \"fine\", \"label\": \"positive\"}\n{\"text\": \"no label\"}\n");
    let cfg = job(&dir, &fixture_model(), &train_jsonl, "");
    assert_fails_with(&train(&cfg, &[]), &["train.jsonl:2", "no label"]);
}

#[test]
fn label_outside_the_declared_set() {
    let dir = TempDir::new("badlabel");
    let train_csv = dir.write("train.csv", "text,label\n\"fine\",positive\n\"meh\",mixed\n");
    let cfg = job(&dir, &fixture_model(), &train_csv, "");
    assert_fails_with(&train(&cfg, &[]), &["train.csv:3", "`mixed`", "negative, positive, neutral"]);
}

fn copy_model(dir: &TempDir) -> PathBuf {
    let m = dir.path().join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_model().join(f), m.join(f)).unwrap();
    }
    m
}

#[test]
fn truncated_safetensors_file() {
    let dir = TempDir::new("trunc");
    let model = copy_model(&dir);
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let train_csv = dir.write("train.csv", &csv_rows(8));
    let cfg = job(&dir, &model, &train_csv, "");
    assert_fails_with(&train(&cfg, &[]), &["model.safetensors", "not a readable safetensors file"]);
}

#[test]
fn tensor_of_the_wrong_shape_names_tensor_and_shapes() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = TempDir::new("shape");
    let model = copy_model(&dir);
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wrong = vec![0u8; 64 * 32 * 4];
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for name in st.names() {
        if name == "bert.pooler.dense.weight" {
            views.push((name.to_string(), TensorView::new(Dtype::F32, vec![64, 32], &wrong).unwrap()));
        } else {
            views.push((name.to_string(), st.tensor(name).unwrap()));
        }
    }
    let out_bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(&weights, out_bytes).unwrap();
    let train_csv = dir.write("train.csv", &csv_rows(8));
    let cfg = job(&dir, &model, &train_csv, "");
    assert_fails_with(&train(&cfg, &[]), &["bert.pooler.dense.weight", "[64, 32]", "[64, 64]"]);
}

#[test]
fn unknown_tensor_and_missing_body_tensor() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = TempDir::new("unknown");
    let model = copy_model(&dir);
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let extra = vec![0u8; 4 * 4];
    let mut views: Vec<(String, TensorView<'_>)> =
        st.names().into_iter().map(|n| (n.to_string(), st.tensor(n).unwrap())).collect();
    views.push((
        "bert.encoder.layer.7.output.dense.weight".into(),
        TensorView::new(Dtype::F32, vec![2, 2], &extra).unwrap(),
    ));
    std::fs::write(&weights, safetensors::serialize(views, None).unwrap()).unwrap();
    let train_csv = dir.write("train.csv", &csv_rows(8));
    let cfg = job(&dir, &model, &train_csv, "");
    assert_fails_with(&train(&cfg, &[]), &["bert.encoder.layer.7.output.dense.weight", "is not a tensor"]);

    let views: Vec<(String, TensorView<'_>)> = st
        .names()
        .into_iter()
        .filter(|n| *n != "bert.encoder.layer.1.intermediate.dense.bias")
        .map(|n| (n.to_string(), st.tensor(n).unwrap()))
        .collect();
    std::fs::write(&weights, safetensors::serialize(views, None).unwrap()).unwrap();
    assert_fails_with(&train(&cfg, &[]), &["encoder.layer.1.intermediate.dense.bias", "missing"]);
}

#[test]
fn device_cuda_without_a_driver_is_a_clear_error() {
    let start = std::time::Instant::now();
    for args in [
        &["--device", "cuda", "train", "--config", "no-such.toml"][..],
        &["--device", "cuda", "--coordinator", "http://127.0.0.1:9"],
    ] {
        let out = worker(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        if kernels::cuda::driver_available() {
            // A machine with a driver: no panic, and a message about the GPU, not a stack trace.
            assert!(err.contains("GPU") || err.contains("CUDA"), "{err}");
        } else {
            assert!(err.contains("error: no CUDA driver found (libcuda.so.1 cannot be loaded)"), "{err}");
            assert!(err.contains("--device cpu"), "{err}");
        }
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "took {:?}", start.elapsed());
    // The CPU path is unaffected by the flag's existence.
    let out = worker(&["--device", "cpu", "train", "--config", "no-such.toml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such.toml: no such config file"));
}

#[test]
fn the_binaries_own_environment_variables_are_not_config_keys() {
    // TANDEM_LISTEN, TANDEM_DEVICE, ... are flags of the binaries (one underscore); only
    // TANDEM_<SECTION>__<KEY> is config, and an unknown one of those is still an error.
    let dir = TempDir::new("env-flags");
    let train = dir.write("train.csv", &csv_rows(12));
    let cfg = job(&dir, &fixture_model(), &train, "");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--print-config", "--config", cfg.to_str().unwrap()])
        .env("TANDEM_LISTEN", "127.0.0.1:0")
        .env("TANDEM_GPU", "0")
        .env("TANDEM_TRAIN__LR", "0.25")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"lr\": 0.25"), "{stdout}");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--print-config", "--config", cfg.to_str().unwrap()])
        .env("TANDEM_TRAIN__LEARNING_RATE", "0.25")
        .output()
        .unwrap();
    assert_fails_with(&out, &["learning_rate"]);
}

#[test]
fn bf16_on_the_cpu_needs_avx512_bf16_and_an_unknown_precision_is_named() {
    let dir = TempDir::new("precision");
    let model = fixture_model();
    let data = dir.write("train.csv", &csv_rows(24));
    let cfg = job(&dir, &model, &data, "");
    let bf16 = train(&cfg, &["--set", "train.precision=bf16"]);
    if kernels::bf16::supported() {
        assert!(bf16.status.success(), "{}", String::from_utf8_lossy(&bf16.stderr));
    } else {
        assert_fails_with(&bf16, &["train.precision", "AVX512_BF16"]);
    }
    assert_fails_with(&train(&cfg, &["--set", "train.precision=fp8"]), &["precision", "fp8"]);
}

/// The bytes of the weights in a model or checkpoint directory.
fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Each step's record in `loss.jsonl` (the last record of a step wins), without the timings.
fn loss_records(out: &Path) -> std::collections::BTreeMap<u64, String> {
    let text = std::fs::read_to_string(out.join("loss.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let key = ["epoch", "loss", "lr", "grad_norm", "tokens"].map(|k| v[k].to_string()).join(" ");
            (v["step"].as_u64().unwrap(), key)
        })
        .collect()
}

#[test]
fn an_interrupted_train_resumes_bit_for_bit() {
    let dir = TempDir::new("resume");
    let train_csv = dir.write("train.csv", &csv_rows(32));
    let cfg = job(&dir, &fixture_model(), &train_csv, "\n[checkpoint]\nevery = 4\n");
    let run = |out: &str, fault: Option<&str>| {
        let out_set = format!("output.dir={}", dir.path().join(out).display());
        let mut c = Command::new(env!("CARGO_BIN_EXE_worker"));
        c.args(["train", "--config", cfg.to_str().unwrap(), "--no-progress", "--set", "train.epochs=3"])
            .args(["--set", &out_set])
            .env_remove("RUST_LOG");
        match fault {
            Some(f) => c.env("TANDEM_FAULT", f),
            None => c.env_remove("TANDEM_FAULT"),
        };
        c.output().unwrap()
    };
    let whole = run("whole", None);
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    // Killed right after step 6: the checkpoint of step 4 is there, and the same command
    // continues from it to the same bits.
    let killed = run("cut", Some("rank0:step@6"));
    assert!(!killed.status.success(), "the fault did not fire");
    let cut = dir.path().join("cut");
    assert!(cut.join("checkpoints/step-00000004/manifest.json").exists());
    assert!(!cut.join("model").exists(), "an interrupted run published a model");
    let resumed = run("cut", None);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("resumed"), "{err}");
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("trained 12 steps"));
    assert!(weights(&cut.join("model")) == weights(&dir.path().join("whole/model")), "the resumed run diverged");
    assert_eq!(loss_records(&cut), loss_records(&dir.path().join("whole")));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["steps"], 12);

    // Run again, the job is done: nothing more to train, the same model.
    let again = run("cut", None);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(weights(&cut.join("model")) == weights(&dir.path().join("whole/model")));
}

#[test]
fn without_a_dev_split_the_test_split_is_evaluated_during_training_and_the_best_is_published() {
    let dir = TempDir::new("best");
    let train_csv = dir.write("train.csv", &csv_rows(32));
    let cfg = dir.write(
        "job.toml",
        &format!(
            "[model]\npath = {:?}\nmax_seq_len = 32\n\n[data]\ntrain = {train_csv:?}\ntest = {train_csv:?}\nlabels = [\"negative\", \"positive\", \"neutral\"]\n\n[train]\nepochs = 3\nbatch_size = 8\nlr = 1e-3\neval_every = 4\n\n[checkpoint]\nevery = 4\nkeep_last = 1\nbest_metric = \"test/accuracy\"\npublish = \"best\"\n\n[output]\ndir = {:?}\n",
            fixture_model(),
            dir.path().join("out")
        ),
    );
    let out = train(&cfg, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for step in [4, 8, 12] {
        assert!(
            stdout.contains(&format!("step {step}: test accuracy")),
            "no test evaluation at step {step}:\n{stdout}"
        );
    }
    // The published model is the checkpoint with the highest test accuracy (the earliest of
    // equals) among those kept (the best and the last), here not the last one.
    let ckpts = dir.path().join("out/checkpoints");
    let mut kept: Vec<(u64, f64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&ckpts).unwrap() {
        let p = entry.unwrap().path();
        if !p.file_name().unwrap().to_string_lossy().starts_with("step-") {
            continue;
        }
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("manifest.json")).unwrap()).unwrap();
        kept.push((m["step"].as_u64().unwrap(), m["metrics"]["test/accuracy"].as_f64().unwrap(), p));
    }
    kept.sort_by_key(|k| k.0);
    let best = kept.iter().fold(None::<&(u64, f64, PathBuf)>, |b, k| match b {
        Some(b) if b.1 >= k.1 => Some(b),
        _ => Some(k),
    });
    let (step, _, best) = best.expect("checkpoints were kept");
    assert_ne!(*step, 12, "the final checkpoint is the best: this run cannot tell best from final ({kept:?})");
    assert!(weights(&dir.path().join("out/model")) == weights(best), "the published model is not {}", best.display());

    // The choice is checked: "best" needs a metric.
    let out = train(&cfg, &["--set", "checkpoint.best_metric="]);
    assert_fails_with(&out, &["checkpoint.publish", "best_metric"]);
}

/// `worker predict` on a masked-LM model answers as the fill-mask pipeline: for each [MASK], the
/// top-k tokens by probability, the text with each filled in; the probabilities are the softmax
/// of the model's own logits at that position.
#[test]
fn predict_fills_each_mask_of_a_masked_lm_model() {
    use worker::checkpoint;
    use worker::layout::Head;
    let dir = TempDir::new("fill-mask");
    let cfg = worker::bert_config::BertConfig::from_file(&fixture_model().join("config.json")).unwrap();
    let model = checkpoint::init_model(cfg, Head::MaskedLm, 1);
    let model_dir = dir.path().join("mlm");
    checkpoint::save(&model, &model_dir, None, Some(&fixture_model())).unwrap();
    let text = "the film was [MASK] and [MASK] fun";
    let out = worker(&["predict", "--model", model_dir.to_str().unwrap(), "--text", text, "--top-k", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fills = line["fills"].as_array().unwrap();
    assert_eq!(fills.len(), 2, "one list per [MASK]");

    // The same forward in process: the softmax at each [MASK].
    let (mut m, _) = checkpoint::load(&model_dir, Head::MaskedLm, 0).unwrap();
    let enc = worker::tokenize::TextEncoder::from_file(&model_dir.join("tokenizer.json"), 128).unwrap();
    let e = enc.encode(text, None).unwrap();
    let mask = enc.token_id("[MASK]").unwrap();
    let labels: Vec<i64> = e.ids.iter().map(|&i| if i == mask { 0 } else { -100 }).collect();
    m.forward(&worker::tokenize::collate(&[&e], &[0], &labels, enc.pad_id), None).unwrap();
    let v = m.cfg.vocab_size;
    for (k, fill) in fills.iter().enumerate() {
        let logits = &m.acts.logits[k * v..(k + 1) * v];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let answers = fill.as_array().unwrap();
        assert_eq!(answers.len(), 3);
        let scores: Vec<f64> = answers.iter().map(|a| a["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "not by probability: {scores:?}");
        for a in answers {
            let id = a["token"].as_u64().unwrap() as usize;
            assert!((a["score"].as_f64().unwrap() - f64::from(logits[id]).exp() / z).abs() < 1e-6, "{a}");
            let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if a == &answers[0] {
                assert_eq!(logits[id], best, "the first fill is not the likeliest");
            }
            assert!(a["sequence"]
                .as_str()
                .unwrap()
                .contains(a["token_str"].as_str().unwrap().trim_start_matches("##")));
        }
    }
    // A JSON Lines file in batches of 2: the fills of one text at a time.
    let texts = ["[MASK] film", "the film was [MASK] and [MASK] fun", "a [MASK] story of the best movie", "[MASK]"];
    let jsonl: String = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
    let file = dir.write("fill.jsonl", &jsonl);
    for (t, (b, one)) in texts.iter().zip(predict_batched_and_alone(&model_dir, &file, &texts)) {
        let tokens = |v: &serde_json::Value| -> Vec<Vec<u64>> {
            v["fills"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_array().unwrap().iter().map(|a| a["token"].as_u64().unwrap()).collect())
                .collect()
        };
        assert_eq!(tokens(&b), tokens(&one), "{t}: the batched fills differ");
    }
    // A text without [MASK] is an error that says so.
    let out = worker(&["predict", "--model", model_dir.to_str().unwrap(), "--text", "no mask here"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no [MASK]"));
}
