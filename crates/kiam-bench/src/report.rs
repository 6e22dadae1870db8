//! The report: markdown tables printed to stdout and written to
//! BENCHMARKS.md. Everything in BENCHMARKS.md below [`KEEP_MARKER`] is
//! hand-written analysis and is carried over unchanged by every run.

use std::fmt::Write as _;

/// Lines after this one in BENCHMARKS.md survive a rewrite.
pub const KEEP_MARKER: &str = "<!-- kiam-bench: everything below this line is kept across runs -->";

#[derive(Debug, Default, Clone)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            out,
            "|{}|",
            self.header
                .iter()
                .map(|_| " --- ")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    /// How this section was measured (one paragraph).
    pub method: String,
    pub tables: Vec<Table>,
    /// Observations printed under the tables.
    pub notes: Vec<String>,
}

/// One target from the issue and what this run measured for it.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<Section>,
    pub verdicts: Vec<Verdict>,
    /// Failures of whole sections (the rest of the report still stands).
    pub failures: Vec<String>,
}

impl Report {
    pub fn verdict(&mut self, target: &str, measured: String, met: bool) {
        self.verdicts.push(Verdict {
            target: target.to_string(),
            measured,
            met,
        });
    }

    /// The generated part of BENCHMARKS.md.
    pub fn markdown(&self, preamble: &str) -> String {
        let mut out = String::new();
        out.push_str(preamble);
        out.push_str("\n## Targets\n\n");
        let mut t = Table::new(&["Target", "Measured", "Met"]);
        for v in &self.verdicts {
            t.row(vec![
                v.target.clone(),
                v.measured.clone(),
                if v.met { "yes" } else { "**no**" }.to_string(),
            ]);
        }
        out.push_str(&t.markdown());
        for f in &self.failures {
            let _ = writeln!(out, "\n**Section failed:** {f}");
        }
        for s in &self.sections {
            let _ = write!(out, "\n## {}\n\n{}\n\n", s.title, s.method);
            for t in &s.tables {
                out.push_str(&t.markdown());
                out.push('\n');
            }
            for n in &s.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

/// `generated` followed by the kept part of `old` (or a stub for it).
pub fn merge(generated: &str, old: Option<&str>) -> String {
    let kept = old
        .and_then(|o| o.split_once(KEEP_MARKER))
        .map(|(_, kept)| kept.to_string())
        .unwrap_or_else(|| "\n\n## Changes and what they bought\n\n(none yet)\n".to_string());
    format!("{}\n{KEEP_MARKER}{kept}", generated.trim_end())
}

/// Microseconds, readable.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

pub fn rate(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k/s", v / 1000.0)
    } else {
        format!("{v:.0}/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_the_hand_written_part() {
        let old = format!("# old table\n{KEEP_MARKER}\n## Changes\nkept text\n");
        let merged = merge("# new table\n", Some(&old));
        assert!(merged.starts_with("# new table\n"));
        assert!(merged.ends_with("\n## Changes\nkept text\n"));
        assert!(!merged.contains("old table"));
        assert!(merge("# t", None).contains("## Changes and what they bought"));
    }
}
