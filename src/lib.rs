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
//! - [`shard`]: which server owns a pod IP (rendezvous hashing), shared by agents and servers.
//! - [`agent`]: `kiam agent` — metadata API, IMDSv2, proxy, server pool, iptables.
//! - [`health`]: `kiam health` — one GetHealth call for probes.
//! - [`explain`]: `kiam explain` — asks a server why a pod gets (or not) its role; prints it.
//! - [`certs`]: `kiam certs` — a CA plus server and agent certificates.
//! - [`webhook`]: `kiam webhook` — admission webhook giving pods with a role the token path.
//! - [`proto`]: code generated from `proto/kiam.proto`.
//!
//! # The credential path, one direction
//! A pod's request for credentials crosses these modules in this order and
//! never returns to an earlier one:
//! 1. `agent` accepts the connection; its TCP peer address is the pod's only
//!    identity (`agent::metadata` routes the path, normalised by
//!    `agent::path`, and answers IMDSv2 tokens with `agent::imdsv2`).
//! 2. `agent::client` asks a kiam server over mutual TLS ([`tls`]), failing
//!    over across every address `--server-address` resolves to
//!    (`agent::retry` bounds the attempts; `agent::fallback` keeps the last
//!    good answer for an outage only).
//! 3. `server::grpc` (`kiam.KiamService`) finds the pod by IP in
//!    `server::pods` (a watch cache of `server::model::PodInfo`, confirmed
//!    or looked up in the API server when it may be stale).
//! 4. `server::policy` decides: the requested role must be the pod's
//!    annotated role and its namespace's `permitted` regex
//!    (`server::namespaces`) must allow it. An allowed decision carries the
//!    `server::model::Identity` it built; nothing else builds one.
//! 5. `server::credentials` answers from its cache or joins the one fetch
//!    in flight for that identity, which calls STS through `server::sts`.
//! 6. The answer goes back as a gRPC message; refusals carry kiam's status
//!    strings and, for our agents, the check that refused ([`wire`]), which
//!    `agent::metadata` maps to an HTTP status in one place.

// Lets the shared test support files (tests/support/*.rs), written against
// the `kiam` crate, be included by this crate's own unit tests too.
extern crate self as kiam;

pub mod agent;
pub mod arn;
pub mod certs;
pub mod cli;
pub mod explain;
pub mod grpc_metrics;
pub mod health;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod webhook;
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
