//! The flag reference (docs/FLAGS.md), generated from the clap definitions
//! in `kiam::cli` so that it cannot drift from the binary: `tests/docs.rs`
//! fails when the committed file differs from [`markdown`]'s output. It lives
//! with the tests because nothing but that check uses it.
//!
//! Only clap's introspection is used; nothing here restates a default or an
//! env var by hand, except `HOST_IP`, which `kiam::cli::host_ip_fallback`
//! reads outside clap.

use std::fmt::Write;

use clap::{Arg, ArgAction, Command, CommandFactory};

use kiam::cli::Cli;

/// How to regenerate docs/FLAGS.md; printed at the top of the file and by the
/// test that compares it.
pub const REGENERATE: &str = "KIAM_REGENERATE_DOCS=1 cargo test --test docs flag_reference";

/// The whole flag reference as markdown.
pub fn markdown() -> String {
    let mut cli = Cli::command();
    // Building fills in what derive leaves to the parser (e.g. the version).
    cli.build();
    let mut out = String::new();
    out.push_str("# Flag reference\n\n");
    let _ = writeln!(
        out,
        "<!-- Generated from src/cli.rs by tests/support/flagdoc.rs; do not edit. \
         Regenerate with: {REGENERATE} -->\n"
    );
    out.push_str(
        "Every flag can also be given as an environment variable (the env column); a flag \
         on the command line wins over the variable. Booleans take `--flag`, `--flag=true` \
         or `--flag=false`. Durations use Go's syntax: `500ms`, `30s`, `15m`, `1h30m`.\n\n",
    );
    out.push_str(
        "Bad flags or unreadable files make `kiam` exit with code 64 and one line naming \
         the flag. `kiam server --check-config` and `kiam agent --check-config` check \
         flags and files without starting anything.\n",
    );
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        subcommand(&mut out, sub);
    }
    out
}

fn subcommand(out: &mut String, sub: &Command) {
    let _ = write!(out, "\n## kiam {}\n\n", sub.get_name());
    if let Some(about) = sub.get_long_about().or(sub.get_about()) {
        let about = one_line(&about.to_string());
        let _ = writeln!(out, "{}.\n", about.trim_end_matches('.'));
    }
    out.push_str("| flag | default | env | description |\n");
    out.push_str("|------|---------|-----|-------------|\n");
    let mut args: Vec<&Arg> = sub
        .get_arguments()
        .filter(|a| {
            a.is_positional() || a.get_long().is_some_and(|l| l != "help" && l != "version")
        })
        .collect();
    // Positionals (no long name) first, then flags by name.
    args.sort_by_key(|a| a.get_long());
    for arg in args {
        row(out, sub.get_name(), arg);
    }
}

/// `POD`: the value name of a positional argument.
fn positional_name(arg: &Arg) -> String {
    arg.get_value_names().and_then(|n| n.first()).map_or_else(
        || arg.get_id().to_string().to_uppercase(),
        |n| n.to_string(),
    )
}

fn row(out: &mut String, sub: &str, arg: &Arg) {
    let long = arg.get_long().unwrap_or_default();
    let flag = if arg.is_positional() {
        format!("`{}` (argument)", positional_name(arg))
    } else {
        format!("`--{long}{}`", value_syntax(arg))
    };

    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    let default = if arg.is_required_set() {
        "required".to_string()
    } else if defaults.is_empty() {
        // No default at all: the help says what happens when it is unset.
        "(unset)".to_string()
    } else if defaults.iter().all(|d| d.is_empty()) {
        "(empty)".to_string()
    } else {
        format!("`{}`", defaults.join(","))
    };

    let mut env = arg
        .get_env()
        .map(|e| format!("`{}`", e.to_string_lossy()))
        .unwrap_or_default();
    if sub == "agent" && long == "host" {
        env.push_str(", `HOST_IP`");
    }

    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| one_line(&h.to_string()))
        .unwrap_or_default();
    let mut description = help;
    if !description.is_empty() && !description.ends_with('.') {
        description.push('.');
    }
    let choices: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|_| !is_bool(arg))
        .map(|p| format!("`{}`", p.get_name()))
        .collect();
    if !choices.is_empty() {
        let _ = write!(description, " One of {}.", choices.join(", "));
    }
    if arg.is_hide_set() {
        description.push_str(" (Hidden from `--help`.)");
    }
    let _ = writeln!(
        out,
        "| {flag} | {} | {env} | {} |",
        cell(&default),
        cell(&description)
    );
}

fn takes_value(arg: &Arg) -> bool {
    !matches!(
        arg.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count | ArgAction::Help
    )
}

/// kingpin-style booleans: `--flag` alone, or with `=true`/`=false`.
fn is_bool(arg: &Arg) -> bool {
    let names: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|p| p.get_name().to_string())
        .collect();
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
        || (names.len() == 2
            && names.iter().any(|n| n == "true")
            && names.iter().any(|n| n == "false"))
}

fn value_syntax(arg: &Arg) -> String {
    if is_bool(arg) {
        if takes_value(arg) {
            return "[=BOOL]".to_string();
        }
        return String::new();
    }
    if !takes_value(arg) {
        return String::new();
    }
    let name = arg
        .get_value_names()
        .and_then(|n| n.first())
        .map(|n| n.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let repeat = if arg.get_value_delimiter().is_some() {
        "[,...]"
    } else {
        ""
    };
    format!(" <{name}>{repeat}")
}

/// Paragraphs joined into one line: a table cell cannot hold newlines.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Escapes what would end a markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_of_every_role_is_listed() {
        let doc = markdown();
        for sub in Cli::command().get_subcommands() {
            assert!(doc.contains(&format!("## kiam {}", sub.get_name())));
            for arg in sub.get_arguments() {
                if arg.is_positional() {
                    let name = positional_name(arg);
                    assert!(doc.contains(&format!("`{name}` (argument)")), "{name}");
                    continue;
                }
                let long = arg.get_long().unwrap();
                assert!(
                    doc.contains(&format!("`--{long}")),
                    "kiam {} --{long} missing",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn rows_carry_defaults_env_and_choices() {
        let doc = markdown();
        assert!(doc.contains(
            "| `--session-duration <SESSION_DURATION>` | `60m` | `KIAM_SESSION_DURATION` |"
        ));
        assert!(doc.contains("| `--iptables[=BOOL]` | `false` | `KIAM_IPTABLES` |"));
        assert!(doc.contains("`KIAM_HOST`, `HOST_IP`"));
        assert!(doc.contains("One of `debug`, `info`, `warn`, `error`."));
        assert!(doc.contains("| `--cert <CERT>` | required | `KIAM_CERT` |"));
    }
}
