//! The Tandem coordinator: the job (its config and its datasets), rendezvous, data sharding,
//! checkpoints and evaluation for a multi-worker job. The coordinator alone reads the dataset in
//! a distributed job; single-process `worker train` uses the same config and readers from here.
//! Being built (the distributed-training issue); the logic is plain state machines, unit-tested
//! without a network, behind the gRPC service module.

pub mod checkpoints;
pub mod data;
pub mod eval;
pub mod fault;
pub mod fingerprint;
pub mod http;
pub mod job;
pub mod plot;
pub mod progress;
pub mod rendezvous;
pub mod service;
pub mod shard;
pub mod telemetry;
pub mod tensorboard;

/// The `main` of Tandem's binaries: logs (`RUST_LOG`, default `info`) to stderr, runs `run`, and
/// turns an error into `error: ...` (with its causes) and exit status 1.
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()>) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and test captures get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
