//! Real `kiam` processes, for figures only a process has (RSS, start-up),
//! and the RSS readings themselves.
//!
//! The `kiam` binary is built by cargo in the same profile as this bench
//! (`cargo build --release --bin kiam`) before anything is measured: a
//! benchmark of a stale binary would be worse than none.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Kills the child when dropped, even on error paths.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `kiam` binary next to this one, rebuilt first when cargo is known.
pub fn kiam_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the bench binary has no directory")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bin", "kiam", "-p", "kiam"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!(
            "building the kiam binary ({})",
            if release { "release" } else { "debug" }
        );
        let status = cmd
            .status()
            .context("running cargo build for the kiam binary")?;
        if !status.success() {
            bail!("cargo build --bin kiam failed");
        }
    }
    let bin = dir.join("kiam");
    if !bin.is_file() {
        bail!(
            "{} not found: run through `cargo run --release -p kiam-bench` so the kiam binary is built",
            bin.display()
        );
    }
    Ok(bin)
}

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing from /proc/{pid}/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system, all threads) a process has used, in seconds.
/// Unlike wall time, this does not grow when other work on the machine
/// delays the process, so it compares runs made under different load.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces), 1-based
    // from `state` = field 3: utime is field 14, stime 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(ticks / 100.0)
}

/// CPU seconds used so far by this process's threads whose name starts
/// with `prefix` (each benchmark role runs on its own named runtime).
pub fn threads_cpu(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().to_string();
            cpu_seconds(&format!("self/task/{tid}")).ok()
        })
        .sum()
}

/// CPU seconds per runtime (by thread-name prefix) over a stretch of work.
pub struct CpuMeter {
    start: Vec<(&'static str, f64)>,
}

impl CpuMeter {
    pub fn start(prefixes: &[&'static str]) -> Self {
        CpuMeter {
            start: prefixes.iter().map(|p| (*p, threads_cpu(p))).collect(),
        }
    }

    /// CPU seconds each prefix used since [`CpuMeter::start`].
    pub fn used(&self) -> Vec<(&'static str, f64)> {
        self.start
            .iter()
            .map(|(p, s)| (*p, threads_cpu(p) - s))
            .collect()
    }
}

/// Spawns `cmd` with stdout and stderr dropped (or inherited with
/// `KIAM_BENCH_LOGS=1`).
pub fn spawn(mut cmd: Command) -> Result<ChildGuard> {
    let logs = std::env::var_os("KIAM_BENCH_LOGS").is_some();
    let out = || {
        if logs {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    };
    cmd.stdout(out()).stderr(out()).stdin(Stdio::null());
    Ok(ChildGuard(cmd.spawn().context("spawning a kiam process")?))
}

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `f` every `every` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
