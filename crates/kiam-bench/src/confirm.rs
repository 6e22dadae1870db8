//! Figure 7: what confirming cached pods costs the API server.
//!
//! The surprise: load here is open-loop. Requests leave at a fixed rate
//! whatever the answers do, because confirmation cost depends on how often
//! each pod asks (at most one GET per pod per `CONFIRM_TTL`), not on how
//! fast the server can answer; a closed loop would tie the two together.
//!
//! Counted from both ends: the GETs of single pods the in-memory API server
//! recorded, and the server's own `kiam_k8s_pod_confirmations_total` by
//! result, as differences over the measured window only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam_sandbox::apiserver::{FakeApiServer, RecordedRequest};

use crate::cluster::Cluster;
use crate::load::new_hist;
use crate::procs::CpuMeter;
use crate::report::{us, Report, Section, Table};
use crate::{pods, runtime};

/// Pod credential requests per second, spread evenly over the pods.
const RATE: f64 = 1000.0;
const NAMESPACES: usize = 10;
const ROLES: usize = 100;
/// gRPC connections carrying the load (as from this many agents).
const CONNECTIONS: usize = 4;
const RESULTS: &[&str] = &["owner", "stale", "unanswered", "skipped"];

/// `--pod-confirmations-per-second` settings measured, with their labels.
const BUDGETS: &[(&str, Option<&str>)] = &[
    ("100 (default)", None),
    ("1000000 (no effective bound)", Some("1000000")),
    ("0 (off)", Some("0")),
];

struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    /// GETs of one pod by name (confirmations) the API server answered.
    gets: usize,
    /// Pod LISTs (direct lookups by IP after a cache miss).
    lists: usize,
    /// Confirmations counted by the server, in [`RESULTS`] order.
    results: Vec<f64>,
    /// CPU seconds the in-memory API server's runtime used.
    api_cpu: f64,
    p99_us: f64,
}

fn is_pod_get(r: &RecordedRequest) -> bool {
    r.verb == "get" && r.path.starts_with("/api/v1/namespaces/") && r.path.contains("/pods/")
}

fn is_pod_list(r: &RecordedRequest) -> bool {
    r.verb == "list" && r.path.ends_with("/pods")
}

fn confirmations(cluster: &Cluster) -> Vec<f64> {
    RESULTS
        .iter()
        .map(|r| {
            cluster.counter(&format!(
                "kiam_k8s_pod_confirmations_total{{result=\"{r}\"}}"
            ))
        })
        .collect()
}

/// `pods_n` pods asked in turn at [`RATE`] for `measure`, after every pod
/// was asked once and the confirmations of that warm-up had expired.
fn run(pods_n: usize, budget: Option<&str>, measure: Duration) -> Result<Run> {
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
            Ok(GetPodCredentialsRequest {
                ip: p.ip,
                role: p.role.context("population pods have roles")?,
            })
        })
        .collect::<Result<_>>()?;
    let requests = Arc::new(requests);
    let flags: Vec<&str> = match budget {
        Some(b) => vec!["--pod-confirmations-per-second", b],
        None => vec![],
    };
    let cluster = kiam_rt.block_on(async {
        let c = Cluster::start(&api, &flags).await?;
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok::<_, anyhow::Error>(c)
    })?;
    let channels = load_rt.block_on(async {
        (0..CONNECTIONS)
            .map(|_| cluster.channel())
            .collect::<Result<Vec<_>>>()
    })?;
    // Warm-up: every pod once, so every identity is cached and every pod
    // is in the server's cache (retried: prefetch may still be running).
    load_rt.block_on(crate::cluster::ask_every_pod_once(
        &channels,
        requests.clone(),
        100,
    ))?;
    // Past CONFIRM_TTL, so the warm-up's confirmations have expired and the
    // budget's bucket is full again: the window starts from a steady state.
    std::thread::sleep(Duration::from_millis(1500));
    let before = confirmations(&cluster);
    api.clear_requests();
    let cpu = CpuMeter::start(&["apiserver"]);
    let total = (RATE * measure.as_secs_f64()) as usize;
    let begin = Instant::now();
    let answers = load_rt.block_on(async {
        let start = tokio::time::Instant::now();
        let mut clients: Vec<_> = channels
            .iter()
            .map(|c| KiamServiceClient::new(c.clone()))
            .collect();
        let mut tasks = Vec::with_capacity(total);
        for k in 0..total {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / RATE)).await;
            let req = requests[k % requests.len()].clone();
            let mut client = clients[k % CONNECTIONS].clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = client.get_pod_credentials(req).await.is_ok();
                (ok, t0.elapsed())
            }));
        }
        clients.clear();
        let mut out = Vec::with_capacity(total);
        for t in tasks {
            out.push(t.await?);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let elapsed = begin.elapsed();
    let api_cpu = cpu.used().iter().map(|(_, s)| s).sum();
    let after = confirmations(&cluster);
    let mut hist = new_hist();
    for (_, took) in &answers {
        hist.saturating_record(took.as_nanos() as u64);
    }
    let run = Run {
        requests: answers.len(),
        errors: answers.iter().filter(|a| !a.0).count(),
        elapsed,
        gets: api.count_requests(is_pod_get),
        lists: api.count_requests(is_pod_list),
        results: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        api_cpu,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
    };
    drop(cluster);
    Ok(run)
}

pub fn confirmation_cost(report: &mut Report, quick: bool) -> Result<()> {
    let (sizes, measure): (&[usize], _) = if quick {
        (&[100, 1000], Duration::from_secs(2))
    } else {
        (&[100, 1000, 5000], Duration::from_secs(5))
    };
    let mut t = Table::new(&[
        "Pods",
        "`--pod-confirmations-per-second`",
        "Requests",
        "Pod GETs per 1000 requests",
        "Pod GETs/s",
        "Confirmed owner / stale / unanswered",
        "Skipped per 1000 requests",
        "Pod LISTs",
        "API server CPU per 1000 requests",
        "p99",
        "Errors",
    ]);
    let mut worst_default: Option<(usize, f64)> = None;
    for &pods_n in sizes {
        for &(label, budget) in BUDGETS {
            let r = run(pods_n, budget, measure)?;
            let per_k = |n: f64| n * 1000.0 / r.requests.max(1) as f64;
            let gets_per_s = r.gets as f64 / r.elapsed.as_secs_f64();
            eprintln!(
                "confirm {pods_n} pods, budget {label}: {} requests, {} GETs, {:?} results",
                r.requests, r.gets, r.results
            );
            if budget.is_none() && worst_default.is_none_or(|(_, g)| gets_per_s > g) {
                worst_default = Some((pods_n, gets_per_s));
            }
            t.row(vec![
                pods_n.to_string(),
                label.to_string(),
                format!("{} in {:.1} s", r.requests, r.elapsed.as_secs_f64()),
                format!("**{:.0}**", per_k(r.gets as f64)),
                format!("{gets_per_s:.0}"),
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    r.results[0], r.results[1], r.results[2]
                ),
                format!("{:.0}", per_k(r.results[3])),
                r.lists.to_string(),
                format!("{:.0} ms", per_k(r.api_cpu * 1000.0)),
                us(r.p99_us),
                r.errors.to_string(),
            ]);
        }
    }
    if let Some((pods_n, gets_per_s)) = worst_default {
        report.verdict(
            "Confirmation GETs at 1000 pod requests/s within the default budget (100/s)",
            format!("at most {gets_per_s:.0} GETs/s ({pods_n} pods)"),
            // The bucket starts full: one second's burst on top of the rate.
            gets_per_s <= 100.0 * (1.0 + 1.0 / measure.as_secs_f64()) + 1.0,
        );
    }
    report.sections.push(Section {
        title: "7. Confirmation cost: API GETs per pod request".into(),
        method: format!(
            "Pods (realistic objects, {NAMESPACES} namespaces, {ROLES} roles) in the in-memory API server, each \
             asked once to warm the caches; 1.5 s later (past `CONFIRM_TTL` = 1 s, the budget's bucket full \
             again) GetPodCredentials requests leave at a fixed {RATE:.0}/s for {measure:?} (open loop, over \
             {CONNECTIONS} mTLS connections), each for the next pod in turn, so every pod asks every \
             pods / {RATE:.0} s. Pod GETs are the GETs of a single pod the API server recorded in that window; \
             the results are the differences of the server's `kiam_k8s_pod_confirmations_total` over it. \
             API server CPU is the in-memory API server's runtime (1 worker), a stand-in: a real API server's GET \
             costs more (authentication, authorization, admission of the read, and a quorum read from etcd). \
             The budget is a token bucket holding one second's worth, so a window of T seconds can see \
             (T + 1) x budget GETs."
        ),
        tables: vec![t],
        notes: vec![
            "A pod that asks more often than once a second costs at most one GET a second (100 pods at 10 \
             requests/s each: ~100 GETs per 1000 requests); a pod that asks less often costs a GET on most \
             requests (one asking exactly once a second finds the last confirmation still valid every other \
             time, as `CONFIRM_TTL` runs from when the GET answered), so without a bound the GETs grow with the \
             pods that ask, up to one per request. The \
             default budget caps the whole server at 100 GETs/s (an etcd quorum read each) whatever the pod \
             count; requests over it are answered from the watch cache (`skipped`), as with \
             `--pod-confirmations-per-second=0`, which costs no GETs at all. Each kiam server has its own \
             budget: N servers can cost the API server N x 100 GETs/s."
                .into(),
        ],
    });
    Ok(())
}
