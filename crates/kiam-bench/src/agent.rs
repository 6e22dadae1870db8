//! Figures 1 and 6: the agent's warm credential path against its floors, and
//! the real `kiam agent` process's RSS at rest and under load.
//!
//! Pods are loopback addresses (127.1.0.1-64) so that each load worker can
//! connect *from* its pod's address, as a pod's connection arrives after the
//! DNAT rule; the kiam server (in-process, fake STS) has those pods in a
//! permitted namespace and their credentials cached before measuring.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use kiam::agent::client::Pool;
use kiam::agent::metadata::RouterContext;
use kiam::agent::metrics::Metrics;
use kiam::agent::proxy::Upstream;
use kiam::agent::server_address::SystemResolver;
use kiam::agent::TlsConnect;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam::tls::{ClientTls, ServerTls};
use kiam_sandbox::apiserver::FakeApiServer;
use kiam_sandbox::procs::{self as sandbox_procs, ChildGuard};
use prometheus_client::registry::Registry;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::load::{self, HttpPlan, Stats, Window};
use crate::procs::{self, mib};
use crate::report::{rate, us, Report, Section, Table};
use crate::{floor, pods, runtime};

const PODS: usize = 64;
const ROLES: usize = 16;

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1 + (i % PODS) as u8))
}

fn role(i: usize) -> String {
    format!("bench-role-{:02}", i % ROLES)
}

fn creds_path(i: usize) -> String {
    format!("/latest/meta-data/iam/security-credentials/{}", role(i))
}

/// The fake API server and kiam server the agent talks to.
pub struct Backend {
    pub _api: FakeApiServer,
    pub cluster: Cluster,
}

pub fn backend(rt: &Runtime) -> Result<Backend> {
    backend_with(rt, &[])
}

/// [`backend`] with extra `kiam server` flags.
fn backend_with(rt: &Runtime, extra: &[&str]) -> Result<Backend> {
    rt.block_on(async {
        let api = FakeApiServer::start().await?;
        api.create_namespace(pods::namespace("bench", Some(".*")))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for i in 0..PODS {
            let mut spec = pods::population(i, 1, ROLES);
            spec.namespace = "bench".into();
            spec.ip = pod_ip(i).to_string();
            spec.role = Some(role(i));
            api.apply_pod(pods::pod(&spec))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let cluster = Cluster::start(&api, extra).await?;
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(Backend { _api: api, cluster })
    })
}

/// `kiam agent` flags for talking to `server`, parsed by kiam's own CLI.
fn agent_args(server: SocketAddr, pki: &kiam::certs::Pki) -> Result<kiam::cli::AgentArgs> {
    use clap::Parser;
    let path = |n: &str| pki.path(n).display().to_string();
    let argv = [
        "kiam".to_string(),
        "agent".into(),
        "--cert".into(),
        path("agent.pem"),
        "--key".into(),
        path("agent-key.pem"),
        "--ca".into(),
        path("ca.pem"),
        "--host".into(),
        "127.0.0.1".into(),
        "--server-address".into(),
        format!("127.0.0.1:{}", server.port()),
        "--metadata-endpoint".into(),
        "http://127.0.0.1:9".into(),
    ];
    match kiam::cli::Cli::try_parse_from(argv)?.command {
        kiam::cli::Command::Agent(args) => Ok(*args),
        _ => bail!("not an agent command line"),
    }
}

/// The agent as `kiam agent` builds it, served by `kiam::agent::run`.
async fn start_agent(b: &Backend, stop: CancellationToken) -> Result<SocketAddr> {
    let args = agent_args(b.cluster.addr, &b.cluster.pki)?;
    let v = kiam::agent::validate(&args)?;
    let mut registry = Registry::default();
    let tls = ClientTls::load(b.cluster.pki.agent_files(), &mut registry)?;
    let pool = Pool::new(
        v.pool,
        Arc::new(TlsConnect(tls)),
        Arc::new(SystemResolver),
        kiam::grpc_metrics::GrpcMetrics::client(&mut registry),
    )
    .await;
    let upstream = Upstream::new("http://127.0.0.1:9", Duration::from_secs(2))?;
    let state = RouterContext::new(
        v.config,
        Arc::new(pool),
        Arc::new(upstream),
        Metrics::new(&mut registry),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(kiam::agent::run(listener, state, stop));
    Ok(addr)
}

fn plan(target: SocketAddr, min_body: usize) -> Arc<HttpPlan> {
    Arc::new(HttpPlan {
        target,
        sources: (0..PODS).map(pod_ip).collect(),
        paths: (0..PODS).map(creds_path).collect(),
        min_body,
    })
}

/// Asks once for every pod's credentials (so the server has them cached);
/// returns the first pod's answer.
async fn warm(agent: SocketAddr) -> Result<Bytes> {
    let mut first = None;
    for i in 0..PODS {
        let mut last = None;
        for _ in 0..100 {
            let (status, body) = load::get_once(agent, pod_ip(i), &creds_path(i)).await?;
            if status == 200 {
                last = Some(body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let body = last.with_context(|| format!("pod {} never got credentials", pod_ip(i)))?;
        first.get_or_insert(body);
    }
    first.context("no pods")
}

/// GetPodCredentials calls a kiam server has started.
fn server_credential_calls(c: &Cluster) -> f64 {
    c.counter(
        "grpc_server_started_total{grpc_method=\"GetPodCredentials\",grpc_service=\"kiam.KiamService\",grpc_type=\"unary\"}",
    )
}

/// The runtimes whose CPU is accounted (thread-name prefixes).
const RUNTIMES: &[&str] = &["kiam-agent", "kiam-server", "floor", "load"];

fn latency_row(name: &str, s: &Stats, floor: &Stats, serving: &[&str]) -> Vec<String> {
    let split = if serving.len() > 1 {
        format!(
            " ({})",
            serving
                .iter()
                .map(|r| format!("{} {:.0}", r.trim_start_matches("kiam-"), s.cpu_us(&[r])))
                .collect::<Vec<_>>()
                .join(" + ")
        )
    } else {
        String::new()
    };
    vec![
        s.concurrency.to_string(),
        name.to_string(),
        rate(s.rps()),
        us(s.p_us(0.5)),
        us(s.p_us(0.99)),
        us(s.p_us(0.999)),
        format!("{:.2}x", s.p_us(0.5) / floor.p_us(0.5)),
        format!("{:.2}x", s.p_us(0.99) / floor.p_us(0.99)),
        format!("{:.0} µs{split}", s.cpu_us(serving)),
        format!("{:.0} µs", s.cpu_us(&["load"])),
        s.errors.to_string(),
    ]
}

/// Figure 1.
pub fn warm_path(
    report: &mut Report,
    window: Window,
    levels: &[usize],
    rounds: usize,
) -> Result<()> {
    let kiam_rt = runtime("kiam-server", 2);
    let agent_rt = runtime("kiam-agent", 2);
    let floor_rt = runtime("floor", 2);
    let load_rt = runtime("load", 2);
    let b = backend(&kiam_rt)?;
    // A server that grants no reuse window (confirmation off, so no pod is
    // ever just confirmed by the API): the agent asks it for every request,
    // as it does a Go kiam server.
    let cold_b = backend_with(&kiam_rt, &["--pod-confirmations-per-second", "0"])?;
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let agent = agent_rt.block_on(start_agent(&b, stop.clone()))?;
    let cold_agent = agent_rt.block_on(start_agent(&cold_b, stop.clone()))?;
    let body = load_rt.block_on(warm(agent))?;
    load_rt.block_on(warm(cold_agent))?;
    // The same credentials message the agent relays, for the gRPC floor.
    let creds = load_rt.block_on(async {
        let mut c = KiamServiceClient::new(b.cluster.channel()?);
        let r = c
            .get_pod_credentials(GetPodCredentialsRequest {
                ip: pod_ip(0).to_string(),
                role: role(0),
            })
            .await?;
        Ok::<_, anyhow::Error>(r.into_inner())
    })?;
    let http_floor = floor_rt.block_on(floor::http_floor(body.clone(), stop.clone()))?;
    let tls = ServerTls::load(b.cluster.pki.server_files(), &mut Registry::default())?;
    let grpc_floor = floor_rt.block_on(floor::grpc_floor(creds, tls, stop.clone()))?;
    let hop_floor = floor_rt.block_on(async {
        let channel = ClientTls::load(b.cluster.pki.agent_files(), &mut Registry::default())?
            .channel(
                &format!("127.0.0.1:{}", grpc_floor.port()),
                &kiam::tls::ChannelOpts::default(),
            )?;
        floor::hop_floor(body.clone(), channel, stop.clone()).await
    })?;

    let mut table = Table::new(&[
        "Concurrency",
        "Server",
        "Throughput",
        "p50",
        "p99",
        "p99.9",
        "p50 / floor",
        "p99 / floor",
        "Serving CPU per request",
        "Load generator CPU per request",
        "Server calls/s",
        "Errors",
    ]);
    let mut c16 = None;
    let with_calls = |mut row: Vec<String>, calls: Option<f64>| {
        let errors = row.pop().expect("errors column");
        row.push(calls.map_or("-".into(), |c| format!("{c:.0}")));
        row.push(errors);
        row
    };
    let seconds = (window.warmup + window.measure).as_secs_f64();
    for &c in levels {
        let run =
            |addr| load_rt.block_on(load::http(plan(addr, body.len() / 2), c, window, RUNTIMES));
        // Rounds interleave floor and kiam so both see the same neighbours;
        // each row keeps its best round (see `load::best`).
        let (mut f, mut h, mut a, mut g) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Server calls per second during each agent's best round.
        let (mut a_calls, mut g_calls) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            f.push(run(http_floor)?);
            h.push(run(hop_floor)?);
            let before = server_credential_calls(&b.cluster);
            a.push(run(agent)?);
            a_calls.push((server_credential_calls(&b.cluster) - before) / seconds);
            let before = server_credential_calls(&cold_b.cluster);
            g.push(run(cold_agent)?);
            g_calls.push((server_credential_calls(&cold_b.cluster) - before) / seconds);
        }
        let best_calls = |stats: &[Stats], calls: &[f64]| {
            let i = (0..stats.len())
                .max_by(|&x, &y| stats[x].rps().total_cmp(&stats[y].rps()))
                .unwrap_or(0);
            calls.get(i).copied()
        };
        let (a_call, g_call) = (best_calls(&a, &a_calls), best_calls(&g, &g_calls));
        let (f, h, a, g) = (load::best(f), load::best(h), load::best(a), load::best(g));
        eprintln!(
            "agent c={c}: floor {:.0}/s p99 {:.0}µs; floor+hop {:.0}/s p99 {:.0}µs; agent {:.0}/s p99 {:.0}µs",
            f.rps(),
            f.p_us(0.99),
            h.rps(),
            h.p_us(0.99),
            a.rps(),
            a.p_us(0.99)
        );
        eprintln!(
            "agent c={c}: no reuse window {:.0}/s p99 {:.0}µs; server calls/s {a_call:?} (warm) {g_call:?} (no window)",
            g.rps(),
            g.p_us(0.99),
        );
        table.row(with_calls(
            latency_row("floor: hyper, fixed bytes", &f, &f, &["floor"]),
            None,
        ));
        table.row(with_calls(
            latency_row("floor + one mTLS gRPC hop", &h, &f, &["floor"]),
            None,
        ));
        table.row(with_calls(
            latency_row(
                "**kiam agent** (+ kiam server), repeats answered within the server's window",
                &a,
                &f,
                &["kiam-agent", "kiam-server"],
            ),
            a_call,
        ));
        table.row(with_calls(
            latency_row(
                "kiam agent asking the server every time (no window granted, as from a Go kiam server)",
                &g,
                &f,
                &["kiam-agent", "kiam-server"],
            ),
            g_call,
        ));
        if c == 16 {
            c16 = Some((f, h, a));
        }
    }
    if let Some((f, h, a)) = c16 {
        report.verdict(
            "Agent warm p99 < 1 ms at concurrency 16",
            us(a.p_us(0.99)),
            a.p_us(0.99) < 1000.0,
        );
        report.verdict(
            "Agent warm latency <= 2x the floor (c=16, p50 / p99)",
            format!(
                "{:.1}x / {:.1}x the fixed-bytes floor; {:.1}x / {:.1}x the floor with one gRPC hop",
                a.p_us(0.5) / f.p_us(0.5),
                a.p_us(0.99) / f.p_us(0.99),
                a.p_us(0.5) / h.p_us(0.5),
                a.p_us(0.99) / h.p_us(0.99)
            ),
            a.p_us(0.5) <= 2.0 * f.p_us(0.5) && a.p_us(0.99) <= 2.0 * f.p_us(0.99),
        );
    }
    report.sections.push(Section {
        title: "1. Agent: warm credential request".into(),
        method: format!(
            "`GET /latest/meta-data/iam/security-credentials/<role>` over HTTP/1.1 keep-alive, one connection per \
             worker, each worker connecting from its own pod address (127.1.0.1-64, {PODS} pods, {ROLES} roles) so \
             the agent identifies it by the TCP peer as in production. The in-process agent (built from `kiam agent` \
             flags, `kiam::agent::run`) asks the in-process kiam server over mutual TLS; the server has the \
             credentials cached (fake STS, real-sized {} byte answer) and grants a reuse window (`kiam-reuse-ms`, \
             at most `CONFIRM_TTL` = 1 s after it last confirmed the pod with the API server), inside which the \
             agent answers repeats from memory with the bytes it rendered once. A second agent talks to a \
             second server started with `--pod-confirmations-per-second=0`, which grants no window (as a Go kiam \
             server grants none), so that agent asks for every request: the path before the warm path. Server \
             calls/s are GetPodCredentials calls the server started during that row's best round (warm-up \
             included). Floors, same load generator, \
             same bytes: a hyper server answering fixed bytes, and the same server making one GetPodCredentials \
             call to a fixed-answer tonic service over the same mTLS before answering. Warm-up {:?}, then {:?} \
             measured, {rounds} rounds interleaving the three servers, the best round (highest throughput) kept per row; agent, server, floors and load generator share the machine's 2 cores (4 tokio \
             runtimes of 2 workers each, nothing pinned).",
            body.len(),
            window.warmup,
            window.measure
        ),
        tables: vec![table],
        notes: vec![],
    });
    Ok(())
}

/// Figure 6.
pub fn agent_rss(report: &mut Report, window: Window) -> Result<()> {
    let kiam_rt = runtime("kiam-server", 2);
    let load_rt = runtime("load", 2);
    let b = backend(&kiam_rt)?;
    let port = sandbox_procs::free_port()?;
    let mut cmd = Command::new(sandbox_procs::find_kiam()?);
    sandbox_procs::agent_args(
        &mut cmd,
        port,
        &format!("127.0.0.1:{}", b.cluster.addr.port()),
        "http://127.0.0.1:9",
        &b.cluster.pki.dir,
    )
    .args(["--host", "127.0.0.1"]);
    let child = ChildGuard::spawn("kiam agent", cmd)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if !sandbox_procs::wait_for_port(port, Duration::from_secs(10)) {
        bail!("kiam agent did not listen on {addr}");
    }
    let body = load_rt.block_on(warm(addr))?;
    std::thread::sleep(Duration::from_secs(1));
    let (rest, _) = procs::rss(child.pid())?;
    let sampler = {
        let pid = child.pid();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((r, _)) = procs::rss(pid) {
                    max = max.max(r);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        (stop, handle)
    };
    let stats = load_rt.block_on(load::http(plan(addr, body.len() / 2), 64, window, &[]))?;
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let under_load = sampler.1.join().expect("sampler thread");
    std::thread::sleep(Duration::from_secs(1));
    let (after, peak) = procs::rss(child.pid())?;
    let mut t = Table::new(&["State", "RSS"]);
    t.row(vec![
        "at rest (started, every pod asked once)".into(),
        mib(rest),
    ]);
    t.row(vec![
        format!(
            "under load (c=64, {} answered, max of 50 ms samples)",
            stats.requests
        ),
        mib(under_load),
    ]);
    t.row(vec!["after load".into(), mib(after)]);
    t.row(vec!["peak (VmHWM)".into(), mib(peak)]);
    let worst = peak.max(under_load);
    report.verdict(
        "Agent RSS < 30 MB",
        format!(
            "{} (highest of VmHWM and the samples under load)",
            mib(worst)
        ),
        worst < 30_000_000,
    );
    report.sections.push(Section {
        title: "6. Agent RSS".into(),
        method: format!(
            "The real `kiam agent` binary (release build, default flags but ports and addresses) against the in-process \
             kiam server, {PODS} pods connecting from their own loopback addresses; RSS from /proc/<pid>/status. \
             Under load: 64 keep-alive connections for {:?} ({} answered at {}, p99 {}).",
            window.measure,
            stats.requests,
            rate(stats.rps()),
            us(stats.p_us(0.99)),
        ),
        tables: vec![t],
        notes: vec![],
    });
    drop(child);
    Ok(())
}
