//! Logs and metrics. Metric names are Go kiam's, so its Grafana dashboard
//! keeps working; each component registers its own families into the one
//! [`Registry`] at construction and keeps the handles.

use std::sync::Arc;

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::cli::LogArgs;

/// Installs the global `tracing` subscriber: text by default, JSON with
/// `--json-log`, filtered at `--level` (`RUST_LOG` overrides for debugging).
pub fn init_logging(args: &LogArgs) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,rustls=warn,tower=warn,kube=warn,aws=warn",
            args.level
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = if args.json_log {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = res;
}

/// Renders the registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` from `registry` until `shutdown` is cancelled.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            encode(&registry),
        )
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds `--prometheus-listen-addr` (if set); the caller spawns [`serve_metrics`].
pub async fn bind_metrics(addr: &str) -> Result<Option<TcpListener>, std::io::Error> {
    if addr.is_empty() {
        return Ok(None);
    }
    let addr = normalise_listen_addr(addr);
    Ok(Some(TcpListener::bind(addr.as_str()).await?))
}

/// Go accepts `:9620` meaning all interfaces; tokio needs a host.
pub fn normalise_listen_addr(addr: &str) -> String {
    if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    }
}

/// An error and its sources as one line, without repeating a message its
/// source already contains (tonic/hyper wrap each other a lot).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let msg = e.to_string();
        if !msg.is_empty() && !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = e.source();
    }
    // Keep the most specific messages: drop a part that a later one repeats.
    let mut out: Vec<&str> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if !parts[i + 1..]
            .iter()
            .any(|later| later.contains(p.as_str()))
        {
            out.push(p);
        }
    }
    out.join(": ")
}
