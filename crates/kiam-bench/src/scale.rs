//! Figure 10 (in-process, scaled down): what kiam costs the API server and
//! STS as a cluster grows, and whether each cost grows linearly.
//!
//! The surprise: nothing here is a cluster. Three kiam servers, the
//! in-memory API server and every "agent" (a mutual-TLS gRPC connection,
//! as an agent holds one per server) share this process and its 2 cores,
//! so the sizes are a small fraction of the (5,000 agents, 150,000
//! pods) and the figures that matter are the ratios: API requests per 1000
//! pod requests, STS calls per minute, and how each changes when pods and
//! agents double. Requests go straight to the servers (no agent warm path),
//! the worst case for the API server: every request is a server request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam_sandbox::apiserver::{FakeApiServer, RecordedRequest};
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::load::new_hist;
use crate::procs::CpuMeter;
use crate::report::{us, Report, Section, Table};
use crate::{pods, runtime};

const SERVERS: usize = 3;
/// Pod credential requests per second, over all pods.
const RATE: f64 = 1000.0;
/// Pods created (and as many deleted) per second during the window.
const CHURN: f64 = 20.0;
const NAMESPACES: usize = 10;
const ROLES: usize = 100;
/// Churned pods are numbered from here, apart from the population.
const CHURN_BASE: usize = 1_000_000;

struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    watches: usize,
    lists: usize,
    gets: usize,
    other: usize,
    sts_calls: usize,
    server_cpu: f64,
    created: usize,
    ready_p50_us: f64,
    ready_max_us: f64,
    p99_us: f64,
}

fn is_pod_get(r: &RecordedRequest) -> bool {
    r.verb == "get" && r.path.contains("/pods/")
}

fn creds_request(p: &pods::PodSpec) -> Result<GetPodCredentialsRequest> {
    Ok(GetPodCredentialsRequest {
        ip: p.ip.clone(),
        role: p.role.clone().context("population pods have roles")?,
    })
}

fn run(pods_n: usize, agents: usize, tags: bool, measure: Duration) -> Result<Run> {
    let kiam_rt = runtime("kiam-server", 2);
    let api_rt = runtime("apiserver", 1);
    let load_rt = runtime("load", 2);
    let api = api_rt.block_on(FakeApiServer::start())?;
    for n in 0..NAMESPACES {
        api.create_namespace(pods::namespace(&format!("team-{n:03}"), Some(".*")))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let requests: Vec<GetPodCredentialsRequest> = (0..pods_n)
        .map(|i| {
            let p = pods::population(i, NAMESPACES, ROLES);
            api.apply_pod(pods::pod(&p))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            creds_request(&p)
        })
        .collect::<Result<_>>()?;
    let requests = Arc::new(requests);
    let flags: Vec<&str> = if tags { vec!["--session-tags"] } else { vec![] };
    let servers = kiam_rt.block_on(async {
        let mut servers = Vec::new();
        for _ in 0..SERVERS {
            servers.push(Cluster::start(&api, &flags).await?);
        }
        for s in &servers {
            s.wait_ready(Duration::from_secs(120)).await?;
        }
        Ok::<_, anyhow::Error>(servers)
    })?;
    // One connection per agent, spread over the servers as agents spread
    // theirs.
    let channels: Vec<Channel> = load_rt.block_on(async {
        (0..agents)
            .map(|a| servers[a % SERVERS].channel())
            .collect::<Result<Vec<_>>>()
    })?;
    // Every pod asked once on some server (prefetch is running on all).
    load_rt.block_on(crate::cluster::ask_every_pod_once(
        &channels,
        requests.clone(),
        200,
    ))?;
    std::thread::sleep(Duration::from_millis(1500));
    let sts_before: usize = servers.iter().map(|s| s.sts.calls()).sum();
    api.clear_requests();
    let cpu = CpuMeter::start(&["kiam-server"]);
    let total = (RATE * measure.as_secs_f64()) as usize;
    let churn_n = (CHURN * measure.as_secs_f64()) as usize;
    let api = Arc::new(api);
    let begin = Instant::now();
    let (answers, ready) = load_rt.block_on(async {
        let start = tokio::time::Instant::now();
        // Churn: a new pod every 1/CHURN s that asks at once (timed from
        // its creation to its first credentials), and the oldest of the
        // population deleted in its place.
        let churn = {
            let api = api.clone();
            let channels = channels.clone();
            tokio::spawn(async move {
                let mut waits = Vec::new();
                for k in 0..churn_n {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / CHURN))
                        .await;
                    let p = pods::population(CHURN_BASE + k, NAMESPACES, ROLES);
                    let req = creds_request(&p)?;
                    api.apply_pod(pods::pod(&p))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let created = Instant::now();
                    // A pod of the population goes (not one the load asks
                    // for: those are the first `pods_n - churn_n`).
                    let gone = pods::population(pods_n.saturating_sub(1 + k), NAMESPACES, ROLES);
                    api.delete_pod(&gone.namespace, &gone.name)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let mut client = KiamServiceClient::new(channels[k % channels.len()].clone());
                    waits.push(tokio::spawn(async move {
                        for _ in 0..500 {
                            if client.get_pod_credentials(req.clone()).await.is_ok() {
                                return Some(created.elapsed());
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        None
                    }));
                }
                let mut out = Vec::new();
                for w in waits {
                    out.push(w.await?);
                }
                Ok::<_, anyhow::Error>(out)
            })
        };
        let asked = pods_n.saturating_sub(churn_n).max(1);
        let mut tasks = Vec::with_capacity(total);
        for k in 0..total {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / RATE)).await;
            let req = requests[k % asked].clone();
            let mut client = KiamServiceClient::new(channels[k % channels.len()].clone());
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = client.get_pod_credentials(req).await.is_ok();
                (ok, t0.elapsed())
            }));
        }
        let mut out = Vec::with_capacity(total);
        for t in tasks {
            out.push(t.await?);
        }
        let ready = churn.await??;
        Ok::<_, anyhow::Error>((out, ready))
    })?;
    let elapsed = begin.elapsed();
    let server_cpu = cpu.used().iter().map(|(_, s)| s).sum();
    let sts_calls = servers.iter().map(|s| s.sts.calls()).sum::<usize>() - sts_before;
    let mut hist = new_hist();
    for (_, took) in &answers {
        hist.saturating_record(took.as_nanos() as u64);
    }
    let mut ready_hist = new_hist();
    for took in ready.iter().flatten() {
        ready_hist.saturating_record(took.as_nanos() as u64);
    }
    let all = api.requests();
    let run = Run {
        requests: answers.len(),
        errors: answers.iter().filter(|a| !a.0).count()
            + ready.iter().filter(|r| r.is_none()).count(),
        elapsed,
        watches: all.iter().filter(|r| r.verb == "watch").count(),
        lists: all.iter().filter(|r| r.verb == "list").count(),
        gets: all.iter().filter(|r| is_pod_get(r)).count(),
        other: all
            .iter()
            .filter(|r| r.verb != "watch" && r.verb != "list" && !is_pod_get(r))
            .count(),
        sts_calls,
        server_cpu,
        created: ready.len(),
        ready_p50_us: ready_hist.value_at_quantile(0.5) as f64 / 1000.0,
        ready_max_us: ready_hist.max() as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
    };
    drop(servers);
    Ok(run)
}

/// Figure 10.
pub fn scale(report: &mut Report, quick: bool) -> Result<()> {
    let (sizes, measure): (&[(usize, usize)], _) = if quick {
        (&[(1000, 16), (2000, 32)], Duration::from_secs(3))
    } else {
        (
            &[(2500, 50), (5000, 100), (10000, 200)],
            Duration::from_secs(6),
        )
    };
    let mut t = Table::new(&[
        "Pods",
        "Agent connections",
        "Session tags",
        "Pod requests",
        "API requests per 1000 pod requests (watch / LIST / pod GET / other)",
        "API requests/s",
        "STS calls/min",
        "New pods: created -> credentials p50 / max",
        "kiam servers' CPU per 1000 pod requests",
        "p99",
        "Errors",
    ]);
    let mut notes = Vec::new();
    let mut rows: Vec<(usize, bool, Run)> = Vec::new();
    for &(pods_n, agents) in sizes {
        for tags in [false, true] {
            let r = run(pods_n, agents, tags, measure)?;
            eprintln!(
                "scale {pods_n} pods {agents} agents tags={tags}: {} requests, api {}/{}/{}/{}, sts {}",
                r.requests, r.watches, r.lists, r.gets, r.other, r.sts_calls
            );
            let per_k = |n: usize| 1000.0 * n as f64 / r.requests.max(1) as f64;
            let secs = r.elapsed.as_secs_f64();
            let api_total = r.watches + r.lists + r.gets + r.other;
            t.row(vec![
                pods_n.to_string(),
                agents.to_string(),
                if tags { "on" } else { "off" }.into(),
                format!("{} in {:.1} s", r.requests, secs),
                format!(
                    "**{:.0}** ({:.1} / {:.1} / {:.0} / {:.1})",
                    per_k(api_total),
                    per_k(r.watches),
                    per_k(r.lists),
                    per_k(r.gets),
                    per_k(r.other)
                ),
                format!("{:.0}", api_total as f64 / secs),
                format!("{:.0}", r.sts_calls as f64 * 60.0 / secs),
                format!(
                    "{} / {} ({} pods)",
                    us(r.ready_p50_us),
                    us(r.ready_max_us),
                    r.created
                ),
                format!(
                    "{:.0} ms",
                    1000.0 * 1000.0 * r.server_cpu / r.requests.max(1) as f64
                ),
                us(r.p99_us),
                r.errors.to_string(),
            ]);
            rows.push((pods_n, tags, r));
        }
    }
    // Growth from one size to the next (pods and agents both double).
    for tags in [false, true] {
        let of: Vec<&(usize, bool, Run)> = rows.iter().filter(|r| r.1 == tags).collect();
        for pair in of.windows(2) {
            let (a, b) = (&pair[0].2, &pair[1].2);
            let ratio = |x: f64, y: f64| {
                if x > 0.0 {
                    format!("{:.2}x", y / x)
                } else {
                    "-".into()
                }
            };
            notes.push(format!(
                "Tags {}: {} -> {} pods (agents doubled too): API requests {} , STS calls {}, server CPU {}, new-pod p50 {}.",
                if tags { "on" } else { "off" },
                pair[0].0,
                pair[1].0,
                ratio(
                    (a.watches + a.lists + a.gets + a.other) as f64,
                    (b.watches + b.lists + b.gets + b.other) as f64
                ),
                ratio(a.sts_calls as f64, b.sts_calls as f64),
                ratio(a.server_cpu, b.server_cpu),
                ratio(a.ready_p50_us, b.ready_p50_us),
            ));
        }
    }
    report.sections.push(Section {
        title: "10. Scale (in-process, scaled down): API server and STS cost as the cluster grows".into(),
        method: format!(
            "**In-process, not a cluster**: {SERVERS} kiam servers (`kiam::server::run`, each with its own fake STS \
             answering at once), the in-memory API server (1 worker) and the agents' connections (one mutual-TLS \
             gRPC connection each, spread over the servers) share this process and the machine's 2 cores, so the \
             sizes are a small fraction of the issue's 5,000 agents and 150,000 pods. Pods: realistic objects in \
             {NAMESPACES} namespaces over {ROLES} roles; each server watches them all. After every pod was asked \
             once and {} ms passed, for {:?}: pod requests leave at {RATE:.0}/s (open loop, each for the next pod \
             in turn, straight to a server: no agent warm path, the worst case for the API server), while {CHURN:.0} \
             pods/s are created (each asks at once and retries every 10 ms; timed from its creation to its first \
             credentials) and as many deleted. API requests are those the in-memory API server recorded in the \
             window from all servers (watch = watches opened); STS calls are the fake STS calls of all servers.",
            1500, measure
        ),
        tables: vec![t],
        notes,
    });
    Ok(())
}
