//! The peer table: Go kiam and kube2iam measured on the same load as ours.
//!
//! The surprise: on machines whose Go module proxy refuses the peers'
//! modules, neither can be built, and the table says so row by row ("n/a"
//! and why) rather than leaving the comparison out. A peer binary is taken
//! from `KIAM_GO_BIN` (what `scripts/peers.sh kiam-go` builds) and
//! `KUBE2IAM_BIN`; driving them against the in-memory API server and the
//! STS double is not written yet, so a binary that is present is named and
//! its rows still say n/a.

use std::path::PathBuf;

use anyhow::Result;

use crate::report::{Report, Section, Table};

/// The figures the issue asks for, per peer.
const ROWS: &[&str] = &[
    "warm credential request: throughput, p50, p99 at concurrency 1 / 16 / 64",
    "first request of a new pod",
    "agent and server CPU per request",
    "RSS of each process",
    "time to sync 10k / 100k pods",
    "STS calls for N pods sharing M roles",
];

struct Peer {
    name: &'static str,
    env: &'static str,
    module: &'static str,
    notes: &'static str,
}

const PEERS: &[Peer] = &[
    Peer {
        name: "Go kiam (agent + server, last commit 29504044e67c)",
        env: "KIAM_GO_BIN",
        module: "github.com/uswitch/kiam",
        notes: "scripts/peers.sh kiam-go builds it when the proxy serves the module",
    },
    Peer {
        name: "kube2iam (agent, current release)",
        env: "KUBE2IAM_BIN",
        module: "github.com/jtblin/kube2iam",
        notes: "it would reach the STS double through AWS_ENDPOINT_URL_STS",
    },
];

fn binary(env: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// The peer table.
pub fn peers(report: &mut Report) -> Result<()> {
    let mut t = Table::new(&["Figure", "kiam (this)", "Go kiam", "kube2iam"]);
    let why: Vec<String> = PEERS
        .iter()
        .map(|p| match binary(p.env) {
            Some(path) => format!(
                "n/a: a binary is given ({}) but kiam-bench does not drive this peer yet",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            None => format!("n/a: not built (no `{}`, see above)", p.env),
        })
        .collect();
    for row in ROWS {
        t.row(vec![
            (*row).to_string(),
            "figures 1-8".into(),
            why[0].clone(),
            why[1].clone(),
        ]);
    }
    report.sections.push(Section {
        title: "9. Peers: Go kiam and kube2iam".into(),
        method: format!(
            "Each peer would run against the same in-memory API server, STS double and load generator as kiam, in \
             the same run. Peer binaries: {}. The Go module proxy answers `403 Forbidden: This module version is \
             not available` for both modules ({}) on this machine (checked with `go list -m -versions` and by \
             `scripts/peers.sh kiam-go`'s build log) and github.com is not reachable, so no peer figure exists; \
             the ratios the issue asks for cannot be stated.",
            PEERS
                .iter()
                .map(|p| format!("{} from `{}` ({})", p.name, p.env, p.notes))
                .collect::<Vec<_>>()
                .join("; "),
            PEERS
                .iter()
                .map(|p| format!("`{}`", p.module))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        tables: vec![t],
        notes: vec![],
    });
    Ok(())
}
