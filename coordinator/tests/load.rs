//! The load tool's run at 64 simulated workers, against the real `coordinator` binary over
//! loopback gRPC: every worker gets a distinct rank of the world, a stalled worker is detected by
//! its heartbeats stopping and every other worker is told to restart, and the world re-forms with
//! the replacement as the next generation. Correctness only: CI is a loaded 2-core machine, so
//! no time here is a speed claim (scripts/load.sh measures those).

use coordinator::load::{measure, Options};
use std::path::PathBuf;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_simulated_workers_rendezvous_fail_and_re_form() {
    let o = Options {
        coordinator: PathBuf::from(env!("CARGO_BIN_EXE_coordinator")),
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-cls"),
        heartbeat_interval: Duration::from_millis(250),
        heartbeat_timeout: Duration::from_secs(2),
        steady: Duration::from_millis(500),
        scratch: std::env::temp_dir().join(format!("tandem-load-test-{}", std::process::id())),
    };
    let row = measure(64, &o).await.unwrap();
    assert!(row.ranks_ok, "generation 0 did not give 64 distinct ranks: {row:?}");
    assert_eq!(row.restarted, 63, "every survivor is told to restart: {row:?}");
    // Not before the heartbeat timeout (less the beat interval the worker had already used).
    assert!(row.detect_s >= 2.0 - 0.3 && row.detect_s < 20.0, "detected after {} s: {row:?}", row.detect_s);
    assert!(row.reformed_ok, "the next generation did not give 64 distinct ranks: {row:?}");
    assert!(row.join_reply_bytes < 2048, "a Join reply of {} bytes", row.join_reply_bytes);
    assert!(row.stream_examples_per_s > 0.0 && row.eval_gather_s > 0.0 && row.checksum_gather_s > 0.0);
    let _ = std::fs::remove_dir_all(&o.scratch);
}
