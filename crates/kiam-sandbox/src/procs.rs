//! Child processes (`kiam server`, `kiam agent`, moto) for the sandbox, the
//! integration tests and the benchmarks. The sandbox's [`ProcessSet`] logs
//! each child to its own file, kills it with the sandbox and watches it so
//! that a crash is reported with the end of its log; tests and benchmarks
//! hold one [`ChildGuard`] per child instead.
//!
//! The one surprise: a [`ProcessSet`] starts children from a dedicated thread
//! that lives as long as the set. `PR_SET_PDEATHSIG` fires when the *thread*
//! that forked a child exits, not the process, so forking from whatever
//! thread happens to call (a tokio blocking thread that idles out, or a test
//! thread that finishes) would kill children early.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long children get to exit after SIGTERM before SIGKILL (the agent
/// removes its iptables rule on the way out).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How many lines of a dead child's log an error quotes.
const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ProcsError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); the end of {}:\n{tail}", log.display())]
    Died {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One child as the set tracks it.
struct Managed {
    name: String,
    child: Child,
    log: PathBuf,
}

type Job = Box<dyn FnOnce() + Send>;

/// Children that are stopped (SIGTERM, then SIGKILL) when the set is dropped
/// or [`ProcessSet::stop_all`] is called, newest first.
pub struct ProcessSet {
    log_dir: PathBuf,
    // std Mutex: only short, synchronous sections (spawn bookkeeping, try_wait).
    children: Arc<Mutex<Vec<Managed>>>,
    /// The spawner thread's queue; dropping it ends the thread.
    jobs: Option<mpsc::Sender<Job>>,
    spawner: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ProcessSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSet")
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

impl ProcessSet {
    /// Logs go to `<log_dir>/<name>.log`.
    pub fn new(log_dir: impl Into<PathBuf>) -> ProcessSet {
        let (jobs, queue) = mpsc::channel::<Job>();
        let spawner = std::thread::Builder::new()
            .name("kiam-sandbox-spawner".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .expect("start the spawner thread");
        ProcessSet {
            log_dir: log_dir.into(),
            children: Arc::default(),
            jobs: Some(jobs),
            spawner: Some(spawner),
        }
    }

    /// Where `name`'s output goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Starts `cmd` with stdin closed and stdout and stderr appended to its
    /// log; it gets SIGTERM when the set goes. Returns the pid.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<u32, ProcsError> {
        let log = self.log_path(name);
        let log_err = |source| ProcsError::Log {
            path: log.clone(),
            source,
        };
        std::fs::create_dir_all(&self.log_dir).map_err(log_err)?;
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(die_with_parent);
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let (reply, answer) = mpsc::channel();
        self.jobs
            .as_ref()
            .expect("the spawner lives as long as the set")
            .send(Box::new(move || {
                let _ = reply.send(cmd.spawn());
            }))
            .expect("the spawner thread is running");
        let spawned = answer
            .recv()
            .expect("the spawner thread answers every job")
            .map_err(|source| ProcsError::Spawn {
                name: name.to_string(),
                program,
                source,
            })?;
        let pid = spawned.id();
        self.lock().push(Managed {
            name: name.to_string(),
            child: spawned,
            log,
        });
        Ok(pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Managed>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first child that has exited, with the end of its log.
    pub fn check(&self) -> Result<(), ProcsError> {
        let mut children = self.lock();
        for managed in children.iter_mut() {
            if let Ok(Some(status)) = managed.child.try_wait() {
                return Err(ProcsError::Died {
                    name: managed.name.clone(),
                    status,
                    log: managed.log.clone(),
                    tail: log_tail(&managed.log, LOG_TAIL_LINES),
                });
            }
        }
        Ok(())
    }

    /// Whether the child called `name` is still running.
    pub fn is_running(&self, name: &str) -> bool {
        self.lock()
            .iter_mut()
            .any(|m| m.name == name && matches!(m.child.try_wait(), Ok(None)))
    }

    /// Stops one child (SIGTERM, then SIGKILL after the grace period) and
    /// forgets it; false if there is none by that name.
    pub fn stop(&self, name: &str) -> bool {
        let taken: Vec<Managed> = {
            let mut children = self.lock();
            let (mine, rest) = std::mem::take(&mut *children)
                .into_iter()
                .partition(|m| m.name == name);
            *children = rest;
            mine
        };
        let found = !taken.is_empty();
        terminate(taken);
        found
    }

    /// Stops every child, newest first (the agent before the server it
    /// talks to), each given a grace period to exit cleanly.
    pub fn stop_all(&self) {
        let mut taken = std::mem::take(&mut *self.lock());
        taken.reverse();
        terminate(taken);
    }

    /// Names and pids of the running children.
    pub fn running(&self) -> Vec<(String, u32)> {
        self.lock()
            .iter_mut()
            .filter_map(|m| {
                matches!(m.child.try_wait(), Ok(None)).then(|| (m.name.clone(), m.child.id()))
            })
            .collect()
    }
}

impl Drop for ProcessSet {
    fn drop(&mut self) {
        self.stop_all();
        drop(self.jobs.take());
        if let Some(spawner) = self.spawner.take() {
            let _ = spawner.join();
        }
    }
}

/// SIGTERM to all, then SIGKILL to whoever is left after the grace period.
fn terminate(mut children: Vec<Managed>) {
    for managed in &children {
        if let Ok(pid) = i32::try_from(managed.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the child is
            // not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for managed in &mut children {
        loop {
            match managed.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    tracing::warn!(child = %managed.name, "did not exit after SIGTERM; killing it");
                    let _ = managed.child.kill();
                    let _ = managed.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// For `pre_exec`: the child gets SIGTERM when the thread that forked it
/// goes, and exits at once if that already happened.
pub(crate) fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: plain system calls without pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() == 1 {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// The last `n` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The workspace this crate was built in (the repository root).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/kiam-sandbox has two parents")
        .to_path_buf()
}

/// The moto_server executable: `$MOTO_SERVER`, else `moto_server` on PATH,
/// else the repository's `.venv` made by scripts/test.sh.
pub fn moto_server_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
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
    let venv = workspace_root().join(".venv/bin/moto_server");
    venv.is_file().then_some(venv)
}

#[derive(Debug, thiserror::Error)]
pub enum FindKiamError {
    #[error("`cargo build --bin kiam` failed ({0}); fix the build and try again")]
    BuildFailed(ExitStatus),
    #[error("cannot run cargo ({cargo}): {source}")]
    Cargo {
        cargo: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no kiam binary next to {} and not started by cargo: run `cargo build --bin kiam`, \
         or pass the binary's path",
        exe.display()
    )]
    NotFound { exe: PathBuf },
}

/// The `kiam` binary next to this executable (`target/<profile>/kiam`).
/// Started by `cargo run` (which sets `CARGO`), it first runs
/// `cargo build --bin kiam` for the same profile, saying so, so the binary is
/// never missing or stale.
pub fn find_kiam() -> Result<PathBuf, FindKiamError> {
    let exe = std::env::current_exe().unwrap_or_default();
    // Integration tests live one level down, in target/<profile>/deps.
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    };
    let kiam = dir.join("kiam");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        eprintln!(
            "kiam-sandbox: building the kiam binary (cargo build --bin kiam --profile {profile})"
        );
        let mut build = Command::new(&cargo);
        // `cargo run` gave us the variables cargo sets for a running package.
        // Build scripts (ring's, for one) watch some of them, so passing them
        // on would rebuild those crates now and again at everyone's next build.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            let set_by_cargo_run = key_text.starts_with("CARGO_PKG_")
                || key_text.starts_with("CARGO_CFG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&key_text.as_ref());
            if set_by_cargo_run {
                build.env_remove(&key);
            }
        }
        let status = build
            .arg("build")
            .arg("--manifest-path")
            .arg(workspace_root().join("Cargo.toml"))
            .args(["--bin", "kiam", "--profile", &profile])
            .status()
            .map_err(|source| FindKiamError::Cargo {
                cargo: PathBuf::from(&cargo).display().to_string(),
                source,
            })?;
        if !status.success() {
            return Err(FindKiamError::BuildFailed(status));
        }
    }
    if kiam.is_file() {
        Ok(kiam)
    } else {
        Err(FindKiamError::NotFound { exe })
    }
}

/// A free TCP port in this thread's network namespace (checked bindable and
/// released: a race with another process is possible but unlikely).
pub fn free_port() -> std::io::Result<u16> {
    // Not the kernel's pick: an ephemeral port handed back here can be taken
    // by any outgoing connection (this process's HTTP clients included)
    // before the child binds it. Ports are handed out in turn from below
    // Linux's ephemeral range (32768-60999), starting at a per-process
    // offset, each once per process, and only if it can be bound now on
    // every address a kiam process listens on.
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok();
        if free {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `ready` every `every` until it is true or `timeout` passes; whether
/// it became true.
pub fn wait_until(timeout: Duration, every: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// A child that is killed (SIGKILL, no grace period) and reaped when the
/// guard drops, even when a test panics: for tests and benchmarks, which
/// hold a child for one scenario. The sandbox uses a [`ProcessSet`].
#[derive(Debug)]
pub struct ChildGuard {
    pub child: Child,
    /// What the child is, for messages.
    pub name: String,
}

impl ChildGuard {
    /// Starts `cmd` with stdin closed, stdout dropped and stderr as
    /// [`child_stderr`] says.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Result<ChildGuard, ProcsError> {
        let name = name.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(child_stderr());
        match cmd.spawn() {
            Ok(child) => Ok(ChildGuard { child, name }),
            Err(source) => Err(ProcsError::Spawn {
                name,
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            }),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test's or benchmark's child writes its logs (stderr): inherited
/// with `KIAM_TEST_LOGS=1` or `KIAM_BENCH_LOGS=1`, else dropped.
pub fn child_stderr() -> Stdio {
    if std::env::var_os("KIAM_TEST_LOGS").is_some() || std::env::var_os("KIAM_BENCH_LOGS").is_some()
    {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// A moto_server serving STS on a loopback port; killed when dropped.
#[derive(Debug)]
pub struct Moto {
    /// `http://127.0.0.1:<port>`: the endpoint for `AWS_ENDPOINT_URL_STS`.
    pub url: String,
    _child: ChildGuard,
}

/// Starts moto_server ([`moto_server_path`]) on a free loopback port and
/// waits until it listens. `None`, after a loud `SKIPPED` line on stderr,
/// when moto is not installed: scripts/test.sh installs it, so CI always runs
/// what needs it. Panics when moto starts but never listens (a test helper).
pub fn start_moto() -> Option<Moto> {
    let Some(path) = moto_server_path() else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: moto_server not found (set MOTO_SERVER or run scripts/test.sh, \
             which installs moto[server] into .venv); nothing was tested against moto ***\n"
        );
        return None;
    };
    let port = free_port().expect("a free loopback port for moto");
    let mut cmd = Command::new(path);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let child = ChildGuard::spawn("moto", cmd).expect("start moto_server");
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "moto_server did not listen on {port}"
    );
    Some(Moto {
        url: format!("http://127.0.0.1:{port}"),
        _child: child,
    })
}

/// AWS settings for a child that point its SDK at the STS at `sts_url` with
/// fake credentials, and keep it away from any real profile or instance
/// metadata.
pub fn moto_env(cmd: &mut Command, sts_url: &str) {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_STS", sts_url)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
}

/// `--cert <certs>/<role>.pem --key <certs>/<role>-key.pem --ca <certs>/ca.pem`:
/// the files `kiam certs` writes into `certs`, for `role` `server` or `agent`.
pub fn tls_args<'a>(cmd: &'a mut Command, certs: &Path, role: &str) -> &'a mut Command {
    cmd.arg("--cert")
        .arg(certs.join(format!("{role}.pem")))
        .arg("--key")
        .arg(certs.join(format!("{role}-key.pem")))
        .arg("--ca")
        .arg(certs.join("ca.pem"))
}

/// `cmd` (the kiam binary, perhaps run in a namespace) made into
/// `kiam server --kubeconfig <kubeconfig>` with the server's TLS files from
/// `certs`; the caller adds the role's other flags.
pub fn server_args<'a>(cmd: &'a mut Command, kubeconfig: &Path, certs: &Path) -> &'a mut Command {
    cmd.arg("server").arg("--kubeconfig").arg(kubeconfig);
    tls_args(cmd, certs, "server")
}

/// `cmd` made into `kiam agent --port <port> --server-address <servers>
/// --metadata-endpoint <metadata>` with the agent's TLS files from `certs`;
/// the caller adds `--host` and the rest.
pub fn agent_args<'a>(
    cmd: &'a mut Command,
    port: u16,
    servers: &str,
    metadata: &str,
    certs: &Path,
) -> &'a mut Command {
    cmd.arg("agent")
        .args(["--port", &port.to_string()])
        .args(["--server-address", servers])
        .args(["--metadata-endpoint", metadata]);
    tls_args(cmd, certs, "agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_child_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("kiam-sandbox-procs-{}", std::process::id()));
        let set = ProcessSet::new(&dir);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo starting; echo broken >&2; exit 3"]);
        set.spawn("crasher", cmd).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        set.spawn("sleeper", sleeper).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match set.check() {
                Err(e) => break e,
                Ok(()) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(()) => panic!("the crash was never noticed"),
            }
        };
        let text = err.to_string();
        assert!(text.contains("crasher exited"), "{text}");
        assert!(text.contains("starting\nbroken"), "{text}");
        assert!(set.is_running("sleeper"));
        assert!(set.stop("sleeper"));
        assert!(!set.is_running("sleeper"));
        drop(set);
        let _ = std::fs::remove_dir_all(dir);
    }
}
