//! Real processes for end-to-end tests: moto's STS server and the `kiam`
//! binary. Children are killed when their guard drops, even on panic.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child on drop.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The moto_server executable: `$MOTO_SERVER`, else `moto_server` on PATH,
/// else the repository's `.venv` made by scripts/test.sh.
pub fn moto_server_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MOTO_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("moto_server");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    venv.is_file().then_some(venv)
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts moto's server on a free loopback port; `None` (after a loud
/// message) when moto is not installed. scripts/test.sh installs it, so CI
/// always runs these tests.
pub fn start_moto() -> Option<(ChildGuard, String)> {
    let Some(path) = moto_server_path() else {
        eprintln!(
            "\n*** SKIPPED: moto_server not found (set MOTO_SERVER or run scripts/test.sh, \
             which installs moto[server] into .venv) ***\n"
        );
        return None;
    };
    let port = free_port();
    let child = Command::new(path)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let guard = ChildGuard {
        child,
        name: "moto".into(),
    };
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "moto_server did not listen on {port}"
    );
    Some((guard, format!("http://127.0.0.1:{port}")))
}

/// The `kiam` binary built for this test run.
pub fn kiam_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiam"))
}

/// AWS settings that point the SDK at moto with fake credentials, and keep
/// it away from any real profile or instance metadata.
pub fn moto_env(cmd: &mut Command, sts_url: &str) {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_STS", sts_url)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
}

/// Where a child's stderr goes: inherited with `KIAM_TEST_LOGS=1`, else dropped.
pub fn child_stderr() -> std::process::Stdio {
    if std::env::var_os("KIAM_TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// The in-memory API server, a kubeconfig for it and a fresh PKI, for tests
/// that run real `kiam` processes.
pub struct ProcCluster {
    pub api: kiam_sandbox::apiserver::FakeApiServer,
    pub kubeconfig: PathBuf,
    pub pki: kiam::certs::Pki,
    _dir: tempfile::TempDir,
}

impl ProcCluster {
    pub async fn start() -> ProcCluster {
        let api = kiam_sandbox::apiserver::FakeApiServer::start()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let pki = kiam::certs::generate(&dir.path().join("certs"), &[], 1).unwrap();
        ProcCluster {
            api,
            kubeconfig,
            pki,
            _dir: dir,
        }
    }

    pub fn namespace(&self, name: &str, permitted: &str) {
        self.api
            .create_namespace(serde_json::json!({"metadata": {"name": name,
                "annotations": {"iam.amazonaws.com/permitted": permitted}}}))
            .unwrap();
    }

    pub fn pod(&self, ns: &str, name: &str, ip: &str, role: &str) {
        self.api
            .apply_pod(serde_json::json!({
                "metadata": {"name": name, "namespace": ns,
                             "annotations": {"iam.amazonaws.com/role": role}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": ip}
            }))
            .unwrap();
    }

    /// `--cert/--key/--ca` for `role` ("server" or "agent").
    pub fn tls_args(&self, cmd: &mut Command, role: &str) {
        cmd.arg("--cert")
            .arg(self.pki.path(&format!("{role}.pem")))
            .arg("--key")
            .arg(self.pki.path(&format!("{role}-key.pem")))
            .arg("--ca")
            .arg(self.pki.path("ca.pem"));
    }

    /// `kiam server` against this cluster, STS at `sts_url`, plus `extra`.
    pub fn server_cmd(&self, sts_url: &str, extra: &[&str]) -> Command {
        let mut cmd = kiam_bin();
        cmd.arg("server").arg("--kubeconfig").arg(&self.kubeconfig);
        self.tls_args(&mut cmd, "server");
        cmd.args(extra).stdout(Stdio::null()).stderr(child_stderr());
        moto_env(&mut cmd, sts_url);
        cmd
    }

    pub fn spawn_server(&self, sts_url: &str, extra: &[&str]) -> ChildGuard {
        ChildGuard {
            child: self.server_cmd(sts_url, extra).spawn().unwrap(),
            name: "kiam server".into(),
        }
    }
}
