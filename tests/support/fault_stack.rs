//! A kiam server (the [`cluster`](super::cluster) fixture) with a real agent
//! in front of it, both in this process: the agent is `kiam::agent::run`
//! on 127.0.0.1:0 with the real server pool over mutual TLS. Pods get
//! loopback addresses (127.0.0.x) and [`http`] connects *from* those
//! addresses, so the agent identifies them by the TCP source as it does in
//! production — no `?ip=`.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiam::agent::client::{Pool, PoolConfig};
use kiam::agent::metadata::{Config, RouterContext};
use kiam::agent::metrics::Metrics;
use kiam::agent::proxy::Upstream;
use kiam::agent::server_address::{SystemResolver, Target};
use kiam::agent::TlsConnect;
use kiam::tls::ClientTls;
use prometheus_client::registry::Registry;
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use super::cluster::Cluster;

/// An agent answering on `addr` for the servers at `servers`.
pub struct Agent {
    pub addr: SocketAddr,
    pub state: Arc<RouterContext>,
    pub registry: Arc<Mutex<Registry>>,
    stop: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The pool settings `kiam agent` uses by default, for `servers`.
pub fn pool_config(servers: &[SocketAddr]) -> PoolConfig {
    PoolConfig {
        targets: servers
            .iter()
            .map(|s| Target {
                host: "127.0.0.1".into(),
                port: s.port(),
            })
            .collect(),
        connect_timeout: Duration::from_millis(500),
        attempt_timeout: Duration::from_millis(300),
        credentials_attempt_timeout: Duration::from_millis(450),
        keepalive_time: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(2),
        keepalive_while_idle: false,
        refresh_interval: Duration::from_secs(3600),
        failure_cooldown: Duration::from_secs(2),
        node: None,
    }
}

impl Agent {
    /// Starts an agent with `kiam agent`'s defaults (changed by `tweak`),
    /// trusting `cluster`'s CA and talking to `servers`.
    pub async fn start(
        cluster: &Cluster,
        servers: &[SocketAddr],
        tweak: impl FnOnce(&mut Config),
    ) -> Agent {
        let mut registry = Registry::default();
        let tls = ClientTls::load(cluster.pki.agent_files(), &mut registry).unwrap();
        let pool = Pool::new(
            pool_config(servers),
            Arc::new(TlsConnect(tls)),
            Arc::new(SystemResolver),
            kiam::grpc_metrics::GrpcMetrics::client(&mut registry),
        )
        .await;
        let mut config = Config::new(Regex::new("^$").unwrap());
        tweak(&mut config);
        // Nothing listens there: nothing is ever proxied in these tests.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = Upstream::new(
            &format!("http://{}", dead.local_addr().unwrap()),
            Duration::from_millis(200),
        )
        .unwrap();
        drop(dead);
        let metrics = Metrics::new(&mut registry);
        let state = RouterContext::new(config, Arc::new(pool), Arc::new(upstream), metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(kiam::agent::run(listener, state.clone(), stop.clone()));
        Agent {
            addr,
            state,
            registry: Arc::new(Mutex::new(registry)),
            stop,
        }
    }

    pub fn metrics(&self) -> String {
        kiam::telemetry::encode(&self.registry.lock().unwrap())
    }

    /// `GET path` from `pod` (a 127.0.0.x address), as an SDK does.
    pub async fn get(&self, pod: &str, path: &str) -> Reply {
        self.request(pod, "GET", path, &[]).await
    }

    pub async fn request(
        &self,
        pod: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        http(self.addr, pod.parse().unwrap(), req.as_bytes()).await
    }

    /// What an SDK does: list the role, then fetch its credentials. Returns
    /// (role, AccessKeyId) or what failed.
    pub async fn sdk_fetch(&self, pod: &str) -> Result<(String, String), String> {
        let list = self
            .get(pod, "/latest/meta-data/iam/security-credentials/")
            .await;
        if list.status != 200 {
            return Err(format!("role listing: {} {}", list.status, list.body));
        }
        let creds = self
            .get(
                pod,
                &format!("/latest/meta-data/iam/security-credentials/{}", list.body),
            )
            .await;
        if creds.status != 200 {
            return Err(format!("credentials: {} {}", creds.status, creds.body));
        }
        Ok((list.body, creds.access_key_id().unwrap_or_default()))
    }
}

/// An HTTP answer as read off the wire.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// 0 when there was no parsable answer (see `error`).
    pub status: u16,
    pub head: String,
    pub body: String,
    /// Set when the connection failed or timed out.
    pub error: Option<String>,
}

impl Reply {
    pub fn access_key_id(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["AccessKeyId"].as_str().map(str::to_string)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A TCP socket bound to `from` (any 127.0.0.0/8 address works on Linux).
pub async fn connect_from(
    to: SocketAddr,
    from: Ipv4Addr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// Sends `request` from `from` on a fresh connection and reads the answer
/// until the agent closes it. Gives up after 2 s (SDKs give up after ~1 s).
pub async fn http(to: SocketAddr, from: Ipv4Addr, request: &[u8]) -> Reply {
    let call = async {
        let mut s = connect_from(to, from).await?;
        s.write_all(request).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => {
            return Reply {
                error: Some(e.to_string()),
                ..Reply::default()
            }
        }
        Err(_) => {
            return Reply {
                error: Some("no answer within 2s".into()),
                ..Reply::default()
            }
        }
    };
    parse_reply(&raw)
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
        error: (status == 0).then(|| format!("unparsable answer: {text:?}")),
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `bound`;
/// returns the value and how long it took.
pub async fn until<T, F, Fut>(what: &str, bound: Duration, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A figure for docs/RELIABILITY.md: printed so `--nocapture` shows it.
pub fn report(scenario: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RELIABILITY {scenario}: {}", line.join(" "));
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
