//! `coordinator`: runs a Tandem job of N workers.
//!
//! ```text
//! coordinator --world-size 2 --config configs/rotten-tomatoes.toml --spawn-local
//! coordinator --world-size 4 --config job.toml --listen 0.0.0.0:29400     # workers elsewhere:
//! worker --coordinator http://HOST:29400                                  # on each worker
//! ```
//!
//! It reads the job config and the datasets, admits N workers (rendezvous), streams each its
//! data shard, gathers their evaluation counts, and ends when every worker has finished. With
//! `--spawn-local` it starts the N workers on this machine itself.
//!
//! Checkpoints go to `checkpoint.dir` (default `<output.dir>/checkpoints`); a job whose
//! checkpoint directory holds a complete checkpoint resumes from the newest one. The final
//! model is published as `<output.dir>/model`.
//!
//! Failures: workers heartbeat; a worker that dies, stalls or reports a failure stops the step
//! everywhere, and the job restarts from its last complete checkpoint once the world is whole
//! again (or, with `elastic.min_workers`, large enough); see the README's failure section.
//! With `--spawn-local` the coordinator starts replacements for local workers that die.

use anyhow::Context;
use clap::Parser;
use coordinator::service::{CheckpointSetup, CoordinatorService, Data, JobInfo};
use job::config::{JobConfig, Task};
use job::progress::ProgressBoard;
use proto::v1::coordinator_server::CoordinatorServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Runs a Tandem training job of N workers",
    after_help = "Environment, besides the variables named above:\n  \
                  TANDEM_JOB_TOKEN    the job token, when there is no --token-file\n  \
                  TANDEM_<SECTION>__<KEY>   a job config key (e.g. TANDEM_TRAIN__LR=3e-5)\n  \
                  RUST_LOG            log filter (default: info)\n\n\
                  Signals: SIGTERM or SIGINT stops the job (a checkpoint upload in flight lands first); \
                  the checkpoints stay, and the same command with checkpoint.resume = true continues."
)]
struct Cli {
    /// How many workers the job has (the most it runs with: with `elastic.min_workers` it may
    /// continue with fewer after a failure).
    #[arg(long, env = "TANDEM_WORLD_SIZE", required_unless_present = "world_size_file")]
    world_size: Option<usize>,
    /// Read the world size from this file instead (a number; written by an init container that
    /// counts the JobSet's nodes, in deploy/kubeflow and deploy/jobset).
    #[arg(long, env = "TANDEM_WORLD_SIZE_FILE", conflicts_with = "world_size")]
    world_size_file: Option<PathBuf>,
    /// The job config (TOML). Layers: defaults < this file < TANDEM_* environment < --set.
    #[arg(long, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.lr=3e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The gRPC address to serve on.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:29400")]
    listen: SocketAddr,
    /// Start the N workers on this machine (the `worker` binary beside this one).
    #[arg(long)]
    spawn_local: bool,
    /// How long rendezvous and evaluation gathers wait for every worker, in seconds.
    #[arg(long, env = "TANDEM_GATHER_TIMEOUT_S", default_value_t = 600)]
    gather_timeout_s: u64,
    /// A file holding the job token that every worker must present (default: the
    /// TANDEM_JOB_TOKEN environment variable). With --spawn-local and no token, one is made up
    /// and handed to the workers through their environment.
    #[arg(long, env = "TANDEM_JOB_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve a non-loopback address without a job token (anyone who can reach it can join)
    /// or without TLS (the token and the data cross the network in clear text): for a network
    /// you trust. Without it, such an address needs both.
    #[arg(long)]
    insecure: bool,
    /// Serve gRPC over TLS with this certificate (PEM; with --tls-key). Workers then connect
    /// to https://... with --tls-ca.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also require every worker to present a certificate signed by this CA (mutual TLS).
    #[arg(long, env = "TANDEM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Where to serve the status page, /metrics (Prometheus) and /api/status over HTTP
    /// (default: the host of --listen, port 29401; if that port is taken, any free one).
    #[arg(long, env = "TANDEM_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Serve no HTTP endpoints.
    #[arg(long, conflicts_with = "http_listen")]
    no_http: bool,
    /// Never draw a progress bar (log a line every 50 steps instead, as without a terminal).
    #[arg(long)]
    no_progress: bool,
    /// After the job ends, how long open connections (a health Watch stream, a stalled worker)
    /// and local workers that have not exited may keep the coordinator from exiting, in seconds;
    /// then it exits anyway (killing those workers) with the job's result.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_S", default_value_t = 10)]
    shutdown_grace_s: u64,
}

/// HTTP/2 streams one gRPC connection may have open at once: a worker uses a handful (its
/// heartbeat, data feed, evaluation, upload), so that one connection cannot open thousands.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// HTTP/2 pings on quiet connections, and how long a ping may go unanswered before the
/// connection is dropped; TCP keepalive under them.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How a local worker ended.
enum Exit {
    Exited(std::process::ExitStatus),
    /// Still running at the deadline, and killed.
    Killed,
}

/// Waits for the local workers to exit until `deadline`, then kills those still running.
fn reap(children: &mut [std::process::Child], deadline: std::time::Instant) -> Vec<Exit> {
    children
        .iter_mut()
        .map(|c| loop {
            match c.try_wait() {
                Ok(Some(status)) => break Exit::Exited(status),
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break Exit::Killed;
                }
            }
        })
        .collect()
}

/// The checkpoint directory, and the checkpoint to resume from when there is one that this job
/// may continue.
fn checkpoint_setup(
    job: &JobConfig,
    worlds: std::ops::RangeInclusive<usize>,
    train_examples: usize,
) -> anyhow::Result<CheckpointSetup> {
    let (store, resume) = job::checkpoints::open_for(job, worlds)?;
    Ok(CheckpointSetup {
        schedule: job::schedule::Schedule::new(&job.train, train_examples)?,
        every: job.checkpoint.every,
        store,
        resume,
        model_dir: job.output.dir.join("model"),
        publish: job.checkpoint.publish,
        config: serde_json::to_value(job)?,
    })
}

/// A listener on `addr` whose accept queue holds `backlog` connections (tokio's default is
/// 1,024; the kernel caps it at `net.core.somaxconn`).
fn bind_with_backlog(addr: SocketAddr, backlog: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog.max(1024)).unwrap_or(u32::MAX))
}

/// The HTTP listener: `explicit` when given (a bind failure is an error), else the host of the
/// gRPC address on port 29401, or any free port when that one is taken.
async fn bind_http(explicit: Option<SocketAddr>, grpc: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(addr) = explicit {
        return tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --http-listen {addr}"));
    }
    let preferred = SocketAddr::new(grpc.ip(), 29401);
    match tokio::net::TcpListener::bind(preferred).await {
        Ok(l) => Ok(l),
        Err(e) => {
            let any = SocketAddr::new(grpc.ip(), 0);
            tracing::debug!(%preferred, error = %e, "port taken; serving HTTP on a free port");
            tokio::net::TcpListener::bind(any).await.with_context(|| format!("binding {any}"))
        }
    }
}

fn main() {
    job::main_with(|| run(Cli::parse()));
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let world_size = match (cli.world_size, &cli.world_size_file) {
        (Some(n), _) => n,
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading --world-size-file {}", f.display()))?
            .trim()
            .parse()
            .with_context(|| format!("--world-size-file {}: not a number", f.display()))?,
        (None, None) => anyhow::bail!("give --world-size (or --world-size-file)"),
    };
    anyhow::ensure!(world_size >= 1, "--world-size must be at least 1");
    let job = JobConfig::load(cli.config.as_deref(), &cli.set)?;
    anyhow::ensure!(
        job.train.batch_size.is_multiple_of(world_size),
        "train.batch_size = {} is not a multiple of --world-size {}: every worker takes an equal share of each batch",
        job.train.batch_size,
        world_size
    );
    let data: Data = match job.train.task {
        Task::Classification => {
            let data = job::data::load(&job)?;
            anyhow::ensure!(!data.train.is_empty(), "{}: the training split is empty", job.data.train.display());
            data.into()
        }
        Task::Mlm => job::pack::Corpora::open(&job, None)?.into(),
    };
    tracing::info!(config = %serde_json::to_string(&job)?, world = world_size, "resolved job config");
    let mut token = proto::auth::JobToken::from_file_or_env(cli.token_file.as_deref()).map_err(anyhow::Error::msg)?;
    if token.is_none() && cli.spawn_local {
        token = Some(proto::auth::JobToken::generate().context("making a job token")?);
    }
    anyhow::ensure!(
        token.is_some() || cli.listen.ip().is_loopback() || cli.insecure,
        "--listen {} is reachable from other machines: give the job a token (TANDEM_JOB_TOKEN or --token-file, the \
         same for every worker), or pass --insecure",
        cli.listen
    );
    let min_workers = if job.elastic.min_workers == 0 { world_size } else { job.elastic.min_workers };
    anyhow::ensure!(
        min_workers <= world_size,
        "elastic.min_workers = {min_workers} exceeds --world-size {}",
        world_size
    );
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            Some(proto::tls::ServerTls { cert: cert.clone(), key: key.clone(), client_ca: cli.tls_client_ca.clone() })
        }
        _ => None,
    };
    if let Some(t) = &tls {
        anyhow::ensure!(!cli.spawn_local, "--spawn-local runs its workers over loopback without TLS: drop --tls-cert");
        t.config().map_err(anyhow::Error::msg)?; // bad files fail now, before any worker joins
    }
    anyhow::ensure!(
        tls.is_some() || cli.listen.ip().is_loopback() || cli.insecure,
        "--listen {} is reachable from other machines and would serve without TLS: the job token and the training \
         data would cross the network in clear text; give --tls-cert and --tls-key (workers then connect to \
         https://... with --tls-ca), or pass --insecure on a network you trust",
        cli.listen
    );
    let train_examples = data.len(proto::v1::Split::Train).unwrap_or(0);
    let setup = checkpoint_setup(&job, min_workers..=world_size, train_examples)?;
    // A restarted coordinator continues the generation numbers (so that nothing of an earlier
    // generation is mistaken for current); its restart budget starts afresh.
    let mut restarts = coordinator::service::read_state(setup.store.dir())?;
    if setup.resume.is_some() || restarts.generation > 0 {
        restarts.generation += 1;
    }
    restarts.restarts = 0;
    // Every worker must load these very model files: their digest is checked at each join. A
    // coordinator that cannot read them takes the first admitted worker's as the job's.
    let model_sha256 = match job::fingerprint::model_sha256(&job) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the model files; the first worker's are the job's");
            None
        }
    };
    let info = JobInfo {
        config_json: serde_json::to_string(&job)?,
        seed: job.train.seed,
        batch_size: job.train.batch_size,
        max_seq_len: job.model.max_seq_len,
    };
    let board = ProgressBoard::new(
        !cli.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        Some((job.output.dir.join("loss.jsonl"), setup.resume.is_some())),
    )
    .with_context(|| format!("opening {}", job.output.dir.join("loss.jsonl").display()))?;
    coordinator::service::write_state(setup.store.dir(), &restarts)
        .with_context(|| format!("writing {}", setup.store.dir().join(coordinator::service::STATE_FILE).display()))?;
    let tb_dir = job.output.dir.join("tensorboard");
    let mut telemetry = coordinator::telemetry::Telemetry::default()
        .with_tensorboard(&tb_dir)
        .with_context(|| format!("creating a TensorBoard event file in {}", tb_dir.display()))?;
    if let Some((dir, m)) = &setup.resume {
        telemetry.record_restart(m.step, &dir.display().to_string());
    }
    let svc = CoordinatorService::new(world_size, info, data, Duration::from_secs(cli.gather_timeout_s))
        .with_telemetry(telemetry, job.output.dir.clone())
        .with_elastic(job.elastic.clone(), job.train.batch_size, restarts)
        .with_checkpoints(setup)
        .with_model_sha256(model_sha256)
        .with_progress(board);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = {
        // A backlog for a world that joins at once (the kernel caps it at net.core.somaxconn).
        let _guard = rt.enter();
        bind_with_backlog(cli.listen, coordinator::limits::max_connections(world_size))
            .with_context(|| format!("binding {}", cli.listen))?
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "coordinator listening");
    if !cli.no_http {
        let http = rt.block_on(bind_http(cli.http_listen, cli.listen))?;
        let url = format!("http://{}/", http.local_addr()?);
        tracing::info!(url, "status page (also /metrics, /api/status, /loss.png)");
        let svc = svc.clone();
        rt.spawn(async move {
            if let Err(e) = coordinator::http::serve(http, svc).await {
                tracing::error!(error = %e, "the HTTP endpoints stopped");
            }
        });
    }
    {
        let _guard = rt.enter();
        svc.spawn_monitor();
    }
    // SIGTERM (Kubernetes deleting or evicting the pod) and SIGINT (Ctrl-C): let a checkpoint
    // upload in flight land, then stop every worker; the checkpoints stay for a restart.
    {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let svc = svc.clone();
        rt.spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            svc.terminate(name, Duration::from_secs(30)).await;
        });
    }
    let children = Arc::new(std::sync::Mutex::new(Vec::new()));
    if cli.spawn_local {
        let exe = std::env::current_exe()?.with_file_name("worker");
        anyhow::ensure!(exe.exists(), "{} not found: build the worker (cargo build -p worker)", exe.display());
        // Share the cores: each local worker gets cores / N compute threads unless told otherwise.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| (cores / world_size).max(1).to_string());
        let child_token = token.clone();
        let spawn = move |rank: usize| -> anyhow::Result<std::process::Child> {
            let mut cmd = std::process::Command::new(&exe);
            cmd.env("RAYON_NUM_THREADS", &threads).env_remove("TANDEM_JOB_TOKEN_FILE").args([
                "--coordinator",
                &format!("http://{addr}"),
                "--rank-hint",
                &rank.to_string(),
            ]);
            // The token goes through the environment, which `ps` does not show.
            if let Some(t) = &child_token {
                cmd.env(proto::auth::TOKEN_ENV, t.expose());
            }
            cmd.spawn().with_context(|| format!("starting {}", exe.display()))
        };
        for rank in 0..world_size {
            children.lock().expect("children lock").push(spawn(rank)?);
        }
        // Like Kubernetes restarting a pod: a local worker that dies is replaced (same rank
        // hint), as long as the job has restarts left; the job itself restarts from its last
        // checkpoint when it notices the loss.
        let (children, svc, max) = (Arc::clone(&children), svc.clone(), job.elastic.max_restarts);
        rt.spawn(async move {
            let mut replaced = 0u32;
            while svc.outcome().is_none() && !svc.is_stopping() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut kids = children.lock().expect("children lock");
                for (rank, c) in kids.iter_mut().enumerate() {
                    let status = match c.try_wait() {
                        Ok(Some(status)) if !status.success() => status.to_string(),
                        Err(e) => e.to_string(),
                        _ => continue,
                    };
                    if svc.outcome().is_some() || svc.is_stopping() {
                        break;
                    }
                    if replaced >= max {
                        svc.end(Err(format!(
                            "worker {rank} exited with {status}, and {max} replacements were started already \
                             (elastic.max_restarts): giving up"
                        )));
                        break;
                    }
                    replaced += 1;
                    tracing::warn!(rank, %status, "a local worker exited; starting a replacement");
                    match spawn(rank) {
                        Ok(child) => *c = child,
                        Err(e) => svc.end(Err(format!("worker {rank} exited with {status}; replacing it: {e:#}"))),
                    }
                }
            }
        });
    }
    let done = svc.clone();
    // grpc.health.v1 for Kubernetes' probes, outside the token check (it says nothing but
    // SERVING).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    rt.block_on(health_reporter.set_service_status("", tonic_health::ServingStatus::Serving));
    rt.block_on(health_reporter.set_service_status(
        <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME,
        tonic_health::ServingStatus::Serving,
    ));
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE));
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.config().map_err(anyhow::Error::msg)?).context("configuring TLS")?;
    }
    // Graceful shutdown waits for every connection to close; after the grace period the
    // coordinator stops waiting (an open health Watch or a stopped worker would hold it forever).
    let (ended_tx, mut ended_rx) = tokio::sync::watch::channel(None::<std::time::Instant>);
    let grace = Duration::from_secs(cli.shutdown_grace_s);
    let max_connections = coordinator::limits::max_connections(world_size);
    let incoming = coordinator::limits::limit(
        tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE)),
        max_connections,
        coordinator::limits::HANDSHAKE_TIMEOUT,
    );
    tracing::debug!(max_connections, "gRPC connection limit");
    let server = builder
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            CoordinatorServer::new(svc.clone()),
            proto::auth::ServerAuth::new(token),
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            done.all_finished.notified().await;
            // Let the last replies (Finish, the STOP of the heartbeats) go out.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = ended_tx.send(Some(std::time::Instant::now()));
        });
    rt.block_on(async {
        tokio::select! {
            served = server => served.context("serving gRPC"),
            _ = async {
                let _ = ended_rx.wait_for(Option::is_some).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_s = grace.as_secs(), "connections still open after the job ended; exiting anyway");
                Ok(())
            }
        }
    })?;
    svc.finish_progress();
    let png = job.output.dir.join("loss.png");
    match std::fs::write(&png, svc.loss_png()) {
        Ok(()) => tracing::info!(path = %png.display(), "loss curve saved"),
        Err(e) => tracing::warn!(path = %png.display(), error = %e, "cannot save the loss curve"),
    }
    // Local workers leave on their own after Finish (or STOP); one that does not (stopped, hung)
    // is killed when the grace period after the job's end runs out, instead of holding the
    // coordinator: one grace period for connections and workers alike.
    let ended_at = (*ended_rx.borrow()).unwrap_or_else(std::time::Instant::now);
    let exits = reap(&mut children.lock().expect("children lock"), ended_at + grace);
    if let Some(Err(why)) = svc.outcome() {
        anyhow::bail!("{why}; the job is stopped");
    }
    for (rank, exit) in exits.iter().enumerate() {
        match exit {
            Exit::Exited(status) => anyhow::ensure!(status.success(), "worker {rank} exited with {status}"),
            Exit::Killed => tracing::warn!(rank, "a local worker was still running after the job ended; killed it"),
        }
    }
    let (mut dev, mut test) = (None, None);
    for ((split, step), m) in svc.eval_results() {
        let counted = if m.perplexity.is_some() { "masked tokens" } else { "examples" };
        println!("step {step}: {} {}  ({} {counted})", split.name(), m.summary(), m.examples);
        // In step order within a split: the last one is the final evaluation.
        match split {
            job::eval::EvalSplit::Dev => dev = Some(m),
            job::eval::EvalSplit::Test => test = Some(m),
        }
    }
    if let Some(Some(r0)) = svc.finish_reports().first() {
        let model = svc.final_model();
        let shown = model.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(not saved)".into());
        println!("trained {} steps on {} workers; model saved to {shown}", r0.steps, svc.world_size());
        let totals = svc.progress_totals().unwrap_or((f64::NAN, 0.0, 0));
        let summary = job::progress::Summary::new(r0.steps, totals, dev, test, model.unwrap_or_default());
        summary.write(&job.output.dir).context("writing the run's metrics")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local worker that does not leave (here `sleep`, as a stopped or hung one) is killed at the
    /// deadline instead of holding the coordinator; one that left is reported as it exited.
    #[test]
    fn reap_kills_what_is_still_running_at_the_deadline() {
        let spawn = |cmd: &str, args: &[&str]| std::process::Command::new(cmd).args(args).spawn().unwrap();
        let mut children = vec![spawn("sleep", &["30"]), spawn("true", &[]), spawn("false", &[])];
        let started = std::time::Instant::now();
        let exits = reap(&mut children, started + Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5), "reaping took {:?}", started.elapsed());
        assert!(matches!(exits[0], Exit::Killed));
        assert!(matches!(&exits[1], Exit::Exited(s) if s.success()));
        assert!(matches!(&exits[2], Exit::Exited(s) if !s.success()));
    }
}
