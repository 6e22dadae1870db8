//! Mutual TLS for both roles; the only place certificates are read.
//!
//! Unlike tonic's built-in TLS, the rustls configs here are rebuilt whenever
//! `--cert`, `--key` or `--ca` change on disk, so new connections use rotated
//! certificates without a restart (established connections keep the
//! certificates they were opened with). The files are polled by content, and
//! every poll opens the paths afresh, so Kubernetes' secret volumes — where
//! `tls.crt -> ..data/tls.crt` and the `..data` symlink is swapped atomically
//! — are followed like a plain rename. A broken new file never replaces a
//! working config: the old one stays in use and the error is logged and
//! exported (`grpc_{server,client}_tls_certificate_update_error`).
//!
//! - [`ServerTls`] + [`incoming`]: the server side; client certificates are
//!   required and must chain to `--ca`.
//! - [`HttpsTls`]: `kiam webhook`'s HTTPS, no client certificate.
//! - [`ClientTls`]: the agent and `kiam health`; the server certificate is
//!   verified against `--ca` and the host part of `--server-address` only
//!   (kiam 3.0's rule), see [`server_name_of`].
//!
//! Extended key usage: `serverAuth` (server) / `clientAuth` (agent) are
//! required when the certificate lists usages at all; `anyExtendedKeyUsage`
//! (cert-manager's `usages: [any]`, which kiam's own docs used) is accepted
//! as Go's crypto/x509 does.
//!
//! Only the ring provider is used, passed explicitly to every config, so no
//! process-wide default provider has to be installed.

mod client;
mod https;
mod load;
mod reload;
mod server;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use client::{
    server_name_of, ChannelOpts, ClientIo, ClientTls, ConnectError, TlsConnector, TlsStreamIo,
};
pub use https::HttpsTls;
pub use load::CertInfo;
pub use server::{incoming, ServerTls, TlsConn, HANDSHAKE_TIMEOUT};

use crate::cli::TlsArgs;

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The three PEM files a role reads. Paths, not contents: they are re-read
/// whenever they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `--cert`: the certificate (chain) this side presents, leaf first.
    pub cert: PathBuf,
    /// `--key`: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `--ca`: the CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        TlsFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
        }
    }
}

impl From<&TlsArgs> for TlsFiles {
    fn from(args: &TlsArgs) -> Self {
        TlsFiles {
            cert: args.cert.clone(),
            key: args.key.clone(),
            ca: args.ca.clone(),
        }
    }
}

/// Why certificate files could not be used. Every message names the flag
/// and the path to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: no such file", path.display())]
    NotFound { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: cannot read: {reason}", path.display())]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag} {}: not a PEM certificate{hint}", path.display())]
    NoCertificate {
        flag: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("--key {}: no private key found{hint}", path.display())]
    NoKey { path: PathBuf, hint: &'static str },
    #[error("{flag} {}: bad PEM: {reason}", path.display())]
    BadPem {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag} {}: {reason}", path.display())]
    BadCertificate {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--key {}: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("--key {} does not belong to the certificate in --cert {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("--server-address {address:?}: {reason}")]
    ServerAddress { address: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Which side of the connection a config is for; decides the required
/// extended key usage and the metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Server,
    Client,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// The ring provider, passed explicitly to every config.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
