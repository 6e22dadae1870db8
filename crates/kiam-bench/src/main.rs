//! `kiam-bench`: how fast and how lean kiam is, each figure next to the
//! floor this machine can reach for the same exchange, measured in the same
//! run. Prints the tables and (full runs) rewrites BENCHMARKS.md.
//!
//! The surprise: everything shares one small machine. Load generator,
//! servers, floors and emulators run side by side on the same cores, so
//! absolute numbers are what *this* machine does with both ends of every
//! connection on it; the ratios to the floors are the portable part.
//!
//! Run: `cargo run --release -p kiam-bench` (full, about 9 minutes) or
//! `cargo run --release -p kiam-bench -- --quick` (small sizes, under a
//! minute). Only a full run rewrites BENCHMARKS.md; `--quick` and `--only`
//! print, and write only to `--out`; `--only <figures> --replace-sections`
//! replaces just those figures' sections in BENCHMARKS.md, marked as a
//! separate run (e.g. figure 10, the ~10-minute scale run).
//!
//! - [`load`]: closed-loop HTTP and gRPC load with latency histograms.
//! - [`floor`]: the minimal servers kiam is compared with.
//! - [`cluster`]: an in-process kiam server on the in-memory API server.
//! - [`pods`]: realistic 4-8 KB pod objects.
//! - [`agent`], [`server`], [`sync`], [`prefetch`], [`confirm`], [`tags`],
//!   [`peers`], [`scale`]: the figures.
//! - [`alloc`]: a counting allocator for heap per pod (child process only).
//! - [`procs`]: real `kiam` processes and their RSS.
//! - [`report`]: the tables and BENCHMARKS.md.

mod agent;
mod alloc;
mod cluster;
mod confirm;
mod floor;
mod load;
mod machine;
mod peers;
mod pods;
mod prefetch;
mod procs;
mod replay;
mod report;
mod scale;
mod server;
mod sync;
mod tags;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks kiam against the machine's floor and writes BENCHMARKS.md")]
struct Args {
    /// Small sizes and short windows (under a minute); writes nothing unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Only these figures (comma-separated): agent, server, sync, prefetch, sts, agent-rss,
    /// confirm, tags, peers, scale;
    /// writes nothing unless --out is given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the report (default: BENCHMARKS.md in the workspace for full runs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pod counts for the sync figure (default 10000,100000; --quick 1000,5000).
    #[arg(long, value_delimiter = ',')]
    sync_sizes: Vec<usize>,
    /// With --only: replace just those figures' sections in BENCHMARKS.md (or --out),
    /// each marked as measured in a separate run; the rest of the file is kept.
    #[arg(long)]
    replace_sections: bool,
    /// Internal: measure one in-process server's heap (see `sync`).
    #[arg(long, hide = true)]
    heap_child: Option<String>,
}

const ALL: &[&str] = &[
    "agent",
    "server",
    "sync",
    "prefetch",
    "sts",
    "agent-rss",
    "confirm",
    "tags",
    "peers",
    "scale",
];

/// A multi-threaded tokio runtime like `kiam`'s own (one per role, so each
/// role's tasks run on its own workers as in separate processes).
pub fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.heap_child {
        alloc::enable();
        return sync::heap_child(spec);
    }
    kiam::ensure_crypto_provider();
    let wanted: Vec<&str> = if args.only.is_empty() {
        ALL.to_vec()
    } else {
        for o in &args.only {
            anyhow::ensure!(ALL.contains(&o.as_str()), "--only {o}: not one of {ALL:?}");
        }
        args.only.iter().map(String::as_str).collect()
    };
    let (window, rounds) = if args.quick {
        let w = load::Window {
            warmup: Duration::from_millis(300),
            measure: Duration::from_millis(1000),
        };
        (w, 1)
    } else {
        let w = load::Window {
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(3),
        };
        (w, 3)
    };
    let before = machine::Conditions::now();
    let mut report = report::Report::default();
    let started = std::time::Instant::now();
    for figure in &wanted {
        eprintln!("== {figure}");
        let r = match *figure {
            "agent" => agent::warm_path(&mut report, window, &[1, 16, 64], rounds),
            "server" => server::throughput(&mut report, window, rounds),
            "sync" => {
                let sizes: &[usize] = match (&args.sync_sizes[..], args.quick) {
                    ([], true) => &[1_000, 5_000],
                    ([], false) => &[10_000, 100_000],
                    (given, _) => given,
                };
                sync::memory_and_sync(&mut report, sizes)
            }
            "prefetch" => prefetch::prefetch(&mut report, args.quick),
            "sts" => prefetch::single_flight(&mut report, args.quick),
            "agent-rss" => agent::agent_rss(&mut report, window),
            "confirm" => confirm::confirmation_cost(&mut report, args.quick),
            "tags" => tags::per_pod_tags(&mut report, args.quick),
            "peers" => peers::peers(&mut report),
            "scale" => scale::scale(&mut report, args.quick),
            _ => unreachable!(),
        };
        if let Err(e) = r {
            eprintln!("{figure} failed: {e:#}");
            report.failures.push(format!("{figure}: {e:#}"));
        }
    }
    let after = machine::Conditions::now();
    let preamble = machine::preamble(&before, &after, args.quick, &wanted, started.elapsed());
    let generated = report.markdown(&preamble);
    println!("{generated}");
    if args.replace_sections {
        anyhow::ensure!(
            !args.only.is_empty() && !args.quick,
            "--replace-sections: give the figures with --only (and not --quick)"
        );
        let path = args.out.clone().unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../BENCHMARKS.md"))
        });
        let old = std::fs::read_to_string(&path)?;
        let provenance = format!(
            "*Measured in a separate run, not the full run above:* `cargo run --release -p kiam-bench -- \
             --only {} --replace-sections` from {} to {} ({:.0} s), load average {} at the start and {} \
             at the end (other sessions' builds and tests may have been running on the 2 cores).",
            wanted.join(","),
            before.at,
            after.at,
            started.elapsed().as_secs_f64(),
            before.loadavg,
            after.loadavg
        );
        std::fs::write(
            &path,
            report::replace_sections(&old, &report.sections, &provenance),
        )?;
        eprintln!(
            "replaced {} section(s) in {}",
            report.sections.len(),
            path.display()
        );
        if !report.failures.is_empty() {
            anyhow::bail!("{} figure(s) failed", report.failures.len());
        }
        return Ok(());
    }
    // Only a full run of every figure replaces the committed report.
    let out = match (&args.out, args.quick || !args.only.is_empty()) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../BENCHMARKS.md"
        ))),
        (None, true) => None,
    };
    if let Some(path) = out {
        let old = std::fs::read_to_string(&path).ok();
        std::fs::write(&path, report::merge(&generated, old.as_deref()))?;
        eprintln!("wrote {}", path.display());
    }
    if !report.failures.is_empty() {
        anyhow::bail!("{} figure(s) failed", report.failures.len());
    }
    Ok(())
}
