//! Running a real SDK client (boto3, the AWS CLI, node, a Go or Java
//! program) as a Pod would, for the end-to-end tests: with a deadline, so a
//! hung client fails its case rather than the run, and its output kept for
//! the failure message.

#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a client may take (a JVM's first start in a Pod is the slowest).
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(90);

/// Runs `cmd` until it exits or [`CLIENT_DEADLINE`] passes (then kills it);
/// its stdout and stderr are appended to `outputs`.
pub fn run(mut cmd: Command, outputs: &mut Vec<String>) -> Result<Output, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let deadline = Instant::now() + CLIENT_DEADLINE;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    Ok(out)
}

/// Runs a client that prints one JSON document (alone, or as its last
/// line); the document, or why not with the end of its stderr.
pub fn run_json(cmd: Command, outputs: &mut Vec<String>) -> Result<Value, String> {
    let out = run(cmd, outputs)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "client failed ({}): {stdout}{}",
            out.status,
            tail(&stderr)
        ));
    }
    serde_json::from_str(stdout.trim())
        .or_else(|_| serde_json::from_str(stdout.trim().lines().last().unwrap_or("")))
        .map_err(|e| format!("client printed {stdout:?} ({e}); stderr: {}", tail(&stderr)))
}

/// The last 15 lines of `text`.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
