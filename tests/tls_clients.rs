//! OpenSSL-based clients against a real `kiam server` process's gRPC port,
//! with the agent certificate `kiam certs` makes: `openssl s_client` (TLS
//! 1.2 and 1.3), Python's `ssl` module and `curl --http2`.
//!
//! The surprise this guards: rustls and Go clients never parse the
//! certificate-authority names in the server's CertificateRequest, OpenSSL
//! does, and once stopped every handshake with an ASN.1 error when they
//! were not whole DER `Name`s (issue 13). So each client here must finish
//! the handshake, s_client must list the CA's subject among the acceptable
//! client CA names, and Python and curl must then talk HTTP/2 to the
//! server (which proves it accepted the client certificate, also in TLS
//! 1.3 where that is decided after the client's Finished).
//!
//! A missing tool (openssl, python3, curl with HTTP/2) is SKIPPED loudly.

#[path = "support/procs.rs"]
mod procs;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use procs::{free_port, wait_for_port, ChildGuard, ProcCluster};

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A real `kiam server` on 127.0.0.1 with `kiam certs` files. It needs no
/// STS for handshakes (no Pod has a role), so STS points at a closed port.
struct Server {
    port: u16,
    pki: PathBuf,
    _child: ChildGuard,
    _cluster: ProcCluster,
}

async fn start_server() -> Server {
    let cluster = ProcCluster::start().await;
    let port = free_port();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let child = cluster.spawn_server(
        &closed,
        &[
            "--role-base-arn",
            "arn:aws:iam::123456789012:role/",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    assert!(
        wait_for_port(port, Duration::from_secs(20)),
        "kiam server did not listen on {port}"
    );
    Server {
        port,
        pki: cluster.pki.dir.clone(),
        _child: child,
        _cluster: cluster,
    }
}

impl Server {
    fn file(&self, name: &str) -> String {
        self.pki.join(name).display().to_string()
    }
}

/// The CA's subject as OpenSSL prints names (`CN = kiam-ca-...`).
fn ca_subject(pki: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(pki.join("ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl x509: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("subject=")
        .trim()
        .to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The lines s_client prints under "Acceptable client certificate CA names".
fn acceptable_ca_names(output: &str) -> Vec<String> {
    output
        .lines()
        .skip_while(|l| !l.starts_with("Acceptable client certificate CA names"))
        .skip(1)
        .take_while(|l| !l.contains(':') || l.contains(" = "))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn s_client(server: &Server, version: &str) -> Output {
    Command::new("openssl")
        .args(["s_client", version, "-connect"])
        .arg(format!("127.0.0.1:{}", server.port))
        .args(["-servername", "localhost", "-verify_hostname", "localhost"])
        .args(["-verify_return_error", "-alpn", "h2"])
        .args(["-CAfile", &server.file("ca.pem")])
        .args(["-cert", &server.file("agent.pem")])
        .args(["-key", &server.file("agent-key.pem")])
        // Ends the session once the handshake is done (stdin is closed).
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_completes_the_handshake_and_sees_the_ca_name() {
    if !have("openssl", &["version"]) {
        say("SKIPPED: openssl_s_client...: no openssl on PATH (scripts/test.sh installs it)");
        return;
    }
    let server = start_server().await;
    let subject = ca_subject(&server.pki);
    for (flag, protocol) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        // Blocking is fine here: the server is another process.
        let out = s_client(&server, flag);
        let all = text(&out);
        assert!(
            all.contains(&format!("Protocol  : {protocol}"))
                || all.contains(&format!("New, {protocol}")),
            "{flag}: no {protocol} session:\n{all}"
        );
        assert!(
            all.contains("Verify return code: 0 (ok)"),
            "{flag}: the server's certificate did not verify:\n{all}"
        );
        assert!(
            !all.contains("asn1") && !all.contains("ASN1"),
            "{flag}: an ASN.1 error:\n{all}"
        );
        assert!(all.contains("ALPN protocol: h2"), "{flag}: no h2:\n{all}");
        let names = acceptable_ca_names(&all);
        assert_eq!(
            names,
            vec![subject.clone()],
            "{flag}: acceptable client CA names, expected the CA's subject:\n{all}"
        );
    }
}

/// Python's `ssl` with the agent's certificate: handshake at each version,
/// then the HTTP/2 preface and a SETTINGS frame back from the server.
const PYTHON: &str = r#"
import socket, ssl, sys
port, ca, cert, key, version = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])
v = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
ctx.minimum_version = v
ctx.maximum_version = v
with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        print("version", tls.version())
        print("alpn", tls.selected_alpn_protocol())
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        head = b""
        while len(head) < 9:
            chunk = tls.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
        print("frame_type", head[3] if len(head) == 9 else -1)
"#;

fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    [venv, PathBuf::from("python3")]
        .into_iter()
        .find(|p| have(&p.display().to_string(), &["-c", "import ssl"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ssl_completes_the_handshake_and_speaks_http2() {
    let Some(python) = python() else {
        say("SKIPPED: python_ssl...: no python with the ssl module");
        return;
    };
    let server = start_server().await;
    for version in ["1.2", "1.3"] {
        let out = Command::new(&python)
            .args(["-c", PYTHON, &server.port.to_string()])
            .args([
                server.file("ca.pem"),
                server.file("agent.pem"),
                server.file("agent-key.pem"),
            ])
            .arg(version)
            .output()
            .unwrap();
        let all = text(&out);
        assert!(out.status.success(), "TLS {version}: python failed:\n{all}");
        assert!(
            all.contains(&format!("version TLSv{version}")),
            "TLS {version}:\n{all}"
        );
        assert!(all.contains("alpn h2"), "TLS {version}:\n{all}");
        // 4 = SETTINGS: the server read the preface over the accepted session.
        assert!(all.contains("frame_type 4"), "TLS {version}:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_with_a_client_certificate_calls_get_health() {
    let http2 = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("HTTP2"));
    if !http2 {
        say("SKIPPED: curl_http2...: no curl with HTTP/2 on PATH");
        return;
    }
    let server = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    // A gRPC message: not compressed, length 0 (an empty GetHealthRequest).
    let body = dir.path().join("request");
    std::fs::write(&body, [0u8, 0, 0, 0, 0]).unwrap();
    for version in ["--tlsv1.2", "--tlsv1.3"] {
        let max = if version == "--tlsv1.2" { "1.2" } else { "1.3" };
        let out = Command::new("curl")
            .args(["-sS", "--http2", version, "--tls-max", max])
            .args(["--max-time", "10", "-D", "-", "-o", "/dev/null"])
            .args(["--cacert", &server.file("ca.pem")])
            .args(["--cert", &server.file("agent.pem")])
            .args(["--key", &server.file("agent-key.pem")])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!(
                "https://localhost:{}/kiam.KiamService/GetHealth",
                server.port
            ))
            .output()
            .unwrap();
        let all = text(&out);
        assert!(out.status.success(), "{version}: curl failed:\n{all}");
        assert!(all.contains("HTTP/2 200"), "{version}:\n{all}");
        assert!(
            all.to_ascii_lowercase()
                .contains("content-type: application/grpc"),
            "{version}:\n{all}"
        );
    }
}
