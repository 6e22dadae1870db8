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
            out.push('\n');
            out.push_str(&s.markdown(None));
        }
        out
    }
}

impl Section {
    /// `## title`, the method, an optional line saying which run measured
    /// it, the tables and the notes.
    pub fn markdown(&self, provenance: Option<&str>) -> String {
        let mut out = String::new();
        let _ = write!(out, "## {}\n\n{}\n\n", self.title, self.method);
        if let Some(p) = provenance {
            let _ = write!(out, "{p}\n\n");
        }
        for t in &self.tables {
            out.push_str(&t.markdown());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    /// The figure's number ("10" for "10. Scale ...").
    fn number(&self) -> Option<&str> {
        self.title.split_once(". ").map(|(n, _)| n)
    }
}

/// `old` (a BENCHMARKS.md) with each of `sections` in place of the section
/// of the same number (or, if it has none, added before the kept part),
/// each marked with `provenance`; everything else is unchanged.
pub fn replace_sections(old: &str, sections: &[Section], provenance: &str) -> String {
    let mut text = old.to_string();
    for s in sections {
        let new = s.markdown(Some(provenance));
        let heading = s.number().map(|n| format!("\n## {n}. "));
        let start = heading.as_deref().and_then(|h| text.find(h)).map(|i| i + 1);
        let (start, end) = match start {
            Some(start) => {
                let after = start + 3;
                let end = [text[after..].find("\n## "), text[after..].find(KEEP_MARKER)]
                    .into_iter()
                    .flatten()
                    .min()
                    .map_or(text.len(), |i| {
                        after + i + usize::from(text[after + i..].starts_with('\n'))
                    });
                (start, end)
            }
            None => {
                let at = text.find(KEEP_MARKER).unwrap_or(text.len());
                (at, at)
            }
        };
        text.replace_range(start..end, &format!("{new}\n"));
    }
    text
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
    fn replace_sections_swaps_only_the_numbered_section() {
        let old = format!(
            "# B\n\n## 9. Nine\n\nold nine\n\n## 10. Ten\n\nold ten\n\n{KEEP_MARKER}\n## Changes\nkept\n"
        );
        let section = |title: &str| Section {
            title: title.into(),
            method: "new method".into(),
            tables: vec![],
            notes: vec!["a note".into()],
        };
        let new = replace_sections(&old, &[section("10. Ten again")], "*separate run*");
        assert!(new.contains("## 9. Nine\n\nold nine\n\n## 10. Ten again\n\nnew method\n\n*separate run*\n\n- a note\n\n<!--"));
        assert!(!new.contains("old ten"));
        assert!(new.ends_with("## Changes\nkept\n"));
        let added = replace_sections(&old, &[section("11. Eleven")], "*p*");
        assert!(added.contains("old ten\n\n## 11. Eleven"));
        assert!(added.contains("- a note\n\n<!--"));
    }

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
