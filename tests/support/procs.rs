//! Real `kiam` processes for end-to-end tests. The helpers that do not
//! need kiam's types (child guard, ports, moto, command lines) are
//! `kiam_sandbox::procs`, shared with the sandbox and the benchmarks; this
//! adds the binary cargo built for this test run and [`ProcCluster`].
#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::process::Command;

pub use kiam_sandbox::procs::{
    child_stderr, moto_env, start_moto, wait_for_port, ChildGuard, Moto,
};

/// A free TCP port on 127.0.0.1 ([`kiam_sandbox::procs::free_port`]; a test
/// cannot go on without one).
pub fn free_port() -> u16 {
    kiam_sandbox::procs::free_port().expect("a free loopback port")
}

/// The `kiam` binary built for this test run.
pub fn kiam_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiam"))
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
        kiam_sandbox::procs::tls_args(cmd, &self.pki.dir, role);
    }

    /// `kiam server` against this cluster, STS at `sts_url`, plus `extra`.
    pub fn server_cmd(&self, sts_url: &str, extra: &[&str]) -> Command {
        let mut cmd = kiam_bin();
        kiam_sandbox::procs::server_args(&mut cmd, &self.kubeconfig, &self.pki.dir).args(extra);
        moto_env(&mut cmd, sts_url);
        cmd
    }

    pub fn spawn_server(&self, sts_url: &str, extra: &[&str]) -> ChildGuard {
        ChildGuard::spawn("kiam server", self.server_cmd(sts_url, extra)).unwrap()
    }

    /// `kiam agent --host 127.0.0.1` on `port`, asking `servers` (comma
    /// separated), with the upstream metadata service at `metadata`, plus
    /// `extra`.
    pub fn agent_cmd(&self, port: u16, servers: &str, metadata: &str, extra: &[&str]) -> Command {
        let mut cmd = kiam_bin();
        kiam_sandbox::procs::agent_args(&mut cmd, port, servers, metadata, &self.pki.dir)
            .args(["--host", "127.0.0.1"])
            .args(extra);
        cmd
    }
}

/// One HTTP/1.1 GET to 127.0.0.1:`port` on a fresh connection, as SDKs
/// make them (Host 169.254.169.254): (status, body), or why not within
/// `within`.
pub async fn http_get(
    port: u16,
    path: &str,
    within: std::time::Duration,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let call = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad response: {out:?}"))?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("no answer to {path} within {within:?}"))?
}
