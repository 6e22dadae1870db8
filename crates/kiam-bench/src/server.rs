//! Figure 2: `GetPodCredentials` answered from the credential cache, over
//! mutual TLS, against a tonic service that answers the same message over
//! the same TLS acceptor without looking anything up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam::tls::{ChannelOpts, ClientTls, ServerTls};
use kiam_sandbox::apiserver::FakeApiServer;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::load::{self, Stats, Window};
use crate::report::{rate, us, Report, Section, Table};
use crate::{floor, pods, runtime};

const PODS: usize = 1000;
const ROLES: usize = 100;
const NAMESPACES: usize = 10;
/// Agents (connections) and requests in flight.
const CONNECTIONS: usize = 8;
const LEVELS: &[usize] = &[16, 64];

fn channels(pki: &kiam::certs::Pki, port: u16) -> Result<Vec<Channel>> {
    let tls = ClientTls::load(pki.agent_files(), &mut Registry::default())?;
    (0..CONNECTIONS)
        .map(|_| Ok(tls.channel(&format!("127.0.0.1:{port}"), &ChannelOpts::default())?))
        .collect()
}

const RUNTIMES: &[&str] = &["kiam-server", "floor", "load", "apiserver"];

fn row(name: &str, s: &Stats, floor: &Stats, serving: &str) -> Vec<String> {
    vec![
        s.concurrency.to_string(),
        name.into(),
        rate(s.rps()),
        format!("{:.2}", s.rps() / floor.rps()),
        us(s.p_us(0.5)),
        us(s.p_us(0.99)),
        format!("{:.0} µs", s.cpu_us(&[serving])),
        format!("{:.1} µs", s.cpu_us(&["apiserver"])),
        format!("{:.0} µs", s.cpu_us(&["load"])),
        s.errors.to_string(),
    ]
}

pub fn throughput(report: &mut Report, window: Window, rounds: usize) -> Result<()> {
    let kiam_rt = runtime("kiam-server", 2);
    let api_rt = runtime("apiserver", 1);
    let floor_rt = runtime("floor", 2);
    let load_rt = runtime("load", 2);
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let api = api_rt.block_on(FakeApiServer::start())?;
    let cluster = kiam_rt.block_on(async {
        for n in 0..NAMESPACES {
            api.create_namespace(pods::namespace(&format!("team-{n:03}"), Some(".*")))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        for i in 0..PODS {
            api.apply_pod(pods::pod(&pods::population(i, NAMESPACES, ROLES)))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let cluster = Cluster::start(&api, &[]).await?;
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok::<_, anyhow::Error>(cluster)
    })?;
    let requests: Arc<Vec<GetPodCredentialsRequest>> = Arc::new(
        (0..PODS)
            .map(|i| {
                let p = pods::population(i, NAMESPACES, ROLES);
                GetPodCredentialsRequest {
                    ip: p.ip,
                    role: p.role.expect("population pods have roles"),
                }
            })
            .collect(),
    );
    // Every pod once, so every identity is cached; keep one answer for the floor.
    let answer = load_rt.block_on(async {
        let mut client = KiamServiceClient::new(cluster.channel()?);
        let mut answer = None;
        for r in requests.iter() {
            let mut tries = 0;
            loop {
                match client.get_pod_credentials(r.clone()).await {
                    Ok(a) => {
                        answer.get_or_insert(a.into_inner());
                        break;
                    }
                    Err(e) if tries > 100 => anyhow::bail!("warming {}: {e}", r.ip),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        answer.ok_or_else(|| anyhow::anyhow!("no pods"))
    })?;
    let answer_len = prost_len(&answer);
    let tls = ServerTls::load(cluster.pki.server_files(), &mut Registry::default())?;
    let floor_addr = floor_rt.block_on(floor::grpc_floor(answer, tls, stop.clone()))?;
    let kiam_channels = load_rt.block_on(async { channels(&cluster.pki, cluster.addr.port()) })?;
    let floor_channels = load_rt.block_on(async { channels(&cluster.pki, floor_addr.port()) })?;

    let mut table = Table::new(&[
        "In flight",
        "Server",
        "Requests/s",
        "vs floor",
        "p50",
        "p99",
        "Server CPU per request",
        "API server CPU per request",
        "Load generator CPU per request",
        "Errors",
    ]);
    let mut best: Option<(Stats, Stats)> = None;
    for &c in LEVELS {
        let run = |channels: &[Channel]| {
            load_rt.block_on(load::grpc(channels, requests.clone(), c, window, RUNTIMES))
        };
        // Interleaved rounds, best kept (see `load::best`).
        let (mut f, mut k) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            f.push(run(&floor_channels)?);
            k.push(run(&kiam_channels)?);
        }
        let (f, k) = (load::best(f), load::best(k));
        eprintln!(
            "server c={c}: floor {:.0}/s, kiam {:.0}/s",
            f.rps(),
            k.rps()
        );
        table.row(row("floor: tonic, fixed answer", &f, &f, "floor"));
        table.row(row("**kiam server**", &k, &f, "kiam-server"));
        if best.as_ref().is_none_or(|(_, b)| k.rps() > b.rps()) {
            best = Some((f, k));
        }
    }
    if let Some((f, k)) = best {
        report.verdict(
            "Server >= 20,000 GetPodCredentials/s on 2 cores",
            format!("{} (in flight {})", rate(k.rps()), k.concurrency),
            k.rps() >= 20_000.0,
        );
        report.verdict(
            "Server >= half the floor",
            format!("{:.2} of the floor ({})", k.rps() / f.rps(), rate(f.rps())),
            k.rps() >= 0.5 * f.rps(),
        );
    }
    report.sections.push(Section {
        title: "2. Server: GetPodCredentials over mTLS, cache hit".into(),
        method: format!(
            "{PODS} pods ({ROLES} roles, {NAMESPACES} namespaces, realistic pod objects) in the in-memory API \
             server; the in-process kiam server (default flags, fake STS) has every identity cached. \
             {CONNECTIONS} mutual-TLS HTTP/2 connections (as from {CONNECTIONS} agents) carry the requests in \
             flight, each for the next pod in turn. Floor: a tonic KiamService answering the same {answer_len}-byte \
             message, behind the same TLS acceptor (`kiam::tls::incoming`) and certificates. kiam server, floor \
             and load generator each have a 2-worker runtime on the shared 2 cores; the in-memory API server has \
             its own (its CPU per request is what kiam's per-pod confirmation GETs, at most one a second per pod, \
             cost the API server). Warm-up {:?}, {:?} measured, {rounds} rounds alternating floor and kiam, the best round kept per row.",
            window.warmup, window.measure
        ),
        tables: vec![table],
        notes: vec![],
    });
    Ok(())
}

fn prost_len(m: &kiam::proto::Credentials) -> usize {
    use prost::Message;
    m.encoded_len()
}
