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
