//! The PKI of the document this project started from (Go kiam's TLS guide):
//! its cfssl steps, run as written with the real `cfssl` and `cfssljson`
//! (built from their Go module by `scripts/peers.sh cfssl` / `cfssljson`,
//! given in `KIAM_CFSSL_BIN` / `KIAM_CFSSLJSON_BIN`), its Secrets made with
//! its `kubectl create secret generic` lines, and our server and agent (and
//! Go kiam's, with `KIAM_GO_BIN`) run on the result over mutual TLS; the
//! same with Vault's PKI secrets engine when `KIAM_VAULT_BIN` is set.
//! SKIPPED loudly without the binaries.

#[path = "support/gokiam.rs"]
mod gokiam;
#[path = "support/procs.rs"]
mod procs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use procs::{free_port, kiam_bin, start_moto, wait_for_port, ChildGuard, ProcCluster};

const BASE: &str = "arn:aws:iam::123456789012:role/";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/web-role?ip=198.18.5.10";

const CFSSL_UNTESTED: &str = "(scripts/test.sh sets it from scripts/peers.sh); \
     the seed document's cfssl steps were not run";

fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

fn bin(var: &str, untested: &str) -> Option<PathBuf> {
    let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) else {
        skipped(&format!("{var} is not set {untested}"));
        return None;
    };
    let p = PathBuf::from(p);
    assert!(p.is_file(), "{var}={} is not a file", p.display());
    Some(p)
}

/// The CSR files the guide's steps read (it points at samples in Go kiam's
/// docs/; these are ours, with the same fields): an RSA-2048 CA, a server
/// whose hosts are the Service name, 127.0.0.1 and localhost (host only,
/// no port: the guide's note on v3.0), and an agent.
fn write_csr_files(dir: &Path) {
    let names = r#"[{"C": "GB", "ST": "Test", "L": "Test", "O": "kiam tests", "OU": "seed"}]"#;
    let key = r#"{"algo": "rsa", "size": 2048}"#;
    std::fs::write(
        dir.join("ca.json"),
        format!(r#"{{"CN": "kiam test CA", "key": {key}, "names": {names}}}"#),
    )
    .unwrap();
    std::fs::write(
        dir.join("server.json"),
        format!(
            r#"{{"hosts": ["kiam-server", "127.0.0.1", "localhost"], "key": {key}, "names": {names}}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("agent.json"),
        format!(r#"{{"CN": "kiam test agent", "key": {key}, "names": {names}}}"#),
    )
    .unwrap();
}

/// The guide's three steps, word for word, in `dir` with cfssl and
/// cfssljson on PATH.
fn seed_steps(dir: &Path, cfssl: &Path, cfssljson: &Path) {
    const STEPS: &[&str] = &[
        "cfssl gencert -initca ca.json | cfssljson -bare ca",
        "cfssl gencert -ca=ca.pem -ca-key=ca-key.pem server.json | cfssljson -bare server",
        "cfssl gencert -ca=ca.pem -ca-key=ca-key.pem agent.json | cfssljson -bare agent",
    ];
    let mut path = vec![
        cfssl.parent().unwrap().to_path_buf(),
        cfssljson.parent().unwrap().to_path_buf(),
    ];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    for step in STEPS {
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", step])
            .current_dir(dir)
            .env("PATH", std::env::join_paths(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in [
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "agent.pem",
        "agent-key.pem",
    ] {
        assert!(dir.join(f).is_file(), "the steps made no {f}");
    }
}

/// The guide's `kubectl create secret generic` lines (client-side, no
/// cluster needed): the Secrets' files, as a kubelet would mount them, in
/// `out`. Without kubectl the files are used as cfssljson wrote them.
fn through_secrets(dir: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let Some(kubectl) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
    else {
        skipped("kubectl not found: the seed's Secrets were not made; files used as written");
        for f in std::fs::read_dir(dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "pem") {
                std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
            }
        }
        return;
    };
    for (secret, files) in [
        (
            "kiam-server-tls",
            ["ca.pem", "server.pem", "server-key.pem"],
        ),
        ("kiam-agent-tls", ["ca.pem", "agent.pem", "agent-key.pem"]),
    ] {
        let mut cmd = Command::new(&kubectl);
        cmd.args(["create", "secret", "generic", secret, "-n", "kube-system"])
            .current_dir(dir);
        for f in files {
            cmd.arg(format!("--from-file={f}"));
        }
        let res = cmd
            .args(["--dry-run=client", "-o", "json"])
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "kubectl create secret {secret}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
        let data = v["data"].as_object().unwrap();
        let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = files.to_vec();
        want.sort();
        assert_eq!(keys, want, "{secret}");
        for (k, b64) in data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_str().unwrap())
                .unwrap();
            std::fs::write(out.join(k), bytes).unwrap();
        }
    }
}

fn health(certs: &Path, port: u16) -> std::process::Output {
    let mut cmd = kiam_bin();
    cmd.args(["health", "--server-address", &format!("localhost:{port}")])
        .args(["--timeout", "2s"]);
    kiam_sandbox::procs::tls_args(&mut cmd, certs, "agent");
    cmd.output().unwrap()
}

async fn eventually_healthy(certs: &Path, port: u16) -> std::process::Output {
    let mut out = health(certs, port);
    for _ in 0..200 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = health(certs, port);
    }
    out
}

/// Credentials through the agent on `agent_port` for the test pod.
async fn credentials_through(agent_port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = procs::http_get(agent_port, CREDS, Duration::from_secs(2)).await;
        if let Ok((200, body)) = &got {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            return v["AccessKeyId"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served credentials: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct SeedPki {
    /// The files as the Secrets hold them (cfssl names).
    certs: PathBuf,
    _dir: tempfile::TempDir,
}

fn seed_pki() -> Option<SeedPki> {
    let (Some(cfssl), Some(cfssljson)) = (
        bin("KIAM_CFSSL_BIN", CFSSL_UNTESTED),
        bin("KIAM_CFSSLJSON_BIN", CFSSL_UNTESTED),
    ) else {
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    write_csr_files(&work);
    seed_steps(&work, &cfssl, &cfssljson);
    let certs = dir.path().join("secrets");
    through_secrets(&work, &certs);
    Some(SeedPki { certs, _dir: dir })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_and_agent_run_on_the_seed_cfssl_pki() {
    let Some(pki) = seed_pki() else { return };
    let Some(moto) = start_moto() else { return };
    let mut c = ProcCluster::start().await;
    // Everything below uses the seed's certificates, not the cluster's own.
    c.pki = kiam::certs::Pki {
        dir: pki.certs.clone(),
    };
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", "198.18.5.10", "web-role");

    let port = free_port();
    let _server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let out = eventually_healthy(&pki.certs, port).await;
    assert!(
        out.status.success(),
        "kiam health with the seed's agent certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client certificate from another CA is refused by the server.
    let other = tempfile::tempdir().unwrap();
    kiam::certs::generate(other.path(), &[], 1).unwrap();
    let out = health(other.path(), port);
    assert!(
        !out.status.success(),
        "a certificate of another CA was accepted"
    );

    let agent_port = free_port();
    let cmd = c.agent_cmd(
        agent_port,
        &format!("localhost:{port}"),
        &format!("http://127.0.0.1:{}", free_port()),
        &["--allow-ip-query"],
    );
    let _agent = ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(wait_for_port(agent_port, Duration::from_secs(20)));
    let key = credentials_through(agent_port).await;
    assert!(key.starts_with("ASIA"), "{key}");
}

/// Go kiam on the same files: its agent gets credentials from our server,
/// and our `kiam health` is answered by its server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_kiam_runs_on_the_seed_cfssl_pki_with_ours() {
    let Some(go) = gokiam::go_kiam_bin() else {
        return;
    };
    let Some(pki) = seed_pki() else { return };
    let Some(moto) = start_moto() else { return };
    let mut c = ProcCluster::start().await;
    c.pki = kiam::certs::Pki {
        dir: pki.certs.clone(),
    };
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", "198.18.5.10", "web-role");

    // Go agent -> our server.
    let port = free_port();
    let _server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let out = eventually_healthy(&pki.certs, port).await;
    assert!(out.status.success());
    let agent_port = free_port();
    let _agent = ChildGuard::spawn(
        "Go kiam agent",
        gokiam::go_agent_cmd(&go, &pki.certs, agent_port, &format!("localhost:{port}")),
    )
    .unwrap();
    assert!(wait_for_port(agent_port, Duration::from_secs(30)));
    let key = credentials_through(agent_port).await;
    assert!(key.starts_with("ASIA"), "{key}");

    // Our health check -> Go server.
    let sts = gokiam::StsProxy::start(&moto.url).await;
    let go_port = free_port();
    let _go_server = ChildGuard::spawn(
        "Go kiam server",
        gokiam::go_server_cmd(
            &go,
            &c.kubeconfig,
            &pki.certs,
            go_port,
            &sts,
            // Go kiam since v4.1 exits at start without an assume role.
            &["--role-base-arn", BASE, "--assume-role-arn", "kiam-server"],
        ),
    )
    .unwrap();
    assert!(wait_for_port(go_port, Duration::from_secs(30)));
    let out = eventually_healthy(&pki.certs, go_port).await;
    assert!(
        out.status.success(),
        "kiam health against Go kiam's server on the seed's PKI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One Vault API call with curl as the dev root token: the parsed answer.
fn vault_call(addr: &str, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-X", method])
        .args(["-H", "X-Vault-Token: root"])
        .args(["-H", "Content-Type: application/json"])
        .args(["--data-binary", &body.to_string()])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{addr}/v1/{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    assert!(
        code.trim().starts_with('2'),
        "vault {method} {path}: {code} {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// The guide's "any other way like Vault": Vault's PKI secrets engine on a
/// dev server (`KIAM_VAULT_BIN`, `scripts/peers.sh vault`) issues the CA,
/// the server's certificate (for kiam-server, localhost and 127.0.0.1) and
/// the agent's, and our server and agent run on them over mutual TLS.
/// Vault cannot be built from the module proxy today (docs/MIGRATING.md,
/// "The seed document's PKI"), so this has not run yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_and_agent_run_on_vault_pki() {
    let Some(vault) = bin("KIAM_VAULT_BIN", "Vault's PKI secrets engine was not tried") else {
        return;
    };
    let Some(moto) = start_moto() else { return };
    let dir = tempfile::tempdir().unwrap();
    let vport = free_port();
    let mut cmd = Command::new(&vault);
    cmd.args(["server", "-dev", "-dev-root-token-id=root"])
        .arg(format!("-dev-listen-address=127.0.0.1:{vport}"))
        .env("HOME", dir.path())
        .env("VAULT_DISABLE_MLOCK", "true")
        .stdout(std::process::Stdio::null());
    let _vault = ChildGuard::spawn("vault", cmd).unwrap();
    assert!(wait_for_port(vport, Duration::from_secs(60)));
    let addr = format!("http://127.0.0.1:{vport}");
    // Ready once unsealed (a dev server unseals itself).
    for _ in 0..100 {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{addr}/v1/sys/health"))
            .output()
            .unwrap();
        if out.stdout == b"200" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    vault_call(
        &addr,
        "POST",
        "sys/mounts/pki",
        serde_json::json!({"type": "pki"}),
    );
    vault_call(
        &addr,
        "POST",
        "sys/mounts/pki/tune",
        serde_json::json!({"max_lease_ttl": "87600h"}),
    );
    let root = vault_call(
        &addr,
        "POST",
        "pki/root/generate/internal",
        serde_json::json!({"common_name": "kiam vault CA", "ttl": "87600h"}),
    );
    let ca = root["data"]["certificate"].as_str().unwrap().to_string();
    vault_call(
        &addr,
        "POST",
        "pki/roles/kiam",
        serde_json::json!({"allowed_domains": ["kiam-server", "localhost", "kiam-agent"],
            "allow_bare_domains": true, "allow_ip_sans": true,
            "server_flag": true, "client_flag": true, "max_ttl": "72h"}),
    );
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.pem"), format!("{ca}\n")).unwrap();
    for (role, body) in [
        (
            "server",
            serde_json::json!({"common_name": "kiam-server", "alt_names": "localhost",
                "ip_sans": "127.0.0.1", "ttl": "24h"}),
        ),
        (
            "agent",
            serde_json::json!({"common_name": "kiam-agent", "ttl": "24h"}),
        ),
    ] {
        let issued = vault_call(&addr, "POST", "pki/issue/kiam", body);
        let d = &issued["data"];
        std::fs::write(
            certs.join(format!("{role}.pem")),
            format!("{}\n", d["certificate"].as_str().unwrap()),
        )
        .unwrap();
        std::fs::write(
            certs.join(format!("{role}-key.pem")),
            format!("{}\n", d["private_key"].as_str().unwrap()),
        )
        .unwrap();
    }

    let mut c = ProcCluster::start().await;
    c.pki = kiam::certs::Pki { dir: certs.clone() };
    c.namespace("team-a", ".*");
    c.pod("team-a", "web", "198.18.5.10", "web-role");
    let port = free_port();
    let _server = c.spawn_server(
        &moto.url,
        &[
            "--role-base-arn",
            BASE,
            "--bind",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let out = eventually_healthy(&certs, port).await;
    assert!(
        out.status.success(),
        "kiam health with Vault's agent certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_port = free_port();
    let cmd = c.agent_cmd(
        agent_port,
        &format!("localhost:{port}"),
        &format!("http://127.0.0.1:{}", free_port()),
        &["--allow-ip-query"],
    );
    let _agent = ChildGuard::spawn("kiam agent", cmd).unwrap();
    assert!(wait_for_port(agent_port, Duration::from_secs(20)));
    let key = credentials_through(agent_port).await;
    assert!(key.starts_with("ASIA"), "{key}");
}
