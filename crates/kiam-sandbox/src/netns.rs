//! A node with Pods made of Linux network namespaces and veth pairs, so that
//! real packets from a "Pod" go through the agent's iptables rule. Root only.
//!
//! The one surprise: a network namespace belongs to a *thread*, not a
//! process. [`NetNs::enter`] moves only the calling thread (a tokio
//! multi-thread runtime would scatter its tasks across namespaces), so code
//! that must open sockets elsewhere uses [`NetNs::bind_tcp`] /
//! [`NetNs::connect_tcp`] (a short-lived thread does the `socket()` call;
//! the socket keeps its namespace wherever it is used afterwards) and child
//! processes use [`NetNs::command`].
//!
//! The node side comes in two kinds, and the difference matters:
//! - shared ([`NodeOptions::isolated`] false): the node side is this
//!   process's own network namespace, so in-process servers, `kiam` processes
//!   and iptables rules there share it. Because conntrack and the nat table
//!   are then the machine's, such a node holds a machine-wide lock until
//!   dropped: one at a time across every process.
//! - isolated: the node side is a namespace of its own. Nothing on the
//!   machine is touched, so rules that match every interface (`! -i eth0`)
//!   are safe and nodes live side by side. It forwards (as a real node does)
//!   but has no uplink, so what no rule redirects is refused at once.
//!
//! Each Pod has a veth pair: the node end `<id>h<k>` and the Pod end `eth0`
//! inside the Pod namespace, whose default route points at the node. Traffic
//! from a Pod to 169.254.169.254 therefore enters the node's `nat PREROUTING`
//! on `<id>h<k>`, which is where `--iptables` catches it. Addresses come
//! only from 198.18.0.0/15 (reserved for benchmarks, never routed). A Pod
//! either takes a /30 of its own (the node end holds the gateway address),
//! or — on an isolated node with a node address — has the exact IP it was
//! given as a /32 and reaches the node address over the link, the way /32
//! CNI plugins route. In a shared namespace a `FORWARD -i <id>h<k> -j DROP`
//! rule keeps Pod traffic from ever leaving the machine.
//!
//! Names are `<prefix><pid:6 hex><n:2 hex>...` so that leftovers of a crashed
//! run (whose pid is gone), processes still running inside them included,
//! are swept at the next start. Everything is removed on drop, also when a
//! test panics.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The metadata service as a Pod addresses it.
pub const METADATA_URL: &str = "http://169.254.169.254";
/// The metadata address, which an isolated node can give its own emulator.
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The name prefix of the test fixture's nodes ([`Node::new`], [`Node::isolated`]).
pub const TEST_PREFIX: &str = "kiamt";

/// 198.18.0.0/15.
const NET_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const NET_SIZE: u32 = 1 << 17;
/// 198.18.0.0/15 as /30 blocks.
const SLOTS: u32 = NET_SIZE / 4;
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME: usize = 15;
/// How long a node waits for the machine-wide locks.
const LOCK_WAIT: Duration = Duration::from_secs(120);
/// The tools every node needs, with the Debian package that has each.
const TOOLS: [(&str, &str); 4] = [
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("curl", "curl"),
];

static NEXT: AtomicU32 = AtomicU32::new(0);
/// Prefixes already swept by this process.
// std Mutex: held only while sweeping, which is synchronous.
static SWEPT: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespaces and iptables need root: run as root (e.g. with sudo)")]
    NotRoot,
    #[error("`{tool}` is not installed: apt-get install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{command}: {reason}")]
    Command { command: String, reason: String },
    #[error("Pod IP {0} is not in 198.18.0.0/15, the only range the sandbox uses")]
    OutOfRange(Ipv4Addr),
    #[error("Pod IP {0} is already taken on this node (or is the node's own address)")]
    Taken(Ipv4Addr),
    #[error("a Pod with its own IP needs an isolated node with a node address")]
    NeedsNodeAddress,
    #[error("no free /30 left in 198.18.0.0/15")]
    Exhausted,
    #[error("interface name {0:?} would exceed 15 bytes: use a shorter prefix or fewer Pods")]
    NameTooLong(String),
    #[error("network namespace {ns}: {source}")]
    Io {
        ns: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whether this process may make namespaces and iptables rules.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Checks for root and for `ip`, `iptables`, `conntrack` and `curl`.
pub fn check_prerequisites() -> Result<(), NetnsError> {
    if !is_root() {
        return Err(NetnsError::NotRoot);
    }
    for (tool, package) in TOOLS {
        if !on_path(tool) {
            return Err(NetnsError::MissingTool { tool, package });
        }
    }
    Ok(())
}

/// Whether `program` is an executable file on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// A named network namespace (`/run/netns/<name>`, as `ip netns` makes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A handle on an existing namespace; nothing is created.
    pub fn named(name: impl Into<String>) -> NetNs {
        NetNs { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    fn open(&self) -> Result<File, NetnsError> {
        File::open(self.path()).map_err(|source| self.io(source))
    }

    fn io(&self, source: std::io::Error) -> NetnsError {
        NetnsError::Io {
            ns: self.name.clone(),
            source,
        }
    }

    /// A command that runs `program` inside the namespace. It also dies with
    /// the thread that spawns it (`PR_SET_PDEATHSIG`), so spawn long-lived
    /// children from a thread that lives as long as they should.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NetnsError> {
        let target = Arc::new(self.open()?);
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::procs::die_with_parent()
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    /// Sockets `f` opens stay in the namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let target = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this fresh thread only; the fd is open.
                    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(self.io(std::io::Error::last_os_error()));
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A listening socket bound inside the namespace (non-blocking, ready for
    /// `tokio::net::TcpListener::from_std`).
    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        let listener = self
            .run(|| std::net::TcpListener::bind(addr))?
            .map_err(|source| self.io(source))?;
        listener
            .set_nonblocking(true)
            .map_err(|source| self.io(source))?;
        Ok(listener)
    }

    /// A (blocking) connection made from inside the namespace; for tokio,
    /// `set_nonblocking(true)` it and use `tokio::net::TcpStream::from_std`.
    pub fn connect_tcp(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<std::net::TcpStream, NetnsError> {
        self.run(|| std::net::TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|source| self.io(source))
    }

    /// Moves this thread into the namespace until the guard is dropped:
    /// sockets it opens and processes it starts live there.
    pub fn enter(&self) -> Result<Entered<'static>, NetnsError> {
        let original = File::open("/proc/thread-self/ns/net").map_err(|source| self.io(source))?;
        let target = self.open()?;
        // SAFETY: both fds are open namespace files.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(self.io(std::io::Error::last_os_error()));
        }
        Ok(Entered {
            original: Some(original),
            _node: std::marker::PhantomData,
        })
    }

    /// Processes living in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        lines(&["ip", "netns", "pids", &self.name])
            .iter()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Runs a command inside the namespace with `ip netns exec`, blocking.
    pub fn exec(&self, cmd: &[&str]) -> std::io::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
    }
}

/// How to build a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Prefix of every name the node makes (at most 5 bytes so that
    /// interface names fit in 15).
    pub prefix: String,
    /// Give the node side a namespace of its own (see the module doc).
    pub isolated: bool,
    /// The node's own address on an isolated node (on its loopback), through
    /// which Pods with explicit IPs route. `None`: every Pod gets a /30.
    pub node_ip: Option<Ipv4Addr>,
}

/// A node: its Pods, and the namespace of its node side when isolated.
#[derive(Debug)]
pub struct Node {
    /// The prefix of every name this node made.
    id: String,
    /// `Some` for an isolated node.
    ns: Option<NetNs>,
    node_ip: Option<Ipv4Addr>,
    pods: Vec<Pod>,
    /// The index the next Pod's names get (never reused within a node).
    next_pod: usize,
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
    /// The Pod's default gateway: the node end's /30 address, or the node
    /// address.
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
    /// Test fixture: a node whose node side is this process's network
    /// namespace, with `pods` Pods on /30s. Without root it prints
    /// `SKIPPED: <test>: ...` and returns `None`; other failures panic.
    pub fn new(test: &str, pods: usize) -> Option<Node> {
        Self::for_test(test, pods, false)
    }

    /// Test fixture: like [`Node::new`], with a node side of its own.
    pub fn isolated(test: &str, pods: usize) -> Option<Node> {
        Self::for_test(test, pods, true)
    }

    fn for_test(test: &str, pods: usize, isolated: bool) -> Option<Node> {
        assert!((1..=16).contains(&pods), "a node has 1 to 16 Pods");
        match check_prerequisites() {
            Ok(()) => {}
            Err(NetnsError::NotRoot) => {
                // Straight to stderr: libtest hides eprintln! of passing tests.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {test}: network namespaces and iptables require root"
                );
                return None;
            }
            Err(e) => panic!("{test}: {e} (scripts/test.sh installs it)"),
        }
        let mut node = Node::create(&NodeOptions {
            prefix: TEST_PREFIX.into(),
            isolated,
            node_ip: None,
        })
        .unwrap_or_else(|e| panic!("{test}: {e}"));
        for _ in 0..pods {
            node.add_pod(None, None)
                .unwrap_or_else(|e| panic!("{test}: {e}"));
        }
        Some(node)
    }

    /// Makes a node without Pods, after sweeping what crashed runs with the
    /// same prefix left behind.
    pub fn create(options: &NodeOptions) -> Result<Node, NetnsError> {
        check_prerequisites()?;
        if options.node_ip.is_some() && !options.isolated {
            return Err(NetnsError::NeedsNodeAddress);
        }
        // Shared nodes serialise for their whole life; every creation
        // serialises on a second lock so that address picking and sweeping
        // never race another process.
        let shared = if options.isolated {
            None
        } else {
            Some(FileLock::acquire("kiam-netns-shared.lock", LOCK_WAIT)?)
        };
        let _creating = FileLock::acquire("kiam-netns-create.lock", LOCK_WAIT)?;
        sweep_once(&options.prefix);

        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 256;
        let id = format!("{}{:06x}{n:02x}", options.prefix, std::process::id());
        let node = Node {
            ns: options.isolated.then(|| NetNs::named(format!("{id}-node"))),
            id,
            node_ip: options.node_ip,
            pods: Vec::new(),
            next_pod: 0,
            _shared: shared,
        };
        // From here on a failed step returns and Drop removes what exists.
        if let Some(ns) = node.ns.clone() {
            run(&["ip", "netns", "add", ns.name()])?;
            node.ip_node(&["link", "set", "lo", "up"])?;
            // As on a real node. With no uplink it only makes the node
            // answer "unreachable" at once to what no rule redirects,
            // instead of dropping it silently.
            run(&[
                "ip",
                "netns",
                "exec",
                ns.name(),
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ])?;
            if let Some(ip) = node.node_ip {
                node.ip_node(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
            }
        }
        Ok(node)
    }

    /// Adds a Pod. `ip`: the exact address (needs a node address), else a
    /// free /30. `label`: the end of the namespace's name (default `pod<k>`).
    pub fn add_pod(
        &mut self,
        ip: Option<Ipv4Addr>,
        label: Option<&str>,
    ) -> Result<&Pod, NetnsError> {
        let k = self.next_pod;
        let host_if = format!("{}h{k:x}", self.id);
        if host_if.len() > MAX_IFNAME {
            return Err(NetnsError::NameTooLong(host_if));
        }
        let (ip, gateway, prefix_len) = match ip {
            Some(ip) => {
                let node_ip = self.node_ip.ok_or(NetnsError::NeedsNodeAddress)?;
                if slot_of(ip).is_none() {
                    return Err(NetnsError::OutOfRange(ip));
                }
                if ip == node_ip || self.pods.iter().any(|p| p.ip == ip) {
                    return Err(NetnsError::Taken(ip));
                }
                (ip, node_ip, 32)
            }
            None => {
                let slot = self.free_slot()?;
                let base = NET_BASE + slot * 4;
                (Ipv4Addr::from(base + 2), Ipv4Addr::from(base + 1), 30)
            }
        };
        let pod = Pod {
            ns: format!(
                "{}-{}",
                self.id,
                label.map_or_else(|| format!("pod{k}"), str::to_string)
            ),
            host_if,
            ip,
            gateway,
        };
        self.next_pod += 1;
        run(&["ip", "netns", "add", &pod.ns])?;
        self.pods.push(pod.clone());
        self.ip_node(&[
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
        ])?;
        if prefix_len == 30 {
            self.ip_node(&["addr", "add", &format!("{gateway}/30"), "dev", &pod.host_if])?;
        }
        self.ip_node(&["link", "set", &pod.host_if, "up"])?;
        if prefix_len == 32 {
            self.ip_node(&["route", "add", &format!("{ip}/32"), "dev", &pod.host_if])?;
        }
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
            ])?;
        }
        let in_pod = |args: &[&str]| {
            let mut full = vec!["ip", "-n", &pod.ns];
            full.extend(args);
            run(&full)
        };
        in_pod(&["addr", "add", &format!("{ip}/{prefix_len}"), "dev", "eth0"])?;
        in_pod(&["link", "set", "lo", "up"])?;
        in_pod(&["link", "set", "eth0", "up"])?;
        if prefix_len == 32 {
            in_pod(&["route", "add", &format!("{gateway}/32"), "dev", "eth0"])?;
        }
        in_pod(&["route", "add", "default", "via", &gateway.to_string()])?;
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Removes a Pod (its namespace and veth pair); false if no Pod has that
    /// namespace.
    pub fn remove_pod(&mut self, ns: &str) -> bool {
        let Some(at) = self.pods.iter().position(|p| p.ns == ns) else {
            return false;
        };
        let pod = self.pods.remove(at);
        if self.ns.is_none() {
            delete_rules(|rule| rule.split_whitespace().any(|t| t == pod.host_if));
        }
        self.remove_links(std::slice::from_ref(&pod));
        true
    }

    fn remove_links(&self, pods: &[Pod]) {
        for pod in pods {
            // Deleting one end deletes both, at once; a namespace's links
            // only go when the kernel gets round to it.
            let mut del = vec!["ip"];
            if let Some(ns) = &self.ns {
                del.extend(["-n", ns.name()]);
            }
            del.extend(["link", "del", &pod.host_if]);
            quiet(&del);
            quiet(&["ip", "netns", "del", &pod.ns]);
        }
    }

    /// `ip` on the node side.
    fn ip_node(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["ip"];
        if let Some(ns) = &self.ns {
            full.extend(["-n", ns.name()]);
        }
        full.extend(args);
        run(&full)
    }

    /// A /30 of 198.18.0.0/15 that no Pod of this node and (for a shared
    /// node) no address of this namespace is in.
    fn free_slot(&self) -> Result<u32, NetnsError> {
        let mut used: Vec<u32> = self.pods.iter().filter_map(|p| slot_of(p.ip)).collect();
        used.extend(self.node_ip.and_then(slot_of));
        // An isolated node cannot collide with anyone else, so it takes the
        // first slots; a shared one starts somewhere that depends on the pid
        // so that processes rarely probe the same slots.
        let start = match self.ns {
            Some(_) => 0,
            None => {
                used.extend(assigned_addresses().into_iter().filter_map(slot_of));
                (std::process::id().wrapping_mul(64)) % SLOTS
            }
        };
        (0..SLOTS)
            .map(|i| (start + i) % SLOTS)
            .find(|s| !used.contains(s))
            .ok_or(NetnsError::Exhausted)
    }

    /// The node address: where the agent listens (`--host`).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.node_ip.unwrap_or_else(|| self.pods[0].gateway)
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

    /// The prefix of every name this node made.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node side's namespace name, if isolated.
    pub fn netns(&self) -> Option<&str> {
        self.ns.as_ref().map(NetNs::name)
    }

    /// The node side's namespace, if isolated.
    pub fn node_ns(&self) -> Option<&NetNs> {
        self.ns.as_ref()
    }

    /// Runs `cmd` in the first Pod.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.pods[0].exec(cmd)
    }

    /// Runs `cmd` on the node side.
    pub fn exec_node(&self, cmd: &[&str]) -> Output {
        let result = match &self.ns {
            Some(ns) => ns.exec(cmd),
            None => Command::new(cmd[0]).args(&cmd[1..]).output(),
        };
        result.unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
    }

    /// Moves this thread into the node side until the guard is dropped:
    /// sockets it opens and processes it starts live there. A no-op for a
    /// shared-namespace node. The guard must be dropped before the node.
    pub fn enter(&self) -> Entered<'_> {
        match &self.ns {
            None => Entered {
                original: None,
                _node: std::marker::PhantomData,
            },
            Some(ns) => ns
                .enter()
                .unwrap_or_else(|e| panic!("entering the node: {e}")),
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
        // next interface given that name. An isolated node's rules go with
        // its namespace.
        if self.ns.is_none() {
            let addresses = self.footprint().addresses;
            delete_rules(|rule| mentions(rule, &self.id, &addresses));
        }
        let pods = std::mem::take(&mut self.pods);
        self.remove_links(&pods);
        if let Some(ns) = &self.ns {
            // Whatever still runs on the node would keep it alive unseen.
            kill_all(&ns.pids());
            quiet(&["ip", "netns", "del", ns.name()]);
        }
    }
}

impl Pod {
    pub fn netns(&self) -> NetNs {
        NetNs::named(self.ns.clone())
    }

    /// Runs `cmd` inside this Pod (`ip netns exec`), blocking.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.netns()
            .exec(cmd)
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
        let out = self.exec_async(&curl_args(url)).await;
        curl_result(url, out)
    }

    /// Blocking [`Pod::http_get`].
    pub fn http_get_blocking(&self, url: &str) -> Result<String, String> {
        curl_result(url, self.exec(&curl_args(url)))
    }

    /// `iptables -w 5 <args>` inside the Pod's own namespace (e.g. an
    /// `OUTPUT` rule that shapes what the Pod can send).
    pub fn iptables(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["ip", "netns", "exec", &self.ns, "iptables", "-w", "5"];
        full.extend(args);
        run(&full)
    }
}

fn curl_args(url: &str) -> [&str; 8] {
    [
        "curl",
        "-sS",
        "--connect-timeout",
        "3",
        "--max-time",
        "10",
        "--fail",
        url,
    ]
}

fn curl_result(url: &str, out: Output) -> Result<String, String> {
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

/// The thread is back in its original namespace when this is dropped.
pub struct Entered<'a> {
    original: Option<File>,
    _node: std::marker::PhantomData<&'a Node>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(original) = &self.original {
            // SAFETY: the fd is the thread's original namespace, still open.
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
        token.trim_start_matches('!').starts_with(id)
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
            let parts = split_rule(spec);
            let mut args = vec!["iptables", "-w", "5", "-t", table, "-D"];
            args.extend(parts.iter().map(String::as_str));
            quiet(&args);
        }
    }
}

/// Splits an `iptables -S` rule into arguments, honouring the double quotes
/// iptables puts around values with spaces (e.g. `--string "PUT /x"`).
fn split_rule(spec: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in spec.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    args.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(current);
    }
    args
}

/// Sweeps leftovers of `prefix` once per process.
fn sweep_once(prefix: &str) {
    let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
    if !swept.iter().any(|p| p == prefix) {
        sweep_leftovers(prefix);
        swept.push(prefix.to_string());
    }
}

/// Removes what a crashed earlier run with this prefix left: namespaces
/// (and the processes still in them) and links whose pid is gone, rules
/// naming them, and DNAT rules to 198.18.0.0/15 addresses no interface has
/// any more.
pub fn sweep_leftovers(prefix: &str) {
    let dead = |name: &str| -> bool {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.get(..6))
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
    };
    for line in lines(&["ip", "netns", "list"]) {
        let name = line.split_whitespace().next().unwrap_or_default();
        if dead(name) {
            kill_all(&NetNs::named(name).pids());
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

/// SIGKILLs `pids` and waits briefly for them to go.
fn kill_all(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids
        .iter()
        .any(|p| PathBuf::from(format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether an address is in 198.18.0.0/15, and its /30 there.
fn slot_of(ip: Ipv4Addr) -> Option<u32> {
    let offset = u32::from(ip).checked_sub(NET_BASE)?;
    (offset < NET_SIZE).then_some(offset / 4)
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
struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    fn acquire(name: &str, wait: Duration) -> Result<FileLock, NetnsError> {
        let path = std::env::temp_dir().join(name);
        let io = |source| NetnsError::Io {
            ns: format!("lock {}", path.display()),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let deadline = Instant::now() + wait;
        // SAFETY: flock on an fd we own.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if Instant::now() >= deadline {
                return Err(NetnsError::Command {
                    command: format!("flock {}", path.display()),
                    reason: format!(
                        "still locked after {wait:?}: is another shared-namespace node alive?"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(FileLock(file))
    }
}

/// Runs a set-up step; its stderr is the error.
fn run(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetnsError::Command {
            command: args.join(" "),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            command: args.join(" "),
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Runs a clean-up step; failures are reported, not fatal (Drop may run
/// while panicking).
fn quiet(args: &[&str]) {
    if let Err(e) = run(args) {
        eprintln!("clean-up: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_like_a_shell_would() {
        assert_eq!(
            split_rule(
                r#"OUTPUT -p tcp -m string --string "PUT /latest/api/token" --algo bm -j REJECT"#
            ),
            [
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "string",
                "--string",
                "PUT /latest/api/token",
                "--algo",
                "bm",
                "-j",
                "REJECT"
            ]
        );
    }

    #[test]
    fn only_198_18_0_0_15_has_slots() {
        assert_eq!(slot_of(Ipv4Addr::new(198, 18, 0, 6)), Some(1));
        assert_eq!(slot_of(Ipv4Addr::new(198, 19, 255, 255)), Some(SLOTS - 1));
        assert_eq!(slot_of(Ipv4Addr::new(198, 20, 0, 0)), None);
        assert_eq!(slot_of(Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn mentions_matches_names_negations_and_targets() {
        let ours = Ipv4Addr::new(198, 18, 0, 1);
        assert!(mentions(
            "-A PREROUTING -i kiamt00000100h0 -j DNAT",
            "kiamt00000100",
            &[]
        ));
        assert!(mentions(
            "-A PREROUTING ! -i !kiamt00000100h+ -j DNAT",
            "kiamt00000100",
            &[]
        ));
        assert!(mentions(
            "-A PREROUTING -j DNAT --to-destination 198.18.0.1:3100",
            "x",
            &[ours]
        ));
        assert!(!mentions(
            "-A PREROUTING -j DNAT --to-destination 198.18.0.10:3100",
            "x",
            &[ours]
        ));
    }
}
