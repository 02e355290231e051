//! What a Tandem job is, shared by the coordinator and the worker (which depend on this crate and
//! not on each other): the job config and its layers (`config`), the dataset readers and labels
//! (`data`), the checkpoint directory (`checkpoints`), which examples each rank sees (`shard`), evaluation counts and their metrics
//! (`eval`), step records and the progress reporter (`progress`), digests of the config and the
//! model files (`fingerprint`), fault points for the failure tests (`fault`), the schedule of a run and the
//! checkpoints that fit it (`schedule`), token shards of a
//! pretraining corpus (`tokens`), their documents packed into rows (`pack`) and dynamically
//! masked (`mlm`), and the binaries' logging and error reporting (`main_with`).
//!
//! Nothing here computes on tensors or talks to the network.

pub mod checkpoints;
pub mod config;
pub mod data;
pub mod eval;
pub mod fault;
pub mod fingerprint;
pub mod mlm;
pub mod pack;
pub mod progress;
pub mod schedule;
pub mod shard;
pub mod tokens;

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
