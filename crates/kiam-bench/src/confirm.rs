//! Figure 7: what confirming cached pods costs the API server.
//!
//! The surprise: load here is open-loop. Requests leave at a fixed rate
//! whatever the answers do, because confirmation cost depends on how often
//! each pod asks (at most one GET per pod per `CONFIRM_TTL`), not on how
//! fast the server can answer; a closed loop would tie the two together.
//!
//! Counted from both ends: the GETs of single pods and the `limit=1` LISTs
//! (watch checks) the in-memory API server recorded, and the server's own
//! `kiam_k8s_pod_confirmations_total` by result, as differences over the
//! measured window only. Two kinds of cluster around the requests: one where
//! pods keep changing (the server can prove its watch current with one LIST
//! for every pod), and one where only other objects change (the proof never
//! completes and every pod is confirmed by its own GET, as before).

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
const RESULTS: &[&str] = &["owner", "stale", "unanswered", "skipped", "current"];
/// Writes per second of other objects (core/v1 Events, as kubelets and
/// controllers make them), in every case, and of pods where pods change.
const CHURN: f64 = 20.0;

/// One measured setting: label, `--pod-confirmations-per-second`, whether
/// pods change during the window.
struct Case {
    label: &'static str,
    budget: Option<&'static str>,
    pods_change: bool,
}

const CASES: &[Case] = &[
    Case {
        label: "100 (default); pods change",
        budget: None,
        pods_change: true,
    },
    Case {
        label: "100 (default); only other objects change",
        budget: None,
        pods_change: false,
    },
    Case {
        label: "1000000 (no effective bound); only other objects change",
        budget: Some("1000000"),
        pods_change: false,
    },
    Case {
        label: "0 (off)",
        budget: Some("0"),
        pods_change: true,
    },
];

struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    /// GETs of one pod by name (confirmations) the API server answered.
    gets: usize,
    /// Pod LISTs (direct lookups by IP after a cache miss).
    lists: usize,
    /// `limit=1` pod LISTs (checks that the watch is current).
    checks: usize,
    /// Confirmations counted by the server, in [`RESULTS`] order.
    results: Vec<f64>,
    /// CPU seconds the in-memory API server's runtime used.
    api_cpu: f64,
    p99_us: f64,
}

fn is_pod_get(r: &RecordedRequest) -> bool {
    r.verb == "get" && r.path.starts_with("/api/v1/namespaces/") && r.path.contains("/pods/")
}

fn is_watch_check(r: &RecordedRequest) -> bool {
    r.verb == "list" && r.path.ends_with("/pods") && r.param("limit") == Some("1")
}

fn is_pod_list(r: &RecordedRequest) -> bool {
    r.verb == "list" && r.path.ends_with("/pods") && !is_watch_check(r)
}

/// A core/v1 Event, the object kubelets and controllers write most.
fn event(n: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("bench.{n:08}"), "namespace": "team-000"},
        "involvedObject": {"kind": "Node", "name": format!("node-{:04}", n % 100)},
        "reason": "NodeHeartbeat", "message": "the rest of the cluster writing",
        "type": "Normal", "count": 1,
    })
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
fn run(pods_n: usize, case: &Case, measure: Duration) -> Result<Run> {
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
    let flags: Vec<&str> = match case.budget {
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
    // The rest of the cluster writing (and pods changing, in some cases)
    // from its own thread for as long as the window lasts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (api, stop, pods_change) = (api.clone(), stop.clone(), case.pods_change);
        let population = requests.len();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64(n as f64 / CHURN);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let _ = api.apply(event(n));
                if pods_change {
                    let p = pods::population(n % population, NAMESPACES, ROLES);
                    let patch = serde_json::json!({"metadata": {"annotations": {"bench/heartbeat": n.to_string()}}});
                    let _ = api.patch_pod(&p.namespace, &p.name, patch);
                }
                n += 1;
            }
        })
    };
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.join();
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
        checks: api.count_requests(is_watch_check),
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
        "`--pod-confirmations-per-second`; the cluster around",
        "Requests",
        "Pod GETs per 1000 requests",
        "Watch checks (`limit=1` LISTs)/s",
        "Confirmed current / owner / stale / unanswered",
        "Skipped per 1000 requests",
        "Pod LISTs",
        "API server CPU per 1000 requests",
        "p99",
        "Errors",
    ]);
    let mut worst_default: Option<(usize, f64)> = None;
    let mut busiest_current: Option<(usize, f64)> = None;
    for &pods_n in sizes {
        for case in CASES {
            let r = run(pods_n, case, measure)?;
            let per_k = |n: f64| n * 1000.0 / r.requests.max(1) as f64;
            let secs = r.elapsed.as_secs_f64();
            let gets_per_s = r.gets as f64 / secs;
            eprintln!(
                "confirm {pods_n} pods, {}: {} requests, {} GETs, {} checks, {:?} results",
                case.label, r.requests, r.gets, r.checks, r.results
            );
            if case.budget.is_none() && worst_default.is_none_or(|(_, g)| gets_per_s > g) {
                worst_default = Some((pods_n, gets_per_s));
            }
            if case.budget.is_none() && case.pods_change {
                let gets_per_k = per_k(r.gets as f64);
                if busiest_current.is_none_or(|(_, g)| gets_per_k > g) {
                    busiest_current = Some((pods_n, gets_per_k));
                }
            }
            t.row(vec![
                pods_n.to_string(),
                case.label.to_string(),
                format!("{} in {secs:.1} s", r.requests),
                format!("**{:.0}**", per_k(r.gets as f64)),
                format!("{:.1}", r.checks as f64 / secs),
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0}",
                    r.results[4], r.results[0], r.results[1], r.results[2]
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
    if let Some((pods_n, gets_per_k)) = busiest_current {
        report.verdict(
            "While pods change, confirming costs no GET per pod: under 1% of requests cost a GET (those \
             before the first check after an idle second)",
            format!("at most {gets_per_k:.1} GETs per 1000 requests ({pods_n} pods)"),
            gets_per_k < 10.0,
        );
    }
    report.sections.push(Section {
        title: "7. Confirmation cost: API GETs per pod request".into(),
        method: format!(
            "Pods (realistic objects, {NAMESPACES} namespaces, {ROLES} roles) in the in-memory API server, each \
             asked once to warm the caches; 1.5 s later (past `CONFIRM_TTL` = 1 s, the budget's bucket full \
             again) GetPodCredentials requests leave at a fixed {RATE:.0}/s for {measure:?} (open loop, over \
             {CONNECTIONS} mTLS connections), each for the next pod in turn, so every pod asks every \
             pods / {RATE:.0} s. Meanwhile the rest of the cluster writes {CHURN:.0} core/v1 Events a second \
             (as kubelets and controllers do) and, where pods change, {CHURN:.0} pod updates a second (an \
             annotation of the next pod in turn). Pod GETs are the GETs of a single pod the API server recorded \
             in that window, watch checks its `limit=1` pod LISTs; the results are the differences of the \
             server's `kiam_k8s_pod_confirmations_total` over it (`current`: the whole cache was proven \
             current, no GET). API server CPU is the in-memory API server's runtime (1 worker), a stand-in: a \
             real API server's GET costs more (authentication, authorization, admission of the read, and a \
             quorum read from etcd). The budget is a token bucket holding one second's worth, so a window of T \
             seconds can see (T + 1) x budget GETs."
        ),
        tables: vec![t],
        notes: vec![
            "While pods change (any busy cluster: status updates, rollouts, the churn of figure 10), the \
             server proves its whole Pod cache current about twice a second with one `limit=1` LIST (a \
             quorum read of one pod) and confirms every request from it: no GET per pod, whatever the number \
             of pods asking or the budget, and nothing `skipped`. Where only other objects change, no pod \
             event ever reaches the LIST's resourceVersion, the checks find the watch `behind` (one a \
             second) and requests are confirmed by a GET of their own pod as before: a pod that asks more \
             often than once a second costs at most one GET a second; one that asks less often costs a GET \
             on most requests, so without a bound the GETs grow with the pods that ask, up to one per \
             request. The default budget caps that at 100 GETs/s per server whatever the pod count; \
             requests over it are answered from the watch cache (`skipped`), as with \
             `--pod-confirmations-per-second=0`, which costs no GETs and no checks at all."
                .into(),
        ],
    });
    Ok(())
}
