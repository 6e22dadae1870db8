//! Documentation that must match the binary: the flag reference, and the
//! metric names the Grafana dashboard and docs/METRICS.md use.

use std::path::PathBuf;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// docs/FLAGS.md is exactly what `kiam::flagdoc::markdown()` generates.
#[test]
fn flag_reference_matches_the_binary() {
    let want = kiam::flagdoc::markdown();
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
            kiam::flagdoc::REGENERATE
        );
    }
}
