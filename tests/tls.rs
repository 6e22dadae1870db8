//! Mutual TLS between a tiny KiamService and a client, over the real
//! `kiam::tls` server stream and client connector on 127.0.0.1:0.

use std::error::Error as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use kiam::tls::{self, ChannelOpts, ClientTls, ServerTls, TlsFiles};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Answers GetHealth with the caller's address, proving `remote_addr` works.
struct Echo;

#[tonic::async_trait]
impl KiamService for Echo {
    async fn get_pod_role(&self, r: Request<GetPodRoleRequest>) -> Result<Response<Role>, Status> {
        Ok(Response::new(Role {
            name: format!("role-for-{}", r.into_inner().ip),
        }))
    }

    async fn get_pod_credentials(
        &self,
        _: Request<GetPodCredentialsRequest>,
    ) -> Result<Response<Credentials>, Status> {
        Err(Status::permission_denied("forbidden by policy"))
    }

    async fn get_health(
        &self,
        r: Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        let peer = r
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        Ok(Response::new(HealthStatus {
            message: format!("ok from {peer}"),
        }))
    }
}

struct TestServer {
    addr: SocketAddr,
    tls: ServerTls,
    registry: Registry,
    stop: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start_server(files: TlsFiles) -> TestServer {
    let mut registry = Registry::default();
    let tls = ServerTls::load_with_interval(files, &mut registry, Duration::from_millis(100))
        .expect("server tls loads");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let incoming = tls::incoming(listener, tls.clone());
    let signal = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(KiamServiceServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, signal)
            .await
            .expect("server runs");
    });
    TestServer {
        addr,
        tls,
        registry,
        stop,
    }
}

fn client(files: TlsFiles) -> ClientTls {
    ClientTls::load_with_interval(files, &mut Registry::default(), Duration::from_millis(100))
        .expect("client tls loads")
}

async fn health(client: &ClientTls, addr: SocketAddr, name: &str) -> Result<String, String> {
    let channel = client
        .connect(addr, name, &ChannelOpts::default())
        .await
        .map_err(|e| e.to_string())?;
    let reply = KiamServiceClient::new(channel)
        .get_health(GetHealthRequest {})
        .await
        .map_err(|s| {
            format!(
                "{s}: {}",
                s.source().map(tls::error_chain).unwrap_or_default()
            )
        })?;
    Ok(reply.into_inner().message)
}

fn pki(dir: &Path) -> kiam::certs::Pki {
    kiam::certs::generate(dir, &[], 30).expect("kiam certs generates")
}

#[tokio::test]
async fn mtls_works_with_kiam_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;
    let agent = client(pki.agent_files());
    let msg = health(&agent, server.addr, "kiam-server")
        .await
        .expect("health over mTLS");
    assert!(msg.starts_with("ok from 127.0.0.1:"), "{msg}");
    let msg = health(&agent, server.addr, "127.0.0.1")
        .await
        .expect("IP SAN works");
    assert!(msg.starts_with("ok from"), "{msg}");
}
