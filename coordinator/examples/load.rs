//! The coordinator at cluster scale: for each size M, a fresh `coordinator` process and M
//! simulated workers in this process (`coordinator::load`), each a real gRPC client on loopback.
//! Prints one row per size, the largest last:
//!
//!   scripts/load.sh [--sizes 16,128,1024,4096,16384] [--json FILE] [--plots DIR]
//!   scripts/load.sh --from FILE --plots DIR      # the table and plots of an earlier --json
//!
//! (which builds the release binaries and runs target/release/examples/load with the same
//! arguments). The coordinator's CPU and memory are read from /proc, apart from this process's.

use anyhow::Context;
use coordinator::load::{format_row, header, measure, Options};
use std::path::PathBuf;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut sizes = vec![16, 128, 1024, 4096, 16384];
    let mut json: Option<PathBuf> = None;
    let mut plots: Option<PathBuf> = None;
    let mut from: Option<PathBuf> = None;
    let mut timeout_s = 15.0; // elastic.heartbeat_timeout_s's default
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => sizes = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--json" => json = Some(value()?.into()),
            "--plots" => plots = Some(value()?.into()),
            "--from" => from = Some(value()?.into()),
            "--heartbeat-timeout-s" => timeout_s = value()?.parse()?,
            _ => anyhow::bail!(
                "unknown argument {a:?} (--sizes A,B,..., --json FILE, --plots DIR, --heartbeat-timeout-s S, --from FILE)"
            ),
        }
    }
    if let Some(path) = from {
        // The table and plots of an earlier run's --json, without running anything.
        let rows: Vec<coordinator::load::Row> = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        println!("{}", header());
        rows.iter().for_each(|r| println!("{}", format_row(r)));
        if let Some(dir) = plots {
            write_plots(&dir, &rows)?;
        }
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let coordinator = exe.parent().and_then(|p| p.parent()).context("the examples directory")?.join("coordinator");
    anyhow::ensure!(coordinator.exists(), "{} is missing: cargo build --release -p coordinator", coordinator.display());
    let o = Options {
        coordinator,
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-cls"),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs_f64(timeout_s),
        steady: Duration::from_secs(5),
        scratch: std::env::temp_dir().join(format!("tandem-load-{}", std::process::id())),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!("{}", header());
    let mut rows = Vec::new();
    for m in sizes {
        let row = rt.block_on(measure(m, &o)).with_context(|| format!("{m} workers"))?;
        println!("{}", format_row(&row));
        rows.push(row);
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?).with_context(|| format!("{}", path.display()))?;
    }
    if let Some(dir) = plots {
        write_plots(&dir, &rows)?;
    }
    let _ = std::fs::remove_dir_all(&o.scratch);
    Ok(())
}

/// One chart per figure against log2(workers), into `dir/scale-<name>.png`.
fn write_plots(dir: &std::path::Path, rows: &[coordinator::load::Row]) -> anyhow::Result<()> {
    use coordinator::load::Row;
    use coordinator::plot::{line_chart_png, Series, Style};
    std::fs::create_dir_all(dir)?;
    type Figure = (&'static str, fn(&Row) -> f64);
    let charts: [(&str, &str, &[Figure]); 6] = [
        (
            "time",
            "seconds",
            &[
                ("connect + GetJob", |r| r.connect_s),
                ("rendezvous", |r| r.rendezvous_s),
                ("evaluation gather", |r| r.eval_gather_s),
                ("checksum gather", |r| r.checksum_gather_s),
                ("re-form after a failure", |r| r.reform_s),
            ],
        ),
        ("join", "bytes", &[("Join reply", |r| r.join_reply_bytes as f64)]),
        ("cpu", "cores", &[("coordinator CPU, every worker beating once a second", |r| r.heartbeat_cpu_cores)]),
        ("memory", "MiB", &[("coordinator resident memory", |r| r.rss_mib)]),
        ("stream", "examples/s", &[("shard streaming, every worker at once", |r| r.stream_examples_per_s)]),
        (
            "detect",
            "seconds",
            &[
                ("failure detected (from the last beat)", |r| r.detect_s),
                ("heartbeat timeout", |r| r.heartbeat_timeout_s),
            ],
        ),
    ];
    for (name, unit, figures) in charts {
        let series: Vec<Series> = figures
            .iter()
            .map(|(label, f)| Series {
                name: (*label).to_string(),
                points: rows.iter().map(|r| ((r.workers as f64).log2(), f(r))).collect(),
                style: Style::Marked,
            })
            .collect();
        let path = dir.join(format!("scale-{name}.png"));
        std::fs::write(&path, line_chart_png(&series, "log2(workers)", "", unit))
            .with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}
