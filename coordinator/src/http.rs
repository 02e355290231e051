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

use crate::service::CoordinatorService;
use crate::telemetry::prometheus_text;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const STATUS_PAGE: &str = include_str!("status.html");

/// The routes above, over one job.
pub fn router(svc: CoordinatorService) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .route("/loss.png", get(loss_png))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(svc)
}

/// Serves [`router`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, svc: CoordinatorService) -> std::io::Result<()> {
    axum::serve(listener, router(svc)).await
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], STATUS_PAGE)
}

async fn status(State(svc): State<CoordinatorService>) -> impl IntoResponse {
    let body = serde_json::to_string(&svc.job_status()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
}

async fn metrics(State(svc): State<CoordinatorService>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], prometheus_text(&svc.job_status()))
}

async fn loss_png(State(svc): State<CoordinatorService>) -> impl IntoResponse {
    let png = tokio::task::spawn_blocking(move || svc.loss_png()).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-store")], png)
}
