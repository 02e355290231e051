//! Watching and stopping a job as an operator does, with real processes: the coordinator's
//! HTTP endpoints during a running job (`/api/status`, Prometheus `/metrics`, the status page
//! rendered by headless Chromium, which saves a screenshot), its TensorBoard event files read by
//! TensorBoard's own reader, the loss curve PNG, a worker SIGTERMed (a pod eviction: the job
//! restarts from its last checkpoint) and the coordinator SIGTERMed (it stops every worker and
//! keeps its checkpoints; started again, it finishes the job bit-identical to an uninterrupted
//! run).
//!
//! Chromium is Debian's `chromium` package: .ci/run installs it and sets
//! TANDEM_REQUIRE_BROWSER=1; elsewhere the page check is skipped (with a note) when it is not
//! installed. TensorBoard comes from scripts/fetch-test-tools.sh (scripts/test.sh runs it).

use crate::distributed::{
    assert_bits_eq, checkpoint_steps, checkpointed_job, coordinator, loss_by_step, params, run_ok, scratch,
};
use crate::support::repo_root;
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STEPS: u64 = 600;
/// Checkpoints (and test-split evaluations: `best_metric`) every 20 steps; quick failure
/// detection.
const SETTINGS: [&str; 8] = [
    "--set",
    "checkpoint.every=20",
    "--set",
    "elastic.heartbeat_interval_s=0.25",
    "--set",
    "elastic.heartbeat_timeout_s=5",
    "--set",
    "elastic.rejoin_timeout_s=60",
];

/// A plain HTTP/1.1 GET on loopback: (status code, headers, body).
fn http_get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    (code, head, raw[split + 4..].to_vec())
}

fn status(addr: &str) -> serde_json::Value {
    let (code, _, body) = http_get(addr, "/api/status");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Polls `/api/status` until `ok` holds (or panics after `limit`).
fn wait_for(addr: &str, limit: Duration, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(addr);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}; the job says {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Parses the Prometheus text format strictly enough to catch a malformed exposition: every
/// sample line is `name{labels} value` under a `# TYPE` of its metric. Returns series -> value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut typed: Vec<String> = Vec::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            typed.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad metric name in {line:?}");
        assert!(typed.last().is_some_and(|t| t == name), "{name} has no # TYPE line before it");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}') && labels.contains("=\""), "{line:?}");
            }
        }
        let v: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("not a number in {line:?}")),
        };
        out.insert(series.to_string(), v);
    }
    out
}

/// TensorBoard's reader over a log directory: tag -> [(step, value)].
fn read_tensorboard(dir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let python = repo_root().join(".cache/pytools/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/fetch-test-tools.sh (scripts/test.sh does)", python.display());
    let o = Command::new(python).arg(repo_root().join("scripts/read_tensorboard.py")).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Debian's Chromium, if installed (required where TANDEM_REQUIRE_BROWSER=1).
fn chromium() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("TANDEM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("TANDEM_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "{} is missing (apt-get install chromium)",
        p.display()
    );
    eprintln!("observe: {} not found (apt-get install chromium): the status page check is skipped", p.display());
    None
}

/// Headless Chromium with the flags a closed network needs; `args` say what to do.
fn headless(exe: &Path, profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(exe)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap()
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// A job's coordinator with its stderr collected; the gRPC and HTTP addresses it logged.
pub(crate) struct Running {
    pub(crate) child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    pub(crate) fn start(mut c: Command) -> Self {
        let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), Arc::clone(&log));
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Running { child, log }
    }

    /// Waits for the process to exit (at most 5 minutes); its exit status must be success.
    pub(crate) fn wait_success(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // the log thread's last lines
                assert!(status.success(), "{what} exited with {status}:\n{}", self.log());
                return;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("{what} did not finish:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The value logged after `key` (e.g. `url="http://..."`), once it is logged.
    pub(crate) fn logged(&self, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(rest) = self.log().split(key).nth(1) {
                return rest.split_whitespace().next().unwrap().trim_matches('"').to_string();
            }
            assert!(Instant::now() < deadline, "no {key} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The coordinator's grpc.health.v1 answer for `service`, asked without the job token (as a
/// Kubernetes probe asks): the serving status, or the gRPC error code.
pub(crate) fn health(grpc: &str, service: &str) -> Result<i32, tonic::Code> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        let req = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
        c.check(req).await.map(|r| r.into_inner().status).map_err(|s| s.code())
    })
}

fn sigterm(pid: u32) {
    assert!(Command::new("sh").args(["-c", &format!("kill -TERM {pid}")]).status().unwrap().success());
}

/// Processes whose command line mentions `needle` (the workers of a coordinator's address).
fn processes_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some(cmd)
        })
        .collect()
}

#[test]
fn a_job_is_watched_over_http_survives_a_sigterm_to_a_worker_and_stops_cleanly_on_a_sigterm_to_the_coordinator() {
    let dir = scratch("observe");
    let cfg = checkpointed_job(&dir, STEPS);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("epochs = 20\n", "epochs = 50\n");
    std::fs::write(&cfg, text).unwrap();

    // The uninterrupted run: the reference parameters, its TensorBoard events and loss PNG.
    let full = dir.join("full");
    let mut c = coordinator(&cfg, 2, &full);
    c.args(SETTINGS).arg("--no-http");
    run_ok(c);
    let want = params(&full.join("model"));
    let curve = loss_by_step(&full);
    let tb = read_tensorboard(&full.join("tensorboard"));
    let loss: Vec<(u64, f64)> = tb["train/loss"].clone();
    assert_eq!(loss.iter().map(|p| p.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    for (step, v) in &loss {
        // Event files hold f32; serde_json's float parsing may be off in the last bit of an f64.
        assert_eq!(*v as f32, curve[step] as f32, "TensorBoard's train/loss at step {step}");
    }
    let acc = &tb["test/accuracy"];
    assert_eq!(acc.len() as u64, STEPS / 20, "{acc:?}");
    assert!(acc.iter().all(|(s, a)| s % 20 == 0 && (0.0..=1.0).contains(a)), "{acc:?}");
    for tag in [
        "train/learning_rate",
        "perf/tokens_per_second",
        "perf/allreduce_seconds",
        "perf/data_wait_seconds",
        "perf/forward_seconds",
        "perf/backward_seconds",
        "perf/optimizer_seconds",
    ] {
        assert_eq!(tb[tag].len() as u64, STEPS, "{tag}");
    }
    assert_eq!(png_size(&std::fs::read(full.join("loss.png")).unwrap()), (960, 480));

    // The same job, watched over HTTP.
    let out = dir.join("watched");
    let mut c = coordinator(&cfg, 2, &out);
    c.args(SETTINGS).args(["--http-listen", "127.0.0.1:0"]);
    let mut job = Running::start(c);
    let http = job.logged("url=").trim_start_matches("http://").trim_end_matches('/').to_string();
    let grpc = job.logged("coordinator listening addr=");
    let s = wait_for(&http, Duration::from_secs(120), "step 30", |s| {
        s["state"] == "training" && s["step"].as_u64() >= Some(30)
    });
    assert_eq!(s["workers"].as_array().unwrap().len(), 2, "{s}");
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(health(&grpc, ""), Ok(serving), "the server's health");
    assert_eq!(health(&grpc, "tandem.v1.Coordinator"), Ok(serving));
    assert_eq!(health(&grpc, "no.such.Service"), Err(tonic::Code::NotFound));

    // A worker is evicted: SIGTERM. The job restarts from its last checkpoint without it, and
    // the replacement (`--spawn-local` starts one, as Kubernetes would) rejoins.
    let host = s["workers"][1]["host"].as_str().unwrap().to_string();
    let pid: u32 = host.rsplit("pid-").next().unwrap().parse().unwrap();
    sigterm(pid);
    let s = wait_for(&http, Duration::from_secs(120), "the restarted job to evaluate", |s| {
        s["generation"].as_u64() >= Some(1)
            && s["state"] == "training"
            && s["evals"].as_array().is_some_and(|e| !e.is_empty())
            && s["checkpoints"].as_array().is_some_and(|c| c.len() >= 2)
    });
    assert!(s["step"].as_u64().unwrap() < STEPS, "the job ended before the test could look: {s}");
    assert!(job.log().contains("received SIGTERM (pod eviction or shutdown)"), "{}", job.log());

    let (code, head, body) = http_get(&http, "/metrics");
    assert_eq!(code, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = parse_prometheus(std::str::from_utf8(&body).unwrap());
    for name in [
        "tandem_step",
        "tandem_train_loss",
        "tandem_learning_rate",
        "tandem_tokens_per_second",
        "tandem_tokens_total",
        "tandem_allreduce_seconds",
        "tandem_allreduce_seconds_total",
        "tandem_data_wait_seconds",
        "tandem_data_wait_seconds_total",
        "tandem_forward_seconds",
        "tandem_backward_seconds",
        "tandem_optimizer_seconds",
        "tandem_eval_accuracy{split=\"test\"}",
        "tandem_eval_macro_f1{split=\"test\"}",
        "tandem_workers",
        "tandem_restarts_total",
        "tandem_job_state{state=\"training\"}",
        "tandem_worker_heartbeat_age_seconds{rank=\"1\"}",
    ] {
        assert!(m.contains_key(name), "{name} is missing from /metrics:\n{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(m["tandem_workers"], 2.0);
    assert!(m["tandem_restarts_total"] >= 1.0);
    assert_eq!(m["tandem_job_state{state=\"training\"}"], 1.0);
    assert!(m["tandem_step"] >= 1.0 && m["tandem_train_loss"].is_finite() && m["tandem_tokens_total"] > 0.0);
    assert!((0.0..=1.0).contains(&m["tandem_eval_accuracy{split=\"test\"}"]));
    let (code, head, png) = http_get(&http, "/loss.png");
    assert!(code == 200 && head.contains("image/png"), "{head}");
    png_size(&png);

    // The status page, as a browser shows it.
    if let Some(exe) = chromium() {
        let url = format!("http://{http}/");
        let dom = headless(&exe, &dir.join("chromium-dom"), &["--virtual-time-budget=5000", "--dump-dom", &url]);
        let dom = String::from_utf8_lossy(&dom.stdout);
        assert_eq!(dom.matches("class=\"worker").count(), 2, "two worker rows:\n{dom}");
        let points = |id: &str| -> usize {
            let tag = dom.split(&format!("id=\"{id}\"")).nth(1).unwrap_or_default();
            tag.split("data-points=\"").nth(1).and_then(|v| v.split('"').next()?.parse().ok()).unwrap_or(0)
        };
        assert!(points("loss-chart") >= 30, "the loss curve has points:\n{dom}");
        assert!(points("eval-chart") >= 1, "the accuracy curve has points:\n{dom}");
        assert!(dom.contains("points=\"") && dom.contains("class=\"state training\""), "{dom}");
        let shots = repo_root().join("target/artefacts");
        std::fs::create_dir_all(&shots).unwrap();
        let shot = shots.join("status-page.png");
        let o = headless(
            &exe,
            &dir.join("chromium-shot"),
            &[
                "--virtual-time-budget=5000",
                "--window-size=1200,1000",
                &format!("--screenshot={}", shot.display()),
                &url,
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&std::fs::read(&shot).unwrap()), (1200, 1000));
        eprintln!("observe: a screenshot of the status page during the job: {}", shot.display());
    }

    // The coordinator is told to stop (SIGTERM): the workers get STOP and exit, the
    // coordinator exits non-zero saying so, every checkpoint on disk is complete.
    sigterm(job.child.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(st) = job.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the coordinator did not stop within 60 s of SIGTERM:\n{}", job.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300)); // the stderr reader's last lines
    let log = job.log();
    assert!(!exit.success(), "{log}");
    assert!(log.contains("the coordinator received SIGTERM and stopped the job"), "{log}");
    assert!(processes_with(&format!("--coordinator http://{grpc}")).is_empty(), "workers left running");
    let kept = checkpoint_steps(&out);
    assert!(!kept.is_empty() && *kept.last().unwrap() < STEPS, "{kept:?}");
    for step in &kept {
        assert!(out.join(format!("checkpoints/step-{step:08}/manifest.json")).exists(), "step {step} incomplete");
    }
    assert!(!out.join("model").exists());

    // Started again, it resumes and ends exactly where the uninterrupted run did.
    let mut c = coordinator(&cfg, 2, &out);
    c.args(SETTINGS).arg("--no-http");
    let (_, err) = run_ok(c);
    assert!(err.contains("resuming"), "{err}");
    assert_bits_eq(&params(&out.join("model")), &want, "SIGTERMed twice and resumed vs uninterrupted");
    // TensorBoard shows one value per step: the replays after each restart replace what the
    // runs before them wrote past their checkpoint.
    let tb = read_tensorboard(&out.join("tensorboard"));
    let steps: Vec<u64> = tb["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    let last = tb["train/loss"].last().unwrap().1;
    assert_eq!(last as f32, curve[&STEPS] as f32, "the last loss is the uninterrupted run's");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn prometheus_parsing_catches_a_malformed_line() {
    let ok = parse_prometheus("# HELP tandem_x x\n# TYPE tandem_x gauge\ntandem_x{a=\"1\"} 2.5\n");
    assert_eq!(ok["tandem_x{a=\"1\"}"], 2.5);
    for bad in ["tandem_x 1\n", "# TYPE tandem_x gauge\ntandem_x one\n", "# TYPE tandem_x gauge\ntandem-x 1\n"] {
        assert!(std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(), "{bad:?} passed");
    }
}

/// A health `Watch` stream held open through the end of a job (a stream the server never
/// closes by itself): the coordinator still exits, with the job's success, once
/// `--shutdown-grace-s` has passed after the job ended, instead of waiting for the stream.
#[test]
fn an_open_watch_stream_does_not_keep_the_coordinator_from_exiting() {
    let dir = scratch("grace");
    let cfg = checkpointed_job(&dir, 10);
    let mut c = coordinator(&cfg, 2, &dir.join("out"));
    c.args(["--no-http", "--shutdown-grace-s", "2"]);
    // Rank 1 hangs once it has finished (SIGSTOP): the coordinator cannot wait for it to exit.
    c.env("TANDEM_FAULT", "rank1:finished@10");
    let mut job = Running::start(c);
    let grpc = job.logged("coordinator listening addr=");
    // The watcher: its own runtime on its own thread, reading the stream until it ends.
    let (opened_tx, opened) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ch =
                tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
            let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            let mut stream = c.watch(req).await.unwrap().into_inner();
            let first = stream.message().await;
            opened_tx.send(first.is_ok()).unwrap();
            while let Ok(Some(_)) = stream.message().await {}
        });
    });
    assert!(opened.recv_timeout(Duration::from_secs(60)).unwrap(), "the Watch stream did not open");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut ended: Option<Instant> = None;
    let status = loop {
        if let Some(status) = job.child.try_wait().unwrap() {
            break status;
        }
        if ended.is_none() && job.log().contains("model published") {
            ended = Some(Instant::now());
        }
        if Instant::now() > deadline {
            job.child.kill().unwrap();
            panic!("the coordinator did not exit with a Watch stream open and a stopped worker:\n{}", job.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = ended.map(|t| t.elapsed());
    std::thread::sleep(Duration::from_millis(200)); // the log thread's last lines
    let log = job.log();
    assert!(status.success(), "the job's exit code: {status}\n{log}");
    assert!(log.contains("TANDEM_FAULT: stopping this process"), "rank 1 did not stop itself:\n{log}");
    assert!(log.contains("exiting anyway"), "the stream was closed before the grace period ran out:\n{log}");
    assert!(log.contains("still running after the job ended; killed it"), "the stopped worker:\n{log}");
    // One grace period (2 s) for the connections and the local workers, with a loaded machine's
    // margin.
    assert!(took.is_some_and(|t| t < Duration::from_secs(15)), "exited {took:?} after the job ended:\n{log}");
    assert!(dir.join("out/model/model.safetensors").exists(), "the job's model is published");
    std::fs::remove_dir_all(&dir).ok();
}
