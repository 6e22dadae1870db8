//! Mutual TLS between a tiny KiamService and a client, over the real
//! `kiam::tls` server stream and client connector on 127.0.0.1:0, with
//! certificates from `kiam certs`, the openssl CLI and cert-manager's file
//! layout; refusals; and rotation on disk while requests flow.

use std::error::Error as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kiam::certs::{self, Ca, Issued, LeafSpec, Usage};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::kiam_service_server::{KiamService, KiamServiceServer};
use kiam::proto::{
    Credentials, GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest, HealthStatus, Role,
};
use kiam::tls::{self, ChannelOpts, ClientTls, ServerTls, TlsFiles};
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

// ---------------------------------------------------------------- fixtures

/// Answers GetHealth with the caller's address, proving `remote_addr` works.
struct Echo;

#[tonic::async_trait]
impl KiamService for Echo {
    async fn get_pod_role(&self, r: Request<GetPodRoleRequest>) -> Result<Response<Role>, Status> {
        Ok(Response::new(Role {
            name: format!("role-for-{}", r.into_inner().ip),
            ..Default::default()
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
        let peer = r.remote_addr().map(|a| a.to_string());
        let has_cert = r.peer_certs().is_some_and(|c| !c.is_empty());
        Ok(Response::new(HealthStatus {
            message: format!(
                "ok from {} (client cert: {has_cert})",
                peer.unwrap_or_default()
            ),
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

impl TestServer {
    fn metrics(&self) -> String {
        kiam::telemetry::encode(&self.registry)
    }

    /// Refused handshakes counted under `reason`.
    fn refused(&self, reason: &str) -> u64 {
        metric(
            &self.metrics(),
            &format!("kiam_tls_handshake_errors_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    }
}

const FAST: Duration = Duration::from_millis(50);

async fn start_server(files: TlsFiles) -> TestServer {
    capture_logs();
    let mut registry = Registry::default();
    let tls = ServerTls::load_with_interval(files, &mut registry, FAST).expect("server tls loads");
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
    ClientTls::load_with_interval(files, &mut Registry::default(), FAST).expect("client tls loads")
}

/// One GetHealth on a new connection; errors flattened to one line.
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
                s.source()
                    .map(kiam::telemetry::error_chain)
                    .unwrap_or_default()
            )
        })?;
    Ok(reply.into_inner().message)
}

fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse::<f64>().ok()))
        .flatten()
        .map(|v| v as u64)
}

/// All log output of this test binary, so refusals can be checked for a
/// clear line. Installed once; every test's runtime logs into it.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// The log line mentioning `needle` (a peer address, a path), if any.
fn log_line(needle: &str) -> Option<String> {
    let logs = logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .find(|l| l.contains(needle))
        .map(str::to_string)
}

/// Waits (bounded) for something the poller does in the background.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}

fn pki(dir: &Path) -> certs::Pki {
    certs::generate(dir, &[], 30).expect("kiam certs generates")
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

/// Writes an issued pair as `<name>.pem`/`<name>-key.pem` and returns
/// the files with `ca` as `--ca`.
fn files_for(dir: &Path, name: &str, issued: &Issued, ca: &Path) -> TlsFiles {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    write(&cert, &issued.cert_pem);
    write(&key, &issued.key_pem);
    TlsFiles::new(cert, key, ca)
}

fn x509(pem_path: &Path) -> Vec<u8> {
    let pem = std::fs::read(pem_path).unwrap();
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    der.to_vec()
}

/// Runs `openssl` with `cmd` split on whitespace (no argument has spaces).
fn openssl(dir: &Path, cmd: &str) {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------- kiam certs

#[test]
fn kiam_certs_chain_verifies_with_openssl_and_has_the_right_names_and_usages() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate(
        dir.path(),
        &["kiam-server.kube-system".into(), "10.1.2.3".into()],
        30,
    )
    .unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "server.pem", "agent.pem"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // openssl also checks the purposes match the usages.
    for (cert, purpose) in [("server.pem", "sslserver"), ("agent.pem", "sslclient")] {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile", "ca.pem", cert])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cert}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let ca_der = x509(&pki.path(certs::CA_CERT));
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());

    let server_der = x509(&pki.path(certs::SERVER_CERT));
    let (_, server) = X509Certificate::from_der(&server_der).unwrap();
    let sans: Vec<String> = server
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(ip) => format!("{:?}", ip),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sans,
        [
            "kiam-server",
            "localhost",
            "[127, 0, 0, 1]",
            "kiam-server.kube-system",
            "[10, 1, 2, 3]"
        ]
    );
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    // clientAuth too, so Go kiam's `kiam health --cert=server.pem` probes work.
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    assert!(!server.is_ca());

    let agent_der = x509(&pki.path(certs::AGENT_CERT));
    let (_, agent) = X509Certificate::from_der(&agent_der).unwrap();
    let eku = agent.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    assert_eq!(agent.subject().to_string(), "CN=agent");

    for (name, mode) in [
        (certs::CA_KEY, 0o600),
        (certs::SERVER_KEY, 0o600),
        (certs::AGENT_KEY, 0o600),
        (certs::CA_CERT, 0o644),
        (certs::SERVER_CERT, 0o644),
        (certs::AGENT_CERT, 0o644),
    ] {
        let m = std::fs::metadata(pki.path(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{name}");
    }
}

#[test]
fn kiam_certs_refuses_to_overwrite_and_reissues_leaves_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let args = |extra: &[&str]| {
        use clap::Parser;
        let mut argv = vec!["kiam", "certs", "--out-dir", dir.path().to_str().unwrap()];
        argv.extend_from_slice(extra);
        match kiam::cli::Cli::try_parse_from(argv).unwrap().command {
            kiam::cli::Command::Certs(a) => a,
            _ => unreachable!(),
        }
    };
    certs::run(&args(&[])).unwrap();
    let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let server_before = std::fs::read(dir.path().join("server.pem")).unwrap();

    // Rerunning the same command keeps the set (docs/TLS.md's steps can be
    // run again); a --host the set lacks is refused, naming --reissue.
    certs::run(&args(&[])).unwrap();
    certs::run(&args(&["--print-secrets"])).unwrap();
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    assert_eq!(
        std::fs::read(dir.path().join("server.pem")).unwrap(),
        server_before
    );
    let err = certs::run(&args(&["--host", "new.example"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.pem") && err.contains("new.example") && err.contains("--reissue"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);

    certs::run(&args(&["--reissue", "--host", "extra.example,10.9.9.9"])).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        ca_before,
        "CA kept"
    );
    let server_after = std::fs::read(dir.path().join("server.pem")).unwrap();
    assert_ne!(server_after, server_before);
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "server.pem", "agent.pem"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-ext",
                "subjectAltName",
                "-in",
                "server.pem",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains("DNS:extra.example") && text.contains("IP Address:10.9.9.9"),
        "{text}"
    );

    // --reissue without --host keeps the names given earlier.
    certs::run(&args(&["--reissue"])).unwrap();
    let kept = certs::server_names(&dir.path().join("server.pem")).unwrap();
    for name in [
        "kiam-server",
        "localhost",
        "127.0.0.1",
        "extra.example",
        "10.9.9.9",
    ] {
        assert!(kept.iter().any(|n| n == name), "{name} kept: {kept:?}");
    }
    // And refuses when it cannot read them, rather than dropping them.
    std::fs::write(dir.path().join("server.pem"), "garbage").unwrap();
    let err = certs::run(&args(&["--reissue"])).unwrap_err().to_string();
    assert!(
        err.contains("server.pem") && err.contains("--host"),
        "{err}"
    );
    certs::run(&args(&["--reissue", "--host", "extra.example"])).unwrap();

    // An incomplete set is refused with nothing written.
    std::fs::remove_file(dir.path().join("agent.pem")).unwrap();
    let err = certs::run(&args(&[])).unwrap_err().to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(!dir.path().join("agent.pem").exists());

    certs::run(&args(&["--force"])).unwrap();
    assert_ne!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        ca_before,
        "--force replaces the CA"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let err = certs::run(&args(&["--host", "not a host!"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--host"), "{err}");
}

#[test]
fn kiam_certs_prints_two_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let yaml = certs::secrets_yaml(&pki.dir, "kiam").unwrap();
    let docs: Vec<&str> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert_eq!(docs.len(), 2);
    assert!(docs[0].contains("name: kiam-server-tls") && docs[0].contains("namespace: kiam"));
    assert!(docs[1].contains("name: kiam-agent-tls"));
    use base64::Engine;
    let b64 = docs[0]
        .lines()
        .find_map(|l| l.strip_prefix("  server-key.pem: "))
        .expect("server-key.pem in kiam-server-tls");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(decoded, std::fs::read(pki.path(certs::SERVER_KEY)).unwrap());
    assert!(docs[1].contains("  agent.pem: ") && docs[1].contains("  ca.pem: "));
    assert!(!docs[1].contains("server"));
}

// ------------------------------------------------------------ mTLS works

#[tokio::test]
async fn mtls_works_with_kiam_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;
    let agent = client(pki.agent_files());
    let msg = health(&agent, server.addr, "kiam-server")
        .await
        .expect("health over mTLS");
    assert!(
        msg.starts_with("ok from 127.0.0.1:") && msg.contains("client cert: true"),
        "{msg}"
    );
    let msg = health(&agent, server.addr, "127.0.0.1")
        .await
        .expect("IP SAN works");
    assert!(msg.starts_with("ok from"), "{msg}");

    // The lazy channel by --server-address, as `kiam health` uses it.
    let channel = agent
        .channel(
            &format!("dns:///localhost:{}", server.addr.port()),
            &ChannelOpts::default(),
        )
        .unwrap();
    let role = KiamServiceClient::new(channel)
        .get_pod_role(GetPodRoleRequest {
            ip: "10.0.0.1".into(),
        })
        .await
        .expect("GetPodRole over the lazy channel");
    assert_eq!(role.into_inner().name, "role-for-10.0.0.1");
}

/// A CA and leaves made with the openssl CLI: RSA with a PKCS#1 key for
/// the server, EC with a SEC1 key (after an EC PARAMETERS block) for the agent.
fn openssl_pki(dir: &Path, server_eku: &str, agent_eku: &str) {
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=openssl-ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    openssl(dir, "genrsa -traditional -out server.key 2048");
    openssl(dir, "ecparam -name prime256v1 -genkey -out agent.key");
    write(
        &dir.join("server.ext"),
        &format!(
            "subjectAltName=DNS:kiam-server,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={server_eku}\n"
        ),
    );
    write(
        &dir.join("agent.ext"),
        &format!("extendedKeyUsage={agent_eku}\n"),
    );
    for (who, cn, serial) in [("server", "kiam-server", 1001), ("agent", "agent", 1002)] {
        openssl(
            dir,
            &format!("req -new -key {who}.key -subj /CN={cn} -out {who}.csr"),
        );
        openssl(
            dir,
            &format!(
                "x509 -req -in {who}.csr -CA ca.crt -CAkey ca.key -set_serial {serial} -days 30 \
                 -extfile {who}.ext -out {who}.crt"
            ),
        );
    }
}

#[tokio::test]
async fn mtls_works_with_openssl_made_certs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl_pki(d, "serverAuth", "clientAuth");
    assert!(std::fs::read_to_string(d.join("server.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    assert!(std::fs::read_to_string(d.join("agent.key"))
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    let server = start_server(TlsFiles::new(
        d.join("server.crt"),
        d.join("server.key"),
        d.join("ca.crt"),
    ))
    .await;
    let agent = client(TlsFiles::new(
        d.join("agent.crt"),
        d.join("agent.key"),
        d.join("ca.crt"),
    ));
    let msg = health(&agent, server.addr, "kiam-server")
        .await
        .expect("openssl certs work");
    assert!(msg.contains("client cert: true"), "{msg}");
}

/// cert-manager's Secret keys (`tls.crt`, `tls.key`, `ca.crt`), mounted
/// as Kubernetes does (`..data` symlink), with kiam's documented
/// `usages: [any]` (anyExtendedKeyUsage) and PKCS#1 keys.
#[tokio::test]
async fn mtls_works_with_cert_manager_secrets_and_usage_any() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    openssl_pki(&src, "anyExtendedKeyUsage", "anyExtendedKeyUsage");
    let mount = |name: &str, who: &str| {
        let vol = dir.path().join(name);
        let data = vol.join("..2026_01_01_00_00_00.000000001");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(src.join(format!("{who}.crt")), data.join("tls.crt")).unwrap();
        std::fs::copy(src.join(format!("{who}.key")), data.join("tls.key")).unwrap();
        std::fs::copy(src.join("ca.crt"), data.join("ca.crt")).unwrap();
        std::os::unix::fs::symlink("..2026_01_01_00_00_00.000000001", vol.join("..data")).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), vol.join(f)).unwrap();
        }
        TlsFiles::new(vol.join("tls.crt"), vol.join("tls.key"), vol.join("ca.crt"))
    };
    let server = start_server(mount("server-tls", "server")).await;
    let agent = client(mount("agent-tls", "agent"));
    let msg = health(&agent, server.addr, "kiam-server")
        .await
        .expect("cert-manager layout works");
    assert!(msg.contains("client cert: true"), "{msg}");
    assert_eq!(
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_verify_error"
        ),
        Some(0)
    );
}

// --------------------------------------------------------------- refused

#[tokio::test]
async fn client_without_a_certificate_is_refused_with_a_clear_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;

    // A client that trusts the CA but has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(x509(&pki.path(certs::CA_CERT)).into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let result = async {
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("kiam-server").unwrap(), tcp)
            .await?;
        // TLS 1.3: the server's verdict arrives after the client finishes.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        s.read(&mut buf).await
    }
    .await;
    assert!(
        result.is_err() || result.as_ref().is_ok_and(|n| *n == 0),
        "{result:?}"
    );
    eventually("the refusal to be counted", || {
        server.refused("no_client_cert") == 1
    })
    .await;
    let line = log_line(&local.to_string()).expect("a log line naming the peer");
    assert!(line.contains("client presented no certificate"), "{line}");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;

    let other_dir = tempfile::tempdir().unwrap();
    let other = certs::generate(other_dir.path(), &[], 30).unwrap();
    // The rogue agent trusts our server's CA but has a cert from its own CA.
    let mut files = other.agent_files();
    files.ca = pki.path(certs::CA_CERT);
    let rogue = client(files);
    let err = health(&rogue, server.addr, "kiam-server")
        .await
        .expect_err("refused");
    eventually("the refusal to be counted", || {
        server.refused("unknown_ca") == 1
    })
    .await;
    let line =
        log_line("TLS handshake refused: client certificate is not signed").expect("a log line");
    assert!(
        line.contains("TLS handshake refused: client certificate is not signed by --ca"),
        "{line}"
    );
    // The agent learns why too, as far as the alert tells it.
    assert!(
        err.contains("refused this client's certificate: it does not trust the CA"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificates_are_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::generate("test-ca", now() - days(100), now() + days(100)).unwrap();
    let ca_path = d.join("ca.pem");
    write(&ca_path, ca.cert_pem());
    let mut expired_agent = LeafSpec::agent(1).unwrap();
    expired_agent.not_before = now() - days(60);
    expired_agent.not_after = now() - days(30);
    let mut expired_server = LeafSpec::server(&[], 1).unwrap();
    expired_server.not_before = now() - days(60);
    expired_server.not_after = now() - days(30);
    let good_server = files_for(
        d,
        "server",
        &ca.issue(&LeafSpec::server(&[], 30).unwrap()).unwrap(),
        &ca_path,
    );
    let good_agent = files_for(
        d,
        "agent",
        &ca.issue(&LeafSpec::agent(30).unwrap()).unwrap(),
        &ca_path,
    );
    let old_server = files_for(
        d,
        "old-server",
        &ca.issue(&expired_server).unwrap(),
        &ca_path,
    );
    let old_agent = files_for(d, "old-agent", &ca.issue(&expired_agent).unwrap(), &ca_path);

    // Expired agent certificate: the server refuses and says so.
    let server = start_server(good_server).await;
    let err = health(&client(old_agent), server.addr, "kiam-server")
        .await
        .expect_err("refused");
    eventually("the refusal to be counted", || {
        server.refused("expired") == 1
    })
    .await;
    assert!(
        err.contains("refused this client's certificate: it says --cert has expired"),
        "{err}"
    );

    // Expired server certificate: the agent refuses and says so; the
    // server's own gauge already flagged it at load.
    let server = start_server(old_server).await;
    assert_eq!(
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_verify_error"
        ),
        Some(1)
    );
    let err = health(&client(good_agent), server.addr, "kiam-server")
        .await
        .expect_err("refused");
    assert!(err.contains("server certificate expired at"), "{err}");
}

#[tokio::test]
async fn server_certificate_without_the_host_is_refused_naming_host_and_sans() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;
    let agent = client(pki.agent_files());
    let err = health(&agent, server.addr, "kiam-server.kube-system.svc")
        .await
        .expect_err("name mismatch refused");
    assert!(
        err.contains("not valid for \"kiam-server.kube-system.svc\"")
            && err.contains("DNS:kiam-server, DNS:localhost, IP:127.0.0.1"),
        "{err}"
    );
    let err = health(&agent, server.addr, "10.0.0.7")
        .await
        .expect_err("IP mismatch refused");
    assert!(err.contains("\"10.0.0.7\""), "{err}");
}

#[tokio::test]
async fn agent_certificate_used_as_the_server_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::generate("test-ca", now() - days(1), now() + days(100)).unwrap();
    let ca_path = d.join("ca.pem");
    write(&ca_path, ca.cert_pem());
    // clientAuth-only, but with the right names, so only the usage is wrong.
    let mut spec = LeafSpec::server(&[], 30).unwrap();
    spec.usage = Usage::Agent;
    let wrong = files_for(d, "server", &ca.issue(&spec).unwrap(), &ca_path);
    let agent = files_for(
        d,
        "agent",
        &ca.issue(&LeafSpec::agent(30).unwrap()).unwrap(),
        &ca_path,
    );
    let server = start_server(wrong).await;
    assert_eq!(
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_verify_error"
        ),
        Some(1)
    );
    let err = health(&client(agent), server.addr, "kiam-server")
        .await
        .expect_err("refused");
    assert!(
        err.contains("lacks serverAuth") && err.contains("agent certificate"),
        "{err}"
    );
}

// ------------------------------------------------------- loading errors

#[test]
fn unusable_files_are_named_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let load = |files: TlsFiles| {
        ServerTls::load(files, &mut Registry::default())
            .unwrap_err()
            .to_string()
    };
    let mut f = pki.server_files();
    f.cert = dir.path().join("missing.pem");
    assert_eq!(
        load(f),
        format!(
            "--cert {}: no such file",
            dir.path().join("missing.pem").display()
        )
    );

    let mut f = pki.server_files();
    f.key = pki.path(certs::SERVER_CERT);
    let e = load(f);
    assert!(
        e.starts_with("--key ") && e.contains("no private key found"),
        "{e}"
    );

    let mut f = pki.server_files();
    f.ca = pki.path(certs::CA_KEY);
    let e = load(f);
    assert!(
        e.starts_with("--ca ") && e.contains("not a PEM certificate"),
        "{e}"
    );

    let mut f = pki.server_files();
    f.key = pki.path(certs::AGENT_KEY);
    let e = load(f);
    assert!(
        e.contains("does not belong to the certificate in --cert"),
        "{e}"
    );
}

// -------------------------------------------------------------- rotation

/// Sends GetHealth on a fresh connection in a loop until stopped; returns
/// (successes, failures as text).
fn request_loop(
    agent: ClientTls,
    addr: SocketAddr,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0, Vec::new());
        // A long-lived channel too: established connections must survive.
        let long = agent
            .connect(addr, "kiam-server", &ChannelOpts::default())
            .await
            .unwrap();
        let mut long = KiamServiceClient::new(long);
        for _ in 0..100_000 {
            if stop.is_cancelled() {
                break;
            }
            match health(&agent, addr, "kiam-server").await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e),
            }
            match long.get_health(GetHealthRequest {}).await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(format!("long-lived: {e}")),
            }
        }
        (ok, failed)
    })
}

/// The serial the server presents on a new connection.
async fn presented_serial(agent: &ClientTls, addr: SocketAddr) -> String {
    let s = agent
        .handshake(addr, &ServerName::try_from("kiam-server").unwrap())
        .await
        .unwrap();
    let der = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.raw_serial_as_string()
}

fn replace_by_rename(dest: &Path, contents: &str) {
    let tmp = dest.with_extension("new");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

#[tokio::test]
async fn rotation_by_rename_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;
    let agent = client(pki.agent_files());
    let old_serial = presented_serial(&agent, server.addr).await;
    let old_expiry = metric(
        &server.metrics(),
        "grpc_server_tls_certificate_expiry_seconds",
    )
    .unwrap();
    assert_eq!(old_expiry as i64, server.tls.cert_info().expiry);

    let stop = CancellationToken::new();
    let load = request_loop(agent.clone(), server.addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // New leaves (longer-lived) from the same CA, renamed into place one
    // file at a time, as a script or `kiam certs --reissue` would.
    let ca = Ca::from_pem(
        &std::fs::read_to_string(pki.path(certs::CA_CERT)).unwrap(),
        &std::fs::read_to_string(pki.path(certs::CA_KEY)).unwrap(),
    )
    .unwrap();
    let new_server = ca.issue(&LeafSpec::server(&[], 90).unwrap()).unwrap();
    let new_agent = ca.issue(&LeafSpec::agent(90).unwrap()).unwrap();
    replace_by_rename(&pki.path(certs::SERVER_CERT), &new_server.cert_pem);
    tokio::time::sleep(Duration::from_millis(150)).await; // a poll sees cert and key mismatched
    replace_by_rename(&pki.path(certs::SERVER_KEY), &new_server.key_pem);
    replace_by_rename(&pki.path(certs::AGENT_KEY), &new_agent.key_pem);
    replace_by_rename(&pki.path(certs::AGENT_CERT), &new_agent.cert_pem);

    eventually("the server to serve the new certificate", || {
        server.tls.cert_info().serial != old_serial
    })
    .await;
    let new_serial = server.tls.cert_info().serial;
    eventually("the agent to present its new certificate", || {
        agent.cert_info().not_after > old_expiry as i64 + 86_400
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 0);

    assert_eq!(presented_serial(&agent, server.addr).await, new_serial);
    let new_expiry = metric(
        &server.metrics(),
        "grpc_server_tls_certificate_expiry_seconds",
    )
    .unwrap();
    assert!(
        new_expiry > old_expiry + 50 * 86_400,
        "{old_expiry} -> {new_expiry}"
    );
    // The transient mismatch was never reported as a failed update.
    assert_eq!(
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_update_error"
        ),
        Some(0)
    );
}

/// Kubernetes' secret volume: files are symlinks into `..data`, itself a
/// symlink to a timestamped directory that is swapped atomically.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> SecretVolume {
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = SecretVolume { dir, generation: 0 };
        v.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.join(name)).unwrap();
        }
        v
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let ts = format!(
            "..2026_01_01_00_00_{:02}.{:09}",
            self.generation, self.generation
        );
        std::fs::create_dir(self.dir.join(&ts)).unwrap();
        for (name, contents) in files {
            write(&self.dir.join(&ts).join(name), contents);
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn files(&self) -> TlsFiles {
        TlsFiles::new(
            self.dir.join("tls.crt"),
            self.dir.join("tls.key"),
            self.dir.join("ca.crt"),
        )
    }
}

#[tokio::test]
async fn rotation_by_secret_volume_symlink_swap_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("cluster-ca", now() - days(1), now() + days(1000)).unwrap();
    let s1 = ca.issue(&LeafSpec::server(&[], 30).unwrap()).unwrap();
    let a1 = ca.issue(&LeafSpec::agent(30).unwrap()).unwrap();
    let mut server_vol = SecretVolume::new(
        dir.path().join("server"),
        &[
            ("tls.crt", &s1.cert_pem),
            ("tls.key", &s1.key_pem),
            ("ca.crt", ca.cert_pem()),
        ],
    );
    let mut agent_vol = SecretVolume::new(
        dir.path().join("agent"),
        &[
            ("tls.crt", &a1.cert_pem),
            ("tls.key", &a1.key_pem),
            ("ca.crt", ca.cert_pem()),
        ],
    );
    let server = start_server(server_vol.files()).await;
    let agent = client(agent_vol.files());
    let old_serial = presented_serial(&agent, server.addr).await;
    let old_expiry = metric(
        &server.metrics(),
        "grpc_server_tls_certificate_expiry_seconds",
    )
    .unwrap();

    let stop = CancellationToken::new();
    let load = request_loop(agent.clone(), server.addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let s2 = ca.issue(&LeafSpec::server(&[], 60).unwrap()).unwrap();
    let a2 = ca.issue(&LeafSpec::agent(60).unwrap()).unwrap();
    server_vol.update(&[
        ("tls.crt", &s2.cert_pem),
        ("tls.key", &s2.key_pem),
        ("ca.crt", ca.cert_pem()),
    ]);
    agent_vol.update(&[
        ("tls.crt", &a2.cert_pem),
        ("tls.key", &a2.key_pem),
        ("ca.crt", ca.cert_pem()),
    ]);

    eventually("the new server certificate", || {
        server.tls.cert_info().serial != old_serial
    })
    .await;
    eventually("the new agent certificate", || {
        agent.cert_info().not_after > old_expiry as i64 + 86_400
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 0);

    let new_serial = presented_serial(&agent, server.addr).await;
    assert_ne!(new_serial, old_serial);
    assert_eq!(new_serial, server.tls.cert_info().serial);
    let new_expiry = metric(
        &server.metrics(),
        "grpc_server_tls_certificate_expiry_seconds",
    )
    .unwrap();
    assert!(
        new_expiry > old_expiry + 20 * 86_400,
        "{old_expiry} -> {new_expiry}"
    );
}

#[tokio::test]
async fn a_broken_new_file_keeps_the_old_certificate_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_server(pki.server_files()).await;
    let agent = client(pki.agent_files());
    let serial = server.tls.cert_info().serial;

    write(
        &pki.path(certs::SERVER_CERT),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let err = server
        .tls
        .reload_now()
        .expect_err("broken file refused")
        .to_string();
    assert!(err.starts_with("--cert "), "{err}");
    eventually("the update error gauge", || {
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_update_error",
        ) == Some(1)
    })
    .await;
    let line = log_line("still using the previous certificate").expect("an error line");
    assert!(line.contains("--cert"), "{line}");
    assert_eq!(server.tls.cert_info().serial, serial);
    health(&agent, server.addr, "kiam-server")
        .await
        .expect("still serving the old certificate");

    // Fixing the file clears the gauge. (Its names cannot be read back from
    // the broken file, so they are given.)
    certs::reissue(dir.path(), &["kiam-server".to_string()], 30).unwrap();
    eventually("the reload", || server.tls.cert_info().serial != serial).await;
    eventually("the gauge to clear", || {
        metric(
            &server.metrics(),
            "grpc_server_tls_certificate_update_error",
        ) == Some(0)
    })
    .await;
    health(&agent, server.addr, "kiam-server")
        .await
        .expect("new certificate works");
}

/// A CA made by cfssl or older openssl has a PKCS#1 (RSA) or SEC1 (EC) key;
/// `--reissue` must still use it.
#[test]
fn reissue_works_from_a_ca_with_a_pkcs1_or_sec1_key() {
    for (genkey, marker) in [
        (
            "genrsa -traditional -out ca-key.pem 2048",
            "BEGIN RSA PRIVATE KEY",
        ),
        (
            "ecparam -name secp384r1 -genkey -noout -out ca-key.pem",
            "BEGIN EC PRIVATE KEY",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(d, genkey);
        assert!(std::fs::read_to_string(d.join("ca-key.pem"))
            .unwrap()
            .contains(marker));
        openssl(
            d,
            "req -x509 -key ca-key.pem -out ca.pem -days 30 -subj /CN=cfssl-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        );
        let pki = certs::reissue(d, &[], 100).expect("reissue from this CA");
        openssl(d, "verify -CAfile ca.pem server.pem agent.pem");
        // The leaf is clamped to the CA's lifetime, never beyond.
        let info = tls::ServerTls::load(pki.server_files(), &mut Registry::default())
            .unwrap()
            .cert_info();
        assert!(
            info.not_after <= (now() + days(31)).unix_timestamp()
                && info.not_after > (now() + days(29)).unix_timestamp(),
            "{marker}"
        );
    }
}
