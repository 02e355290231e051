//! The coordinator under load: M simulated workers in one process, each a real gRPC client of
//! the real `coordinator` binary on loopback (its own connection, from its own 127.x.y.z source
//! address, with the job token). They speak the protocol a worker does (GetJob, Join,
//! Heartbeat, StreamShard, ReportEval, ReportChecksum) and skip the collectives; one of them
//! stalls, the world re-forms. [`measure`] times each phase and reads the coordinator's CPU
//! and memory from `/proc`; `examples/load.rs` prints the table, `tests/load.rs` checks the
//! outcome at 64 workers. Bounded in count and time: every phase has a deadline, and the
//! coordinator is killed at the end.

use anyhow::Context;
use proto::auth::{ClientAuth, JobToken};
use proto::v1::beat_reply::Action;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{Beat, ChecksumReport, EvalReport, GetJobRequest, JoinReply, JoinRequest, ShardRequest, Split};
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientAuth>>;

/// How the simulated job runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `coordinator` binary.
    pub coordinator: PathBuf,
    /// A model directory (config.json, model.safetensors, tokenizer.json) for the job config.
    pub model: PathBuf,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// How long the coordinator's CPU and memory are watched while every worker beats.
    pub steady: Duration,
    /// Where the job's files go (a directory per run is made in it).
    pub scratch: PathBuf,
}

/// What one run at M workers measured.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub workers: usize,
    /// Every worker's connection and GetJob, before the rendezvous.
    pub connect_s: f64,
    /// From the first Join sent to the last rank assigned.
    pub rendezvous_s: f64,
    /// The largest Join reply (protobuf bytes).
    pub join_reply_bytes: usize,
    /// The coordinator while every worker heartbeats: cores busy, resident memory.
    pub heartbeat_cpu_cores: f64,
    pub rss_mib: f64,
    /// Every worker streaming its shard of the training split at once.
    pub stream_examples_per_s: f64,
    pub eval_gather_s: f64,
    pub checksum_gather_s: f64,
    /// From a stalled worker's last heartbeat to the first RESTART the others get, with the
    /// heartbeat timeout it had.
    pub detect_s: f64,
    pub heartbeat_timeout_s: f64,
    /// From the replacement's Join (the survivors had rejoined) to the last rank assigned.
    pub reform_s: f64,
    /// Checks: distinct ranks 0..M in both generations, every survivor (M - 1) told to restart.
    pub ranks_ok: bool,
    pub restarted: usize,
    pub reformed_ok: bool,
}

/// The synthetic job of `m` workers: a CSV of max(4m, 4096) short texts, a global batch of m.
fn write_job(dir: &Path, m: usize, o: &Options) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from("text,label\n");
    for i in 0..(4 * m).max(4096) {
        csv.push_str(&format!("example {i} of the load test,{}\n", ["a", "b"][i % 2]));
    }
    let data = dir.join("data.csv");
    std::fs::write(&data, csv)?;
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_seq_len = 16\n[data]\ntrain = {data:?}\ntest = {data:?}\nlabels = [\"a\", \"b\"]\n\
             [train]\nbatch_size = {m}\nepochs = 1\n[output]\ndir = {:?}\n[checkpoint]\nevery = 0\n\
             [elastic]\nheartbeat_interval_s = {}\nheartbeat_timeout_s = {}\nrejoin_timeout_s = 300\n",
            o.model,
            dir.join("out"),
            o.heartbeat_interval.as_secs_f64(),
            o.heartbeat_timeout.as_secs_f64(),
        ),
    )?;
    Ok(cfg)
}

/// The coordinator's CPU time (user + system, seconds) and resident memory (MiB).
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0; // utime, stime in USER_HZ (100 on Linux)
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

/// A simulated worker's own source address: 127.2.x.y, so that tens of thousands of
/// connections do not share one address's ephemeral ports.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 2 + (i / 62_500) as u8, (i / 250 % 250) as u8, (i % 250) as u8 + 1))
}

async fn connect(url: &str, i: usize, token: &JobToken) -> anyhow::Result<Client> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
        .local_address(Some(source(i)))
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("simulated worker {i} connecting"))?;
    Ok(CoordinatorClient::with_interceptor(ch, ClientAuth::new(Some(token))))
}

/// The coordinator process, killed when dropped.
struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_coordinator(o: &Options, cfg: &Path, m: usize, token: &JobToken) -> anyhow::Result<(Coordinator, String)> {
    let mut child = Command::new(&o.coordinator)
        .args(["--world-size", &m.to_string(), "--config", cfg.to_str().context("a UTF-8 path")?])
        .args(["--listen", "127.0.0.1:0", "--no-http", "--no-progress", "--gather-timeout-s", "600"])
        .env(proto::auth::TOKEN_ENV, token.expose())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", o.coordinator.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let coordinator = Coordinator(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("coordinator listening addr=").nth(1) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
            if line.contains("ERROR") {
                eprintln!("coordinator: {line}");
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).context("the coordinator did not start listening")?;
    Ok((coordinator, format!("http://{addr}")))
}

/// A heartbeat stream: beats every interval until `stall` is set; records when the coordinator
/// says RESTART.
fn spawn_heartbeat(
    mut client: Client,
    who: (u32, u64, Vec<u8>),
    interval: Duration,
    stall: Arc<std::sync::atomic::AtomicBool>,
    last_beat: Arc<Mutex<Option<Instant>>>,
    restarted: Arc<Mutex<Vec<Instant>>>,
) {
    let (rank, generation, secret) = who;
    let (tx, rx) = tokio::sync::mpsc::channel::<Beat>(2);
    let stalled = Arc::clone(&stall);
    tokio::spawn(async move {
        let beat = Beat { rank, generation, phase: "training".into(), member_secret: secret, ..Default::default() };
        let sender = tokio::spawn(async move {
            loop {
                if !stall.load(std::sync::atomic::Ordering::Relaxed) {
                    if tx.send(beat.clone()).await.is_err() {
                        return;
                    }
                    *last_beat.lock().expect("last beat lock") = Some(Instant::now());
                }
                tokio::time::sleep(interval).await;
            }
        });
        if let Ok(replies) = client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            let mut replies = replies.into_inner();
            while let Ok(Some(r)) = replies.message().await {
                if r.action == Action::Restart as i32 {
                    if !stalled.load(std::sync::atomic::Ordering::Relaxed) {
                        restarted.lock().expect("restarted lock").push(Instant::now());
                    }
                    break;
                }
            }
        }
        sender.abort();
    });
}

fn join_request(i: usize, config_sha256: &str, model_sha256: &str) -> JoinRequest {
    JoinRequest {
        protocol_version: proto::PROTOCOL_VERSION,
        rank_hint: Some(i as u32),
        // Parsed, never dialled: the simulated workers skip the ring.
        ring_addr: format!("127.0.0.1:{}", 20_000 + i % 40_000),
        hostname: format!("sim-{i}"),
        config_sha256: config_sha256.to_string(),
        model_sha256: model_sha256.to_string(),
        nccl_id: Vec::new(),
    }
}

/// Joins every client at once; returns the replies by client and (first sent, last received).
async fn join_all(clients: &[Client], requests: Vec<JoinRequest>) -> anyhow::Result<(Vec<JoinReply>, f64)> {
    let t0 = Instant::now();
    let handles: Vec<_> = clients
        .iter()
        .cloned()
        .zip(requests)
        .map(|(mut c, r)| tokio::spawn(async move { c.join(r).await.map(tonic::Response::into_inner) }))
        .collect();
    let mut replies = Vec::with_capacity(handles.len());
    for h in handles {
        replies.push(h.await?.context("a simulated worker's Join")?);
    }
    Ok((replies, t0.elapsed().as_secs_f64()))
}

/// Calls `call` for every admitted worker at once (its client and Join reply); returns the
/// results in worker order and the seconds until the last one came.
async fn on_every_worker<T, Fut>(
    clients: &[Client],
    replies: &[JoinReply],
    call: impl Fn(Client, &JoinReply) -> Fut,
) -> anyhow::Result<(Vec<T>, f64)>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let t = Instant::now();
    let handles: Vec<_> = clients.iter().zip(replies).map(|(c, r)| tokio::spawn(call(c.clone(), r))).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok((out, t.elapsed().as_secs_f64()))
}

fn ranks_ok(replies: &[JoinReply], m: usize) -> bool {
    let mut ranks: Vec<u32> = replies.iter().map(|r| r.rank).collect();
    ranks.sort_unstable();
    ranks == (0..m as u32).collect::<Vec<_>>() && replies.iter().all(|r| r.world_size as usize == m)
}

/// Runs the job of `m` simulated workers against a fresh coordinator and measures it.
pub async fn measure(m: usize, o: &Options) -> anyhow::Result<Row> {
    let dir = o.scratch.join(format!("load-{m}"));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = write_job(&dir, m, o)?;
    let token = JobToken::generate()?;
    let (coordinator, url) = start_coordinator(o, &cfg, m, &token)?;
    let pid = coordinator.0.id();
    let job = job::config::JobConfig::load(Some(&cfg), &[])?;
    let model_sha256 = job::fingerprint::model_sha256(&job)?;
    let mut row = Row { workers: m, heartbeat_timeout_s: o.heartbeat_timeout.as_secs_f64(), ..Row::default() };

    // Connections and GetJob, 256 at a time (the accept queue is bounded by somaxconn).
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let handles: Vec<_> = (0..m)
        .map(|i| {
            let (url, token, gate) = (url.clone(), token.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let mut c = connect(&url, i, &token).await?;
                let spec = c.get_job(GetJobRequest { protocol_version: proto::PROTOCOL_VERSION }).await?.into_inner();
                anyhow::Ok((c, job::fingerprint::sha256_hex(spec.job_config_json.as_bytes())))
            })
        })
        .collect();
    let (mut clients, mut digests) = (Vec::with_capacity(m), Vec::with_capacity(m));
    for h in handles {
        let (c, d) = h.await??;
        clients.push(c);
        digests.push(d);
    }
    row.connect_s = t.elapsed().as_secs_f64();

    // The rendezvous.
    let requests = (0..m).map(|i| join_request(i, &digests[i], &model_sha256)).collect();
    let (replies, took) = join_all(&clients, requests).await?;
    row.rendezvous_s = took;
    row.join_reply_bytes = replies.iter().map(prost::Message::encoded_len).max().unwrap_or(0);
    row.ranks_ok = ranks_ok(&replies, m);
    let generation = replies.first().map_or(0, |r| r.generation);

    // Every worker heartbeats; the coordinator's CPU and memory at steady state.
    let restarted = Arc::new(Mutex::new(Vec::new()));
    let stalls: Vec<_> = (0..m).map(|_| Arc::new(std::sync::atomic::AtomicBool::new(false))).collect();
    let last_beats: Vec<_> = (0..m).map(|_| Arc::new(Mutex::new(None))).collect();
    for (i, r) in replies.iter().enumerate() {
        let who = (r.rank, generation, r.member_secret.clone());
        let (stall, last, told) = (Arc::clone(&stalls[i]), Arc::clone(&last_beats[i]), Arc::clone(&restarted));
        spawn_heartbeat(clients[i].clone(), who, o.heartbeat_interval, stall, last, told);
    }
    tokio::time::sleep(o.heartbeat_interval * 2).await;
    let (cpu0, _) = usage(pid);
    let t = Instant::now();
    tokio::time::sleep(o.steady).await;
    let (cpu1, rss) = usage(pid);
    row.heartbeat_cpu_cores = (cpu1 - cpu0) / t.elapsed().as_secs_f64();
    row.rss_mib = rss;

    // Every worker streams its training shard.
    let (counts, took) = on_every_worker(&clients, &replies, |mut c, r| {
        let req = ShardRequest {
            rank: r.rank,
            split: Split::Train as i32,
            generation: r.generation,
            member_secret: r.member_secret.clone(),
            ..Default::default()
        };
        async move {
            let mut s = c.stream_shard(req).await?.into_inner();
            let mut n = 0usize;
            while let Some(b) = s.message().await? {
                n += b.examples.len();
            }
            anyhow::Ok(n)
        }
    })
    .await?;
    row.stream_examples_per_s = counts.iter().sum::<usize>() as f64 / took;

    // The evaluation and checksum gathers: every worker reports, each reply waits for all.
    let (_, took) = on_every_worker(&clients, &replies, |mut c, r| {
        let req = EvalReport {
            rank: r.rank,
            split: Split::Test as i32,
            step: 1,
            classes: 2,
            confusion: vec![1, 0, 0, 1],
            loss_sum: 0.5,
            generation: r.generation,
            member_secret: r.member_secret.clone(),
            ..Default::default()
        };
        async move { Ok(c.report_eval(req).await?) }
    })
    .await?;
    row.eval_gather_s = took;
    let (_, took) = on_every_worker(&clients, &replies, |mut c, r| {
        let (rank, generation, member_secret) = (r.rank, r.generation, r.member_secret.clone());
        let req = ChecksumReport { rank, generation, step: 1, checksum: 42, member_secret };
        async move { Ok(c.report_checksum(req).await?) }
    })
    .await?;
    row.checksum_gather_s = took;

    // The last worker stalls (its stream stays open, its beats stop): the others are told to
    // restart once the heartbeat timeout has passed.
    let stalled = m - 1;
    let t_fail = Instant::now();
    stalls[stalled].store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = t_fail + o.heartbeat_timeout * 3 + Duration::from_secs(30);
    while restarted.lock().expect("restarted lock").len() < m - 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let told = restarted.lock().expect("restarted lock").clone();
    row.restarted = told.len();
    // From its last beat: the coordinator last heard of it then.
    let last = last_beats[stalled].lock().expect("last beat lock").unwrap_or(t_fail);
    row.detect_s = told.iter().min().map_or(f64::NAN, |t| t.duration_since(last).as_secs_f64());

    // The survivors rejoin at once; the replacement (the stalled one restarted) joins last.
    let requests: Vec<JoinRequest> = (0..m).map(|i| join_request(i, &digests[i], &model_sha256)).collect();
    let mut survivors: Vec<_> = Vec::new();
    for (i, r) in requests.iter().enumerate().filter(|(i, _)| *i != stalled) {
        let (mut c, r) = (clients[i].clone(), r.clone());
        survivors.push(tokio::spawn(async move { c.join(r).await.map(tonic::Response::into_inner) }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t_replacement = Instant::now();
    let mut c = clients[stalled].clone();
    let last = c.join(requests[stalled].clone()).await.context("the replacement's Join")?.into_inner();
    let mut again = vec![last];
    for h in survivors {
        again.push(h.await?.context("a survivor's Join")?);
    }
    row.reform_s = t_replacement.elapsed().as_secs_f64();
    row.reformed_ok = ranks_ok(&again, m) && again.iter().all(|r| r.generation == generation + 1);
    drop(coordinator);
    drop(clients);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

/// The table's header and a row of it.
pub fn header() -> String {
    format!(
        "{:>7} {:>9} {:>12} {:>10} {:>13} {:>9} {:>13} {:>9} {:>10} {:>14} {:>9}",
        "workers",
        "connect_s",
        "rendezvous_s",
        "join_bytes",
        "beat_cpu_core",
        "rss_mib",
        "stream_ex/s",
        "eval_s",
        "checksum_s",
        "detect_s(tmo)",
        "reform_s"
    )
}

pub fn format_row(r: &Row) -> String {
    format!(
        "{:>7} {:>9.2} {:>12.3} {:>10} {:>13.3} {:>9.0} {:>13.0} {:>9.3} {:>10.3} {:>14} {:>9.3}{}",
        r.workers,
        r.connect_s,
        r.rendezvous_s,
        r.join_reply_bytes,
        r.heartbeat_cpu_cores,
        r.rss_mib,
        r.stream_examples_per_s,
        r.eval_gather_s,
        r.checksum_gather_s,
        format!("{:.2}({:.0})", r.detect_s, r.heartbeat_timeout_s),
        r.reform_s,
        if r.ranks_ok && r.reformed_ok && r.restarted + 1 == r.workers { "" } else { "  CHECKS FAILED" }
    )
}
