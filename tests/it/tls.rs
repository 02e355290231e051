//! gRPC over TLS between real processes, with the certificates in tests/fixtures/tls (made by
//! scripts/make_tls_fixtures.sh): the coordinator presents its certificate and requires one from
//! every worker (mutual TLS). A worker that trusts another CA, speaks plain HTTP/2, or has no
//! certificate of its own does not get in; one with the right CA and certificate trains the job.

use crate::distributed::{bin, checkpointed_job, scratch};
use crate::recovery::{coordinator_at, free_port, wait_ok};
use crate::support::fixtures;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn a_job_over_mutual_tls_refuses_workers_without_the_right_certificates() {
    let dir = scratch("tls");
    let cfg = checkpointed_job(&dir, 10);
    let tls = fixtures().join("tls");
    let f = |name: &str| tls.join(name).to_str().unwrap().to_string();
    let out = dir.join("run");
    let port = free_port();
    let log = dir.join("coord.log");
    let mut c = coordinator_at(&cfg, 1, &out, port, &log);
    c.args(["--tls-cert", &f("coordinator.pem"), "--tls-key", &f("coordinator.key")])
        .args(["--tls-client-ca", &f("ca.pem")]);
    let coord = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains("coordinator listening") {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let https = format!("https://localhost:{port}");
    let worker = |url: &str| {
        let mut w = std::process::Command::new(bin("worker"));
        w.args(["--coordinator", url, "--rank-hint", "0"]).env("RAYON_NUM_THREADS", "1").stdout(Stdio::null());
        w
    };
    let refused = |what: &str, url: &str, args: Vec<String>, expect: &str| {
        let mut w = worker(url);
        w.args(["--timeout-s", "3"]).args(&args).stderr(Stdio::piped());
        let o = w.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a worker with {what} got in");
        assert!(err.contains(expect), "{what}: expected {expect:?} in\n{err}");
    };
    refused("plain HTTP/2", &format!("http://localhost:{port}"), vec![], "cannot reach the coordinator");
    refused("another CA", &https, vec!["--tls-ca".into(), f("other-ca.pem")], "invalid peer certificate");
    refused("no client certificate", &https, vec!["--tls-ca".into(), f("ca.pem")], "cannot reach the coordinator");
    refused("an https URL but no CA", &https, vec![], "give the CA that signed the coordinator's certificate");
    let mut w = worker(&https);
    w.args(["--tls-ca", &f("ca.pem"), "--tls-cert", &f("worker.pem"), "--tls-key", &f("worker.key")])
        .stderr(std::fs::File::create(dir.join("worker.log")).unwrap());
    let w = w.spawn().unwrap();
    wait_ok(coord, "the coordinator", &log);
    wait_ok(w, "the worker", &dir.join("worker.log"));
    assert!(out.join("model/model.safetensors").exists());
    // A key that is not PEM: refused at start, naming the file.
    let mut c = coordinator_at(&cfg, 1, &dir.join("other"), free_port(), &dir.join("bad.log"));
    c.args(["--tls-cert", &f("coordinator.pem"), "--tls-key", cfg.to_str().unwrap()]);
    assert!(!c.status().unwrap().success());
    let err = std::fs::read_to_string(dir.join("bad.log")).unwrap();
    assert!(err.contains(&format!("TLS key {}: not a PEM file", cfg.display())), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Off loopback, nothing travels in clear text unless told: a coordinator on a non-loopback
/// address without TLS refuses to start, and a worker refuses to send its token to a plain
/// http:// coordinator elsewhere, each naming the fix (TLS, or --insecure).
#[test]
fn clear_text_off_loopback_is_refused_without_insecure() {
    let dir = scratch("clear-text");
    let cfg = checkpointed_job(&dir, 10);
    let o = std::process::Command::new(bin("coordinator"))
        .args(["--world-size", "1", "--config", cfg.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .args(["--set", &format!("output.dir={}", dir.join("out").display())])
        .env("TANDEM_JOB_TOKEN", "a-token-for-the-clear-text-test")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the coordinator served 0.0.0.0 without TLS:\n{err}");
    assert!(err.contains("would serve without TLS") && err.contains("--insecure"), "{err}");
    let o = std::process::Command::new(bin("worker"))
        .args(["--coordinator", "http://tandem-coordinator.invalid:29400", "--timeout-s", "1"])
        .env("TANDEM_JOB_TOKEN", "a-token-for-the-clear-text-test")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("clear text") && err.contains("--insecure"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The certificates deploy/k8s/make-secrets.sh makes for the Kubernetes manifests work: a
/// coordinator serving them trains a job with a worker that trusts the CA it wrote and reaches
/// the coordinator by its Service's name. Needs openssl (required where
/// TANDEM_REQUIRE_OPENSSL=1, as in CI; skipped with a note elsewhere).
#[test]
fn the_kubernetes_secrets_script_makes_certificates_a_job_runs_over() {
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        assert!(std::env::var("TANDEM_REQUIRE_OPENSSL").as_deref() != Ok("1"), "openssl is missing");
        eprintln!("tls: openssl not found: deploy/k8s/make-secrets.sh is not checked");
        return;
    }
    let dir = scratch("k8s-secrets");
    let k8s = dir.join("k8s");
    std::fs::create_dir_all(k8s.join("common")).unwrap();
    let deploy = crate::support::repo_root().join("deploy");
    std::fs::copy(deploy.join("k8s/make-secrets.sh"), k8s.join("make-secrets.sh")).unwrap();
    std::fs::copy(deploy.join("make-tls.sh"), dir.join("make-tls.sh")).unwrap();
    let o = std::process::Command::new("bash").arg(k8s.join("make-secrets.sh")).arg("jobs").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = |name: &str| k8s.join("common").join(name).to_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(f("job-token.txt")).unwrap().trim().len(), 64);
    let cfg = checkpointed_job(&dir, 10);
    let (port, log) = (free_port(), dir.join("coord.log"));
    let mut c = coordinator_at(&cfg, 1, &dir.join("out"), port, &log);
    c.args(["--tls-cert", &f("tls/tls.crt"), "--tls-key", &f("tls/tls.key")])
        .env("TANDEM_JOB_TOKEN_FILE", f("job-token.txt"));
    let coord = c.spawn().unwrap();
    let mut w = std::process::Command::new(bin("worker"));
    w.args(["--coordinator", &format!("https://127.0.0.1:{port}"), "--rank-hint", "0", "--timeout-s", "60"])
        .args(["--tls-ca", &f("tls/ca.pem"), "--tls-domain", "tandem-coordinator.jobs.svc"])
        .env("TANDEM_JOB_TOKEN_FILE", f("job-token.txt"))
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.log")).unwrap());
    let w = w.spawn().unwrap();
    wait_ok(coord, "the coordinator", &log);
    wait_ok(w, "the worker", &dir.join("worker.log"));
    assert!(dir.join("out/model/model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}
