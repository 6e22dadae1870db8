//! Figure 10 (in-process): what kiam costs the API server and STS at the
//! size of the largest clusters (5,000 nodes, 150,000 pods), and how each
//! cost grows as pods and nodes double.
//!
//! The surprise: nothing here is a cluster. Three kiam servers, the
//! in-memory API server and every agent's connection (one mutual-TLS gRPC
//! connection per agent) share this process and its 2 cores. The load is
//! what agents send on behalf of pods asking at realistic rates (see
//! [`Rates`]), so the request rate grows with the pods; the figures to read
//! are per second, per 1000 pod requests, and the growth ratios between
//! rows.
//!
//! Which server a pod's request goes to is decided in one place,
//! [`route`]: today the agent's own connection (node -> agent -> server).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::{GetHealthRequest, GetPodCredentialsRequest, GetPodRoleRequest};
use kiam_sandbox::apiserver::{FakeApiServer, RecordedRequest};
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::load::new_hist;
use crate::procs::CpuMeter;
use crate::report::{us, Report, Section, Table};
use crate::{alloc, pods, runtime};

const SERVERS: usize = 3;
/// Pods created (and as many deleted) per second during the window.
const CHURN: f64 = 100.0;
const NAMESPACES: usize = 50;
const ROLES: usize = 100;
/// Churned pods are numbered from here, apart from the population.
const CHURN_BASE: usize = 10_000_000;
/// A new pod retries this often until it has credentials, as an agent does.
const RETRY: Duration = Duration::from_millis(10);

/// How often pods ask (the load model, written out in the method text).
struct Rates;

impl Rates {
    /// Share of pods whose SDK caches credentials: botocore and the other
    /// SDKs refresh 15 min before a 1 h expiry, so one request per ~45 min.
    const CACHING: f64 = 0.9;
    const CACHING_PERIOD: f64 = 45.0 * 60.0;
    /// The rest build a new client per unit of work and ask every ~30 s.
    const UNCACHED_PERIOD: f64 = 30.0;

    /// Pod requests per second a population of `pods` sends.
    fn per_second(pods: usize) -> f64 {
        pods as f64
            * (Self::CACHING / Self::CACHING_PERIOD + (1.0 - Self::CACHING) / Self::UNCACHED_PERIOD)
    }
}

/// A stable pseudo-random fraction in [0, 1) for `i` (phases, kinds).
fn frac(i: usize, salt: u64) -> f64 {
    let mut h = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// When each of the first `asked` pods asks within `window`: (offset, pod),
/// sorted. Caching pods ask once per period at a random phase (so few in a
/// short window); uncached ones every [`Rates::UNCACHED_PERIOD`].
fn schedule(asked: usize, window: Duration) -> Vec<(Duration, usize)> {
    let w = window.as_secs_f64();
    let mut out = Vec::new();
    for i in 0..asked {
        let period = if frac(i, 1) < Rates::CACHING {
            Rates::CACHING_PERIOD
        } else {
            Rates::UNCACHED_PERIOD
        };
        let mut t = frac(i, 2) * period;
        while t < w {
            out.push((Duration::from_secs_f64(t), i));
            t += period;
        }
    }
    out.sort();
    out
}

/// The agents' connections, grouped by the server they go to: agent `a`
/// holds `by_server[a % SERVERS][a / SERVERS]`.
struct Connections {
    by_server: Vec<Vec<Channel>>,
}

impl Connections {
    fn agent(&self, agent: usize) -> &Channel {
        &self.by_server[agent % SERVERS][agent / SERVERS]
    }

    /// The connection a request for a pod on `agent`'s node goes over to
    /// `server`: the agent's own when it goes there, else one of the same
    /// server's (standing in for the agent's connection to that server).
    fn to(&self, server: usize, agent: usize) -> &Channel {
        if agent % SERVERS == server {
            return self.agent(agent);
        }
        let conns = &self.by_server[server];
        &conns[(agent / SERVERS) % conns.len()]
    }
}

/// Which server answers a request for the pod at `pod_ip` on `agent`'s node.
///
/// THE ROUTING SWITCH. Our agents ask a pod's owner first: the server
/// `kiam::shard::owner` picks for the pod's IP among the servers, the one
/// that prefetched it when servers share prefetch (`--prefetch-peers`).
/// Without sharing (the "before" row) every server prefetches every pod and
/// the agent's own server answers, as a Go kiam agent's connection would.
fn route(pod_ip: &str, agent: usize, servers: &[SocketAddr], sharing: bool) -> usize {
    let owner = pod_ip
        .parse()
        .ok()
        .and_then(|ip| kiam::shard::owner(ip, servers));
    match owner {
        Some(owner) if sharing => owner,
        _ => agent % SERVERS,
    }
}

/// The name of node `node` (pods' `spec.nodeName`, the agents' `--node-name`).
fn node_name(node: usize) -> String {
    format!("node-{node:05}.eu-west-1.compute.internal")
}

/// Pod `i` of the population (or of the churn) on node `i % nodes`.
fn pod_object(p: &pods::PodSpec, node: usize) -> serde_json::Value {
    let mut obj = pods::pod(p);
    obj["spec"]["nodeName"] = node_name(node).into();
    let host = format!("10.0.{}.{}", node / 250, node % 250 + 1);
    obj["status"]["hostIP"] = host.clone().into();
    obj["status"]["hostIPs"] = serde_json::json!([{ "ip": host }]);
    obj
}

struct Run {
    pods: usize,
    agents: usize,
    tags: bool,
    /// Servers shared prefetch (`--prefetch-peers`) and agents asked each
    /// pod's owner.
    sharing: bool,
    requests: usize,
    errors: usize,
    elapsed: Duration,
    watches: usize,
    lists: usize,
    gets: usize,
    other: usize,
    sts_calls: usize,
    server_cpu: f64,
    /// The servers' live heap after the window (bytes).
    server_heap: isize,
    created: usize,
    /// Requests the new pods sent until each had credentials.
    new_pod_requests: usize,
    not_ready: usize,
    ready_p50_us: f64,
    ready_p99_us: f64,
    ready_max_us: f64,
    p99_us: f64,
    setup: Duration,
}

impl Run {
    fn api_total(&self) -> usize {
        self.watches + self.lists + self.gets + self.other
    }
    /// Modelled pod requests and the new pods' requests.
    fn all_requests(&self) -> usize {
        self.requests + self.new_pod_requests
    }
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
}

fn is_pod_get(r: &RecordedRequest) -> bool {
    r.verb == "get" && r.path.contains("/pods/")
}

fn kiam_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiam-server")
        .on_thread_start(alloc::track_this_thread)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One pod request as an agent sends it: GetPodRole, then
/// GetPodCredentials for that role.
/// What an agent on node `agent` sends for one pod request: GetPodRole then
/// GetPodCredentials, each naming the agent's node (`kiam-node`).
async fn pod_request(channel: Channel, ip: String, agent: usize) -> Result<()> {
    let node: tonic::metadata::MetadataValue<_> = node_name(agent).parse()?;
    let about = |request: &mut tonic::metadata::MetadataMap| {
        request.insert(kiam::wire::NODE_KEY, node.clone());
    };
    let mut client = KiamServiceClient::new(channel);
    let mut request = tonic::Request::new(GetPodRoleRequest { ip: ip.clone() });
    about(request.metadata_mut());
    let role = client.get_pod_role(request).await?.into_inner().name;
    let mut request = tonic::Request::new(GetPodCredentialsRequest { ip, role });
    about(request.metadata_mut());
    client.get_pod_credentials(request).await?;
    Ok(())
}

fn run(pods_n: usize, agents: usize, tags: bool, sharing: bool, window: Duration) -> Result<Run> {
    let setup_start = Instant::now();
    let kiam_rt = kiam_runtime();
    let api_rt = runtime("apiserver", 1);
    let load_rt = runtime("load", 2);
    let api = api_rt.block_on(FakeApiServer::start())?;
    for n in 0..NAMESPACES {
        api.create_namespace(pods::namespace(&format!("team-{n:03}"), Some(".*")))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let t = Instant::now();
    // Built on a second thread while this one stores them.
    let (tx, rx) = std::sync::mpsc::sync_channel(4096);
    let builder = std::thread::spawn(move || {
        for i in 0..pods_n {
            let p = pods::population(i, NAMESPACES, ROLES);
            if tx.send(pod_object(&p, i % agents)).is_err() {
                break;
            }
        }
    });
    api.apply_pods(rx)
        .map_err(|e| anyhow::anyhow!("storing pods: {e:?}"))?;
    builder
        .join()
        .map_err(|_| anyhow::anyhow!("the pod builder panicked"))?;
    let ips: Vec<String> = (0..pods_n).map(pods::ip_for).collect();
    eprintln!("scale: {pods_n} pods stored in {:?}", t.elapsed());
    let heap_before = alloc::tracked_live();
    let t = Instant::now();
    let servers = kiam_rt.block_on(async {
        // Bound first, so each server can be given all three addresses.
        let mut listeners = Vec::new();
        for _ in 0..SERVERS {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let peers = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()?
            .join(",");
        let mut flags: Vec<&str> = Vec::new();
        if tags {
            flags.push("--session-tags");
        }
        if sharing {
            flags.extend(["--prefetch-peers", &peers, "--advertise-ip", "127.0.0.1"]);
        }
        let mut servers = Vec::new();
        for listener in listeners {
            servers.push(Cluster::start_on(&api, &flags, listener).await?);
        }
        for s in &servers {
            s.wait_ready(Duration::from_secs(600)).await?;
        }
        Ok::<_, anyhow::Error>(servers)
    })?;
    eprintln!("scale: {SERVERS} servers synced in {:?}", t.elapsed());
    // Prefetch (one STS call per identity per server) settles: wait until
    // no STS call happened for a second.
    let t = Instant::now();
    let sts = |servers: &[Cluster]| servers.iter().map(|s| s.sts.calls()).sum::<usize>();
    let mut last = sts(&servers);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = sts(&servers);
        if now == last || t.elapsed() > Duration::from_secs(300) {
            break;
        }
        last = now;
    }
    eprintln!(
        "scale: prefetch settled in {:?} ({last} STS calls)",
        t.elapsed()
    );
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    // One connection per agent, agent a to server a % SERVERS, each
    // connected (one health call) before the window.
    let t = Instant::now();
    let conns = load_rt.block_on(async {
        let mut by_server: Vec<Vec<Channel>> = vec![Vec::new(); SERVERS];
        for a in 0..agents {
            by_server[a % SERVERS].push(servers[a % SERVERS].channel()?);
        }
        let all: Vec<Channel> = by_server.iter().flatten().cloned().collect();
        let mut tasks = Vec::new();
        for w in 0..32 {
            let mine: Vec<Channel> = all.iter().skip(w).step_by(32).cloned().collect();
            tasks.push(tokio::spawn(async move {
                for c in mine {
                    // A server still busy may drop a handshake: try again,
                    // as an agent's channel would.
                    let mut tried = 0;
                    while let Err(e) = KiamServiceClient::new(c.clone())
                        .get_health(GetHealthRequest {})
                        .await
                    {
                        tried += 1;
                        anyhow::ensure!(tried < 20, "connecting an agent: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(Connections { by_server })
    })?;
    eprintln!("scale: {agents} agent connections in {:?}", t.elapsed());
    let setup = setup_start.elapsed();

    let churn_n = (CHURN * window.as_secs_f64()) as usize;
    let asked = pods_n.saturating_sub(churn_n).max(1);
    let plan = Arc::new(schedule(asked, window));
    let ips = Arc::new(ips);
    let conns = Arc::new(conns);
    let addrs = Arc::new(addrs);
    let sts_before = sts(&servers);
    api.clear_requests();
    let cpu = CpuMeter::start(&["kiam-server"]);
    let api = Arc::new(api);
    let begin = Instant::now();
    let (answers, ready) = load_rt.block_on(async {
        let start = tokio::time::Instant::now();
        // Churn: a new pod every 1/CHURN s on the next node, asking at once
        // and every RETRY until it has credentials (timed from its creation),
        // and a pod of the population (one the load does not ask for)
        // deleted in its place.
        let churn = {
            let (api, conns, addrs) = (api.clone(), conns.clone(), addrs.clone());
            tokio::spawn(async move {
                let mut waits = Vec::new();
                for k in 0..churn_n {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / CHURN))
                        .await;
                    let p = pods::population(CHURN_BASE + k, NAMESPACES, ROLES);
                    let agent = k % agents;
                    api.apply_pod(pod_object(&p, agent))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let created = Instant::now();
                    let gone = pods::population(pods_n - 1 - k, NAMESPACES, ROLES);
                    api.delete_pod(&gone.namespace, &gone.name)
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let channel = conns
                        .to(route(&p.ip, agent, &addrs, sharing), agent)
                        .clone();
                    waits.push(tokio::spawn(async move {
                        // Up to 30 s, as an agent's own deadline allows.
                        for tried in 1..=3000 {
                            if pod_request(channel.clone(), p.ip.clone(), agent)
                                .await
                                .is_ok()
                            {
                                return (Some(created.elapsed()), tried);
                            }
                            tokio::time::sleep(RETRY).await;
                        }
                        (None, 3000)
                    }));
                }
                let mut out = Vec::new();
                for w in waits {
                    out.push(w.await?);
                }
                Ok::<_, anyhow::Error>(out)
            })
        };
        let mut tasks = Vec::with_capacity(plan.len());
        for &(at, i) in plan.iter() {
            tokio::time::sleep_until(start + at).await;
            let agent = i % agents;
            let ip = ips[i].clone();
            let channel = conns.to(route(&ip, agent, &addrs, sharing), agent).clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = pod_request(channel, ip, agent).await.is_ok();
                (ok, t0.elapsed())
            }));
        }
        tokio::time::sleep_until(start + window).await;
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await?);
        }
        let ready = churn.await??;
        Ok::<_, anyhow::Error>((out, ready))
    })?;
    let elapsed = begin.elapsed();
    let server_cpu = cpu.used().iter().map(|(_, s)| s).sum();
    let sts_calls = sts(&servers) - sts_before;
    let server_heap = alloc::tracked_live() - heap_before;
    let mut hist = new_hist();
    for (_, took) in &answers {
        hist.saturating_record(took.as_nanos() as u64);
    }
    let mut ready_hist = new_hist();
    for took in ready.iter().filter_map(|r| r.0) {
        ready_hist.saturating_record(took.as_nanos() as u64);
    }
    let count = |f: &dyn Fn(&RecordedRequest) -> bool| api.count_requests(f);
    let run = Run {
        pods: pods_n,
        agents,
        tags,
        sharing,
        requests: answers.len(),
        errors: answers.iter().filter(|a| !a.0).count(),
        elapsed,
        watches: count(&|r| r.verb == "watch"),
        lists: count(&|r| r.verb == "list"),
        gets: count(&is_pod_get),
        other: count(&|r| r.verb != "watch" && r.verb != "list" && !is_pod_get(r)),
        sts_calls,
        server_cpu,
        server_heap,
        created: ready.len(),
        not_ready: ready.iter().filter(|r| r.0.is_none()).count(),
        new_pod_requests: ready.iter().map(|r| r.1).sum(),
        ready_p50_us: ready_hist.value_at_quantile(0.5) as f64 / 1000.0,
        ready_p99_us: ready_hist.value_at_quantile(0.99) as f64 / 1000.0,
        ready_max_us: ready_hist.max() as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        setup,
    };
    kiam_rt.block_on(async { drop(servers) });
    drop(conns);
    Ok(run)
}

/// "linear", "sub-linear" or "super-linear" for a figure that went from
/// `a` to `b` while pods and nodes doubled.
fn growth(a: f64, b: f64) -> String {
    if a <= 0.0 || b <= 0.0 {
        return "-".into();
    }
    let r = b / a;
    let kind = if r < 1.6 {
        "sub-linear"
    } else if r <= 2.5 {
        "linear"
    } else {
        "**super-linear**"
    };
    format!("{r:.2}x {kind}")
}

fn mib(bytes: isize) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Figure 10.
pub fn scale(report: &mut Report, quick: bool) -> Result<()> {
    // (pods, agents, modes: 0 tags off, 1 off and on, 3 off, on, and on
    // without sharing)
    let (sizes, window): (&[(usize, usize, usize)], _) = if quick {
        (&[(2_000, 64, 1), (4_000, 128, 3)], Duration::from_secs(5))
    } else {
        (
            &[(37_500, 1_250, 0), (75_000, 2_500, 1), (150_000, 5_000, 3)],
            Duration::from_secs(30),
        )
    };
    // One size, for profiling: KIAM_BENCH_SCALE=<pods>,<agents>,<modes: 0 tags off, 1 off and on,
    // 2 on, 3 off, on, and on without prefetch sharing>.
    let given: Vec<(usize, usize, usize)> = std::env::var("KIAM_BENCH_SCALE")
        .ok()
        .and_then(|v| {
            let f: Vec<usize> = v.split(',').filter_map(|x| x.parse().ok()).collect();
            (f.len() == 3).then(|| vec![(f[0], f[1], f[2])])
        })
        .unwrap_or_default();
    let sizes: Vec<(usize, usize, usize)> = if given.is_empty() {
        sizes.to_vec()
    } else {
        given
    };
    let started = Instant::now();
    let mut rows: Vec<Run> = Vec::new();
    for &(pods_n, agents, with_tags) in &sizes {
        // (tags, sharing): sharing is the default deployment; the last
        // mode is the "before" row (every server prefetches every pod).
        let modes: &[(bool, bool)] = match with_tags {
            0 => &[(false, true)],
            1 => &[(false, true), (true, true)],
            2 => &[(true, true)],
            _ => &[(false, true), (true, true), (true, false)],
        };
        for &(tags, sharing) in modes {
            let r = run(pods_n, agents, tags, sharing, window)
                .with_context(|| format!("{pods_n} pods, tags {tags}, sharing {sharing}"))?;
            // Give the freed heap of this row back to the system before the
            // next: 150,000 pods as JSON values take ~10 GiB, and glibc keeps
            // freed arenas otherwise (two large rows in a row ran out of the
            // machine's 24 GiB).
            // SAFETY: malloc_trim only releases free memory; no pointer is touched.
            unsafe {
                libc::malloc_trim(0);
            }
            eprintln!(
                "scale {pods_n} pods {agents} agents tags={tags} sharing={sharing}: {} requests, api {}/{}/{}/{}, sts {}, setup {:?}",
                r.requests, r.watches, r.lists, r.gets, r.other, r.sts_calls, r.setup
            );
            rows.push(r);
        }
    }
    let total = started.elapsed();
    let mut t = Table::new(&[
        "Pods",
        "Agents",
        "Session tags",
        "Prefetch shared (`--prefetch-peers`), agents ask the owner",
        "Pod requests (/s)",
        "API requests/s (watch / LIST / pod GET / other)",
        "API requests per 1000 pod requests",
        "STS calls/min",
        "New pods: created -> credentials p50 / p99 / max",
        "kiam servers' CPU: per s / per 1000 pod requests",
        "kiam servers' heap (3 servers)",
        "Pod request p99",
        "Errors",
    ]);
    for r in &rows {
        let secs = r.secs();
        let per_s = |n: usize| n as f64 / secs;
        let per_k = |n: usize| 1000.0 * n as f64 / r.all_requests().max(1) as f64;
        t.row(vec![
            r.pods.to_string(),
            r.agents.to_string(),
            if r.tags { "on" } else { "off" }.into(),
            if r.sharing {
                "yes".to_string()
            } else {
                "**no** (before: every server prefetches every pod)".to_string()
            },
            format!(
                "{} + {} new pods' ({:.0}/s)",
                r.requests,
                r.new_pod_requests,
                per_s(r.all_requests())
            ),
            format!(
                "**{:.0}** ({:.2} / {:.1} / {:.0} / {:.1})",
                per_s(r.api_total()),
                per_s(r.watches),
                per_s(r.lists),
                per_s(r.gets),
                per_s(r.other)
            ),
            format!("{:.0}", per_k(r.api_total())),
            format!("{:.0}", r.sts_calls as f64 * 60.0 / secs),
            format!(
                "{} / {} / {} ({} pods{})",
                us(r.ready_p50_us),
                us(r.ready_p99_us),
                us(r.ready_max_us),
                r.created,
                if r.not_ready > 0 {
                    format!(", **{} never ready**", r.not_ready)
                } else {
                    String::new()
                }
            ),
            format!(
                "{:.2} s / {:.0} ms",
                r.server_cpu / secs,
                1000.0 * 1000.0 * r.server_cpu / r.all_requests().max(1) as f64
            ),
            mib(r.server_heap),
            us(r.p99_us),
            r.errors.to_string(),
        ]);
    }
    let mut g = Table::new(&[
        "Tags",
        "Pods (agents)",
        "Pod requests/s",
        "kiam CPU/s",
        "kiam heap",
        "API requests/s",
        "STS calls/min",
        "New pod p50",
        "New pod p99",
        "Pod request p99",
    ]);
    for tags in [false, true] {
        let of: Vec<&Run> = rows
            .iter()
            .filter(|r| r.tags == tags && r.sharing)
            .collect();
        for pair in of.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            g.row(vec![
                if tags { "on" } else { "off" }.into(),
                format!("{} ({}) -> {} ({})", a.pods, a.agents, b.pods, b.agents),
                growth(a.requests as f64 / a.secs(), b.requests as f64 / b.secs()),
                growth(a.server_cpu / a.secs(), b.server_cpu / b.secs()),
                growth(a.server_heap as f64, b.server_heap as f64),
                growth(
                    a.api_total() as f64 / a.secs(),
                    b.api_total() as f64 / b.secs(),
                ),
                growth(a.sts_calls as f64 / a.secs(), b.sts_calls as f64 / b.secs()),
                growth(a.ready_p50_us, b.ready_p50_us),
                growth(a.ready_p99_us, b.ready_p99_us),
                growth(a.p99_us, b.p99_us),
            ]);
        }
    }
    let pod_bytes: Vec<usize> = (0..24)
        .map(|i| {
            serde_json::to_vec(&pod_object(&pods::population(i, NAMESPACES, ROLES), 0))
                .map(|v| v.len())
                .unwrap_or(0)
        })
        .collect();
    let (min_b, max_b) = (
        pod_bytes.iter().min().copied().unwrap_or(0),
        pod_bytes.iter().max().copied().unwrap_or(0),
    );
    let setups: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.0} s", r.setup.as_secs_f64()))
        .collect();
    let notes = vec![
        "Growth: each figure's ratio from one size to the next while pods and nodes double; \
         1.6x-2.5x is called linear, below sub-linear, above super-linear. The pod request rate \
         doubles by construction (it is proportional to the pods), so per-second figures that \
         double are linear per pod."
            .to_string(),
        format!(
            "Setup per row (storing the pods, three servers' first sync, prefetch, {} connections): {}.",
            "the agents'",
            setups.join(", ")
        ),
    ];
    report.sections.push(Section {
        title: "10. Scale (in-process): API server and STS cost up to 150,000 pods and 5,000 agents".into(),
        method: format!(
            "**In-process, not a cluster**: {SERVERS} kiam servers (`kiam::server::run`, each with its own fake \
             STS answering at once) on one 2-worker runtime, the in-memory API server (1 worker) and the agents' \
             connections plus load (2 workers) share this process and the machine's 2 cores. Agents: one \
             mutual-TLS gRPC connection each (agent `a` to server `a mod 3`, not one per server per agent: \
             {SERVERS}x the connections would not change what the API server or STS see, and a request for a \
             pod owned by another server goes over one of that server's connections); each pod is on node \
             `i mod agents`, and its requests name that node (`kiam-node`, as our agents do) and go to the \
             pod's owner among the servers (`kiam::shard::owner` of its IP, as our agents ask), which alone \
             prefetched it (`--prefetch-peers`, the deployed default); in the row whose sharing column says no (before) the servers \
             run without `--prefetch-peers` (every server prefetches every pod) and each request goes to the \
             agent's own server. Pods: realistic \
             objects ({min_b}-{max_b} bytes of JSON each) in {NAMESPACES} namespaces over {ROLES} roles, stored \
             straight into the API server; each server watches them all. **Load model**: {:.0}% of pods use SDKs \
             that cache credentials and ask once per {:.0} min (botocore refreshes 15 min before a 1 h expiry), \
             {:.0}% build a new client per unit of work and ask every {:.0} s, each at a fixed random phase ({:.0} pod requests/s per 10,000 pods); \
             every pod request is what an agent sends (GetPodRole, then GetPodCredentials), straight to a server \
             (no agent warm path, so each is a server request). After the servers synced, prefetch had settled (no STS call for 1 s) and \
             every connection was up, for {:?}: the pods ask as modelled, while {CHURN:.0} \
             pods/s are created (each asks at once and retries every {} ms until it has credentials, timed from \
             its creation) and as many deleted. API requests are those the in-memory API server recorded in the \
             window from all servers (watch = watches opened); STS calls are the fake STS calls of all servers; \
             CPU is the kiam runtime's threads'; heap is what the kiam runtime's threads allocated and did not \
             free since before the servers started (the process RSS also holds the API server's objects and the \
             load); per 1000 pod requests counts the modelled requests and the new pods' (retries included). The in-memory API server indexes pods by `status.podIP` and `spec.nodeName` (the \
             real one's watch cache indexes `spec.nodeName` and scans for `status.podIP`), so its LIST cost is \
             not the real one's; the request counts are. Whole `--only scale` run: {:.0} s.",
            Rates::CACHING * 100.0,
            Rates::CACHING_PERIOD / 60.0,
            (1.0 - Rates::CACHING) * 100.0,
            Rates::UNCACHED_PERIOD,
            Rates::per_second(10_000),
            window,
            RETRY.as_millis(),
            total.as_secs_f64()
        ),
        tables: vec![t, g],
        notes,
    });
    Ok(())
}
