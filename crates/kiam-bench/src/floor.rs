//! The floors: the least a server on this machine can do for the same
//! exchange. Each is measured in the same run, with the same load generator,
//! as the kiam figure it bounds.
//!
//! - [`http_floor`]: a hyper HTTP/1 server answering every request with fixed
//!   bytes (the agent's JSON answer), on the same connection settings as the
//!   agent.
//! - [`grpc_floor`]: a tonic `KiamService` answering `GetPodCredentials` with
//!   a fixed message, over the same mutual TLS acceptor as `kiam server`.
//! - [`hop_floor`]: the HTTP floor asking the gRPC floor once per request —
//!   the least any agent can do that asks a server on every request, which
//!   is what kiam's design (the server decides per request) requires.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use kiam::tls::ServerTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Serves `body` as `application/json` to every request until `stop`.
pub async fn http_floor(body: Bytes, stop: CancellationToken) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header(http::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(body))
                                .expect("static response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A `KiamService` that answers from constants.
#[derive(Clone)]
struct Fixed {
    creds: Arc<Credentials>,
}

#[tonic::async_trait]
impl KiamService for Fixed {
    async fn get_pod_role(&self, _: Request<GetPodRoleRequest>) -> Result<Response<Role>, Status> {
        Ok(Response::new(Role {
            name: "role".into(),
            ..Default::default()
        }))
    }

    async fn get_pod_credentials(
        &self,
        _: Request<GetPodCredentialsRequest>,
    ) -> Result<Response<Credentials>, Status> {
        Ok(Response::new((*self.creds).clone()))
    }

    async fn get_health(
        &self,
        _: Request<GetHealthRequest>,
    ) -> Result<Response<HealthStatus>, Status> {
        Ok(Response::new(HealthStatus {
            message: "ok".into(),
        }))
    }
    async fn explain(
        &self,
        _: Request<kiam::proto::ExplainRequest>,
    ) -> Result<Response<kiam::proto::Explanation>, Status> {
        Err(Status::unimplemented("explain"))
    }
    async fn get_token_credentials(
        &self,
        _: tonic::Request<kiam::proto::GetTokenCredentialsRequest>,
    ) -> Result<tonic::Response<kiam::proto::TokenCredentials>, tonic::Status> {
        Err(tonic::Status::unimplemented("token credentials"))
    }
}

/// Serves `creds` to every GetPodCredentials over mutual TLS (`tls`, the
/// server certificate kiam uses) with kiam's transport settings.
pub async fn grpc_floor(
    creds: Credentials,
    tls: ServerTls,
    stop: CancellationToken,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = KiamServiceServer::new(Fixed {
        creds: Arc::new(creds),
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming_shutdown(
                kiam::tls::incoming(listener, tls),
                stop.cancelled_owned(),
            )
            .await;
    });
    Ok(addr)
}

/// An HTTP server that, per request, calls GetPodCredentials on `upstream`
/// and answers with `body`.
pub async fn hop_floor(
    body: Bytes,
    upstream: Channel,
    stop: CancellationToken,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let client = KiamServiceClient::new(upstream.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    let body = body.clone();
                    let mut client = client.clone();
                    async move {
                        let status = match client
                            .get_pod_credentials(GetPodCredentialsRequest {
                                ip: "127.1.0.1".into(),
                                role: "role".into(),
                            })
                            .await
                        {
                            Ok(_) => http::StatusCode::OK,
                            Err(_) => http::StatusCode::BAD_GATEWAY,
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .header(http::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(body))
                                .expect("static response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
