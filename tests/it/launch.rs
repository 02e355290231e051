//! Launching as cluster users do, with real processes: one `worker --nproc-per-node 2` for the
//! node (torchrun's convention; also with one of its workers SIGKILLed, which it replaces) and two
//! workers that find the coordinator and their ranks from torchrun's variables alone (RANK,
//! LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) train the same job as `coordinator
//! --spawn-local`, bit for bit.

use crate::distributed::{assert_bits_eq, bin, checkpointed_job, coordinator, params, run_ok, scratch};
use crate::hostile::start_coordinator;
use crate::observe::Running;
use std::process::Command;

#[test]
fn a_launcher_per_node_and_torchrun_variables_train_what_spawn_local_trains() {
    let dir = scratch("launch");
    let cfg = checkpointed_job(&dir, 20);
    run_ok(coordinator(&cfg, 2, &dir.join("local")));
    let want = params(&dir.join("local/model"));

    // One launcher for the node: two workers, rank hints 0 and 1 (node rank 0).
    let (mut coord, grpc) = start_coordinator(&cfg, &dir.join("launcher"), &["--no-http"], &[]);
    let mut launcher = Command::new(bin("worker"));
    launcher.args(["--coordinator", &format!("http://{grpc}"), "--nproc-per-node", "2", "--node-rank", "0"]);
    let mut launcher = Running::start(launcher);
    coord.wait_success("the coordinator");
    launcher.wait_success("the launcher");
    assert!(launcher.log().contains("starting the workers of this node"), "{}", launcher.log());
    assert_bits_eq(&params(&dir.join("launcher/model")), &want, "--nproc-per-node 2 vs --spawn-local");

    // A worker of the launcher SIGKILLed at step 7: the launcher starts a replacement, the job
    // restarts from its checkpoint of step 5 and ends the same.
    let (mut coord, grpc) = start_coordinator(&cfg, &dir.join("crash"), &["--no-http"], &[]);
    let mut launcher = Command::new(bin("worker"));
    launcher
        .args(["--coordinator", &format!("http://{grpc}"), "--nproc-per-node", "2", "--node-rank", "0"])
        .env("TANDEM_FAULT", "rank1:step@7");
    let mut launcher = Running::start(launcher);
    coord.wait_success("the coordinator");
    launcher.wait_success("the launcher");
    let log = launcher.log();
    assert!(log.contains("TANDEM_FAULT: killing") && log.contains("starting a replacement"), "{log}");
    assert_bits_eq(&params(&dir.join("crash/model")), &want, "a launcher's replaced worker vs --spawn-local");

    // Two workers with torchrun's variables and no flags at all.
    let (mut coord, grpc) = start_coordinator(&cfg, &dir.join("torchrun"), &["--no-http"], &[]);
    let port = grpc.rsplit_once(':').unwrap().1.to_string();
    let mut workers: Vec<Running> = (0..2)
        .rev()
        .map(|rank| {
            let mut w = Command::new(bin("worker"));
            w.env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RAYON_NUM_THREADS", "1");
            Running::start(w)
        })
        .collect();
    coord.wait_success("the coordinator");
    for (k, w) in workers.iter_mut().enumerate() {
        w.wait_success(&format!("worker {k}"));
        assert!(w.log().contains("rank hint from the environment"), "{}", w.log());
    }
    // Started rank 1 first: the ranks came from RANK, not from the order of arrival.
    let log = workers[0].log();
    assert!(log.contains("rank hint from the environment rank=1"), "{log}");
    assert_bits_eq(&params(&dir.join("torchrun/model")), &want, "torchrun's variables vs --spawn-local");
    std::fs::remove_dir_all(&dir).ok();
}
