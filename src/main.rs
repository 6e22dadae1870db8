//! The `kiam` binary: parse flags, set up logging, run the chosen role.
//! Bad flags or unreadable files exit 64 with one line naming the flag,
//! before any port is bound.

use clap::Parser;
use kiam::cli::Cli;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line, naming the flag: clap's first line does.
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{line}");
            std::process::exit(kiam::EXIT_USAGE);
        }
    };
    let _ = cli;
}
