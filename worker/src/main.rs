//! `worker`: one Tandem training process.
//!
//! ```text
//! worker train --config configs/rotten-tomatoes.toml            # fine-tune, single process
//! worker train --config job.toml --set train.epochs=1 --set train.lr=3e-5
//! TANDEM_TRAIN__BATCH_SIZE=16 worker train --config job.toml    # environment layer
//! worker predict --model runs/rotten-tomatoes/model --text "a gem of a film"
//! worker bench --preset minilm                                  # training-step tokens/s
//! worker --coordinator http://127.0.0.1:29400                   # one rank of a distributed job
//! ```
//!
//! In a distributed job the coordinator hands every worker its rank, the job config and its ring
//! peers (see `coordinator --help`); `coordinator --spawn-local` starts the workers itself.

use anyhow::Context;
use clap::{Parser, Subcommand};
use job::config::{JobConfig, RingTransport};
use std::path::PathBuf;
use std::time::Instant;
use worker::checkpoint;
use worker::layout::Head;
use worker::model::Batch;
use worker::tokenize::{collate, Encoded, TextEncoder};

#[derive(Parser)]
#[command(
    args_override_self = true,
    name = "worker",
    version,
    about = "A Tandem BERT training process",
    after_help = "Environment, besides the variables named above:\n  \
                  TANDEM_JOB_TOKEN    the job token, when there is no --token-file\n  \
                  RAYON_NUM_THREADS   compute threads (default: every core, or train.threads)\n  \
                  RUST_LOG            log filter (default: info)"
)]
struct Cli {
    /// Join the job run by this coordinator (e.g. http://127.0.0.1:29400) as one rank.
    #[arg(long, env = "TANDEM_COORDINATOR")]
    coordinator: Option<String>,
    /// The rank to ask for (Kubernetes sets JOB_COMPLETION_INDEX in an Indexed Job).
    #[arg(long, env = "JOB_COMPLETION_INDEX")]
    rank_hint: Option<u32>,
    /// Where this worker accepts its ring predecessor.
    #[arg(long, env = "TANDEM_RING_LISTEN", default_value = "127.0.0.1:0")]
    ring_listen: std::net::SocketAddr,
    /// The ring address to announce to the peers (default: the bound address).
    #[arg(long, env = "TANDEM_RING_ADVERTISE")]
    ring_advertise: Option<String>,
    /// Deadline for the coordinator, the rendezvous and every ring peer, in seconds.
    #[arg(long, env = "TANDEM_TIMEOUT_S", default_value_t = 600)]
    timeout_s: u64,
    /// A file holding the job token (default: the TANDEM_JOB_TOKEN environment variable; never a
    /// flag, which `ps` would show).
    #[arg(long, env = "TANDEM_JOB_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Connect to the coordinator over TLS (an https:// URL), trusting this CA (PEM).
    #[arg(long, env = "TANDEM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long, env = "TANDEM_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    /// This worker's certificate (PEM; with --tls-key), for a coordinator that requires one.
    #[arg(long, env = "TANDEM_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Send the job token to a coordinator that is not on this machine over plain http:// (in
    /// clear text): for a network you trust. Without it, such a coordinator needs https://.
    #[arg(long)]
    insecure: bool,
    /// Where to compute: cpu, or cuda (an NVIDIA GPU: --gpu picks which).
    #[arg(long, env = "TANDEM_DEVICE", value_enum, default_value_t = Device::Cpu, global = true)]
    device: Device,
    /// The GPU to use with --device cuda (an index among the visible ones; one worker per GPU;
    /// default: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID, else 0).
    #[arg(long, env = "TANDEM_GPU", global = true)]
    gpu: Option<usize>,
    /// Start this many workers on this node, one per device, and wait for them (torchrun's
    /// --nproc-per-node): each gets `--gpu i` with --device cuda or an equal share of the cores,
    /// rank hint node_rank * N + i, ring port + i when --ring-listen names one; a worker that
    /// crashes is replaced, SIGTERM / SIGINT are forwarded.
    #[arg(long, env = "TANDEM_NPROC_PER_NODE")]
    nproc_per_node: Option<usize>,
    /// This node's index among the nodes, for --nproc-per-node (default: torchrun's NODE_RANK or
    /// GROUP_RANK, Slurm's SLURM_NODEID, or Kubernetes' JOB_COMPLETION_INDEX).
    #[arg(long, env = "TANDEM_NODE_RANK")]
    node_rank: Option<usize>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a sequence classifier in this process (no coordinator).
    Train {
        /// The job config (TOML). Layers: defaults < this file < TANDEM_* environment < --set.
        #[arg(long, env = "TANDEM_CONFIG")]
        config: Option<PathBuf>,
        /// Override one config key, e.g. `--set train.lr=3e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the resolved config (as JSON) and exit.
        #[arg(long)]
        print_config: bool,
        /// No progress bar (log lines instead).
        #[arg(long)]
        no_progress: bool,
    },
    /// Classify texts with a saved classifier (one JSON line each: the top label, its probability
    /// `score` and the logits, as the text-classification pipeline), or fill each [MASK] with a
    /// masked-LM model (the `--top-k` likeliest tokens, as the fill-mask pipeline).
    Predict {
        /// A model directory written by `worker train` (or any HF BERT classifier or masked-LM
        /// model).
        #[arg(long)]
        model: PathBuf,
        /// A text (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// A file of texts, predicted in batches: CSV, TSV or JSON Lines (by its extension), the
        /// text in --text-column and a second text in --text-pair-column; one JSON line out per
        /// row, in order (after the --text ones).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value = "text")]
        text_column: String,
        #[arg(long)]
        text_pair_column: Option<String>,
        /// Texts per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        max_seq_len: usize,
        /// For a masked-LM model: the fills given for each [MASK].
        #[arg(long, default_value_t = 5)]
        top_k: usize,
    },
    /// Tokenize a raw text corpus into token shards for pretraining (streaming; the same bytes
    /// for any thread count). Prints the corpus manifest.
    Preprocess {
        /// Files or directories (every file below, in path order): plain text, one document per
        /// line (or blank-line separated with --blank-lines); JSON Lines (.jsonl/.json, the text
        /// in --text-field); any of them gzip-compressed (.gz); Parquet (.parquet, the text in
        /// the --text-field column).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// The tokenizer (a tokenizer.json).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The output directory: shard-NNNNN.tok files and corpus.json (written last).
        #[arg(long)]
        out: PathBuf,
        /// Documents are separated by blank lines instead of one per line.
        #[arg(long)]
        blank_lines: bool,
        /// The field of each JSON object (the column of a Parquet file) that holds the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// The most tokens one shard holds (whole documents; a longer document is an error).
        #[arg(long, default_value_t = 1 << 26)]
        shard_tokens: u64,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Time the training step (forward, backward, clipping, AdamW) on random tokens; print
    /// tokens/s and the time split as one JSON line.
    Bench {
        /// tiny (2 layers, hidden 128, vocab 30522) or minilm (the packaged checkpoint's shape).
        #[arg(long, default_value = "minilm")]
        preset: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Dropout on (training) or off.
        #[arg(long)]
        dropout: bool,
        /// fp32, or bf16 (dense layers in bf16 with f32 accumulation).
        #[arg(long, default_value = "fp32")]
        precision: String,
    },
    /// On a machine with an NVIDIA GPU: run every CUDA kernel against its CPU twin on random
    /// inputs and print the table (scripts/gpu-check.sh). Exits 1 if any kernel fails.
    GpuCheck {
        /// Where cuda_bf16.h is, for NVRTC (default: $TANDEM_CUDA_INCLUDE, then
        /// /usr/local/cuda/include).
        #[arg(long)]
        cuda_include: Option<String>,
    },
    /// Time the CPU ring all-reduce between processes (run one per rank; see scripts/bench.py).
    BenchRing {
        #[arg(long)]
        rank: usize,
        /// Every rank's ring address, comma-separated, in rank order.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<std::net::SocketAddr>,
        /// Buffer sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        sizes_mib: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// `auto`: shared memory between ranks on this host; `tcp`: loopback TCP.
        #[arg(long, default_value = "auto", value_parser = ["auto", "tcp"])]
        transport: String,
    },
}

fn main() {
    job::main_with(|| run(Cli::parse()));
}

/// The GPU index: --gpu / TANDEM_GPU, else the local rank torchrun or Slurm set, else 0.
fn gpu_index(flag: Option<usize>) -> usize {
    flag.or_else(|| worker::launch::env_number(&["LOCAL_RANK", "SLURM_LOCALID"]).map(|(_, v)| v)).unwrap_or(0)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Cmd::GpuCheck { cuda_include }) = &cli.cmd {
        return gpu_check(gpu_index(cli.gpu), cuda_include.clone());
    }
    if cli.device == Device::Cuda {
        if let Some(why) = kernels::cuda::cuda_unavailable(gpu_index(cli.gpu)) {
            anyhow::bail!("{why}");
        }
        anyhow::ensure!(
            matches!(cli.cmd, None | Some(Cmd::Train { .. })),
            "--device cuda is for training (`worker train`, or a distributed job's worker); this command runs on the CPU"
        );
    }
    let device = match cli.device {
        Device::Cpu => worker::engine::Device::Cpu,
        Device::Cuda => worker::engine::Device::Cuda(gpu_index(cli.gpu)),
    };
    let Some(cmd) = cli.cmd else {
        if let Some(nproc) = cli.nproc_per_node.filter(|&n| n != 1) {
            anyhow::ensure!(
                !std::env::args().any(|a| a == "--rank-hint" || a.starts_with("--rank-hint=")),
                "--nproc-per-node gives each worker its rank hint (node rank x N + i): give the node's rank with \
                 --node-rank instead of --rank-hint"
            );
            let node_rank = cli.node_rank.or_else(|| {
                worker::launch::env_number(&["NODE_RANK", "GROUP_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX"])
                    .map(|(_, v)| v)
            });
            return worker::launch::Launch {
                nproc,
                node_rank,
                cuda: cli.device == Device::Cuda,
                ring_listen: cli.ring_listen,
                ring_advertise: cli.ring_advertise,
            }
            .run();
        }
        // torchrun's and Slurm's variables, where Tandem's own are not given (README, "Launching").
        let master = std::env::var("MASTER_ADDR").ok().zip(std::env::var("MASTER_PORT").ok());
        let coordinator = cli.coordinator.or_else(|| master.map(|(addr, port)| format!("http://{addr}:{port}")));
        let coordinator = coordinator.context(
            "give --coordinator URL (or MASTER_ADDR and MASTER_PORT) to join a job, or a command (see --help)",
        )?;
        let rank_hint = cli.rank_hint.or_else(|| {
            let (from, rank) = worker::launch::env_number(&["RANK", "SLURM_PROCID"])?;
            tracing::info!(rank, from, "rank hint from the environment");
            u32::try_from(rank).ok()
        });
        let token = proto::auth::JobToken::from_file_or_env(cli.token_file.as_deref()).map_err(anyhow::Error::msg)?;
        return worker::distributed::run(worker::distributed::WorkerOpts {
            token,
            coordinator,
            rank_hint,
            ring_listen: cli.ring_listen,
            ring_advertise: cli.ring_advertise,
            timeout: std::time::Duration::from_secs(cli.timeout_s),
            tls: cli.tls_ca.map(|ca| proto::tls::ClientTls {
                ca,
                domain: cli.tls_domain,
                identity: cli.tls_cert.zip(cli.tls_key),
            }),
            device,
            insecure: cli.insecure,
        });
    };
    match cmd {
        Cmd::Train { config, set, print_config, no_progress } => {
            let job = JobConfig::load(config.as_deref(), &set)?;
            if print_config {
                println!("{}", serde_json::to_string_pretty(&job)?);
                return Ok(());
            }
            worker::kernel_threads(job.train.threads);
            tracing::info!(config = %serde_json::to_string(&job)?, "resolved job config");
            let s = worker::local::train(&job, !no_progress, device)?;
            println!("trained {} steps in {:.0} s ({:.0} tokens/s)", s.steps, s.train_seconds, s.tokens_per_second);
            for (name, m) in [("dev ", &s.dev), ("test", &s.test)] {
                if let Some(m) = m {
                    let counted = if m.perplexity.is_some() { "masked tokens" } else { "examples" };
                    println!("{name} {}  ({} {counted})", m.summary(), m.examples);
                }
            }
            println!("model saved to {}", s.model_dir.display());
            Ok(())
        }
        Cmd::Predict { model, text, file, text_column, text_pair_column, batch_size, max_seq_len, top_k } => {
            let mut inputs: Vec<(String, Option<String>)> = text.into_iter().map(|t| (t, None)).collect();
            if let Some(path) = file {
                let spec = job::data::DataSpec {
                    path,
                    format: None,
                    text_column,
                    text_pair_column,
                    label_column: None,
                    skip_rows_after_header: 0,
                };
                inputs.extend(job::data::read(&spec)?.into_iter().map(|r| (r.text, r.text_pair)));
            }
            predict(&model, &inputs, batch_size.max(1), max_seq_len, top_k)
        }
        Cmd::Preprocess { inputs, tokenizer, out, blank_lines, text_field, shard_tokens, no_progress } => {
            let opts = worker::preprocess::Options {
                inputs,
                tokenizer,
                out,
                blank_lines,
                text_field,
                shard_tokens,
                progress: !no_progress,
            };
            let corpus = worker::preprocess::run(&opts)?;
            println!("{}", serde_json::to_string_pretty(&corpus)?);
            Ok(())
        }
        Cmd::Bench { preset, batch, seq, steps, dropout, precision } => {
            bench(&preset, batch, seq, steps, dropout, &precision)
        }
        Cmd::BenchRing { rank, peers, sizes_mib, iters, transport } => {
            let transport = if transport == "tcp" { RingTransport::Tcp } else { RingTransport::Auto };
            bench_ring(rank, &peers, &sizes_mib, iters, transport)
        }
        Cmd::GpuCheck { .. } => unreachable!("handled above"),
    }
}

/// As the fill-mask pipeline answers: for each `[MASK]` of each text, the `top_k` likeliest
/// tokens with their probabilities and the text with each filled in.
/// As the fill-mask pipeline answers, for a batch of texts: for each `[MASK]` of each text, the
/// `top_k` likeliest tokens with their probabilities and the text with each filled in.
fn fill_mask(
    model: &mut worker::model::Bert,
    enc: &TextEncoder,
    texts: &[(String, Option<String>)],
    top_k: usize,
) -> anyhow::Result<()> {
    let mask = enc.special("[MASK]")?;
    let encoded = texts.iter().map(|(t, p)| enc.encode(t, p.as_deref())).collect::<Result<Vec<_>, _>>()?;
    let t = encoded.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    // Label every [MASK] (with any id): the head computes the rows that carry a label, in order.
    let mut labels = vec![job::mlm::IGNORE; texts.len() * t];
    for (i, e) in encoded.iter().enumerate() {
        anyhow::ensure!(e.ids.contains(&mask), "no [MASK] in {:?}", texts[i].0);
        for (k, _) in e.ids.iter().enumerate().filter(|(_, &id)| id == mask) {
            labels[i * t + k] = 0;
        }
    }
    let refs: Vec<&Encoded> = encoded.iter().collect();
    let ids: Vec<u32> = (0..texts.len() as u32).collect();
    model.forward(&collate(&refs, &ids, &labels, enc.pad_id), None)?;
    let vocab = model.cfg.vocab_size;
    let mut row = 0;
    for ((text, pair), e) in texts.iter().zip(&encoded) {
        let mut fills = Vec::new();
        for at in (0..e.ids.len()).filter(|&k| e.ids[k] == mask) {
            let logits = &model.acts.logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = logits.iter().map(|&l| (f64::from(l) - f64::from(top)).exp()).sum();
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let answers: Vec<serde_json::Value> = order[..top_k.min(vocab)]
                .iter()
                .map(|&id| {
                    let mut filled = e.ids.clone();
                    filled[at] = id as u32;
                    serde_json::json!({
                        "score": (f64::from(logits[id]) - f64::from(top)).exp() / z,
                        "logit": logits[id],
                        "token": id,
                        "token_str": enc.decode(&[id as u32]).unwrap_or_default(),
                        "sequence": enc.decode(&filled).unwrap_or_default(),
                    })
                })
                .collect();
            fills.push(answers);
        }
        let mut line = serde_json::json!({ "text": text, "fills": fills });
        if let Some(p) = pair {
            line["text_pair"] = p.as_str().into();
        }
        println!("{line}");
    }
    Ok(())
}

/// `worker predict`: `inputs` (text, optional pair) in batches of `batch_size`, one JSON line each.
fn predict(
    dir: &std::path::Path,
    inputs: &[(String, Option<String>)],
    batch_size: usize,
    max_len: usize,
    top_k: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(!inputs.is_empty(), "nothing to predict: give --text or --file");
    let cfg = worker::bert_config::BertConfig::from_file(&dir.join(checkpoint::CONFIG_FILE))?;
    let id2label = cfg.raw.get("id2label").and_then(|v| v.as_object());
    let num_labels = id2label.map(|m| m.len()).unwrap_or(2);
    let name = |k: usize| {
        id2label
            .and_then(|m| m.get(&k.to_string()))
            .and_then(|v| v.as_str())
            .map_or(format!("LABEL_{k}"), str::to_owned)
    };
    let arch = cfg.raw.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or("");
    let enc = TextEncoder::from_file(&dir.join("tokenizer.json"), max_len)?;
    if matches!(arch, "BertForMaskedLM" | "BertForPreTraining") {
        let (mut model, _) = checkpoint::load(dir, Head::MaskedLm, 0)?;
        for chunk in inputs.chunks(batch_size) {
            fill_mask(&mut model, &enc, chunk, top_k)?;
        }
        return Ok(());
    }
    let (mut model, _) = checkpoint::load(dir, Head::Classification { num_labels }, 0)?;
    for chunk in inputs.chunks(batch_size) {
        let encoded = chunk.iter().map(|(t, p)| enc.encode(t, p.as_deref())).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Encoded> = encoded.iter().collect();
        let ids: Vec<u32> = (0..chunk.len() as u32).collect();
        model.forward(&collate(&refs, &ids, &vec![0; chunk.len()], enc.pad_id), None)?;
        for (i, (text, pair)) in chunk.iter().enumerate() {
            // As the text-classification pipeline answers: the top label and its softmax probability.
            let logits = &model.acts.logits[i * num_labels..(i + 1) * num_labels];
            let top = (0..num_labels).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0);
            let z: f64 = logits.iter().map(|&l| (f64::from(l) - f64::from(logits[top])).exp()).sum();
            let mut line = serde_json::json!({ "text": text, "label": name(top), "score": 1.0 / z, "logits": logits });
            if let Some(p) = pair {
                line["text_pair"] = p.as_str().into();
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn bench(preset: &str, b: usize, t: usize, steps: usize, dropout: bool, precision: &str) -> anyhow::Result<()> {
    use worker::engine::{self, Compute, Peers};
    let (layers, hidden, heads, inter) = match preset {
        "tiny" => (2, 128, 2, 512),
        "minilm" => (6, 384, 12, 1536),
        other => anyhow::bail!("unknown preset {other:?} (tiny, minilm)"),
    };
    let precision = match precision {
        "fp32" => job::config::Precision::Fp32,
        "bf16" => job::config::Precision::Bf16,
        other => anyhow::bail!("unknown precision {other:?} (fp32, bf16)"),
    };
    worker::kernel_threads(0);
    let p = if dropout { 0.1 } else { 0.0 };
    let cfg = worker::bert_config::BertConfig::from_json_str(&format!(
        r#"{{"vocab_size": 30522, "hidden_size": {hidden}, "num_hidden_layers": {layers}, "num_attention_heads": {heads},
            "intermediate_size": {inter}, "max_position_embeddings": 512, "type_vocab_size": 2,
            "hidden_dropout_prob": {p}, "attention_probs_dropout_prob": {p}, "pad_token_id": 0}}"#
    ))?;
    let model = checkpoint::init_model(cfg, Head::Classification { num_labels: 2 }, 1);
    let train = job::config::TrainSection { dropout, precision, ..Default::default() };
    let opt = worker::optim::AdamW::new(
        model.layout.total,
        train.adam_beta1,
        train.adam_beta2,
        train.adam_eps,
        train.weight_decay,
    );
    let mut engine = engine::open(&Compute::Cpu, model, opt, engine::Options { precision, zero: false }, Peers::Alone)?;
    let batch = Batch {
        b,
        t,
        input_ids: (0..b * t).map(|i| 1000 + (i as u32 * 7919) % 20000).collect(),
        token_type_ids: vec![0; b * t],
        attention_mask: vec![1; b * t],
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: (0..b as u32).collect(),
        labels: (0..b as i64).map(|i| i % 2).collect(),
    };
    // The training loop's own step (forward, backward, clipping, AdamW); the first is warm-up.
    let mut reports = Vec::new();
    for s in 0..steps as u64 + 1 {
        let start = Instant::now();
        let r = worker::train::optimizer_step(engine.as_mut(), std::slice::from_ref(&batch), b, &train, s, 1e-5)?;
        if s > 0 {
            reports.push((start.elapsed().as_secs_f64(), r));
        }
    }
    let median = |f: &dyn Fn(&(f64, worker::train::StepReport)) -> f64| {
        let mut v: Vec<f64> = reports.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step_s = median(&|r| r.0);
    println!(
        "{}",
        serde_json::json!({
            "impl": "tandem", "preset": preset, "batch": b, "seq": t, "precision": format!("{precision:?}").to_lowercase(),
            "threads": rayon::current_num_threads(), "step_s": step_s,
            "tokens_per_s": (b * t) as f64 / step_s,
            "forward_s": median(&|r| r.1.forward.as_secs_f64()),
            "backward_s": median(&|r| r.1.backward.as_secs_f64()),
            "optimizer_s": median(&|r| r.1.optimizer.as_secs_f64()),
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

/// This process's peak resident set (VmHWM in /proc/self/status), in MiB; 0 where unknown.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

fn gpu_check(ordinal: usize, include: Option<String>) -> anyhow::Result<()> {
    let include = include
        .or_else(|| std::env::var("TANDEM_CUDA_INCLUDE").ok())
        .unwrap_or_else(|| "/usr/local/cuda/include".to_string());
    let gpu = kernels::gpu::Gpu::open(ordinal, vec![include])?;
    println!("GPU {ordinal}: {} ({})", gpu.name, gpu.arch);
    let rows = kernels::gpu::kernel_parity(&gpu)?;
    println!("{:<34} {:>10} {:>12} {:>10}  result", "kernel vs CPU twin", "elements", "rel. error", "tolerance");
    for r in &rows {
        println!(
            "{:<34} {:>10} {:>12.2e} {:>10.0e}  {}",
            r.kernel,
            r.elements,
            r.rel_error,
            r.tolerance,
            if r.nan {
                "FAIL (NaN)"
            } else if r.passed() {
                "ok"
            } else {
                "FAIL"
            }
        );
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();

    // The whole model: CPU and GPU training side by side, then GPU throughput at BERT-base.
    let gpu = std::sync::Arc::new(gpu);
    use job::config::Precision;
    println!("\n{:<12} {:>6} {:>16} {:>16}  result", "model", "steps", "grad rel. error", "loss rel. error");
    let mut model_failed = 0;
    // fp32 must agree with the CPU to 1e-3; bf16 GEMMs against the CPU's f32, to a few percent.
    for (label, name, precision, tol, b, t) in [
        ("tiny", "tiny", Precision::Fp32, 1e-3, 8, 64),
        ("minilm", "minilm", Precision::Fp32, 1e-3, 8, 128),
        ("minilm-bf16", "minilm", Precision::Bf16, 5e-2, 8, 128),
    ] {
        let mut r = worker::gpu_check::training_parity(&gpu, name, precision, 20, b, t)?;
        r.preset = label.into();
        let ok = r.grad_rel_error <= tol && r.loss_rel_error <= tol;
        model_failed += usize::from(!ok);
        println!(
            "{:<12} {:>6} {:>16.2e} {:>16.2e}  {}",
            r.preset,
            r.losses.len(),
            r.grad_rel_error,
            r.loss_rel_error,
            if ok { "ok" } else { "FAIL" }
        );
        let (first, last) = (r.losses[0], r.losses[r.losses.len() - 1]);
        println!("{:<10} loss CPU {:.6} -> {:.6}, GPU {:.6} -> {:.6}", "", first.0, last.0, first.1, last.1);
    }
    // A 1-rank NCCL communicator through the worker's all-reduce path (id, setup, all-reduce
    // under the watchdog): the sum over one rank must leave the buffer bit for bit as it was.
    if worker::nccl::available() {
        let watchdog =
            worker::watchdog::Watchdog::new(std::time::Duration::from_secs(60), worker::watchdog::abort_process());
        let id = worker::nccl::new_id()?;
        let ring = worker::nccl::NcclRing::connect(gpu.stream.clone(), 0, 1, &id, watchdog)?;
        let host: Vec<f32> = (0..16usize << 20).map(|i| (i % 1013) as f32 * 0.001 - 0.5).collect();
        let mut dev = gpu.upload(&host)?;
        ring.all_reduce_sum(&mut dev.as_view_mut(), None)?; // warm-up
        let took = ring.all_reduce_sum(&mut dev.as_view_mut(), None)?;
        let exact = gpu.download(&dev)? == host;
        println!(
            "\nnccl 1-rank all-reduce: {} MiB in {:.3} ms, {}",
            (host.len() * 4) >> 20,
            took.as_secs_f64() * 1e3,
            if exact { "exact: ok" } else { "values changed: FAIL" }
        );
        model_failed += usize::from(!exact);
        let differ = worker::gpu_check::nccl_step_parity(&gpu, 5)?;
        println!(
            "nccl bucketed step: 5 steps through the 1-rank communicator, {} parameters differ from the plain step: {}",
            differ,
            if differ == 0 { "ok" } else { "FAIL" }
        );
        model_failed += usize::from(differ != 0);
    } else {
        println!("\nnccl 1-rank all-reduce: did not run: {}", worker::nccl::NcclError::Missing);
    }
    let peak = std::env::var("TANDEM_PEAK_TFLOPS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(989.0) * 1e12;
    println!();
    for (label, precision) in [("fp32", Precision::Fp32), ("bf16", Precision::Bf16)] {
        let tp = worker::gpu_check::throughput(&gpu, "base", precision, 32, 128, 10, peak)?;
        println!(
            "{{\"impl\": \"tandem\", \"model\": \"bert-base\", \"precision\": \"{label}\", \"batch\": {}, \"seq\": {}, \"step_s\": {:.4}, \"tokens_per_s\": {:.0}, \"mfu\": {:.4}}}",
            tp.batch, tp.seq, tp.step_s, tp.tokens_per_s, tp.mfu
        );
    }
    anyhow::ensure!(failed == 0, "{failed} kernel(s) differ from their CPU twins");
    anyhow::ensure!(model_failed == 0, "{model_failed} model(s) train differently on the GPU");
    Ok(())
}

fn bench_ring(
    rank: usize,
    peers: &[std::net::SocketAddr],
    sizes_mib: &[usize],
    iters: usize,
    transport: RingTransport,
) -> anyhow::Result<()> {
    use worker::collective::{Collective, Neighbours, Ring, RingOptions};
    let addr = *peers.get(rank).with_context(|| format!("no peer address for rank {rank}"))?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let opts = RingOptions { transport, ..RingOptions::new(std::time::Duration::from_secs(60)) };
    let mut ring = Ring::connect(Neighbours::of(rank, peers), listener, &opts)?;
    let shm = ring.shared_memory();
    let transport = if shm.0 && shm.1 { "shm" } else { "tcp" };
    let n = peers.len() as f64;
    for &mib in sizes_mib {
        let len = mib * (1 << 20) / 4;
        let mut buf: Vec<f32> = (0..len).map(|i| (i % 97) as f32 + rank as f32).collect();
        ring.all_reduce_sum(&mut buf)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..iters {
            let start = Instant::now();
            ring.all_reduce_sum(&mut buf)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let bytes = (len * 4) as f64;
        if rank == 0 {
            println!(
                "{{\"impl\": \"tandem-ring\", \"transport\": \"{transport}\", \"world\": {n}, \"mib\": {mib}, \"seconds\": {t:.4}, \"bus_gb_per_s\": {:.3}}}",
                2.0 * (n - 1.0) / n * bytes / t / 1e9
            );
        }
    }
    Ok(())
}
