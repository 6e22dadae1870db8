//! `kiam webhook`: a mutating admission webhook that gives pods with
//! `iam.amazonaws.com/role` the token path — the two container
//! credential-provider variables and a projected service-account token with
//! kiam's audience (see docs/WEBHOOK.md).
//!
//! The surprise: it never decides *whether* a namespace opted in. The
//! MutatingWebhookConfiguration's namespaceSelector does, in the API server,
//! so the webhook holds no Kubernetes credentials at all and answers every
//! review from the review alone. Injecting is also never a grant: the kiam
//! server still applies the same policy to the token's pod as to an IP.
//!
//! - `patch`: the pure rules, pod in, JSON patch out.
//! - `review`: AdmissionReview v1 in and out.
//! - this file: flags, HTTPS (certificates reloaded when they change), the
//!   routes `POST /mutate`, `GET /healthz`, and metrics.

pub mod patch;
pub mod review;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::WebhookArgs;
use crate::tls::{HttpsTls, TlsFiles, HANDSHAKE_TIMEOUT};
use crate::Fatal;
use patch::Injection;

/// The API server sends whole pods; its own request limit is 3 MiB.
const BODY_LIMIT: usize = 6 * 1024 * 1024;

/// How long the webhook keeps serving after SIGTERM (well inside the
/// Deployment's 30 s termination grace period).
const DRAIN: Duration = Duration::from_secs(5);

/// The shortest token lifetime the API server accepts for a projected
/// volume (`expirationSeconds` >= 600).
const MIN_EXPIRATION: Duration = Duration::from_secs(600);
/// The longest (`expirationSeconds` <= 2^32).
const MAX_EXPIRATION: Duration = Duration::from_secs(1 << 32);

/// Every value of the `result` label.
const RESULTS: [&str; 7] = [
    "injected",
    "no_role",
    "already_set",
    "no_service_account",
    "ignored",
    "malformed",
    "bad_request",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The webhook's metric families.
#[derive(Clone, Default)]
struct Metrics {
    /// `kiam_webhook_reviews_total{result}`: one per AdmissionReview.
    reviews: Family<ResultLabel, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "kiam_webhook_reviews",
            "AdmissionReviews answered, by result",
            m.reviews.clone(),
        );
        // Every result from the start, so rate() and alerts see zeros
        // rather than absent series.
        for result in RESULTS {
            m.count_zero(result);
        }
        m
    }

    fn count_zero(&self, result: &'static str) {
        let _ = self.reviews.get_or_create(&ResultLabel { result });
    }

    fn count(&self, result: &'static str) {
        self.reviews.get_or_create(&ResultLabel { result }).inc();
    }
}

/// What the request handlers share.
struct Shared {
    injection: Injection,
    metrics: Metrics,
}

/// The injection the flags ask for; errors name the flag.
pub fn injection(args: &WebhookArgs) -> Result<Injection, Fatal> {
    if args.token_audience.trim().is_empty() {
        return Err(Fatal::Usage("--token-audience must not be empty".into()));
    }
    if args.token_expiration < MIN_EXPIRATION || args.token_expiration > MAX_EXPIRATION {
        return Err(Fatal::Usage(format!(
            "--token-expiration {}: must be between 10m and 2^32 seconds (the API server refuses other projected tokens)",
            humantime::format_duration(args.token_expiration)
        )));
    }
    Ok(Injection {
        audience: args.token_audience.clone(),
        expiration_seconds: i64::try_from(args.token_expiration.as_secs()).unwrap_or(i64::MAX),
    })
}

/// Parses the flags, reads the certificates, binds and serves until SIGTERM.
pub async fn main(args: WebhookArgs) -> Result<(), Fatal> {
    let injection = injection(&args)?;
    let mut registry = Registry::default();
    let tls = HttpsTls::load(TlsFiles::from(&args.tls), &mut registry)
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    let bind = crate::telemetry::normalise_listen_addr(&args.bind);
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let listener = TcpListener::bind(bind.as_str())
        .await
        .map_err(|e| Fatal::Usage(format!("--bind {}: {e}", args.bind)))?;
    let metrics_listener = crate::telemetry::bind_metrics(&args.telemetry.prometheus_listen_addr)
        .await
        .map_err(|e| {
            Fatal::Usage(format!(
                "--prometheus-listen-addr {}: {e}",
                args.telemetry.prometheus_listen_addr
            ))
        })?;
    let shutdown = crate::shutdown::on_signal();
    // The API server keeps calling this pod until its endpoint is gone,
    // moments after SIGTERM: keep answering a little longer, since with
    // failurePolicy Fail a refused connection is a refused pod.
    let stop = CancellationToken::new();
    tokio::spawn({
        let (shutdown, stop) = (shutdown.clone(), stop.clone());
        async move {
            shutdown.cancelled().await;
            tracing::info!(
                "still answering for {}s while the API server stops calling this pod",
                DRAIN.as_secs()
            );
            tokio::time::sleep(DRAIN).await;
            stop.cancel();
        }
    });
    let metrics = Metrics::register(&mut registry);
    if let Some(l) = metrics_listener {
        tokio::spawn(crate::telemetry::serve_metrics(
            l,
            Arc::new(registry),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        audience = %injection.audience,
        "kiam webhook serving AdmissionReviews on POST /mutate"
    );
    run(listener, tls, injection, metrics, stop).await;
    Ok(())
}

/// Serves HTTPS on `listener` until `shutdown` (tests use [`serve`]).
async fn run(
    listener: TcpListener,
    tls: HttpsTls,
    injection: Injection,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let app = router(Arc::new(Shared { injection, metrics }));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a webhook connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_connection(conn, peer, app, shutdown).await;
        });
    }
    // Reviews in flight are answered (each connection finishes its request
    // and closes); the API server would otherwise see a failed call.
    drop(listener);
    connections.close();
    if tokio::time::timeout(Duration::from_secs(10), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("gave up waiting for webhook connections to finish");
    }
}

async fn serve_connection(
    conn: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let service = TowerToHyperService::new(app);
    let serving = builder.serve_connection(TokioIo::new(conn), service);
    tokio::pin!(serving);
    tokio::select! {
        r = serving.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer, error = %e, "webhook connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            // Finish what is in flight, take nothing new.
            serving.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

async fn mutate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match review::answer(&body, &shared.injection) {
        Ok((out, result)) => {
            shared.metrics.count(result.as_str());
            tracing::debug!(result = result.as_str(), uid = %out["response"]["uid"], "admission review answered");
            (
                [(header::CONTENT_TYPE, "application/json")],
                out.to_string(),
            )
                .into_response()
        }
        Err(e) => {
            shared.metrics.count("bad_request");
            tracing::warn!(error = %e, "refused an unreadable AdmissionReview");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    }
}
