//! kiam in Rust: per-Pod AWS IAM credentials for Kubernetes.
//!
//! An agent on every node answers Pods' requests to the EC2 metadata API; a
//! central server watches Pods and Namespaces, applies the role policy and
//! fetches STS credentials. They talk gRPC (kiam's v3/v4 wire format) over
//! mutual TLS.
//!
//! # Layout
//! - [`wire`]: what agents and servers agree on beyond the proto (status strings, metadata, time format).
//! - [`arn`]: the one IAM ARN parser.
//! - [`cli`]: flags (kiam's names and defaults), shared by every role.
//! - [`grpc_metrics`]: go-grpc-prometheus' families for both ends of the wire.
//! - [`telemetry`]: `tracing` set-up and the Prometheus registry/endpoint.
//! - [`shutdown`]: SIGINT/SIGTERM turned into a cancellation token.
//! - [`tls`]: the only place certificates are read; reloads them when they change.
//! - [`server`]: `kiam server` — caches, policy, credentials, gRPC service.
//! - [`agent`]: `kiam agent` — metadata API, IMDSv2, proxy, server pool, iptables.
//! - [`health`]: `kiam health` — one GetHealth call for probes.
//! - [`certs`]: `kiam certs` — a CA plus server and agent certificates.
//! - [`proto`]: code generated from `proto/kiam.proto`.

pub mod agent;
pub mod arn;
pub mod certs;
pub mod cli;
pub mod grpc_metrics;
pub mod health;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Generated from `proto/kiam.proto` (package `kiam`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("kiam");
}

/// The exit code for bad flags or unreadable files (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Why a role stopped: `Usage` (bad flag or unreadable file: exit 64, one
/// line naming the flag) or `Failed` (a runtime failure: exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl Fatal {
    pub fn exit_code(&self) -> i32 {
        match self {
            Fatal::Usage(_) => EXIT_USAGE,
            Fatal::Failed(_) => 1,
        }
    }
}

/// Selects ring as rustls' process-wide provider. Two providers are linked
/// (kube uses ring, the AWS SDK aws-lc-rs), so rustls cannot pick one itself
/// and any client built without an explicit provider would panic. Idempotent.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
