//! Figures 4 and 5: prefetch against a slow STS, and STS calls under a
//! request storm.
//!
//! STS (fake, in-process) answers after 100 ms. "Ready" is judged from the
//! STS side: a pod's credentials were ready for its first request if the
//! AssumeRole call for its identity had *finished* before the request was
//! sent — not inferred from the request's latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::GetPodCredentialsRequest;
use kiam_sandbox::apiserver::FakeApiServer;

use crate::cluster::Cluster;
use crate::load::new_hist;
use crate::pods::{self, BASE_ARN};
use crate::report::{us, Report, Section, Table};
use crate::runtime;

const STS_DELAY: Duration = Duration::from_millis(100);
const FIRST_REQUEST_AFTER: Duration = Duration::from_millis(500);

fn fresh_pod(i: usize, tag: &str) -> pods::PodSpec {
    let mut p = pods::population(i, 1, 1);
    p.namespace = "fresh".into();
    p.name = format!("{tag}-{i:05}-{}", &p.name[p.name.len() - 6..]);
    p.role = Some(format!("{tag}-role-{i:05}"));
    p
}

async fn start(extra: &[&str]) -> Result<(FakeApiServer, Cluster)> {
    let api = FakeApiServer::start().await?;
    api.create_namespace(pods::namespace("fresh", Some(".*")))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let cluster = Cluster::start(&api, extra).await?;
    cluster.sts.fake.set_delay(STS_DELAY);
    cluster.wait_ready(Duration::from_secs(30)).await?;
    Ok((api, cluster))
}

struct Steady {
    pods: usize,
    ready: usize,
    answered: usize,
    p50_us: f64,
    p99_us: f64,
}

/// Pods appear one by one at `rate`/s, each with its own role; each asks
/// once, 500 ms after it appeared.
fn steady(pods_n: usize, rate: f64) -> Result<Steady> {
    let kiam_rt = runtime("kiam-server", 2);
    let load_rt = runtime("load", 2);
    let (api, cluster) = kiam_rt.block_on(start(&[]))?;
    let api = Arc::new(api);
    let sts = cluster.sts.clone();
    let channel = load_rt.block_on(async { cluster.channel() })?;
    let results = load_rt.block_on(async move {
        let begin = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..pods_n {
            tokio::time::sleep_until(begin + Duration::from_secs_f64(i as f64 / rate)).await;
            let spec = fresh_pod(i, "steady");
            api.apply_pod(pods::pod(&spec))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let appeared = Instant::now();
            let sts = sts.clone();
            let mut client = KiamServiceClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until((appeared + FIRST_REQUEST_AFTER).into()).await;
                let asked = Instant::now();
                let role = spec.role.expect("fresh pods have roles");
                let ready = sts
                    .done_at(&format!("{BASE_ARN}{role}"))
                    .is_some_and(|done| done <= asked);
                let ok = client
                    .get_pod_credentials(GetPodCredentialsRequest { ip: spec.ip, role })
                    .await
                    .is_ok();
                (ready, ok, asked.elapsed())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await?);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let mut hist = new_hist();
    for (_, _, took) in &results {
        hist.saturating_record(took.as_nanos() as u64);
    }
    drop(cluster);
    Ok(Steady {
        pods: pods_n,
        ready: results.iter().filter(|r| r.0).count(),
        answered: results.iter().filter(|r| r.1).count(),
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

struct Burst {
    ready_by_first_request: usize,
    all_ready: Duration,
    /// AssumeRole calls the STS double counted.
    sts_calls: usize,
    /// The most AssumeRole calls it saw in flight at once.
    max_in_flight: usize,
}

/// `n` pods, each with its own role, created as fast as the API server
/// takes them; nobody asks, so this is prefetch alone.
fn burst(n: usize, extra: &[&str]) -> Result<Burst> {
    let kiam_rt = runtime("kiam-server", 2);
    let (api, cluster) = kiam_rt.block_on(start(extra))?;
    let begin = Instant::now();
    let mut appeared = Vec::with_capacity(n);
    for i in 0..n {
        let spec = fresh_pod(i, "burst");
        api.apply_pod(pods::pod(&spec))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        appeared.push((
            Instant::now(),
            format!("{BASE_ARN}{}", spec.role.expect("role")),
        ));
    }
    let deadline = begin + Duration::from_secs(120);
    loop {
        if appeared
            .iter()
            .all(|(_, arn)| cluster.sts.done_at(arn).is_some())
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "prefetch of {n} pods not done in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let last = appeared
        .iter()
        .filter_map(|(_, arn)| cluster.sts.done_at(arn))
        .max()
        .context("no pods")?;
    let ready = appeared
        .iter()
        .filter(|(t, arn)| {
            cluster
                .sts
                .done_at(arn)
                .is_some_and(|d| d <= *t + FIRST_REQUEST_AFTER)
        })
        .count();
    let sts_calls = cluster.sts.calls();
    let max_in_flight = cluster.sts.fake.max_total_in_flight();
    drop(cluster);
    drop(api);
    Ok(Burst {
        ready_by_first_request: ready,
        all_ready: last - begin,
        sts_calls,
        max_in_flight,
    })
}

pub fn prefetch(report: &mut Report, quick: bool) -> Result<()> {
    let (steady_n, burst_n) = if quick { (100, 200) } else { (500, 1000) };
    let rate = 50.0;
    let s = steady(steady_n, rate)?;
    eprintln!("prefetch steady: {}/{} ready", s.ready, s.pods);
    let mut t1 = Table::new(&[
        "Arrivals",
        "Ready before first request",
        "Answered",
        "First request p50",
        "p99",
    ]);
    let share = s.ready as f64 / s.pods as f64;
    t1.row(vec![
        format!("{} pods at {rate:.0}/s, one new role each", s.pods),
        format!("{} of {} ({:.1}%)", s.ready, s.pods, share * 100.0),
        s.answered.to_string(),
        us(s.p50_us),
        us(s.p99_us),
    ]);
    report.verdict(
        "Prefetch: credentials ready before the first request for >= 99% of pods",
        format!(
            "{:.1}% ({} pods at {rate:.0}/s, each a new identity)",
            share * 100.0,
            s.pods
        ),
        share >= 0.99,
    );
    let mut t2 = Table::new(&[
        "Burst",
        "`--fetchers`",
        "Ready 500 ms after appearing",
        "All ready after",
        "AssumeRole calls",
        "Most in flight at once",
    ]);
    let mut notes = Vec::new();
    let mut default_burst = None;
    for (label, flags) in [
        ("default (adaptive, ceiling 128)", vec![]),
        ("8 (Go kiam's fixed default)", vec!["--fetchers", "8"]),
    ] {
        let b = burst(burst_n, &flags)?;
        eprintln!(
            "prefetch burst fetchers {label}: all ready in {:?}, {} calls, {} at once",
            b.all_ready, b.sts_calls, b.max_in_flight
        );
        t2.row(vec![
            format!("{burst_n} pods at once, one new role each"),
            label.to_string(),
            format!(
                "{} ({:.1}%)",
                b.ready_by_first_request,
                100.0 * b.ready_by_first_request as f64 / burst_n as f64
            ),
            format!("{:.2} s", b.all_ready.as_secs_f64()),
            b.sts_calls.to_string(),
            b.max_in_flight.to_string(),
        ]);
        default_burst.get_or_insert(b);
    }
    if let Some(b) = default_burst {
        report.verdict(
            &format!("A burst of {burst_n} new identities ready in < 2 s with default flags, no more STS calls than identities"),
            format!(
                "{:.2} s, {} AssumeRole calls (at most {} at once)",
                b.all_ready.as_secs_f64(),
                b.sts_calls,
                b.max_in_flight
            ),
            b.all_ready < Duration::from_secs(2) && b.sts_calls <= burst_n,
        );
    }
    notes.push(format!(
        "With STS at {} ms per call, N background calls at once complete at most N / 0.1 s identities per \
         second. The default starts at 8 and adds a slot per quick answer while calls wait (doubling every \
         round trip up to `--fetchers`, 128), and halves on throttling; `--fetchers 8` keeps Go kiam's fixed \
         concurrency. A pod that asks before its identity's turn jumps the queue; pods that share an identity \
         cost nothing extra.",
        STS_DELAY.as_millis()
    ));
    report.sections.push(Section {
        title: "4. Prefetch against a 100 ms STS".into(),
        method: format!(
            "In-process kiam server (default flags unless stated), fake STS answering every AssumeRole after {} ms. \
             Each new pod (Running, with an IP, in a namespace permitting every role) is written to the in-memory \
             API server; its first GetPodCredentials is sent {} ms later. A pod counts as ready when STS had \
             finished the call for its identity before that request was sent (recorded by the STS double, not \
             inferred from latency).",
            STS_DELAY.as_millis(),
            FIRST_REQUEST_AFTER.as_millis()
        ),
        tables: vec![t1, t2],
        notes,
    });
    Ok(())
}

struct Storm {
    calls: usize,
    errors: usize,
    took: Duration,
    p99_us: f64,
}

/// `pods_n` pods over `identities` identities already in the API server; as
/// soon as the server is ready, `concurrency` workers ask for every pod.
fn storm(pods_n: usize, identities: usize, concurrency: usize, extra: &[&str]) -> Result<Storm> {
    let kiam_rt = runtime("kiam-server", 2);
    let load_rt = runtime("load", 2);
    const NAMESPACES: usize = 10;
    let api = kiam_rt.block_on(FakeApiServer::start())?;
    for n in 0..NAMESPACES {
        api.create_namespace(pods::namespace(&format!("team-{n:03}"), Some(".*")))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    // Roles are per namespace in the population: pick the role count so the
    // identities total `identities`.
    let specs: Vec<pods::PodSpec> = (0..pods_n)
        .map(|i| {
            let mut p = pods::population(i, NAMESPACES, identities);
            p.role = Some(format!("shared-role-{:03}", i % identities));
            p
        })
        .collect();
    for s in &specs {
        api.apply_pod(pods::pod(s))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let cluster = kiam_rt.block_on(async {
        let c = Cluster::start(&api, extra).await?;
        c.sts.fake.set_delay(STS_DELAY);
        c.wait_ready(Duration::from_secs(60)).await?;
        Ok::<_, anyhow::Error>(c)
    })?;
    let channels: Vec<_> = load_rt.block_on(async {
        (0..8)
            .map(|_| cluster.channel())
            .collect::<Result<Vec<_>>>()
    })?;
    let specs = Arc::new(specs);
    let start = Instant::now();
    let results = load_rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let specs = specs.clone();
            let mut client = KiamServiceClient::new(channels[w % channels.len()].clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for s in specs.iter().skip(w).step_by(concurrency) {
                    let t0 = Instant::now();
                    let r = client
                        .get_pod_credentials(GetPodCredentialsRequest {
                            ip: s.ip.clone(),
                            role: s.role.clone().expect("role"),
                        })
                        .await;
                    out.push((r.is_ok(), t0.elapsed()));
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
    let took = start.elapsed();
    let mut hist = new_hist();
    for (_, t) in &results {
        hist.saturating_record(t.as_nanos() as u64);
    }
    let calls = cluster.sts.calls();
    drop(cluster);
    Ok(Storm {
        calls,
        errors: results.iter().filter(|r| !r.0).count(),
        took,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

pub fn single_flight(report: &mut Report, quick: bool) -> Result<()> {
    let (pods_n, identities, concurrency) = if quick {
        (2_000, 100, 200)
    } else {
        (10_000, 100, 1000)
    };
    let mut t = Table::new(&[
        "Setting",
        "Pods",
        "Identities",
        "Concurrent requests",
        "AssumeRole calls",
        "Errors",
        "All answered after",
        "p99",
    ]);
    let mut all_exact = true;
    for (label, flags) in [
        ("prefetch on (default)", vec![]),
        (
            "prefetch starved (`--prefetch-buffer-size 1`)",
            vec!["--prefetch-buffer-size", "1"],
        ),
    ] {
        let s = storm(pods_n, identities, concurrency, &flags)?;
        eprintln!("sts {label}: {} calls, {} errors", s.calls, s.errors);
        all_exact &= s.calls == identities && s.errors == 0;
        t.row(vec![
            label.to_string(),
            pods_n.to_string(),
            identities.to_string(),
            concurrency.to_string(),
            format!("**{}**", s.calls),
            s.errors.to_string(),
            format!("{:.2} s", s.took.as_secs_f64()),
            us(s.p99_us),
        ]);
    }
    report.verdict(
        "STS calls for 10k pods / 100 identities / 1000 concurrent requests = 100",
        if all_exact {
            "exactly one per identity in both settings".into()
        } else {
            "see section 5".into()
        },
        all_exact,
    );
    report.sections.push(Section {
        title: "5. STS calls under a request storm".into(),
        method: format!(
            "All pods are in the API server before the in-process kiam server starts (fake STS, {} ms per call). \
             The moment it reports ready, {concurrency} concurrent workers over 8 mTLS connections ask for every \
             pod's credentials once. With prefetch on, the initial list already starts one fetch per identity and \
             requests join them; with the prefetch buffer at 1 almost every announcement is dropped, so the \
             requests themselves cause the fetches and single flight on the request path is what is measured.",
            STS_DELAY.as_millis()
        ),
        tables: vec![t],
        notes: vec![],
    });
    Ok(())
}
