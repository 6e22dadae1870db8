//! The `kiam` binary: parse flags, set up logging, run the chosen role.
//! Bad flags or unreadable files exit 64 with one line naming the flag,
//! before any port is bound.

use kiam::cli::{Cli, Command, LogArgs};
use kiam::Fatal;

fn main() {
    kiam::ensure_crypto_provider();
    // HOST_IP is the agent's; `kiam certs --host` must not pick it up.
    if std::env::args_os().nth(1).is_some_and(|a| a == "agent") {
        kiam::cli::host_ip_fallback();
    }
    let cli = match Cli::try_parse_kingpin(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line naming the flag: clap's message up to its usage
            // section (a missing flag is named on the second line).
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("{line}");
            std::process::exit(kiam::EXIT_USAGE);
        }
    };
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Fatal> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::Failed(format!("starting the async runtime: {e}")))
}

fn init_logging(log: &LogArgs) {
    kiam::telemetry::init_logging(log);
}

fn run(command: Command) -> Result<(), Fatal> {
    match command {
        Command::Server(args) => {
            init_logging(&args.log);
            runtime()?
                .block_on(kiam::server::main(*args))
                .map_err(Fatal::from)
        }
        Command::Agent(args) => {
            init_logging(&args.log);
            runtime()?.block_on(kiam::agent::main(*args)).map_err(|e| {
                if e.is_usage() {
                    Fatal::Usage(e.to_string())
                } else {
                    Fatal::Failed(e.to_string())
                }
            })
        }
        Command::Health(args) => {
            init_logging(&args.log);
            let message = runtime()?.block_on(kiam::health::main(args))?;
            println!("{message}");
            Ok(())
        }
        Command::Explain(args) => {
            init_logging(&args.log);
            let served = runtime()?.block_on(kiam::explain::main(args))?;
            if !served {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Webhook(args) => {
            init_logging(&args.log);
            runtime()?.block_on(kiam::webhook::main(*args))
        }
        Command::Certs(args) => kiam::certs::run(&args).map_err(|e| Fatal::Usage(e.to_string())),
    }
}
