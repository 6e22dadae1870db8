//! The server side: a reloading rustls `ServerConfig` and a stream of
//! handshaken connections for `tonic::transport::Server::serve_with_incoming*`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use super::load::{CertInfo, Material};
use super::reload::Reloading;
use super::verify::{explain, ClientVerifier};
use super::{provider, Side, TlsError, TlsFiles, RELOAD_INTERVAL};

/// A handshaken server connection. tonic implements `Connected` for it, so
/// handlers get `request.remote_addr()` and `request.peer_certs()`.
pub type TlsConn = tokio_rustls::server::TlsStream<TcpStream>;

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight at once; beyond this, accepting waits, so a flood of
/// idle sockets cannot exhaust memory.
const MAX_PENDING_HANDSHAKES: usize = 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The server's TLS: requires a client certificate signed by `--ca`, serves
/// `--cert`, speaks h2 only (ALPN). Cheap to clone; the file poller runs
/// until the last clone is dropped.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Reloading<ServerConfig>>,
    /// `kiam_tls_handshake_errors_total{reason}`: refused connections, so a
    /// misconfigured agent fleet shows up on a dashboard, not only in logs.
    handshake_errors: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.inner.info())
            .finish()
    }
}

impl ServerTls {
    /// Reads the files (errors name the flag) and registers
    /// `grpc_server_tls_certificate_{expiry_seconds,update_error,verify_error}`
    /// and `kiam_tls_handshake_errors_total`. Reloading starts if called
    /// inside a Tokio runtime.
    pub fn load(files: TlsFiles, registry: &mut Registry) -> Result<ServerTls, TlsError> {
        Self::load_with_interval(files, registry, RELOAD_INTERVAL)
    }

    /// [`ServerTls::load`] with a custom poll interval (tests use a short one).
    pub fn load_with_interval(
        files: TlsFiles,
        registry: &mut Registry,
        interval: Duration,
    ) -> Result<ServerTls, TlsError> {
        let inner = Reloading::load(Side::Server, files, build_server_config, registry, interval)?;
        let handshake_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "kiam_tls_handshake_errors",
            "TLS handshakes the server refused or that failed, by reason",
            handshake_errors.clone(),
        );
        Ok(ServerTls {
            inner,
            handshake_errors,
        })
    }

    /// The config new connections use right now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.config()
    }

    /// The certificate currently served.
    pub fn cert_info(&self) -> CertInfo {
        self.inner.info()
    }

    /// Re-reads the files immediately (the poller does this every second).
    pub fn reload_now(&self) -> Result<bool, TlsError> {
        self.inner.reload_now()
    }

    /// Handshakes one accepted connection with the current config.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsConn> {
        tokio_rustls::TlsAcceptor::from(self.config())
            .accept(tcp)
            .await
    }

    fn count(&self, reason: &'static str) {
        self.handshake_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

fn build_server_config(m: &Material) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = ClientVerifier::new(
        m.anchors.clone(),
        provider.signature_verification_algorithms,
    );
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections on `listener` and yields those whose TLS
/// handshake succeeds. Handshakes run concurrently, each bounded by
/// [`HANDSHAKE_TIMEOUT`], so a slow or hostile client never delays others;
/// refused ones are logged (one line naming the peer and the reason) and
/// skipped. Dropping the stream (as tonic does on shutdown) closes the
/// listener.
///
/// ```ignore
/// Server::builder().add_service(svc)
///     .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown.cancelled())
/// ```
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<TlsConn, io::Error>>(64);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of
                // spinning; the listener itself is still fine.
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(conn)) => {
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(e)) => refused(&tls, peer, &e),
                Err(_) => {
                    tls.count("timeout");
                    tracing::warn!(peer = %peer, "TLS handshake refused: client did not finish it within {HANDSHAKE_TIMEOUT:?}");
                }
            }
        });
    }
}

fn refused(tls: &ServerTls, peer: SocketAddr, e: &io::Error) {
    let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        // Not a TLS problem: the client went away (port scanners, probes
        // that only open TCP). Not worth more than debug.
        tls.count("io");
        tracing::debug!(peer = %peer, error = %e, "connection closed during TLS handshake");
        return;
    };
    tls.count(reason_of(rustls_err));
    tracing::warn!(peer = %peer, "TLS handshake refused: {}", explain(Side::Client, rustls_err));
}

fn reason_of(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "unknown_ca",
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "not_yet_valid"
        }
        rustls::Error::InvalidCertificate(_) => "bad_client_cert",
        rustls::Error::AlertReceived(_) => "client_refused_server_cert",
        _ => "protocol",
    }
}
