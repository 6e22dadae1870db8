//! A node with Pods made of Linux network namespaces and veth pairs, for
//! tests that need real packets to go through iptables. Root only: without
//! root every constructor prints `SKIPPED: ...` and returns `None`.
//!
//! The node side comes in two kinds, and the difference matters:
//! - [`Node::new`]: the node side is the test process's own network namespace,
//!   so in-process servers, `kiam` processes and iptables rules there all
//!   share it. Because conntrack and the nat table are then the machine's,
//!   such a node holds a machine-wide lock until dropped: one at a time
//!   across every test process (a second one in the same test would wait and
//!   then panic).
//! - [`Node::isolated`]: the node side is a namespace of its own. Nothing on
//!   the machine is touched, so rules that match every interface
//!   (`! -i eth0`) are safe and tests run in parallel. It forwards (as a
//!   real node does) but has no uplink, so what no rule redirects is
//!   refused at once. Code that must run "on
//!   the node" runs there through [`Node::enter`] (this thread only: use a
//!   current-thread runtime, the `#[tokio::test]` default) or
//!   [`Node::exec_node`].
//!
//! Each Pod has a veth pair: the node end `<id>h<k>` carries the Pod's
//! gateway address, the Pod end is `eth0` inside the Pod namespace, and the
//! Pod's default route points at the node end. Traffic from a Pod to
//! 169.254.169.254 therefore enters the node's `nat PREROUTING` on `<id>h<k>`
//! — which is where `--iptables` catches it. Addresses come only from
//! 198.18.0.0/15 (reserved for tests), one /30 per Pod. In a shared
//! namespace a `FORWARD -i <id>h<k> -j DROP` rule keeps Pod traffic from ever
//! leaving the machine, whatever the host's `ip_forward`.
//!
//! Names are `kiamt<pid:6 hex><n:2 hex>...` so that leftovers of a crashed
//! run (whose pid is gone) are swept at the next start. Everything is removed
//! on drop, also when the test panics.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The metadata service as a Pod addresses it.
pub const METADATA_URL: &str = "http://169.254.169.254";

const PREFIX: &str = "kiamt";
/// 198.18.0.0/15 as /30 blocks.
const NET_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const SLOTS: u32 = (1 << 17) / 4;
/// How long a shared-namespace node waits for another one to finish.
const SHARED_WAIT: Duration = Duration::from_secs(120);

static NEXT: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A node: its Pods, and the namespace of its node side when isolated.
#[derive(Debug)]
pub struct Node {
    /// The prefix of every name this node made.
    id: String,
    /// `Some` for [`Node::isolated`].
    ns: Option<String>,
    pods: Vec<Pod>,
    /// Held by a shared-namespace node for its whole life (see module doc).
    _shared: Option<FileLock>,
}

/// One Pod: a namespace with `eth0` and a default route via the node.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The Pod's network namespace (`ip netns exec <ns>`).
    pub ns: String,
    /// The node-side veth end: what `--host-interface` names.
    pub host_if: String,
    /// The Pod's address: what the agent sees as the caller.
    pub ip: Ipv4Addr,
    /// The node end's address, the Pod's default gateway.
    pub gateway: Ipv4Addr,
}

/// What a node leaves on the machine, to check it is all gone after drop.
#[derive(Debug, Clone)]
pub struct Footprint {
    id: String,
    /// Addresses in the shared namespace (empty for an isolated node).
    addresses: Vec<Ipv4Addr>,
}

impl Node {
    /// A node whose node side is this process's network namespace.
    pub fn new(test: &str, pods: usize) -> Option<Node> {
        Self::create(test, pods, false)
    }

    /// A node whose node side is a namespace of its own.
    pub fn isolated(test: &str, pods: usize) -> Option<Node> {
        Self::create(test, pods, true)
    }

    fn create(test: &str, pods: usize, isolated: bool) -> Option<Node> {
        assert!((1..=16).contains(&pods), "a node has 1 to 16 Pods");
        if unsafe { libc::geteuid() } != 0 {
            // Straight to stderr: libtest hides eprintln! of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: network namespaces and iptables require root"
            );
            return None;
        }
        for tool in ["ip", "iptables", "conntrack", "curl"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                found,
                "{test}: `{tool}` is missing (scripts/test.sh installs it)"
            );
        }

        // Shared nodes serialise for their whole life; every creation
        // serialises on a second lock so that address picking and sweeping
        // never race another process.
        let shared = (!isolated).then(|| FileLock::acquire("kiam-netns-shared.lock", SHARED_WAIT));
        let _creating = FileLock::acquire("kiam-netns-create.lock", SHARED_WAIT);
        SWEEP.call_once(sweep_leftovers);

        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 256;
        let id = format!("{PREFIX}{:06x}{n:02x}", std::process::id());
        let mut node = Node {
            ns: isolated.then(|| format!("{id}-node")),
            id,
            pods: Vec::new(),
            _shared: shared,
        };
        // From here on a failed step panics and Drop removes what exists.
        if let Some(ns) = &node.ns {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            // As on a real node. With no uplink it only makes the node
            // answer "unreachable" at once to what no rule redirects,
            // instead of dropping it silently.
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ]);
        }
        for (k, slot) in free_slots(pods, isolated).into_iter().enumerate() {
            node.add_pod(k, slot);
        }
        Some(node)
    }

    fn add_pod(&mut self, k: usize, slot: u32) {
        let base = NET_BASE + slot * 4;
        let pod = Pod {
            ns: format!("{}-pod{k}", self.id),
            host_if: format!("{}h{k:x}", self.id),
            gateway: Ipv4Addr::from(base + 1),
            ip: Ipv4Addr::from(base + 2),
        };
        run(&["ip", "netns", "add", &pod.ns]);
        self.pods.push(pod.clone());
        let node_ip = |args: &[&str]| {
            let mut full = vec!["ip"];
            if let Some(ns) = &self.ns {
                full.extend(["-n", ns]);
            }
            full.extend(args);
            run(&full);
        };
        node_ip(&[
            "link",
            "add",
            &pod.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.ns,
        ]);
        node_ip(&[
            "addr",
            "add",
            &format!("{}/30", pod.gateway),
            "dev",
            &pod.host_if,
        ]);
        node_ip(&["link", "set", &pod.host_if, "up"]);
        if self.ns.is_none() {
            run(&[
                "iptables",
                "-w",
                "5",
                "-I",
                "FORWARD",
                "-i",
                &pod.host_if,
                "-j",
                "DROP",
            ]);
        }
        let p = |args: &[&str]| {
            let mut full = vec!["ip", "-n", &pod.ns];
            full.extend(args);
            run(&full);
        };
        p(&["addr", "add", &format!("{}/30", pod.ip), "dev", "eth0"]);
        p(&["link", "set", "lo", "up"]);
        p(&["link", "set", "eth0", "up"]);
        p(&["route", "add", "default", "via", &pod.gateway.to_string()]);
    }

    /// The node address: where the agent listens (`--host`).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.pods[0].gateway
    }

    pub fn pod(&self, k: usize) -> &Pod {
        &self.pods[k]
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// `--host-interface` matching the node end of every Pod (`<id>h+`).
    pub fn interface_wildcard(&self) -> String {
        format!("{}h+", self.id)
    }

    /// The node side's namespace, if isolated.
    pub fn netns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// Runs `cmd` in the first Pod.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.pods[0].exec(cmd)
    }

    /// Runs `cmd` on the node side.
    pub fn exec_node(&self, cmd: &[&str]) -> Output {
        let mut command = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(cmd);
                c
            }
            None => {
                let mut c = Command::new(cmd[0]);
                c.args(&cmd[1..]);
                c
            }
        };
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    /// Moves this thread into the node side until the guard is dropped:
    /// sockets it opens and processes it starts live there. A no-op for a
    /// shared-namespace node. The guard must be dropped before the node.
    pub fn enter(&self) -> Entered<'_> {
        let Some(ns) = &self.ns else {
            return Entered {
                original: None,
                _node: self,
            };
        };
        let original = File::open("/proc/thread-self/ns/net").expect("open own network namespace");
        let target = File::open(format!("/run/netns/{ns}")).expect("open node namespace");
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns into {ns}: {}", std::io::Error::last_os_error());
        }
        Entered {
            original: Some(original),
            _node: self,
        }
    }

    /// What to look for after drop (see [`Footprint::leftovers`]).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            id: self.id.clone(),
            addresses: match self.ns {
                Some(_) => Vec::new(),
                None => self.pods.iter().map(|p| p.gateway).collect(),
            },
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Rules first: a rule naming a deleted interface would match the
        // next interface given that name.
        let addresses = self.footprint().addresses;
        delete_rules(|rule| mentions(rule, &self.id, &addresses));
        for pod in &self.pods {
            if self.ns.is_none() {
                // Deleting one end deletes both, at once; a namespace's
                // links only go when the kernel gets round to it.
                quiet(&["ip", "link", "del", &pod.host_if]);
            }
            quiet(&["ip", "netns", "del", &pod.ns]);
        }
        if let Some(ns) = &self.ns {
            quiet(&["ip", "netns", "del", ns]);
        }
    }
}

impl Pod {
    /// Runs `cmd` inside this Pod (`ip netns exec`), blocking.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} in {}: {e}", self.ns))
    }

    /// Like [`Pod::exec`] without blocking the runtime, so a server on the
    /// same runtime can answer.
    pub async fn exec_async(&self, cmd: &[&str]) -> Output {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} in {}: {e}", self.ns))
    }

    /// `GET url` with curl from inside the Pod: the body, or curl's error.
    pub async fn http_get(&self, url: &str) -> Result<String, String> {
        let out = self
            .exec_async(&[
                "curl",
                "-sS",
                "--connect-timeout",
                "3",
                "--max-time",
                "10",
                "--fail",
                url,
            ])
            .await;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// The thread is back in its original namespace when this is dropped.
pub struct Entered<'a> {
    original: Option<File>,
    _node: &'a Node,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(original) = &self.original {
            if unsafe { libc::setns(original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "cannot return to the original network namespace: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl Footprint {
    /// Namespaces, links and iptables rules (in this process's namespace)
    /// that still carry the node's names or addresses.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for line in lines(&["ip", "netns", "list"])
            .into_iter()
            .chain(lines(&["ip", "-o", "link", "show"]))
        {
            if line.contains(&self.id) {
                found.push(line);
            }
        }
        for table in ["nat", "filter"] {
            for rule in lines(&["iptables", "-w", "5", "-t", table, "-S"]) {
                if mentions(&rule, &self.id, &self.addresses) {
                    found.push(format!("{table}: {rule}"));
                }
            }
        }
        found
    }
}

/// Whether an `iptables -S` line names one of our interfaces or sends
/// traffic to one of our addresses.
fn mentions(rule: &str, id: &str, addresses: &[Ipv4Addr]) -> bool {
    rule.split_whitespace().any(|token| {
        token.starts_with(id)
            || addresses.iter().any(|a| {
                token
                    .strip_prefix(&a.to_string())
                    .is_some_and(|rest| rest.starts_with(':'))
            })
    })
}

/// Deletes every `-A` rule of the nat and filter tables (in this process's
/// namespace) that `matches`.
fn delete_rules(matches: impl Fn(&str) -> bool) {
    for table in ["nat", "filter"] {
        for rule in lines(&["iptables", "-w", "5", "-t", table, "-S"]) {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            if !matches(&rule) {
                continue;
            }
            let mut args = vec!["iptables", "-w", "5", "-t", table, "-D"];
            args.extend(spec.split_whitespace());
            quiet(&args);
        }
    }
}

/// Removes what a crashed earlier run left: names whose pid is gone, and
/// DNAT rules to 198.18.0.0/15 addresses no interface has any more.
fn sweep_leftovers() {
    let dead = |name: &str| -> bool {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.get(..6))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
    };
    for line in lines(&["ip", "netns", "list"]) {
        let name = line.split_whitespace().next().unwrap_or_default();
        if dead(name) {
            quiet(&["ip", "netns", "del", name]);
        }
    }
    for line in lines(&["ip", "-o", "link", "show"]) {
        // "7: kiamt...h0@if6: <...>"
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        let name = name.split('@').next().unwrap_or_default();
        if dead(name) {
            quiet(&["ip", "link", "del", name]);
        }
    }
    let assigned = assigned_addresses();
    delete_rules(|rule| {
        rule.split_whitespace().any(|token| {
            dead(token.trim_start_matches('!'))
                || token
                    .split_once(':')
                    .and_then(|(ip, _)| ip.parse::<Ipv4Addr>().ok())
                    .is_some_and(|ip| slot_of(ip).is_some() && !assigned.contains(&ip))
        })
    });
}

/// `pods` /30 slots of 198.18.0.0/15 no address of this namespace is in.
/// An isolated node cannot collide with anyone, so it takes the first ones.
fn free_slots(pods: usize, isolated: bool) -> Vec<u32> {
    if isolated {
        return (0..pods as u32).collect();
    }
    let used: Vec<u32> = assigned_addresses()
        .into_iter()
        .filter_map(slot_of)
        .collect();
    // Start somewhere that depends on the pid so that processes rarely probe
    // the same slots.
    let start = (std::process::id() * 64) % SLOTS;
    (0..SLOTS)
        .map(|i| (start + i) % SLOTS)
        .filter(|s| !used.contains(s))
        .take(pods)
        .collect()
}

fn slot_of(ip: Ipv4Addr) -> Option<u32> {
    let offset = u32::from(ip).checked_sub(NET_BASE)?;
    (offset < SLOTS * 4).then_some(offset / 4)
}

fn assigned_addresses() -> Vec<Ipv4Addr> {
    lines(&["ip", "-o", "-4", "addr", "show"])
        .iter()
        .filter_map(|line| {
            let mut tokens = line.split_whitespace();
            tokens.find(|t| *t == "inet")?;
            tokens.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// An exclusive `flock` on a file in the temp directory, across threads
/// and processes (each acquisition opens the file anew).
#[derive(Debug)]
struct FileLock(File);

impl FileLock {
    fn acquire(name: &str, wait: Duration) -> FileLock {
        let path = std::env::temp_dir().join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let deadline = Instant::now() + wait;
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(
                Instant::now() < deadline,
                "{} still locked after {wait:?}: is another shared-namespace Node alive in this test?",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        FileLock(file)
    }
}

/// Runs a set-up step; panics with its stderr if it fails.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs a clean-up step; failures are reported, not fatal (Drop may run
/// while panicking).
fn quiet(args: &[&str]) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "clean-up {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("clean-up {args:?}: {e}"),
    }
}

fn lines(args: &[&str]) -> Vec<String> {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
