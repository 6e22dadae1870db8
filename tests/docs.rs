//! Documentation that must match the binary: the flag reference, and the
//! metric names the Grafana dashboard and docs/METRICS.md use.

#[path = "support/flagdoc.rs"]
mod flagdoc;

#[path = "support/exposition.rs"]
mod exposition;

use exposition::{check_expr, dashboard_exprs, ours, scrape_server_and_agent, Exposition};
use std::collections::{BTreeMap, BTreeSet};
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

// ---------------------------------------------------------------------------
// The prose: README.md and every docs/*.md (new files included).

/// README.md and every Markdown file in docs/, FLAGS.md (generated) last.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![repo("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// A path relative to the repository, for messages.
fn shown(path: &std::path::Path) -> String {
    path.strip_prefix(repo(""))
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A fenced code block: its info string, first line number, the marker
/// comment on the line before it (if any), and its lines (unindented).
#[derive(Debug)]
struct Block {
    lang: String,
    line: usize,
    marker: Option<String>,
    lines: Vec<String>,
}

fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            let indent = lines[i].len() - trimmed.len();
            let marker = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim())
                .filter(|l| l.starts_with("<!--"))
                .map(str::to_string);
            let start = i + 1;
            i += 1;
            let mut body = Vec::new();
            while i < lines.len() && lines[i].trim_start() != "```" {
                body.push(
                    lines[i]
                        .get(indent..)
                        .unwrap_or(lines[i].trim_start())
                        .to_string(),
                );
                i += 1;
            }
            out.push(Block {
                lang: info.trim().to_string(),
                line: start,
                marker,
                lines: body,
            });
        }
        i += 1;
    }
    out
}

/// Prose with fenced code blocks blanked out (line numbers kept).
fn prose(text: &str) -> String {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push("");
            continue;
        }
        out.push(if fenced { "" } else { line });
    }
    out.join("\n")
}

fn is_shell(lang: &str) -> bool {
    matches!(lang, "sh" | "bash" | "shell" | "console" | "zsh")
}

const MARKER_HELP: &str = "put one of these on the line just before the block:\n  \
    <!-- not-run: <why no test can run it here, e.g. needs a cluster> -->\n  \
    <!-- run-by: tests/<file>.rs (<what runs it>) -->  (tests/docs.rs runs the blocks it is named for \
    in a temporary directory, with `kiam` on PATH)";

/// Every shell block in README.md and docs/ is run by a test or says why
/// not, and a test it names exists and names the document.
#[test]
fn every_shell_block_is_run_by_a_test_or_says_why_not() {
    let mut problems = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        for b in blocks(&text).iter().filter(|b| is_shell(&b.lang)) {
            let at = format!("{}:{}", shown(&file), b.line);
            match b.marker.as_deref() {
                Some(m) if m.starts_with("<!-- not-run:") => {
                    let reason = m
                        .trim_start_matches("<!-- not-run:")
                        .trim_end_matches("-->");
                    if reason.trim().is_empty() {
                        problems.push(format!("{at}: `not-run` needs a reason; {MARKER_HELP}"));
                    }
                }
                Some(m) if m.starts_with("<!-- run-by:") => {
                    let test = m
                        .trim_start_matches("<!-- run-by:")
                        .split_whitespace()
                        .next()
                        .unwrap_or_default();
                    let Ok(source) = std::fs::read_to_string(repo(test)) else {
                        problems.push(format!("{at}: run-by names {test:?}, which does not exist"));
                        continue;
                    };
                    let name = file.file_name().unwrap().to_string_lossy().to_string();
                    if test != "tests/docs.rs" && !source.contains(&name) {
                        problems.push(format!("{at}: {test} never mentions {name}"));
                    }
                }
                _ => problems.push(format!(
                    "{at}: a ```{} block without a marker; {MARKER_HELP}",
                    b.lang
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A directory with `kiam` (this build) and a `kubectl` that keeps what it
/// is given in `kubectl-input.yaml`, first on PATH.
fn doc_shell(dir: &std::path::Path) -> std::process::Command {
    let bin = dir.join(".bin");
    std::fs::create_dir_all(&bin).unwrap();
    let kiam = bin.join("kiam");
    if !kiam.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kiam"), &kiam).unwrap();
        let kubectl = bin.join("kubectl");
        std::fs::write(&kubectl, "#!/bin/sh\ncat >> kubectl-input.yaml\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("bash");
    cmd.current_dir(dir)
        .env("PATH", path)
        .env_remove("KIAM_HOST")
        .env_remove("HOST_IP");
    cmd
}

/// The blocks marked `run-by: tests/docs.rs`, run in document order in one
/// temporary directory per document (so a block can use what an earlier
/// one wrote), each with `bash -e -o pipefail` (a failing command before a
/// pipe fails the block): every one must succeed.
#[test]
fn shell_blocks_marked_for_this_test_run_as_written() {
    let mut ran = 0;
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        let mine: Vec<Block> = blocks(&text)
            .into_iter()
            .filter(|b| {
                b.marker
                    .as_deref()
                    .is_some_and(|m| m.starts_with("<!-- run-by: tests/docs.rs"))
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        for b in &mine {
            let script = b.lines.join("\n");
            let out = doc_shell(dir.path())
                .args(["-e", "-o", "pipefail", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}:{}: the block failed ({}):\n{script}\nstdout: {}\nstderr: {}",
                shown(&file),
                b.line,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
        // Whatever a block piped into `kubectl apply -f -` must be YAML
        // Kubernetes objects.
        if let Ok(input) = std::fs::read_to_string(dir.path().join("kubectl-input.yaml")) {
            for doc in serde_yaml::Deserializer::from_str(&input) {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                if v.is_null() {
                    continue;
                }
                assert!(
                    v["kind"].is_string() && v["apiVersion"].is_string(),
                    "{v:?}"
                );
            }
        }
    }
    assert!(ran > 0, "no block is marked run-by: tests/docs.rs");
}

use serde::Deserialize;

/// Every kiam flag (long name) per subcommand, and its default as --help
/// prints it.
fn kiam_flags() -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    use clap::CommandFactory;
    let mut out = BTreeMap::new();
    for sub in kiam::cli::Cli::command().get_subcommands() {
        let mut flags = BTreeMap::new();
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                let default = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                flags.insert(long.to_string(), Some(default).filter(|d| !d.is_empty()));
            }
        }
        flags.insert("help".into(), None);
        out.insert(sub.get_name().to_string(), flags);
    }
    out
}

/// Flags the documents name that belong to other programs (kube2iam, Go
/// kiam, kubelet, iptables, the container engines, ...), each with whose.
const FOREIGN_FLAGS: &[(&str, &str)] = &[
    ("base-role-arn", "kube2iam"),
    ("auto-discover-base-arn", "kube2iam"),
    ("default-role", "kube2iam"),
    ("auto-discover-default-role", "kube2iam"),
    ("namespace-restrictions", "kube2iam"),
    ("namespace-key", "kube2iam"),
    ("namespace-restriction-format", "kube2iam"),
    ("iam-role-session-ttl", "kube2iam"),
    ("use-regional-sts-endpoint", "kube2iam"),
    ("iam-role-key", "kube2iam"),
    ("iam-external-id", "kube2iam"),
    ("host-ip", "kube2iam"),
    ("app-port", "kube2iam"),
    ("metrics-port", "kube2iam"),
    ("metadata-addr", "kube2iam"),
    ("log-level", "kube2iam"),
    ("verbose", "kube2iam"),
    ("debug", "kube2iam"),
    ("log-format", "kube2iam"),
    ("node", "kube2iam"),
    ("api-server", "kube2iam"),
    ("api-token", "kube2iam"),
    ("insecure", "kube2iam"),
    (
        "no-iptables-remove",
        "Go kiam's kingpin negation, accepted by kiam too",
    ),
    (
        "no-iptables",
        "Go kiam's kingpin negation, accepted by kiam too",
    ),
    (
        "no-json-log",
        "Go kiam's kingpin negation, accepted by kiam too",
    ),
    ("no-", "kingpin's negation prefix"),
    ("flag", "a placeholder"),
    ("no-flag", "a placeholder for kingpin's negation"),
    ("comment", "iptables' comment match"),
    ("user", "podman and docker"),
    ("register-with-taints", "kubelet"),
    ("service-cluster-ip-range", "kube-apiserver"),
    ("enable-host-legacy-routing", "cilium-agent"),
    ("force", "kiam certs"),
    ("nocapture", "the Rust test harness"),
    ("quick", "kiam-bench"),
    ("only", "kiam-bench"),
    ("out", "kiam-bench"),
    ("tool", "valgrind"),
];

/// Every `--flag` the documents put in inline code is a kiam flag (of some
/// role) or one of FOREIGN_FLAGS; every flag on a `kiam <role>` command
/// line in a shell block is one of that role's; and a default stated next
/// to a flag (`--flag` ... default `x`) is the one --help prints.
#[test]
fn flags_and_defaults_named_in_the_docs_are_the_binarys() {
    let flags = kiam_flags();
    let any_role = |name: &str| flags.values().any(|f| f.contains_key(name));
    let foreign = |name: &str| FOREIGN_FLAGS.iter().any(|(f, _)| *f == name);
    let inline = regex::Regex::new(r"`[^`]*?--([a-z][a-z0-9-]*)[^`]*`").unwrap();
    let flag_in_code = regex::Regex::new(r"(?:^|[\s`(\[])--([a-z][a-z0-9-]*)").unwrap();
    let stated_default =
        regex::Regex::new(r"`--([a-z][a-z0-9-]*)`[^.`|]{0,30}?\(?default(?:s to)?:? `([^`]+)`")
            .unwrap();
    let row = regex::Regex::new(r"^\| `--([a-z][a-z0-9-]*)` \|.*\| `([^`]+)` \|$").unwrap();
    let mut problems = Vec::new();
    for file in documents() {
        if file.ends_with("FLAGS.md") {
            continue; // generated from the binary
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let prose = prose(&text);
        for (n, line) in prose.lines().enumerate() {
            for span in inline.find_iter(line) {
                let span = span.as_str();
                // Commands of other programs in inline code are theirs.
                let first = span
                    .trim_matches('`')
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                if [
                    "iptables", "kubectl", "podman", "docker", "cargo", "openssl", "curl", "helm",
                    "cilium",
                ]
                .contains(&first)
                {
                    continue;
                }
                for cap in flag_in_code.captures_iter(span) {
                    let name = &cap[1];
                    if !any_role(name) && !foreign(name) {
                        problems.push(format!(
                            "{}:{}: `--{name}` is no kiam flag (`kiam <role> --help`); if it is \
                             another program's, add it to FOREIGN_FLAGS in tests/docs.rs",
                            shown(&file),
                            n + 1
                        ));
                    }
                }
            }
            for cap in stated_default.captures_iter(line) {
                let (name, said) = (&cap[1], &cap[2]);
                let defaults: Vec<&Option<String>> =
                    flags.values().filter_map(|f| f.get(name)).collect();
                if defaults.is_empty() {
                    continue;
                }
                if !defaults.iter().any(|d| d.as_deref() == Some(said)) {
                    problems.push(format!(
                        "{}:{}: says `--{name}` defaults to `{said}`, --help says {:?}",
                        shown(&file),
                        n + 1,
                        defaults
                    ));
                }
            }
        }
        // Tables of defaults (a heading with "default" in it): a row whose
        // first cell is a kiam flag and whose last cell is one `value`
        // states that flag's default.
        let mut in_defaults = false;
        for (n, line) in prose.lines().enumerate() {
            if line.starts_with('#') {
                in_defaults = line.to_lowercase().contains("default");
                continue;
            }
            let Some(cap) = row.captures(line).filter(|_| in_defaults) else {
                continue;
            };
            let (name, said) = (&cap[1], &cap[2]);
            let defaults: Vec<&Option<String>> =
                flags.values().filter_map(|f| f.get(name)).collect();
            if !defaults.is_empty() && !defaults.iter().any(|d| d.as_deref() == Some(said)) {
                problems.push(format!(
                    "{}:{}: the table gives `--{name}` the default `{said}`, --help says {:?}",
                    shown(&file),
                    n + 1,
                    defaults
                ));
            }
        }
        // `kiam <role> ...` command lines in shell blocks.
        for b in blocks(&text).iter().filter(|b| is_shell(&b.lang)) {
            let joined = b.lines.join("\n").replace("\\\n", " ");
            for line in joined.lines() {
                let line = line.split(" #").next().unwrap_or(line);
                for segment in line.split(['|', ';']).flat_map(|s| s.split("&&")) {
                    let words: Vec<&str> = segment.split_whitespace().collect();
                    let Some(at) = words.iter().position(|w| {
                        *w == "kiam"
                            || w.ends_with("/kiam")
                            || w.starts_with("registry.example.com/kiam")
                    }) else {
                        continue;
                    };
                    let Some(role) = words.get(at + 1).filter(|r| flags.contains_key(**r)) else {
                        continue;
                    };
                    for w in &words[at + 2..] {
                        let Some(name) = w.strip_prefix("--") else {
                            continue;
                        };
                        let name = name.split('=').next().unwrap_or(name);
                        if !flags[*role].contains_key(name) {
                            problems.push(format!(
                                "{}:{}: `kiam {role}` has no --{name}",
                                shown(&file),
                                b.line
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_`
/// dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text).lines() {
        let Some(h) = line.strip_prefix('#') else {
            continue;
        };
        let h = h.trim_start_matches('#');
        if !h.starts_with(' ') {
            continue;
        }
        let base = slug(h);
        let n = seen.entry(base.clone()).or_default();
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Relative links in README.md and docs/*.md point at files that exist,
/// and a `#section` in them (or a link within the page) at a heading there.
#[test]
fn relative_links_resolve() {
    let link = regex::Regex::new(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)").unwrap();
    let mut broken = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        for cap in link.captures_iter(&prose(&text)) {
            let target = &cap[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = if target.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(target)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target} does not exist", shown(&file)));
                continue;
            }
            if let Some(anchor) = cap.get(2).map(|m| m.as_str()) {
                let is_md = resolved.extension().is_some_and(|e| e == "md");
                if is_md {
                    let there = std::fs::read_to_string(&resolved).unwrap();
                    if !anchors(&there).contains(anchor) {
                        broken.push(format!(
                            "{}: {target}#{anchor}: no such heading in {}",
                            shown(&file),
                            shown(&resolved)
                        ));
                    }
                }
            }
        }
    }
    // Section references by name (`docs/IAM.md, "The server's identity"`)
    // in the documents and the manifests' comments.
    let by_name = regex::Regex::new(r#"(?:docs/)?([A-Z][A-Z-]+\.md)[,:]? \(?"([^"]+)""#).unwrap();
    let mut sources = documents();
    let mut stack = vec![repo("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                sources.push(path);
            }
        }
    }
    for file in sources {
        let text = std::fs::read_to_string(&file).unwrap();
        for cap in by_name.captures_iter(&text) {
            let (doc, section) = (&cap[1], &cap[2]);
            let path = [repo("docs").join(doc), repo(doc)]
                .into_iter()
                .find(|p| p.exists());
            let Some(path) = path else {
                broken.push(format!("{}: {doc} does not exist", shown(&file)));
                continue;
            };
            let there = std::fs::read_to_string(&path).unwrap();
            if !anchors(&there).contains(&slug(section)) {
                broken.push(format!(
                    "{}: {doc} has no section {section:?}",
                    shown(&file)
                ));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// A paragraph that cites BENCHMARKS.md or RELIABILITY.md, and a table right
/// after it, quote figures (a number with a unit) that are in the cited
/// file; and the "every test the tables cite" command of RELIABILITY.md
/// names every test file its tables cite.
#[test]
fn figures_quoted_from_benchmarks_and_reliability_are_theirs() {
    let figure = regex::Regex::new(r"(\d+(?:\.\d+)?)\s?(ms|µs|s|MiB|MB|KiB|KB|%)\b").unwrap();
    let sources: Vec<(&str, String)> = ["BENCHMARKS.md", "docs/RELIABILITY.md"]
        .iter()
        .map(|f| (*f, std::fs::read_to_string(repo(f)).unwrap()))
        .collect();
    let normalise = |t: &str| t.replace(' ', "");
    let mut problems = Vec::new();
    for file in documents() {
        let name = shown(&file);
        if name == "docs/RELIABILITY.md" || name == "docs/FLAGS.md" {
            continue;
        }
        let text = prose(&std::fs::read_to_string(&file).unwrap());
        let paragraphs: Vec<&str> = text.split("\n\n").collect();
        for (i, p) in paragraphs.iter().enumerate() {
            let cited: Vec<&(&str, String)> = sources
                .iter()
                .filter(|(f, _)| p.contains(f.rsplit('/').next().unwrap()))
                .collect();
            if cited.is_empty() {
                continue;
            }
            let mut scope = p.to_string();
            if let Some(next) = paragraphs
                .get(i + 1)
                .filter(|n| n.trim_start().starts_with('|'))
            {
                scope.push_str(next);
            }
            for m in figure.find_iter(&scope) {
                let quoted = normalise(m.as_str());
                if !cited
                    .iter()
                    .any(|(_, body)| normalise(body).contains(&quoted))
                {
                    problems.push(format!(
                        "{name}: {:?} is not in {} (which the paragraph cites)",
                        m.as_str(),
                        cited
                            .iter()
                            .map(|(f, _)| *f)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ));
                }
            }
        }
    }
    // RELIABILITY.md's command runs every test file its tables cite.
    let reliability = &sources[1].1;
    let block = blocks(reliability)
        .into_iter()
        .find(|b| b.lines.iter().any(|l| l.contains("every test the tables")))
        .expect("RELIABILITY.md's command for every test the tables cite");
    let command = block.lines.join(" ");
    let cited = regex::Regex::new(r"`([a-z_0-9]+)::").unwrap();
    for cap in cited.captures_iter(reliability) {
        let test = &cap[1];
        if repo(&format!("tests/{test}.rs")).exists()
            && !command.contains(&format!("--test {test} "))
            && !command.contains(&format!("--test {test}\n"))
        {
            problems.push(format!(
                "docs/RELIABILITY.md cites {test}:: but its command leaves out --test {test}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
