//! The client side (agent, `kiam health`): a reloading rustls `ClientConfig`
//! and a tonic connector that dials TCP, then handshakes verifying the
//! server against the host part of `--server-address` only.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use super::load::{CertInfo, Material};
use super::reload::Reloading;
use super::verify::{explain, explain_alert, ServerVerifier};
use super::{provider, Side, TlsError, TlsFiles, RELOAD_INTERVAL};
use crate::cli::ClientArgs;
use crate::telemetry::error_chain;

/// The I/O type [`TlsConnector`] hands to tonic.
pub type TlsStreamIo = TokioIo<ClientIo>;

/// A client TLS stream whose errors say what a server's alert means. With
/// TLS 1.3 the server judges our certificate after our side of the
/// handshake is done, so its refusal arrives on the first read, far from
/// the connector; without this, it surfaces as
/// "received fatal alert: CertificateExpired" deep inside a transport error.
pub struct ClientIo {
    inner: tokio_rustls::client::TlsStream<TcpStream>,
}

impl ClientIo {
    pub fn get_ref(&self) -> &tokio_rustls::client::TlsStream<TcpStream> {
        &self.inner
    }
}

fn clarify(e: io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => io::Error::new(
            e.kind(),
            format!(
                "the kiam server refused this client's certificate: {}",
                explain_alert(*alert)
            ),
        ),
        _ => e,
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_read(cx, buf)
            .map_err(clarify)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner)
            .poll_write(cx, buf)
            .map_err(clarify)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner)
            .poll_write_vectored(cx, bufs)
            .map_err(clarify)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(clarify)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx).map_err(clarify)
    }
}

/// HTTP/2 and connection settings for a channel to a kiam server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOpts {
    /// TCP connect plus TLS handshake (`--gateway-timeout-creation`).
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval (`--grpc-keepalive-time-duration`); `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is dropped
    /// (`--grpc-keepalive-timeout-duration`).
    pub keepalive_timeout: Duration,
    /// Ping even with no request in flight (`--grpc-keepalive-permit-without-stream`).
    pub keepalive_while_idle: bool,
    /// Deadline for each request on the channel, if any.
    pub request_timeout: Option<Duration>,
}

impl Default for ChannelOpts {
    fn default() -> Self {
        ChannelOpts {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(2),
            keepalive_while_idle: false,
            request_timeout: None,
        }
    }
}

impl From<&ClientArgs> for ChannelOpts {
    fn from(a: &ClientArgs) -> Self {
        ChannelOpts {
            connect_timeout: a.gateway_timeout_creation,
            keepalive_interval: (!a.grpc_keepalive_time_duration.is_zero())
                .then_some(a.grpc_keepalive_time_duration),
            keepalive_timeout: a.grpc_keepalive_timeout_duration,
            keepalive_while_idle: a.grpc_keepalive_permit_without_stream,
            request_timeout: None,
        }
    }
}

impl ChannelOpts {
    /// An endpoint for `uri` with these options applied.
    pub fn endpoint(&self, uri: Uri) -> Endpoint {
        let mut ep = Endpoint::from(uri)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(interval) = self.keepalive_interval {
            ep = ep
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(self.keepalive_timeout)
                .keep_alive_while_idle(self.keepalive_while_idle);
        }
        if let Some(t) = self.request_timeout {
            ep = ep.timeout(t);
        }
        ep
    }
}

/// Failure to open a channel; the message carries the whole cause chain
/// (tonic's own error only says "transport error").
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to kiam server {addr}: {detail}")]
pub struct ConnectError {
    pub addr: String,
    pub detail: String,
}

/// The agent's TLS: presents `--cert`, trusts `--ca`, checks the server's
/// name. Cheap to clone; the file poller runs until the last clone is dropped.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Reloading<ClientConfig>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("cert", &self.inner.info())
            .finish()
    }
}

impl ClientTls {
    /// Reads the files (errors name the flag) and registers
    /// `grpc_client_tls_certificate_{expiry_seconds,update_error,verify_error}`.
    /// Reloading starts if called inside a Tokio runtime.
    pub fn load(files: TlsFiles, registry: &mut Registry) -> Result<ClientTls, TlsError> {
        Self::load_with_interval(files, registry, RELOAD_INTERVAL)
    }

    /// [`ClientTls::load`] with a custom poll interval (tests use a short one).
    pub fn load_with_interval(
        files: TlsFiles,
        registry: &mut Registry,
        interval: Duration,
    ) -> Result<ClientTls, TlsError> {
        let inner = Reloading::load(Side::Client, files, build_client_config, registry, interval)?;
        Ok(ClientTls { inner })
    }

    /// The config new connections use right now.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.inner.config()
    }

    /// The certificate currently presented.
    pub fn cert_info(&self) -> CertInfo {
        self.inner.info()
    }

    /// Re-reads the files immediately (the poller does this every second).
    pub fn reload_now(&self) -> Result<bool, TlsError> {
        self.inner.reload_now()
    }

    /// A tonic connector that verifies servers as `server_name` (see
    /// [`server_name_of`]) and dials whatever address the endpoint URI
    /// names, so one connector serves every resolved server address.
    pub fn connector(&self, server_name: &str) -> Result<TlsConnector, TlsError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::ServerAddress {
                address: server_name.to_string(),
                reason: format!("not a DNS name or IP address: {e}"),
            })?;
        Ok(TlsConnector {
            tls: self.clone(),
            name,
        })
    }

    /// TCP connect to `addr` and a TLS handshake checking `server_name`.
    /// Errors explain the refusal (name mismatch with the SANs found,
    /// unknown CA, expiry, wrong usage).
    pub async fn handshake(
        &self,
        addr: SocketAddr,
        server_name: &ServerName<'static>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.config());
        connector
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let detail = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(r) => explain(Side::Server, r),
                    None => e.to_string(),
                };
                io::Error::new(
                    e.kind(),
                    format!(
                        "TLS handshake with {addr} as {:?} failed: {detail}",
                        server_name.to_str()
                    ),
                )
            })
    }

    /// Connects now to one server address, verifying it as `server_name`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        opts: &ChannelOpts,
    ) -> Result<Channel, ConnectError> {
        let connector = self.connector(server_name).map_err(|e| ConnectError {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?;
        opts.endpoint(uri_for(&addr.to_string()))
            .connect_with_connector(connector)
            .await
            .map_err(|e| ConnectError {
                addr: addr.to_string(),
                detail: error_chain(&e),
            })
    }

    /// Like [`ClientTls::connect`], but connects on first use and
    /// reconnects as needed.
    pub fn connect_lazy(
        &self,
        addr: SocketAddr,
        server_name: &str,
        opts: &ChannelOpts,
    ) -> Result<Channel, TlsError> {
        let connector = self.connector(server_name)?;
        Ok(opts
            .endpoint(uri_for(&addr.to_string()))
            .connect_with_connector_lazy(connector))
    }

    /// A lazy channel to `--server-address` as written (`host:port`,
    /// `[v6]:port`, `dns:///host:port`); the host is re-resolved on every
    /// (re)connect and its addresses tried in order. For `kiam health` and
    /// other one-server uses; the agent balances over addresses itself.
    pub fn channel(&self, server_address: &str, opts: &ChannelOpts) -> Result<Channel, TlsError> {
        let name = server_name_of(server_address)?;
        let authority = strip_scheme(server_address.trim());
        let uri = authority_uri(authority).map_err(|reason| TlsError::ServerAddress {
            address: server_address.to_string(),
            reason,
        })?;
        let connector = self.connector(&name)?;
        Ok(opts.endpoint(uri).connect_with_connector_lazy(connector))
    }
}

fn build_client_config(m: &Material) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = ServerVerifier {
        anchors: m.anchors.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn uri_for(authority: &str) -> Uri {
    // A SocketAddr's Display is always a valid authority.
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"))
}

fn authority_uri(authority: &str) -> Result<Uri, String> {
    let with_port = if has_port(authority) {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    Uri::builder()
        .scheme("http")
        .authority(with_port.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("not host:port: {e}"))
}

fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (host.starts_with('[') || !host.contains(':'))
        }
        None => false,
    }
}

/// Dials the endpoint's address, then handshakes with the fixed name.
#[derive(Clone)]
pub struct TlsConnector {
    tls: ClientTls,
    name: ServerName<'static>,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TlsStreamIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStreamIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let addrs = resolve(&uri).await?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{uri}: no addresses"));
            for addr in addrs {
                match tls.handshake(addr, &name).await {
                    Ok(inner) => return Ok(TokioIo::new(ClientIo { inner })),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

async fn resolve(uri: &Uri) -> io::Result<Vec<SocketAddr>> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}

fn strip_scheme(address: &str) -> &str {
    // gRPC target syntax: dns:[//authority/]host[:port]
    match address.strip_prefix("dns:") {
        Some(rest) => match rest.strip_prefix("//") {
            Some(r) => r.split_once('/').map(|(_, h)| h).unwrap_or(r),
            None => rest,
        },
        None => address,
    }
}

/// The TLS name of a `--server-address`: its host part only (kiam 3.0's
/// rule). Accepts `host:port`, `host`, `[v6]:port`, a bare IPv6 address and
/// gRPC's `dns:///host:port`. An IP host is checked against the
/// certificate's IP SANs, a name against its DNS SANs.
pub fn server_name_of(server_address: &str) -> Result<String, TlsError> {
    let bad = |reason: &str| TlsError::ServerAddress {
        address: server_address.to_string(),
        reason: reason.to_string(),
    };
    let a = strip_scheme(server_address.trim());
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split_once(']')
            .map(|(h, _)| h)
            .ok_or_else(|| bad("unclosed '['"))?
    } else if a.matches(':').count() > 1 {
        a // a bare IPv6 address
    } else {
        a.split_once(':').map(|(h, _)| h).unwrap_or(a)
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains(',') {
        return Err(bad(
            "one address at a time (split the comma-separated list first)",
        ));
    }
    ServerName::try_from(host.to_string())
        .map_err(|e| bad(&format!("host {host:?} is not a DNS name or IP: {e}")))?;
    Ok(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_the_host_part_only() {
        assert_eq!(server_name_of("kiam-server:443").unwrap(), "kiam-server");
        assert_eq!(server_name_of("kiam-server").unwrap(), "kiam-server");
        assert_eq!(
            server_name_of("dns:///kiam-server:443").unwrap(),
            "kiam-server"
        );
        assert_eq!(
            server_name_of("dns://8.8.8.8/kiam-server.kube-system:443").unwrap(),
            "kiam-server.kube-system"
        );
        assert_eq!(server_name_of("127.0.0.1:9610").unwrap(), "127.0.0.1");
        assert_eq!(server_name_of("[::1]:9610").unwrap(), "::1");
        assert_eq!(server_name_of("::1").unwrap(), "::1");
        assert!(server_name_of(":443").is_err());
        assert!(server_name_of("[::1:443").is_err());
        assert!(server_name_of("a,b:443").is_err());
    }

    #[test]
    fn authorities_get_a_port() {
        assert_eq!(authority_uri("kiam-server").unwrap().port_u16(), Some(443));
        assert_eq!(
            authority_uri("kiam-server:9610").unwrap().port_u16(),
            Some(9610)
        );
        assert_eq!(authority_uri("[::1]:9610").unwrap().host(), Some("[::1]"));
    }
}
