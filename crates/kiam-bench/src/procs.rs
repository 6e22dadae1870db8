//! What a benchmark reads of a process: RSS and CPU time, its own runtimes'
//! included. Starting the real `kiam` processes (the binary found and
//! rebuilt in this bench's profile first, children guarded, logs with
//! `KIAM_BENCH_LOGS=1`) is `kiam_sandbox::procs`, shared with the tests.

use anyhow::{Context, Result};

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

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
