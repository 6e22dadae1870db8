//! Figure 8: what per-pod session tags cost in STS calls and in a new pod's
//! wait for its first credentials.
//!
//! The surprise: `--session-tags` changes what a credential *is*. The tags
//! describe one pod, so they are part of the identity credentials are cached
//! and single-flighted by; pods sharing a role no longer share credentials,
//! and every pod costs its own AssumeRole call. This figure counts those
//! calls (with the STS double) and times the first answer for a pod that
//! appears after the rest are served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam_sandbox::apiserver::FakeApiServer;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::load::new_hist;
use crate::report::{us, Report, Section, Table};
use crate::{pods, runtime};

/// STS answers every AssumeRole after this long (as in figures 4 and 5).
const STS_DELAY: Duration = Duration::from_millis(100);
const NAMESPACES: usize = 10;
/// Requests in flight while every pod is served once.
const CONCURRENCY: usize = 100;
/// New pods appear this far apart after the rest are served.
const NEW_POD_EVERY: Duration = Duration::from_millis(50);
/// The later first request, when prefetch has had time to run.
const LATER: Duration = Duration::from_millis(500);

fn spec(i: usize, roles: usize) -> pods::PodSpec {
    let mut p = pods::population(i, NAMESPACES, roles);
    p.role = Some(format!("shared-role-{:03}", i % roles));
    p
}

fn request(p: &pods::PodSpec) -> GetPodCredentialsRequest {
    GetPodCredentialsRequest {
        ip: p.ip.clone(),
        role: p.role.clone().expect("bench pods have roles"),
    }
}

struct Run {
    /// AssumeRole calls until every pod had been answered once.
    calls: usize,
    errors: usize,
    all_answered: Duration,
    p99_us: f64,
    /// Pod written to the API server -> credentials, asking at once.
    at_once: hdrhistogram::Histogram<u64>,
    /// First request's latency when asked [`LATER`] after appearing.
    later: hdrhistogram::Histogram<u64>,
    /// AssumeRole calls the new pods caused.
    new_calls: usize,
}

/// Asks until answered (a pod just written may not be visible yet).
async fn ask(client: &mut KiamServiceClient<Channel>, r: GetPodCredentialsRequest) -> Result<()> {
    let mut tries = 0;
    while let Err(e) = client.get_pod_credentials(r.clone()).await {
        tries += 1;
        anyhow::ensure!(tries < 200, "{}: {e}", r.ip);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// New pods `first..first + n`, one every [`NEW_POD_EVERY`], each asking
/// `after` it appeared; what each waited (from appearing when `after` is
/// zero, else from its first request).
fn new_pods(
    api: &Arc<FakeApiServer>,
    load_rt: &tokio::runtime::Runtime,
    channel: &Channel,
    first: usize,
    n: usize,
    roles: usize,
    after: Duration,
) -> Result<hdrhistogram::Histogram<u64>> {
    let waits = load_rt.block_on(async {
        let begin = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for j in 0..n {
            tokio::time::sleep_until(begin + NEW_POD_EVERY * j as u32).await;
            let p = spec(first + j, roles);
            api.apply_pod(pods::pod(&p))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let appeared = Instant::now();
            let mut client = KiamServiceClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((appeared + after).into()).await;
                let asked = Instant::now();
                ask(&mut client, request(&p)).await?;
                Ok::<_, anyhow::Error>(if after.is_zero() {
                    appeared.elapsed()
                } else {
                    asked.elapsed()
                })
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let mut hist = new_hist();
    for w in waits {
        hist.saturating_record(w.as_nanos() as u64);
    }
    Ok(hist)
}

/// `pods_n` pods over `roles` roles, all in the API server before the
/// server starts; [`CONCURRENCY`] workers ask for each once; then
/// `new_n` new pods appear twice over (asking at once, and [`LATER`]).
fn run(pods_n: usize, roles: usize, new_n: usize, extra: &[&str]) -> Result<Run> {
    let kiam_rt = runtime("kiam-server", 2);
    let load_rt = runtime("load", 2);
    let api = kiam_rt.block_on(FakeApiServer::start())?;
    for n in 0..NAMESPACES {
        api.create_namespace(pods::namespace(&format!("team-{n:03}"), Some(".*")))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let specs: Vec<pods::PodSpec> = (0..pods_n).map(|i| spec(i, roles)).collect();
    for s in &specs {
        api.apply_pod(pods::pod(s))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let api = Arc::new(api);
    let cluster = kiam_rt.block_on(async {
        let c = Cluster::start(&api, extra).await?;
        c.sts.fake.set_delay(STS_DELAY);
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok::<_, anyhow::Error>(c)
    })?;
    let channel = load_rt.block_on(async { cluster.channel() })?;
    let specs = Arc::new(specs);
    let start = Instant::now();
    let results = load_rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..CONCURRENCY {
            let specs = specs.clone();
            let mut client = KiamServiceClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for s in specs.iter().skip(w).step_by(CONCURRENCY) {
                    let t0 = Instant::now();
                    let ok = client.get_pod_credentials(request(s)).await.is_ok();
                    out.push((ok, t0.elapsed()));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await?);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let all_answered = start.elapsed();
    let calls = cluster.sts.calls();
    let mut hist = new_hist();
    for (_, t) in &results {
        hist.saturating_record(t.as_nanos() as u64);
    }
    let at_once = new_pods(
        &api,
        &load_rt,
        &channel,
        pods_n,
        new_n,
        roles,
        Duration::ZERO,
    )?;
    let later = new_pods(
        &api,
        &load_rt,
        &channel,
        pods_n + new_n,
        new_n,
        roles,
        LATER,
    )?;
    let new_calls = cluster.sts.calls() - calls;
    drop(cluster);
    Ok(Run {
        calls,
        errors: results.iter().filter(|r| !r.0).count(),
        all_answered,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        at_once,
        later,
        new_calls,
    })
}

fn p_us(h: &hdrhistogram::Histogram<u64>, q: f64) -> String {
    us(h.value_at_quantile(q) as f64 / 1000.0)
}

pub fn per_pod_tags(report: &mut Report, quick: bool) -> Result<()> {
    let (pods_n, roles, new_n) = if quick { (200, 10, 10) } else { (1000, 10, 40) };
    let mut calls = Table::new(&[
        "Setting",
        "Pods",
        "Roles",
        "AssumeRole calls to serve every pod once",
        "Errors",
        "All answered after",
        "p99",
    ]);
    let mut first = Table::new(&[
        "Setting",
        "New pods",
        "Their AssumeRole calls",
        "Asking at once: appeared -> credentials, p50",
        "max",
        "Asking 500 ms later: first request p50",
        "max",
    ]);
    let mut counts = Vec::new();
    for (label, flags) in [
        ("default (no tags)", vec![]),
        ("`--session-tags`", vec!["--session-tags"]),
    ] {
        let r = run(pods_n, roles, new_n, &flags)?;
        eprintln!(
            "tags {label}: {} calls for {pods_n} pods, {} for {} new pods",
            r.calls,
            r.new_calls,
            2 * new_n
        );
        counts.push(r.calls);
        calls.row(vec![
            label.to_string(),
            pods_n.to_string(),
            roles.to_string(),
            format!("**{}**", r.calls),
            r.errors.to_string(),
            format!("{:.2} s", r.all_answered.as_secs_f64()),
            us(r.p99_us),
        ]);
        first.row(vec![
            label.to_string(),
            format!("{} ({new_n} + {new_n})", 2 * new_n),
            r.new_calls.to_string(),
            p_us(&r.at_once, 0.5),
            p_us(&r.at_once, 1.0),
            p_us(&r.later, 0.5),
            p_us(&r.later, 1.0),
        ]);
    }
    let [untagged, tagged] = counts[..] else {
        anyhow::bail!("two settings measured");
    };
    report.verdict(
        &format!("STS calls to serve {pods_n} pods over {roles} roles: one per role, one per pod with --session-tags"),
        format!("{untagged} without tags, {tagged} with --session-tags"),
        untagged == roles && tagged == pods_n,
    );
    let method = format!(
        "{pods_n} pods in {NAMESPACES} namespaces sharing {roles} roles (every namespace permits every role), \
         all in the in-memory API server before the in-process kiam server starts; fake STS answering every \
         AssumeRole after {} ms, default `--fetchers`. The moment the server is ready, {CONCURRENCY} \
         concurrent workers over one mTLS connection ask for every pod's credentials once (prefetch started \
         on the initial list; requests join its fetches or start their own). AssumeRole calls are counted by \
         the STS double when every pod has been answered. Then new pods (another pod of one of the same \
         roles, in one of the same namespaces) appear one every {} ms: {new_n} that ask the moment they are \
         written to the API server (the server finds them by a direct lookup if the watch has not shown them \
         yet; timed from the write), then {new_n} that ask {} ms later (prefetch has had time; timed from the \
         request).",
        STS_DELAY.as_millis(),
        NEW_POD_EVERY.as_millis(),
        LATER.as_millis(),
    );
    report.sections.push(Section {
        title: "8. Per-pod session tags: STS calls and first credentials".into(),
        method,
        tables: vec![calls, first],
        notes: vec![format!(
            "Without tags pods of one role share one credential (identity = role, session name, external id): \
             {roles} calls serve {pods_n} pods, and a new pod of a known role is answered from the cache. With \
             `--session-tags` the tags name the pod, so every pod is its own identity: one AssumeRole per pod \
             (and per refresh, every `--session-refresh`), a new pod that asks at once waits for its own STS \
             call, and a burst of new pods is bounded by the background concurrency (adaptive, at most \
             `--fetchers`) / STS latency as in figure 4. STS throttles AssumeRole per account (the concurrency \
             halves when it does); size `--fetchers` and the refresh interval for pods, not roles."
        )],
    });
    Ok(())
}
