//! Plain server-authenticated HTTPS (no client certificate), for `kiam
//! webhook`: the API server calls admission webhooks without one. Same
//! reloading as the gRPC side, so a renewed cert-manager Secret is served
//! without a restart; `--ca` is still read, to warn when the certificate
//! does not chain to the CA the webhook configuration's caBundle holds.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls::ServerConfig;

use super::load::{CertInfo, Material};
use super::reload::Reloading;
use super::{provider, Side, TlsError, TlsFiles, RELOAD_INTERVAL};

/// A reloading rustls config that asks for no client certificate and speaks
/// h2 and http/1.1. Cheap to clone; the poller stops with the last clone.
#[derive(Clone)]
pub struct HttpsTls {
    inner: Arc<Reloading<ServerConfig>>,
}

impl std::fmt::Debug for HttpsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsTls")
            .field("cert", &self.inner.info())
            .finish()
    }
}

impl HttpsTls {
    /// Reads the files (errors name the flag) and registers
    /// `grpc_server_tls_certificate_{expiry_seconds,update_error,verify_error}`.
    pub fn load(files: TlsFiles, registry: &mut Registry) -> Result<HttpsTls, TlsError> {
        Self::load_with_interval(files, registry, RELOAD_INTERVAL)
    }

    /// [`HttpsTls::load`] with a custom poll interval (tests use a short one).
    pub fn load_with_interval(
        files: TlsFiles,
        registry: &mut Registry,
        interval: Duration,
    ) -> Result<HttpsTls, TlsError> {
        let inner = Reloading::load(Side::Server, files, build, registry, interval)?;
        Ok(HttpsTls { inner })
    }

    /// The config new connections use right now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.config()
    }

    /// The certificate currently served.
    pub fn cert_info(&self) -> CertInfo {
        self.inner.info()
    }
}

fn build(m: &Material) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
