//! Figure 3: memory and time to first full sync with many realistic pods.
//!
//! Three readings per size, all against the same in-memory API server in
//! this process: the floor (a raw paginated LIST of every pod, bytes read
//! and dropped, as kube-rs pages it: 500 per page); the real `kiam server`
//! process (time from spawn until GetHealth answers ok, then RSS); and an
//! in-process server in a child process whose allocator counts live bytes,
//! for the cache's heap per pod. The child holds no API server, so its heap
//! growth is kiam's own; the per-pod figure is the slope between two sizes,
//! which cancels everything that does not grow with pods.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::tls::{ChannelOpts, ClientTls};
use kiam_sandbox::apiserver::FakeApiServer;
use kiam_sandbox::procs::{self as sandbox_procs, ChildGuard};
use prometheus_client::registry::Registry;

use crate::cluster::Cluster;
use crate::pods::{self, BASE_ARN};
use crate::procs::{self, mib};
use crate::replay::{self, PAGE};
use crate::report::{Report, Section, Table};
use crate::{alloc, runtime};

const NAMESPACES: usize = 50;
const ROLES: usize = 100;

struct Populated {
    api: FakeApiServer,
    json_bytes: usize,
    annotation_bytes: usize,
}

/// The emulator's pages, captured, and how long the emulator took.
struct Captured {
    pages: replay::Pages,
    emulator: Duration,
}

fn capture(rt: &tokio::runtime::Runtime, p: &Populated) -> Result<Captured> {
    rt.block_on(async {
        let mut pages = replay::Pages::default();
        let emulator = replay::capture(p.api.addr(), "/api/v1/pods", &mut pages).await?;
        replay::capture(p.api.addr(), "/api/v1/namespaces", &mut pages).await?;
        Ok(Captured { pages, emulator })
    })
}

fn populate(rt: &tokio::runtime::Runtime, n: usize) -> Result<Populated> {
    let api = rt.block_on(FakeApiServer::start())?;
    for ns in 0..NAMESPACES {
        // No iam.amazonaws.com/permitted: nothing is prefetched, so no STS
        // is needed and the figures are the caches' alone.
        api.create_namespace(pods::namespace(&format!("team-{ns:03}"), None))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let mut json_bytes = 0;
    let mut annotation_bytes = 0;
    for i in 0..n {
        let spec = pods::population(i, NAMESPACES, ROLES);
        let pod = pods::pod(&spec);
        json_bytes += serde_json::to_vec(&pod)?.len();
        annotation_bytes += spec.role.as_deref().map_or(0, str::len);
        api.apply_pod(pod).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    Ok(Populated {
        api,
        json_bytes,
        annotation_bytes,
    })
}

/// What the heap child reports.
struct Heap {
    sync: Duration,
    grown: i64,
    /// CPU seconds the child used from `kiam::server::run` to ready.
    cpu: f64,
}

/// Entry point of the child: `--heap-child <api url>,<pods>`. Prints
/// `heap <sync ns> <bytes grown>`.
pub fn heap_child(spec: &str) -> Result<()> {
    let (url, _) = spec.split_once(',').context("--heap-child URL,PODS")?;
    kiam::ensure_crypto_provider();
    let rt = runtime("kiam-server", 2);
    let (sync, grown, cpu) = rt.block_on(async {
        let (cluster, listener, deps) = Cluster::prepare(url, &[]).await?;
        let before = alloc::live();
        let cpu_before = procs::cpu_seconds("self")?;
        let start = Instant::now();
        tokio::spawn(kiam::server::run(listener, deps, cluster.shutdown.clone()));
        // Ready is what agents see: GetHealth answers ok. Polled every 5 ms
        // on one connection (its handshake is a constant the slope cancels).
        cluster.wait_ready(Duration::from_secs(600)).await?;
        let sync = start.elapsed();
        let cpu = procs::cpu_seconds("self")? - cpu_before;
        // Let the last page's buffers and the list's connection settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let grown = alloc::live() - before;
        drop(cluster);
        Ok::<_, anyhow::Error>((sync, grown, cpu))
    })?;
    println!("heap {} {} {cpu}", sync.as_nanos(), grown);
    Ok(())
}

fn run_heap_child(api_url: &str, pods: usize) -> Result<Heap> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--heap-child")
        .arg(format!("{api_url},{pods}"))
        .output()?;
    if !out.status.success() {
        bail!(
            "heap child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("heap "))
        .context("heap child printed nothing")?;
    let mut f = line.split_whitespace().skip(1);
    let sync_ns: u64 = f.next().context("sync")?.parse()?;
    let grown: i64 = f.next().context("grown")?.parse()?;
    let cpu: f64 = f.next().context("cpu")?.parse()?;
    Ok(Heap {
        sync: Duration::from_nanos(sync_ns),
        grown,
        cpu,
    })
}

struct ProcessRun {
    sync: Duration,
    /// CPU seconds from spawn to ready (start-up included).
    cpu: f64,
    rss: u64,
    peak: u64,
}

fn run_process(api: std::net::SocketAddr, load_rt: &tokio::runtime::Runtime) -> Result<ProcessRun> {
    let bin = sandbox_procs::find_kiam()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, replay::kubeconfig(api))?;
    let pki = kiam::certs::generate(&dir.path().join("certs"), &[], 1)?;
    let port = sandbox_procs::free_port()?;
    let mut cmd = Command::new(bin);
    sandbox_procs::server_args(&mut cmd, &kubeconfig, &pki.dir)
        .args(["--role-base-arn", BASE_ARN])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        // STS is never called (no namespace permits a role); keep the SDK
        // off the network and away from real credentials anyway.
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    // Channels spawn their connection task on the current runtime.
    let _in_runtime = load_rt.enter();
    let channel = ClientTls::load(pki.agent_files(), &mut Registry::default())?
        .channel(&format!("127.0.0.1:{port}"), &ChannelOpts::default())?;
    let start = Instant::now();
    let child = ChildGuard::spawn("kiam server", cmd)?;
    let sync = load_rt.block_on(async {
        let mut client = KiamServiceClient::new(channel);
        loop {
            if let Ok(r) = client.get_health(kiam::proto::GetHealthRequest {}).await {
                if r.get_ref().message == "ok" {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("kiam server did not become ready within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })?;
    let cpu = procs::cpu_seconds(&child.pid().to_string())?;
    std::thread::sleep(Duration::from_secs(1));
    let (rss, peak) = procs::rss(child.pid())?;
    Ok(ProcessRun {
        sync,
        cpu,
        rss,
        peak,
    })
}

pub fn memory_and_sync(report: &mut Report, sizes: &[usize]) -> Result<()> {
    let api_rt = runtime("apiserver", 2);
    let load_rt = runtime("load", 1);
    let mut table = Table::new(&[
        "Pods",
        "JSON per pod",
        "Emulator LIST",
        "LIST floor",
        "Sync: `kiam server` process",
        "Its CPU time",
        "Sync: in-process",
        "Its CPU time",
        "RSS after sync",
        "Peak RSS",
        "kiam heap growth",
        "Heap per pod (whole)",
    ]);
    let mut points = Vec::new();
    for &n in sizes {
        eprintln!("sync: loading {n} pods");
        let (json_bytes, annotation_bytes, captured) = {
            let p = populate(&api_rt, n)?;
            let c = capture(&load_rt, &p)?;
            (p.json_bytes, p.annotation_bytes, c)
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let _stop_guard = stop.clone().drop_guard();
        let replay = api_rt.block_on(replay::serve(captured.pages.clone(), stop.clone()))?;
        // The floor is cheap: best of three, so a neighbour's burst does not
        // make kiam look faster than the floor.
        let mut floor = Duration::MAX;
        for _ in 0..3 {
            floor = floor.min(load_rt.block_on(replay::list_floor(replay))?);
        }
        let proc_run = run_process(replay, &load_rt)?;
        let heap = run_heap_child(&format!("http://{replay}"), n)?;
        eprintln!(
            "sync {n}: emulator {:?}, floor {:?} ({} MB), process {:?} rss {}, in-process {:?}, heap {}",
            captured.emulator,
            floor,
            captured.pages.bytes / 1_000_000,
            proc_run.sync,
            mib(proc_run.rss),
            heap.sync,
            heap.grown
        );
        table.row(vec![
            n.to_string(),
            format!("{:.1} KB", json_bytes as f64 / n as f64 / 1000.0),
            format!("{:.2} s", captured.emulator.as_secs_f64()),
            format!("{:.2} s", floor.as_secs_f64()),
            format!("{:.2} s", proc_run.sync.as_secs_f64()),
            format!("{:.2} s", proc_run.cpu),
            format!("{:.2} s", heap.sync.as_secs_f64()),
            format!("{:.2} s", heap.cpu),
            mib(proc_run.rss),
            mib(proc_run.peak),
            mib(heap.grown.max(0) as u64),
            format!("{:.0} B", heap.grown as f64 / n as f64),
        ]);
        points.push((n, heap, proc_run, annotation_bytes as f64 / n as f64, floor));
    }
    let mut notes = Vec::new();
    if let [(n1, h1, ..), (n2, h2, p2, ann, floor2)] = points.as_slice() {
        let per_pod = (h2.grown - h1.grown) as f64 / (*n2 - *n1) as f64;
        notes.push(format!(
            "Cache heap per pod (slope between {n1} and {n2} pods): **{per_pod:.0} bytes**, of which {ann:.0} are \
             the pod's iam annotation text."
        ));
        report.verdict(
            "<= 1 KiB of cache per pod beyond its annotations",
            format!("{:.0} B per pod + {ann:.0} B of annotation", per_pod - ann),
            per_pod - ann <= 1024.0,
        );
        report.verdict(
            &format!("{n2} pods synced in < 5 s"),
            format!(
                "{:.2} s (`kiam server` process, {:.2} s of CPU; in-process {:.2} s; the LIST floor alone {:.2} s)",
                p2.sync.as_secs_f64(),
                p2.cpu,
                h2.sync.as_secs_f64(),
                floor2.as_secs_f64()
            ),
            p2.sync < Duration::from_secs(5),
        );
    }
    report.sections.push(Section {
        title: "3. Server memory and start-up".into(),
        method: format!(
            "Realistic pods (labels, annotations, owner references, managed fields, two containers with env, \
             probes, resources and mounts, projected volumes, Running status with conditions and container \
             statuses) spread over {NAMESPACES} namespaces and {ROLES} roles, in the in-memory API server (this \
             process, 2 workers). No namespace permits a role, so nothing is prefetched and STS is never called. \
             The emulator's LIST pages ({PAGE} pods each, as kube-rs asks) are captured once (\"Emulator LIST\": \
             its own time, which is not kiam's) and replayed from memory by a minimal HTTP server, so kiam \
             lists from something at least as fast as a real API server's watch cache. LIST floor: every \
             replayed page read and dropped by a bare HTTP/1 client (best of three). Process: the release `kiam server` binary with a kubeconfig for the API server; sync time is \
             spawn until GetHealth answers `ok` (polled every 10 ms), RSS read 1 s later. Heap: an in-process \
             server in a child process with a counting allocator, live bytes 1 s after sync minus before \
             `kiam::server::run`."
        ),
        tables: vec![table],
        notes,
    });
    Ok(())
}
