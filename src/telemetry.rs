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

/// The media type of what [`encode`] writes: prometheus-client encodes
/// OpenMetrics 1.0.0 text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The media type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the registry as OpenMetrics text ([`OPENMETRICS_CONTENT_TYPE`]).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Whether a scraper's `Accept` header prefers OpenMetrics to the
/// Prometheus text format 0.0.4. Prometheus asks for OpenMetrics first
/// (`application/openmetrics-text;version=1.0.0` with the highest q, then
/// `text/plain;version=0.0.4`); a client that does not name OpenMetrics
/// (curl's `*/*`, no header, an old scraper) gets the 0.0.4 text, as the Go
/// client library does.
pub fn prefers_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match openmetrics {
        Some(q) if q > 0.0 => q >= text.unwrap_or(0.0),
        _ => false,
    }
}

/// OpenMetrics text from [`encode`] as the Prometheus text format 0.0.4:
/// counter families are named with their `_total` suffix, `# UNIT` and
/// `# EOF` lines, `_created` samples and exemplars are dropped, and types
/// 0.0.4 does not have become `untyped` (`info`: `gauge`).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| kind.trim() == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind.trim() {
                "counter" => (format!("{name}_total"), "counter"),
                kind @ ("gauge" | "histogram" | "summary") => (name.to_string(), kind),
                "info" => (format!("{name}_info"), "gauge"),
                _ => (name.to_string(), "untyped"),
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if counters.contains(name) {
                "_total"
            } else {
                ""
            };
            out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if let Some(base) = line[..name_end].strip_suffix("_created") {
            if counters.contains(base) {
                continue;
            }
        }
        // An exemplar follows the value after " # ".
        let sample = match line.find(" # ") {
            Some(at) if !line[..at].contains('"') || line[..at].matches('"').count() % 2 == 0 => {
                &line[..at]
            }
            _ => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` from `registry` until `shutdown` is cancelled: as
/// OpenMetrics to a scraper that asks for it (Prometheus does), else as
/// the Prometheus text format 0.0.4, each with its own content type.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    async fn metrics(
        State(registry): State<Arc<Registry>>,
        headers: axum::http::HeaderMap,
    ) -> impl IntoResponse {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let body = encode(&registry);
        if prefers_openmetrics(accept) {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body)
        } else {
            (
                [(header::CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE)],
                to_prometheus_text(&body),
            )
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

    fn registry() -> Registry {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        c.inc();
        registry.register("kiam_test_requests", "Requests served", c);
        let g = Gauge::<i64>::default();
        g.set(3);
        registry.register("kiam_test_cached", "Entries cached", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        registry.register("kiam_test_seconds", "Latency", h);
        registry
    }

    #[test]
    fn prometheus_asks_for_openmetrics_and_curl_gets_text() {
        // Prometheus 2.x and 3.x default scrape Accept headers.
        for prometheus in [
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
        ] {
            assert!(prefers_openmetrics(Some(prometheus)), "{prometheus}");
        }
        for other in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text;q=0"),
            Some("text/plain;q=1,application/openmetrics-text;q=0.5"),
        ] {
            assert!(!prefers_openmetrics(other), "{other:?}");
        }
    }

    #[test]
    fn the_text_format_names_counters_with_total_and_has_no_eof() {
        let om = encode(&registry());
        assert!(om.contains("# TYPE kiam_test_requests counter"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
        let text = to_prometheus_text(&om);
        assert!(
            text.contains("# TYPE kiam_test_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP kiam_test_requests_total Requests served"),
            "{text}"
        );
        assert!(text.contains("\nkiam_test_requests_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE kiam_test_cached gauge\nkiam_test_cached 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kiam_test_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("kiam_test_seconds_bucket{le=\"1.0\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // Every sample line of the text format is one OpenMetrics had.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(om.lines().any(|l| l == line), "{line}");
        }
    }

    #[tokio::test]
    async fn metrics_are_served_with_the_content_type_of_their_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(
            listener,
            Arc::new(registry()),
            shutdown.clone(),
        ));
        let get = |accept: Option<&'static str>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let accept = accept
                .map(|a| format!("Accept: {a}\r\n"))
                .unwrap_or_default();
            s.write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let om = get(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ))
        .await;
        assert!(
            om.to_ascii_lowercase()
                .contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{om}"
        );
        assert!(om.contains("# EOF"), "{om}");
        let text = get(None).await;
        assert!(
            text.to_ascii_lowercase()
                .contains(&format!("content-type: {PROMETHEUS_TEXT_CONTENT_TYPE}")),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && text.contains("# TYPE kiam_test_requests_total counter"),
            "{text}"
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
