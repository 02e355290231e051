//! Fault injection for the failure tests: `TANDEM_FAULT=<who>:<point>@<step>` makes a process
//! SIGKILL itself at a chosen moment, so that a test can kill a worker in the middle of an
//! all-reduce or of a checkpoint upload, or the coordinator in the middle of writing a
//! checkpoint, deterministically. `<who>` is `coordinator` or `rank<N>`; points:
//!
//! - `rank<N>:allreduce@S`: in the all-reduce of step S (after its first bucket);
//! - `rank<N>:upload@S`: after the first megabyte of the checkpoint upload of step S;
//! - `rank<N>:step@S`: right after step S;
//! - `rank<N>:perturb@S`: not a kill: after step S the rank nudges one parameter, a silent
//!   desync for the parameter checksums to catch;
//! - `rank<N>:finished@S`: not a kill: having finished a job of S steps, the rank SIGSTOPs
//!   itself (a worker that hangs at the end, for the coordinator's shutdown grace period);
//! - `coordinator:commit@S`: with the checkpoint of step S written but not yet complete;
//! - `coordinator:publish-copied@0`: with a model being published copied, not yet in place;
//! - `coordinator:install-swapped@0`: with a directory exchanged into place (a published model,
//!   or a checkpoint replacing a damaged one of its step), the old one not yet deleted.
//!
//! A worker fires only in the job's first generation (a replacement started with the same
//! environment does not kill itself again); `worker train` is rank 0 of generation 0 and has the
//! `step` point. Unset, nothing happens: one environment lookup.

use std::sync::OnceLock;

#[derive(Debug, PartialEq, Eq)]
struct Fault {
    who: String,
    point: String,
    step: u64,
}

fn parse(spec: &str) -> Option<Fault> {
    let (who, rest) = spec.split_once(':')?;
    let (point, step) = rest.split_once('@')?;
    Some(Fault { who: who.to_string(), point: point.to_string(), step: step.parse().ok()? })
}

fn planned() -> Option<&'static Fault> {
    static PLAN: OnceLock<Option<Fault>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let spec = std::env::var("TANDEM_FAULT").ok()?;
        let f = parse(&spec);
        if f.is_none() {
            tracing::warn!(spec, "TANDEM_FAULT is not <who>:<point>@<step>; ignored");
        }
        f
    })
    .as_ref()
}

/// Whether the injected fault is planned for `who` at `point` of `step`.
pub fn due(who: &str, point: &str, step: u64) -> bool {
    planned().is_some_and(|f| f.who == who && f.point == point && f.step == step)
}

/// SIGKILLs this process: no destructors, no flushing, exactly like `kill -9` from outside.
pub fn kill_self(what: &str) -> ! {
    eprintln!("TANDEM_FAULT: killing this process (pid {}) {what}", std::process::id());
    // Through the shell's `kill` builtin: no unsafe code, no extra crate.
    let _ = std::process::Command::new("sh").args(["-c", &format!("kill -KILL {}", std::process::id())]).status();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// SIGSTOPs this process (as `kill -STOP` from outside): it hangs until SIGCONT or SIGKILL.
pub fn stop_self(what: &str) {
    eprintln!("TANDEM_FAULT: stopping this process (pid {}) {what}", std::process::id());
    let _ = std::process::Command::new("sh").args(["-c", &format!("kill -STOP {}", std::process::id())]).status();
}

/// The coordinator's injection points.
pub fn coordinator_point(point: &str, step: u64) {
    if due("coordinator", point, step) {
        kill_self(&format!("at point {point:?} of step {step}"));
    }
}

/// Whether a worker's fault is due: rank `rank` of generation `generation` (only generation 0).
pub fn worker_due(rank: usize, generation: u64, point: &str, step: u64) -> bool {
    generation == 0 && due(&format!("rank{rank}"), point, step)
}

/// A worker's kill points (see [`worker_due`]).
pub fn worker_point(rank: usize, generation: u64, point: &str, step: u64) {
    if worker_due(rank, generation, point, step) {
        kill_self(&format!("at point {point:?} of step {step}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(parse("rank1:allreduce@7"), Some(Fault { who: "rank1".into(), point: "allreduce".into(), step: 7 }));
        assert_eq!(parse("coordinator:commit@10").unwrap().who, "coordinator");
        assert_eq!(parse("rank1:allreduce"), None);
        assert_eq!(parse("nonsense"), None);
    }
}
