//! The coordinator's HTTP endpoints, beside its gRPC port, for people and monitoring systems:
//!
//! | path          | what                                                               |
//! |---------------|--------------------------------------------------------------------|
//! | `/`           | the status page (`status.html`: polls `/api/status` every 2 s)     |
//! | `/api/status` | the job as JSON ([`crate::telemetry::JobStatus`])                  |
//! | `/metrics`    | Prometheus text format ([`crate::telemetry::prometheus_text`])     |
//! | `/loss.png`   | the loss curve so far as a PNG                                      |
//! | `/healthz`    | `ok` while the process serves                                       |
//!
//! Read-only and unauthenticated: it shows the job's progress and its workers' host names, never
//! the token or the data. Bind it to a cluster-internal address (the default follows `--listen`).
//!
//! Nothing a client of this port does reaches the locks that heartbeats and the gRPC handlers
//! take: one task publishes the job's status (JSON and Prometheus text, rendered once) every
//! [`REFRESH`], and the endpoints serve that snapshot; the loss chart is drawn on the blocking
//! pool, one drawing at a time, only when the history changed, from a copy of it. The port holds
//! at most [`MAX_CONNECTIONS`] connections (`crate::limits`), and a connection that does not
//! send a whole request head within [`HEADER_READ_TIMEOUT`] (idle keep-alive included) is closed.

use crate::service::CoordinatorService;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::StreamExt;

const STATUS_PAGE: &str = include_str!("status.html");

/// How often the published status is refreshed.
pub const REFRESH: Duration = Duration::from_millis(500);
/// Connections the HTTP port holds at once (browsers, scrapers, probes).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection may take to send a request's head, or stay idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The job's status as the endpoints serve it, rendered once per refresh.
struct Published {
    json: Arc<str>,
    metrics: Arc<str>,
    /// The telemetry's version when it was taken: the chart is redrawn only when it moved.
    changes: u64,
}

#[derive(Clone)]
struct Http {
    svc: CoordinatorService,
    published: watch::Receiver<Arc<Published>>,
    /// The last chart drawn and the version it shows; its lock also makes the drawings one at a
    /// time (the clients waiting for it then get the drawing just made).
    chart: Arc<tokio::sync::Mutex<Option<(u64, axum::body::Bytes)>>>,
}

fn publish(svc: &CoordinatorService) -> Published {
    let status = svc.job_status();
    Published {
        json: serde_json::to_string(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")).into(),
        metrics: crate::telemetry::prometheus_text(&status).into(),
        changes: svc.telemetry_changes(),
    }
}

/// The routes above, over one job. Spawns the task that publishes its status (on the current
/// runtime), which ends with the last copy of the router.
pub fn router(svc: CoordinatorService) -> Router {
    let (tx, published) = watch::channel(Arc::new(publish(&svc)));
    let publisher = svc.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = tx.closed() => return,
            }
            let svc = publisher.clone();
            let Ok(p) = tokio::task::spawn_blocking(move || publish(&svc)).await else { return };
            tx.send_replace(Arc::new(p));
        }
    });
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .route("/loss.png", get(loss_png))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Http { svc, published, chart: Arc::default() })
}

/// Serves [`router`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, svc: CoordinatorService) -> std::io::Result<()> {
    let app = router(svc);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut incoming =
        std::pin::pin!(crate::limits::limit(incoming, MAX_CONNECTIONS, crate::limits::HANDSHAKE_TIMEOUT));
    while let Some(conn) = incoming.next().await {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, or a connection reset while queued: go on (the
                // limit pauses accepting after an error).
                tracing::debug!(error = %e, "accepting an HTTP connection");
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "an HTTP connection ended");
            }
        });
    }
    Ok(())
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], STATUS_PAGE)
}

async fn status(State(h): State<Http>) -> impl IntoResponse {
    let body = h.published.borrow().json.to_string();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
}

async fn metrics(State(h): State<Http>) -> impl IntoResponse {
    let body = h.published.borrow().metrics.to_string();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

async fn loss_png(State(h): State<Http>) -> impl IntoResponse {
    let version = h.published.borrow().changes;
    let mut chart = h.chart.lock().await;
    let png = match &*chart {
        Some((v, png)) if *v == version => png.clone(),
        _ => {
            let svc = h.svc.clone();
            let png =
                axum::body::Bytes::from(tokio::task::spawn_blocking(move || svc.loss_png()).await.unwrap_or_default());
            *chart = Some((version, png.clone()));
            png
        }
    };
    ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-store")], png)
}
