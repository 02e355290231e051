//! Failures in the middle of a job, with real processes on loopback and real SIGKILL / SIGSTOP:
//! a worker killed during an all-reduce, during a checkpoint upload, or between steps; the
//! coordinator killed while it writes a checkpoint; a worker stalled; a worker lost for good in
//! an elastic job; a rank whose parameters silently diverge. Each run restarts from its last
//! complete checkpoint, and on the CPU backend ends with exactly the parameters of the
//! uninterrupted run (for the same world size).
//!
//! The kills at chosen moments come from `TANDEM_FAULT` (job/src/fault.rs): the process
//! SIGKILLs itself at that point of that step, which is what `kill -9` from outside does, only
//! at a moment a test can choose. The stall is a real SIGSTOP from outside.

use crate::distributed::{
    assert_bits_eq, bin, checkpoint_steps, checkpointed_job, coordinator, norm_diff, params, run_err, run_ok, scratch,
};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fast failure detection for tests: heartbeats every 0.25 s, silence of 3 s is a failure.
const FAST: [&str; 8] = [
    "--set",
    "elastic.heartbeat_interval_s=0.25",
    "--set",
    "elastic.heartbeat_timeout_s=3",
    "--set",
    "elastic.rejoin_timeout_s=60",
    "--set",
    "elastic.collective_timeout_s=30",
];

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `coordinator` on a fixed port without local workers; its log goes to `log`.
pub(crate) fn coordinator_at(cfg: &Path, world: usize, out: &Path, port: u16, log: &Path) -> Command {
    let mut c = Command::new(bin("coordinator"));
    c.args(["--world-size", &world.to_string(), "--config", cfg.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--gather-timeout-s", "60", "--no-progress"])
        .args(["--set", &format!("output.dir={}", out.display())])
        .args(FAST)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c
}

pub(crate) fn worker_at(port: u16, rank: usize, log: &Path) -> Command {
    let mut w = Command::new(bin("worker"));
    w.args(["--coordinator", &format!("http://127.0.0.1:{port}"), "--rank-hint", &rank.to_string()])
        .args(["--timeout-s", "60"])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    w
}

pub(crate) fn wait_ok(mut c: Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "{what} exited with {status}:\n{text}");
            return;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("{what} did not end within 180 s (a hang):\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("loss.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The uninterrupted run every interrupted one must match.
fn reference(dir: &Path, cfg: &Path, world: usize) -> Vec<f32> {
    let out = dir.join(format!("reference-{world}"));
    let mut c = coordinator(cfg, world, &out);
    c.args(FAST);
    run_ok(c);
    params(&out.join("model"))
}

#[test]
fn a_worker_killed_at_random_moments_is_replaced_and_the_result_is_bit_identical() {
    let dir = scratch("kill-worker");
    let cfg = checkpointed_job(&dir, 30);
    let want = reference(&dir, &cfg, 2);
    // Seeded "random" moments (a tiny LCG, so a failure names its case): a rank and a step for
    // each kind of moment. Checkpoints are every 5 steps, uploads come from rank 0.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) % n
    };
    let cases = [
        format!("rank{}:allreduce@{}", next(2), 2 + next(26)),
        format!("rank{}:step@{}", next(2), 1 + next(28)),
        format!("rank0:upload@{}", 5 * (1 + next(5))),
    ];
    for (i, fault) in cases.iter().enumerate() {
        let out = dir.join(format!("case-{i}"));
        let mut c = coordinator(&cfg, 2, &out);
        c.args(FAST).env("TANDEM_FAULT", fault);
        let (stdout, err) = run_ok(c);
        println!("{fault}: {}", stdout.lines().last().unwrap_or_default());
        assert!(err.contains("TANDEM_FAULT: killing this process"), "{fault}: the fault did not fire:\n{err}");
        // It restarted from the last checkpoint complete on disk when the failure struck: uploads
        // overlap training (one in flight), so that is the last one or the one before.
        let from: u64 = err
            .split("restarting the job from step-")
            .nth(1)
            .and_then(|r| r.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{fault}: no restart from a checkpoint:\n{err}"));
        let at: u64 = fault.rsplit('@').next().unwrap().parse().unwrap();
        println!("{fault}: restarted from the checkpoint of step {from}");
        assert!(
            from > 0 && from.is_multiple_of(5) && from <= at && at - from <= 10,
            "{fault}: restarted from step {from}"
        );
        assert!(err.contains("starting a replacement"), "{fault}: no replacement:\n{err}");
        assert_bits_eq(&params(&out.join("model")), &want, &format!("{fault}: recovered vs uninterrupted"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_coordinator_killed_while_writing_a_checkpoint_is_restarted_and_the_job_completes() {
    let dir = scratch("kill-coord");
    let cfg = checkpointed_job(&dir, 30);
    let want = reference(&dir, &cfg, 2);
    let out = dir.join("run");
    let port = free_port();
    // The coordinator SIGKILLs itself with the checkpoint of step 10 written but not complete.
    let mut c = coordinator_at(&cfg, 2, &out, port, &dir.join("coord-1.log"));
    c.env("TANDEM_FAULT", "coordinator:commit@10");
    let mut coord = c.spawn().unwrap();
    let workers: Vec<Child> =
        (0..2).map(|r| worker_at(port, r, &dir.join(format!("worker-{r}.log"))).spawn().unwrap()).collect();
    let status = coord.wait().unwrap();
    assert!(!status.success(), "the coordinator was to be killed");
    let log1 = std::fs::read_to_string(dir.join("coord-1.log")).unwrap();
    assert!(log1.contains("TANDEM_FAULT: killing this process"), "{log1}");
    // Only complete checkpoints count: step 5; the partial one of step 10 is not a checkpoint.
    assert_eq!(checkpoint_steps(&out), vec![5], "{log1}");
    let ckpt = out.join("checkpoints");
    let m = job::checkpoints::read_manifest(&ckpt.join("step-00000005")).unwrap();
    job::checkpoints::verify(&ckpt.join("step-00000005"), &m).expect("the last complete checkpoint is intact");
    // The same command again: the workers, still running, find it and rejoin.
    let coord = coordinator_at(&cfg, 2, &out, port, &dir.join("coord-2.log")).spawn().unwrap();
    wait_ok(coord, "the restarted coordinator", &dir.join("coord-2.log"));
    for (r, w) in workers.into_iter().enumerate() {
        wait_ok(w, &format!("worker {r}"), &dir.join(format!("worker-{r}.log")));
    }
    let log2 = std::fs::read_to_string(dir.join("coord-2.log")).unwrap();
    assert!(log2.contains("resuming") && log2.contains("step-00000005"), "{log2}");
    assert_bits_eq(&params(&out.join("model")), &want, "coordinator killed and restarted vs uninterrupted");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_coordinator_killed_from_outside_at_random_steps_is_restarted_and_the_job_completes() {
    let dir = scratch("kill-coord-random");
    let cfg = checkpointed_job(&dir, 150);
    let want = reference(&dir, &cfg, 2);
    let out = dir.join("run");
    let port = free_port();
    let workers: Vec<Child> =
        (0..2).map(|r| worker_at(port, r, &dir.join(format!("worker-{r}.log"))).spawn().unwrap()).collect();
    // Two kills at seeded "random" steps, SIGKILL from outside, each followed by the same
    // command again; the third coordinator runs to the end.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = Vec::new();
    for round in 0..3 {
        let log = dir.join(format!("coord-{round}.log"));
        let mut coord = coordinator_at(&cfg, 2, &out, port, &log).spawn().unwrap();
        if round == 2 {
            wait_ok(coord, "the last coordinator", &log);
            break;
        }
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let at = last_step(&out) + 10 + (x >> 33) % 40;
        let deadline = Instant::now() + Duration::from_secs(120);
        while last_step(&out) < at {
            assert!(Instant::now() < deadline, "round {round}: no progress to step {at}");
            std::thread::sleep(Duration::from_millis(2));
        }
        coord.kill().unwrap(); // SIGKILL
        coord.wait().unwrap();
        kills.push(at);
        // Whatever it was doing, every checkpoint on disk is complete and matches its manifest.
        let ckpt = out.join("checkpoints");
        for step in checkpoint_steps(&out) {
            let d = ckpt.join(format!("step-{step:08}"));
            let m = job::checkpoints::read_manifest(&d).unwrap();
            job::checkpoints::verify(&d, &m).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    println!("coordinator killed at steps {kills:?}");
    for (r, w) in workers.into_iter().enumerate() {
        wait_ok(w, &format!("worker {r}"), &dir.join(format!("worker-{r}.log")));
    }
    assert_bits_eq(&params(&out.join("model")), &want, "coordinator killed twice vs uninterrupted");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_stalled_worker_is_reported_the_others_do_not_hang_and_a_replacement_finishes_the_job() {
    let dir = scratch("stall");
    let cfg = checkpointed_job(&dir, 300);
    let want = reference(&dir, &cfg, 2);
    let out = dir.join("run");
    let port = free_port();
    let coord = coordinator_at(&cfg, 2, &out, port, &dir.join("coord.log")).spawn().unwrap();
    let w0 = worker_at(port, 0, &dir.join("worker-0.log")).spawn().unwrap();
    let mut w1 = worker_at(port, 1, &dir.join("worker-1.log")).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_step(&out) < 12 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let stop = |sig: &str, pid: u32| {
        assert!(Command::new("sh").args(["-c", &format!("kill -{sig} {pid}")]).status().unwrap().success());
    };
    stop("STOP", w1.id());
    let stopped_at = Instant::now();
    // The coordinator names the stalled rank within the heartbeat timeout (3 s) and a bit.
    let log = dir.join("coord.log");
    while !std::fs::read_to_string(&log).unwrap().contains("rank 1") {
        assert!(stopped_at.elapsed() < Duration::from_secs(15), "the stall was not reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("rank 1") && text.contains("stalled: no heartbeat"), "{text}");
    println!("stall reported after {:.1} s", stopped_at.elapsed().as_secs_f64());
    // The stalled process is gone for good (as a node would be); a replacement takes its rank.
    stop("KILL", w1.id());
    w1.wait().unwrap();
    let w1 = worker_at(port, 1, &dir.join("worker-1b.log")).spawn().unwrap();
    wait_ok(coord, "the coordinator", &log);
    wait_ok(w0, "worker 0", &dir.join("worker-0.log"));
    wait_ok(w1, "the replacement", &dir.join("worker-1b.log"));
    assert!(!std::fs::read_to_string(dir.join("worker-0.log")).unwrap().is_empty());
    assert_bits_eq(&params(&out.join("model")), &want, "stalled, replaced vs uninterrupted");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_elastic_job_that_loses_a_worker_for_good_continues_on_fewer() {
    let dir = scratch("elastic");
    let cfg = checkpointed_job(&dir, 30);
    let want = reference(&dir, &cfg, 3);
    let out = dir.join("run");
    let port = free_port();
    let mut c = coordinator_at(&cfg, 3, &out, port, &dir.join("coord.log"));
    c.args(["--set", "elastic.min_workers=2", "--set", "elastic.last_call_s=1"]);
    let coord = c.spawn().unwrap();
    let mut workers = Vec::new();
    for r in 0..3 {
        let mut w = worker_at(port, r, &dir.join(format!("worker-{r}.log")));
        if r == 2 {
            w.env("TANDEM_FAULT", "rank2:step@8");
        }
        workers.push(w.spawn().unwrap());
    }
    wait_ok(coord, "the coordinator", &dir.join("coord.log"));
    let lost = workers.pop().unwrap().wait_with_output().unwrap();
    assert!(!lost.status.success(), "rank 2 was to be killed");
    for (r, w) in workers.into_iter().enumerate() {
        wait_ok(w, &format!("worker {r}"), &dir.join(format!("worker-{r}.log")));
    }
    let log = std::fs::read_to_string(dir.join("coord.log")).unwrap();
    assert!(log.contains("world=2"), "the job continued on 2:\n{log}");
    // The same global batch (12 examples: 6 per worker instead of 4), so the same training up to
    // the order of float sums.
    let d = norm_diff(&want, &params(&out.join("model")));
    println!("elastic 3 -> 2 workers vs 3 uninterrupted: relative difference {d:.2e}");
    assert!(d < 1e-5, "relative difference {d}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_rank_whose_parameters_diverge_stops_the_job_naming_the_step_and_the_rank() {
    let dir = scratch("desync");
    let cfg = checkpointed_job(&dir, 30);
    let out = dir.join("run");
    let mut c = coordinator(&cfg, 2, &out);
    c.args(FAST).args(["--set", "elastic.checksum_every=4"]).env("TANDEM_FAULT", "rank1:perturb@6");
    let err = run_err(c);
    assert!(err.contains("diverged at step 8: ranks [1] differ from rank 0"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_worker_whose_model_files_differ_is_refused_and_the_job_goes_on() {
    let dir = scratch("model-hash");
    let cfg = checkpointed_job(&dir, 10);
    let out = dir.join("run");
    let port = free_port();
    let log = dir.join("coord.log");
    let coord = coordinator_at(&cfg, 1, &out, port, &log).spawn().unwrap();
    // Wait until the coordinator has read (and digested) the model files.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains("coordinator listening") {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // This node holds another version of the checkpoint: one weight differs.
    let weights = dir.join("model-in/model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let mut other = good.clone();
    *other.last_mut().unwrap() ^= 1;
    std::fs::write(&weights, &other).unwrap();
    let o = worker_at(port, 0, &dir.join("bad.log")).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a worker with other model files got in");
    assert!(err.contains("the coordinator refused this worker") && err.contains("model files"), "{err}");
    std::fs::write(&weights, &good).unwrap();
    let w = worker_at(port, 0, &dir.join("good.log")).spawn().unwrap();
    wait_ok(coord, "the coordinator", &log);
    wait_ok(w, "the worker", &dir.join("good.log"));
    assert!(out.join("model/model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}
