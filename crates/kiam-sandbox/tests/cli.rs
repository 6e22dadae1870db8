//! The `kiam-sandbox` command line: a bad flag exits 64 (EX_USAGE) with one
//! line naming it, as `kiam` does, before anything is started.

use std::process::{Command, Output};

fn sandbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiam-sandbox"))
        .args(args)
        .output()
        .unwrap()
}

fn expect_usage(args: &[&str], flag: &str) {
    let out = sandbox(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.contains(flag),
        "{args:?} does not name {flag}: {stderr}"
    );
    assert!(out.stdout.is_empty(), "{args:?} started something");
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    expect_usage(&["--no-such-flag"], "--no-such-flag");
    expect_usage(&["--sts", "aws"], "--sts");
    expect_usage(&["--seed"], "--seed");
    expect_usage(&["--seed", "/nonexistent/cluster.yaml"], "--seed");
    expect_usage(&["smoke", "--kiam"], "--kiam");
}

#[test]
fn help_lists_every_flag_and_exits_0() {
    let out = sandbox(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--check",
        "--seed",
        "--sts",
        "--loopback",
        "--kiam",
        "--state-dir",
        "smoke",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert_eq!(sandbox(&["-h"]).status.code(), Some(0));
}
