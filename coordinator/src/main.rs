//! `coordinator --world-size N --config job.toml`: rendezvous, data sharding, checkpoints and
//! evaluation for a multi-worker job. Not built yet (the distributed-training issue); until then
//! this binary says so and exits non-zero rather than pretending to run a job.

fn main() {
    eprintln!(
        "coordinator: not implemented yet; multi-worker training arrives with the coordinator issue. \
         Train in one process with `worker train --config job.toml`."
    );
    std::process::exit(2);
}
