//! Go kiam (github.com/uswitch/kiam, built by `scripts/peers.sh kiam-go`)
//! as a test peer, and the one thing it needs that ours does not: its AWS
//! SDK (Go, v1) has no setting for a custom STS endpoint, so its STS calls
//! are sent through [`StsProxy`], an HTTPS proxy that answers the CONNECT to
//! `sts.amazonaws.com` itself, with a certificate from a CA of its own
//! (handed to the SDK as `AWS_CA_BUNDLE`), and passes the requests on to
//! moto. Nothing leaves loopback.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Go kiam binary from `KIAM_GO_BIN`, or `None` after a loud SKIPPED
/// line when it is unset (scripts/test.sh sets it when the peer builds).
pub fn go_kiam_bin() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("KIAM_GO_BIN").filter(|p| !p.is_empty()) else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: KIAM_GO_BIN is not set (scripts/test.sh sets it from \
             `scripts/peers.sh kiam-go`); nothing was tested against Go kiam ***\n"
        );
        return None;
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "KIAM_GO_BIN={} is not a file",
        path.display()
    );
    Some(path)
}

/// `kiam server` of Go kiam against `kubeconfig`, TLS files from `certs`
/// (`kiam certs` layout), gRPC on 127.0.0.1:`port`, STS through `sts`.
pub fn go_server_cmd(
    bin: &Path,
    kubeconfig: &Path,
    certs: &Path,
    port: u16,
    sts: &StsProxy,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin);
    kiam_sandbox::procs::server_args(&mut cmd, kubeconfig, certs)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--level", "debug"])
        .args(extra);
    sts.env(&mut cmd);
    cmd
}

/// `kiam agent` of Go kiam on 127.0.0.1:`port` asking the server at
/// `server` (host:port), with `?ip=` lookups allowed and no iptables.
pub fn go_agent_cmd(bin: &Path, certs: &Path, port: u16, server: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .args(["--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--server-address", server])
        .args(["--allow-ip-query", "--level", "debug"]);
    kiam_sandbox::procs::tls_args(&mut cmd, certs, "agent");
    cmd
}

/// Go kiam's flags for `role`, read from its `--help` (kingpin prints one
/// per line, two spaces in): (name, value) where value is `None` for a
/// boolean and otherwise its default, or the placeholder of a flag that has
/// none (`--host=HOST`).
pub fn go_flags(bin: &Path, role: &str) -> Vec<(String, Option<String>)> {
    let out = std::process::Command::new(bin)
        .args([role, "--help"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut flags = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("  --") else {
            continue;
        };
        let word = rest.split_whitespace().next().unwrap_or_default();
        let (name, value) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v.trim_matches('"').to_string())),
            None => (word, None),
        };
        if name != "help" {
            flags.push((name.to_string(), value));
        }
    }
    assert!(
        flags.len() > 10,
        "too few flags in Go kiam's {role} --help:\n{text}"
    );
    flags
}

/// An HTTPS proxy on loopback that terminates every CONNECT with a
/// certificate for `sts.amazonaws.com` and forwards the plain HTTP inside to
/// moto. Stops with the runtime that started it.
pub struct StsProxy {
    pub port: u16,
    ca_bundle: PathBuf,
    _dir: tempfile::TempDir,
}

impl StsProxy {
    /// Proxies to the moto at `moto_url` (`http://127.0.0.1:<port>`).
    pub async fn start(moto_url: &str) -> StsProxy {
        let moto = moto_url
            .strip_prefix("http://")
            .expect("moto's URL is http://host:port")
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        let ca = kiam::certs::Ca::generate(
            "sts-proxy-ca",
            time::OffsetDateTime::now_utc() - time::Duration::hours(1),
            time::OffsetDateTime::now_utc() + time::Duration::days(1),
        )
        .unwrap();
        let leaf = ca
            .issue(&kiam::certs::LeafSpec::server(&["sts.amazonaws.com".to_string()], 1).unwrap())
            .unwrap();
        let ca_bundle = dir.path().join("ca.pem");
        std::fs::write(&ca_bundle, ca.cert_pem()).unwrap();

        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (acceptor, moto) = (acceptor.clone(), moto.clone());
                tokio::spawn(async move {
                    if let Err(e) = tunnel(conn, acceptor, &moto).await {
                        eprintln!("sts proxy: {e}");
                    }
                });
            }
        });
        StsProxy {
            port,
            ca_bundle,
            _dir: dir,
        }
    }

    /// Fake credentials, the proxy and its CA for a Go kiam server.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CA_BUNDLE", &self.ca_bundle)
            .env("HTTPS_PROXY", format!("http://127.0.0.1:{}", self.port))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("no_proxy");
    }
}

/// One proxied connection: CONNECT, TLS as sts.amazonaws.com, bytes to moto.
async fn tunnel(
    mut conn: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    moto: &str,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 || head.len() > 8192 {
            return Err(std::io::Error::other("no CONNECT request"));
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    if !line.starts_with("CONNECT sts.amazonaws.com:443 ") {
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await?;
        return Err(std::io::Error::other(format!(
            "refused {:?}",
            line.lines().next()
        )));
    }
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let mut tls = acceptor.accept(conn).await?;
    let mut upstream = tokio::net::TcpStream::connect(moto).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut upstream).await?;
    Ok(())
}
