//! Documentation that must match the binary: the flag reference, and the
//! metric names the Grafana dashboard and docs/METRICS.md use.

#[path = "support/flagdoc.rs"]
mod flagdoc;

#[path = "support/exposition.rs"]
mod exposition;

use exposition::{check_expr, dashboard_exprs, ours, scrape_server_and_agent, Exposition};
use std::path::PathBuf;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// docs/FLAGS.md is exactly what `flagdoc::markdown()` generates.
#[test]
fn flag_reference_matches_the_binary() {
    let want = flagdoc::markdown();
    let path = repo("docs/FLAGS.md");
    if std::env::var_os("KIAM_REGENERATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let first = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| have.lines().count().min(want.lines().count()));
        panic!(
            "docs/FLAGS.md is out of date with src/cli.rs (first difference at line {}):\n  \
             committed: {:?}\n  generated: {:?}\nRegenerate it with: {}",
            first + 1,
            have.lines().nth(first).unwrap_or("<end of file>"),
            want.lines().nth(first).unwrap_or("<end of file>"),
            flagdoc::REGENERATE
        );
    }
}

/// The Grafana dashboard and docs/METRICS.md name only metrics (and
/// labels) that a running server and agent export, and METRICS.md
/// documents every family they export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_metrics_doc_match_the_binaries() {
    let Some(e) = scrape_server_and_agent().await else {
        return;
    };
    let mut problems = Vec::new();

    let text = std::fs::read_to_string(repo("docs/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("docs/grafana-dashboard.json is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(
        exprs.len() >= 10,
        "the dashboard has only {} queries",
        exprs.len()
    );
    for (title, expr) in &exprs {
        if expr.trim().is_empty() {
            problems.push(format!("dashboard panel {title:?}: a target without expr"));
        }
        for p in check_expr(expr, &e) {
            problems.push(format!("dashboard panel {title:?}: {p}"));
        }
    }

    let doc = std::fs::read_to_string(repo("docs/METRICS.md")).unwrap();
    for (name, kind) in e.families.iter().filter(|(n, _)| ours(n)) {
        let want = Exposition::documented_name(name, kind);
        if !doc.contains(&format!("`{want}")) {
            problems.push(format!(
                "docs/METRICS.md does not document `{want}` ({kind}), which the binaries export"
            ));
        }
    }
    let series = e.series_names();
    let label_names = e.label_names();
    let token = regex::Regex::new(r"\b(?:kiam|grpc)_[a-zA-Z0-9_]+").unwrap();
    for line in doc.lines().filter(|l| !l.contains("not exported")) {
        for m in token.find_iter(line) {
            let n = m.as_str();
            if !series.contains(n) && !e.families.contains_key(n) && !label_names.contains(n) {
                problems.push(format!("docs/METRICS.md names {n}, which is not exported"));
            }
        }
    }
    println!(
        "{} dashboard queries and docs/METRICS.md checked against {} exported families",
        exprs.len(),
        e.families.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Relative links in README.md and docs/*.md point at files that exist.
#[test]
fn relative_links_resolve() {
    let mut files = vec![repo("README.md")];
    for entry in std::fs::read_dir(repo("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let link = regex::Regex::new(r"\]\(([^)#\s]+)(?:#[^)]*)?\)").unwrap();
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for cap in link.captures_iter(&text) {
            let target = &cap[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = file.parent().unwrap().join(target);
            if !resolved.exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
