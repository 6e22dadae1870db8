//! The local sandbox cluster: the real `kiam server` and `kiam agent
//! --iptables` processes on a simulated node whose Pods are network
//! namespaces, with an in-memory Kubernetes API server, STS (moto or a
//! built-in emulator) and the node's own metadata service around them.
//!
//! The one surprise: the node is a network namespace of its own, not this
//! machine's. The agent, the server, STS and the node's metadata service
//! (answering at 169.254.169.254:80, as on EC2) all live there, so the
//! agent's iptables rule and conntrack flush never touch the machine, and a
//! Pod that escaped the rule would really reach the node's role — which is
//! what makes "no Pod ever sees the node role" a meaningful check. This
//! process is the node's only link to the outside: it bridges the node's
//! `127.0.0.1:<port>` to the API server here (so one kubeconfig works on both
//! sides), and forwards loopback ports here to STS, the agent and the
//! metrics endpoints on the node.
//!
//! Without root (or without `ip`/`iptables`/`conntrack`/`curl`) it says so
//! loudly and runs everything on this machine's loopback instead, with the
//! agent's `--allow-ip-query`: Pods are then only IPs, asked for with `?ip=`.
//!
//! Clean-up happens on drop: children get SIGTERM (then SIGKILL), the node
//! and Pod namespaces go (and with them every rule), and the state directory
//! is removed. A run that crashed is swept by the next start (names carry
//! the pid); children also die with the thread that started them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apiserver::{FakeApiServer, Resource};
use crate::imds::{ImdsEmulator, NodeIdentity};
use crate::netns::{self, NetNs, NetnsError, Node, NodeOptions};
use crate::procs::{self, FindKiamError, ProcessSet, ProcsError};
use crate::sts::StsEmulator;

mod webhook;

/// The demo cluster (crates/kiam-sandbox/demo/cluster.yaml), built in.
pub const DEMO_CLUSTER: &str = include_str!("../demo/cluster.yaml");
/// `--role-base-arn` of the sandbox's server.
pub const ROLE_BASE_ARN: &str = "arn:aws:iam::123456789012:role/";
/// The node's address: on its loopback, the Pods' gateway, and the agent's
/// `--host`.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's IPv6 address (with [`SandboxOptions::ipv6`]): on its loopback,
/// and the agent's `--host-ipv6`. From 2001:2::/48, the IPv6 benchmarking
/// range.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// EC2's IPv6 metadata address, where the node's own metadata service also
/// answers (with [`SandboxOptions::ipv6`]).
pub const METADATA_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The node end of every Pod link, the Pods' IPv6 gateway.
const GATEWAY_IP6: &str = "fe80::1";
/// The AWS region everything is configured with.
pub const REGION: &str = "us-east-1";
/// `spec.nodeName` of the sandbox's Pods.
pub const NODE_NAME: &str = "sandbox-node";

/// Name prefix of the sandbox's namespaces and links.
const PREFIX: &str = "ksb";
/// Ports on the node. Its namespace is private, so these cannot collide
/// with anything and read well in the printed commands.
const NODE_AGENT_PORT: u16 = 8181;
const NODE_SERVER_PORT: u16 = 9610;
const NODE_STS_PORT: u16 = 5000;
const NODE_AGENT_METRICS_PORT: u16 = 9620;
const NODE_SERVER_METRICS_PORT: u16 = 9621;
/// Addresses the kubelet stand-in gives Pods created through the API:
/// 198.18.1.0 upwards, clear of the demo's 198.18.0.x.
const FIRST_DYNAMIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// How long each part may take to come up (generous for 2-core CI).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the kubelet stand-in looks for new and deleted Pods.
const KUBELET_INTERVAL: Duration = Duration::from_millis(300);

/// Numbers the state directories of the sandboxes of one process.
static NEXT_STATE_DIR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("seed {name}: {reason}")]
    Seed { name: String, reason: String },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Procs(#[from] ProcsError),
    #[error(transparent)]
    FindKiam(#[from] FindKiamError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} was not ready after {}s; the end of {}:\n{tail}", READY_TIMEOUT.as_secs(), log.display())]
    NotReady {
        what: String,
        log: PathBuf,
        tail: String,
    },
    #[error("`kiam certs` failed: {0}")]
    Certs(String),
    #[error(
        "moto_server not found: set MOTO_SERVER, put it on PATH or run scripts/test.sh \
         (which installs moto[server] into .venv), or use the built-in STS"
    )]
    NoMoto,
    #[error("{0}")]
    Pod(String),
    #[error(
        "this sandbox runs without network namespaces (not root): Pods are only IPs, \
         asked for with ?ip= against the agent"
    )]
    NoNamespaces,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Which STS the server talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StsChoice {
    /// moto when installed, else the built-in emulator.
    #[default]
    Auto,
    Moto,
    BuiltIn,
}

/// Where the node and its Pods live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkChoice {
    /// Namespaces when root with the tools, else loopback (loudly).
    #[default]
    Auto,
    /// Namespaces or an error.
    Namespaces,
    /// This machine's loopback and `--allow-ip-query`.
    Loopback,
}

/// How the sandbox runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Namespaces,
    Loopback,
}

/// Which STS is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsKind {
    Moto,
    BuiltIn,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Multi-document YAML of Namespaces and Pods.
    pub seed_yaml: String,
    /// Where the seed came from, for messages.
    pub seed_name: String,
    /// The `kiam` binary; `None`: [`procs::find_kiam`].
    pub kiam: Option<PathBuf>,
    pub sts: StsChoice,
    pub network: NetworkChoice,
    /// Kubeconfig, certificates and logs; `None`: a fresh directory in the
    /// temp dir, removed on drop.
    pub state_dir: Option<PathBuf>,
    /// Extra flags for `kiam server` and `kiam agent`.
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// Give Pods created through the API (kubectl) an IP and a namespace, as
    /// a kubelet would, and remove deleted Pods' namespaces.
    pub kubelet: bool,
    /// Print a line to stderr when the kubelet stand-in adds or removes a Pod.
    pub announce: bool,
    /// Namespace mode: the node also has IPv6 ([`NODE_IP6`]) and its own
    /// metadata service at `[fd00:ec2::254]:80`, the agent runs with
    /// `--host-ipv6`, and Pods can be given IPv6 addresses
    /// ([`Sandbox::add_ipv6`]).
    pub ipv6: bool,
    /// Extra environment for `kiam agent` (e.g. a PATH with stand-in tools).
    pub agent_env: Vec<(String, String)>,
    /// Namespace mode: the agent also takes `169.254.170.23:80`, the
    /// container credentials address of the token path
    /// (`--iptables-container-credentials`).
    pub container_credentials: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            seed_yaml: DEMO_CLUSTER.into(),
            seed_name: "demo/cluster.yaml".into(),
            kiam: None,
            sts: StsChoice::Auto,
            network: NetworkChoice::Auto,
            state_dir: None,
            server_args: Vec::new(),
            agent_args: Vec::new(),
            kubelet: true,
            announce: false,
            ipv6: false,
            agent_env: Vec::new(),
            container_credentials: false,
        }
    }
}

impl SandboxOptions {
    /// The defaults, seeded from a YAML file.
    pub fn with_seed_file(path: &Path) -> Result<Self, SandboxError> {
        let seed_yaml = std::fs::read_to_string(path).map_err(|e| SandboxError::Seed {
            name: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(SandboxOptions {
            seed_yaml,
            seed_name: path.display().to_string(),
            ..Default::default()
        })
    }
}

/// A Pod of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its network namespace (`ip netns exec <netns> ...`); `None` in
    /// loopback mode.
    pub netns: Option<String>,
}

impl SandboxPod {
    pub fn netns_handle(&self) -> Option<NetNs> {
        self.netns.clone().map(NetNs::named)
    }

    /// `ip netns exec <netns> <program>`: runs a program inside the Pod.
    pub fn command(&self, program: &str) -> Result<Command, SandboxError> {
        let netns = self.netns.as_ref().ok_or(SandboxError::NoNamespaces)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, program]);
        Ok(cmd)
    }
}

/// Where things answer. "Here" means this machine's loopback.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The API server, here and (bridged) on the node.
    pub api: String,
    /// STS, here.
    pub sts: String,
    /// STS as a Pod reaches it.
    pub sts_for_pods: String,
    /// STS as the server on the node reaches it.
    pub sts_for_server: String,
    /// The node's metadata service as the agent reaches it (`--metadata-endpoint`).
    pub node_metadata: String,
    /// The agent, here (in namespace mode connections arrive from the node's
    /// loopback, so only /ping and /health are useful).
    pub agent: String,
    pub agent_metrics: String,
    pub server_metrics: String,
    /// `--server-address` as the agent uses it.
    pub server_address: String,
}

/// Pods and the node, shared with the kubelet stand-in.
struct Cluster {
    // std Mutex: Pod set-up runs `ip` commands synchronously, never `.await`s.
    node: Mutex<Option<Node>>,
    pods: Mutex<Vec<SandboxPod>>,
    api: FakeApiServer,
    announce: bool,
    /// Held by a kubelet pass and by changes made through the sandbox, so
    /// neither sees the other's half-made Pod.
    // std Mutex: held over synchronous work only.
    sync: Mutex<()>,
}

/// A running sandbox; everything stops when it is dropped.
pub struct Sandbox {
    mode: Mode,
    sts_kind: StsKind,
    cluster: Arc<Cluster>,
    procs: ProcessSet,
    imds: ImdsEmulator,
    /// The node's metadata service at `[fd00:ec2::254]:80` (`ipv6`).
    imds_v6: Option<ImdsEmulator>,
    builtin_sts: Option<StsEmulator>,
    endpoints: Endpoints,
    kiam: PathBuf,
    state_dir: PathBuf,
    remove_state_dir: bool,
    kubeconfig: PathBuf,
    certs: PathBuf,
    warnings: Vec<String>,
    stop_kubelet: Arc<AtomicBool>,
    kubelet: Option<std::thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("mode", &self.mode)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Starts everything and returns once the server is healthy, the agent
    /// answers `/ping`, its iptables rule is in place and every seeded Pod
    /// has its namespace. Blocking; it runs its own tokio runtime, so call it
    /// from anywhere (but not drop it inside an async context that must not
    /// block: dropping waits for children to exit).
    pub fn start(options: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let mut warnings = Vec::new();
        let mode = match options.network {
            NetworkChoice::Loopback => Mode::Loopback,
            NetworkChoice::Namespaces => {
                netns::check_prerequisites()?;
                Mode::Namespaces
            }
            NetworkChoice::Auto => match netns::check_prerequisites() {
                Ok(()) => Mode::Namespaces,
                Err(e) => {
                    warnings.push(format!(
                        "NO NETWORK NAMESPACES: {e}. Falling back to loopback: the agent runs \
                         with --allow-ip-query and Pods are only IPs (add ?ip=<pod IP>)."
                    ));
                    Mode::Loopback
                }
            },
        };

        let (state_dir, remove_state_dir) = match &options.state_dir {
            Some(dir) => (dir.clone(), false),
            None => {
                sweep_state_dirs();
                (
                    // Several sandboxes may live in one process (tests).
                    std::env::temp_dir().join(format!(
                        "kiam-sandbox-{}-{}",
                        std::process::id(),
                        NEXT_STATE_DIR.fetch_add(1, Ordering::Relaxed)
                    )),
                    true,
                )
            }
        };
        std::fs::create_dir_all(&state_dir).map_err(io(format!(
            "creating the state directory {}",
            state_dir.display()
        )))?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiam-sandbox")
            .enable_all()
            .build()
            .map_err(io("starting a tokio runtime"))?;
        let api = runtime
            .block_on(FakeApiServer::start())
            .map_err(io("starting the API server"))?;
        api.load_yaml(&options.seed_yaml)
            .map_err(|e| SandboxError::Seed {
                name: options.seed_name.clone(),
                reason: e.to_string(),
            })?;
        let kubeconfig = state_dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)
            .map_err(io(format!("writing {}", kubeconfig.display())))?;

        let kiam = match &options.kiam {
            Some(path) => path.clone(),
            None => procs::find_kiam()?,
        };
        let certs = state_dir.join("certs");
        make_certs(&kiam, &certs)?;

        let node = match mode {
            Mode::Namespaces => {
                let node = Node::create(&NodeOptions {
                    prefix: PREFIX.into(),
                    isolated: true,
                    node_ip: Some(NODE_IP),
                })?;
                let ns = node.node_ns().expect("isolated").name().to_string();
                run_quiet(&[
                    "ip",
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    "169.254.169.254/32",
                    "dev",
                    "lo",
                ])?;
                Some(node)
            }
            Mode::Loopback => None,
        };
        let node_ns = node.as_ref().and_then(|n| n.node_ns().cloned());
        let cluster = Arc::new(Cluster {
            node: Mutex::new(node),
            pods: Mutex::new(Vec::new()),
            api: api.clone(),
            announce: options.announce,
            sync: Mutex::new(()),
        });

        // The node's own metadata service, where a Pod would reach the real
        // one: 169.254.169.254:80 on the node.
        let imds = {
            let listener = listen(
                &runtime,
                node_ns.as_ref(),
                SocketAddr::from((netns::METADATA_IP, 80)),
            )?;
            let _entered = runtime.enter();
            ImdsEmulator::serve(
                listener,
                NodeIdentity {
                    local_ipv4: NODE_IP.to_string(),
                    ..NodeIdentity::default()
                },
            )
            .map_err(io("starting the IMDS emulator"))?
        };
        // The same service at [fd00:ec2::254]:80, where an IPv6 Pod would
        // reach the real one.
        let imds_v6 = match (&node_ns, options.ipv6) {
            (Some(ns), true) => {
                for address in [format!("{NODE_IP6}/128"), format!("{METADATA_IP6}/128")] {
                    run_quiet(&["ip", "-n", ns.name(), "addr", "add", &address, "dev", "lo"])?;
                }
                let listener = listen(&runtime, Some(ns), SocketAddr::from((METADATA_IP6, 80)))?;
                let _entered = runtime.enter();
                Some(
                    ImdsEmulator::serve(
                        listener,
                        NodeIdentity {
                            local_ipv4: NODE_IP.to_string(),
                            ..NodeIdentity::default()
                        },
                    )
                    .map_err(io("starting the IPv6 IMDS emulator"))?,
                )
            }
            _ => None,
        };
        let node_metadata = match node_ns {
            Some(_) => netns::METADATA_URL.to_string(),
            None => format!("http://{}", imds.addr()),
        };

        let procs = ProcessSet::new(state_dir.join("logs"));
        let mut sandbox = Sandbox {
            mode,
            sts_kind: StsKind::BuiltIn,
            cluster,
            procs,
            imds,
            imds_v6,
            builtin_sts: None,
            endpoints: Endpoints {
                api: api.url(),
                sts: String::new(),
                sts_for_pods: String::new(),
                sts_for_server: String::new(),
                node_metadata,
                agent: String::new(),
                agent_metrics: String::new(),
                server_metrics: String::new(),
                server_address: String::new(),
            },
            kiam,
            state_dir,
            remove_state_dir,
            kubeconfig,
            certs,
            warnings,
            stop_kubelet: Arc::new(AtomicBool::new(false)),
            kubelet: None,
            runtime: Some(runtime),
        };
        // From here on an error drops `sandbox`, which cleans up what exists.
        sandbox.start_node_services(node_ns.as_ref(), options.sts)?;
        sandbox.start_kiam(node_ns.as_ref(), &options)?;
        sandbox.start_webhook()?;
        sandbox.adopt_seeded_pods()?;
        if options.kubelet {
            sandbox.start_kubelet();
        }
        Ok(sandbox)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn listen(
        &self,
        node_ns: Option<&NetNs>,
        node_addr: SocketAddr,
    ) -> Result<tokio::net::TcpListener, SandboxError> {
        listen(self.rt(), node_ns, node_addr)
    }

    /// STS and (namespace mode) the API bridge.
    fn start_node_services(
        &mut self,
        node_ns: Option<&NetNs>,
        sts: StsChoice,
    ) -> Result<(), SandboxError> {
        let moto = match sts {
            StsChoice::BuiltIn => None,
            StsChoice::Moto => Some(procs::moto_server_path().ok_or(SandboxError::NoMoto)?),
            StsChoice::Auto => procs::moto_server_path(),
        };
        let sts_addr = match moto {
            Some(moto) => {
                self.sts_kind = StsKind::Moto;
                let (mut cmd, addr) = match node_ns {
                    Some(ns) => (
                        ns.command(&moto)?,
                        SocketAddr::from(([0, 0, 0, 0], NODE_STS_PORT)),
                    ),
                    None => (
                        Command::new(&moto),
                        SocketAddr::from((
                            [127, 0, 0, 1],
                            procs::free_port().map_err(io("picking a port"))?,
                        )),
                    ),
                };
                cmd.args(["-H", &addr.ip().to_string(), "-p", &addr.port().to_string()]);
                self.procs.spawn("moto", cmd)?;
                let local = SocketAddr::from(([127, 0, 0, 1], addr.port()));
                self.wait_until("moto (STS)", "moto", || self.connects(node_ns, local))?;
                addr
            }
            None => {
                self.sts_kind = StsKind::BuiltIn;
                let listener =
                    self.listen(node_ns, SocketAddr::from(([0, 0, 0, 0], NODE_STS_PORT)))?;
                let _entered = self.rt().enter();
                let emulator =
                    StsEmulator::serve(listener).map_err(io("starting the built-in STS"))?;
                let addr = emulator.addr();
                self.builtin_sts = Some(emulator);
                addr
            }
        };
        self.endpoints.sts_for_server = format!("http://127.0.0.1:{}", sts_addr.port());
        match node_ns {
            Some(ns) => {
                self.endpoints.sts_for_pods = format!("http://{NODE_IP}:{}", sts_addr.port());
                self.endpoints.sts = self.forward_to_node(ns, sts_addr.port())?;
                // The server on the node reads the same kubeconfig: bridge
                // the node's 127.0.0.1:<api port> to the API server here.
                let api_addr = self.cluster.api.addr();
                let listener = self.listen(Some(ns), api_addr)?;
                self.rt().spawn(forward(listener, Target::Here(api_addr)));
            }
            None => {
                self.endpoints.sts = self.endpoints.sts_for_server.clone();
                self.endpoints.sts_for_pods = self.endpoints.sts_for_server.clone();
            }
        }
        Ok(())
    }

    /// A loopback port here that forwards to `port` on the node's loopback.
    fn forward_to_node(&self, ns: &NetNs, port: u16) -> Result<String, SandboxError> {
        let listener = self.listen(None, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let here = listener.local_addr().map_err(io("listening"))?;
        self.rt().spawn(forward(
            listener,
            Target::Node(ns.clone(), SocketAddr::from(([127, 0, 0, 1], port))),
        ));
        Ok(format!("http://{here}"))
    }

    /// `kiam server`, then `kiam agent`, each waited for.
    fn start_kiam(
        &mut self,
        node_ns: Option<&NetNs>,
        options: &SandboxOptions,
    ) -> Result<(), SandboxError> {
        let port = |fixed: u16| -> Result<u16, SandboxError> {
            match node_ns {
                Some(_) => Ok(fixed),
                None => procs::free_port().map_err(io("picking a port")),
            }
        };
        let server_port = port(NODE_SERVER_PORT)?;
        let server_metrics = port(NODE_SERVER_METRICS_PORT)?;
        let agent_port = port(NODE_AGENT_PORT)?;
        let agent_metrics = port(NODE_AGENT_METRICS_PORT)?;
        self.endpoints.server_address = format!("localhost:{server_port}");

        let mut server = self.kiam_command(node_ns)?;
        procs::server_args(&mut server, &self.kubeconfig, &self.certs)
            .args(["--role-base-arn", ROLE_BASE_ARN])
            .args(["--bind", &format!("127.0.0.1:{server_port}")])
            .args([
                "--prometheus-listen-addr",
                &format!("127.0.0.1:{server_metrics}"),
            ])
            .args(&options.server_args)
            .env("AWS_ACCESS_KEY_ID", "AKIASANDBOXSERVER001")
            .env("AWS_SECRET_ACCESS_KEY", "sandbox-server-secret")
            .env("AWS_REGION", REGION)
            .env("AWS_ENDPOINT_URL_STS", &self.endpoints.sts_for_server)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ENDPOINT_URL");
        self.procs.spawn("kiam-server", server)?;
        self.wait_until("kiam server (kiam health)", "kiam-server", || {
            self.server_healthy(node_ns)
        })?;

        let mut agent = self.kiam_command(node_ns)?;
        procs::agent_args(
            &mut agent,
            agent_port,
            &self.endpoints.server_address,
            &self.endpoints.node_metadata,
            &self.certs,
        )
        .args([
            "--prometheus-listen-addr",
            &format!("127.0.0.1:{agent_metrics}"),
        ]);
        match node_ns {
            Some(_) => {
                let wildcard = self.with_node(|node| node.interface_wildcard());
                agent
                    .args(["--iptables", "--host", &NODE_IP.to_string()])
                    .args(["--host-interface", &wildcard]);
                if options.ipv6 {
                    agent.args(["--host-ipv6", &NODE_IP6.to_string()]);
                }
                if options.container_credentials {
                    agent.arg("--iptables-container-credentials");
                }
            }
            None => {
                agent.args(["--allow-ip-query", "--host", "127.0.0.1"]);
            }
        }
        agent.args(&options.agent_args);
        agent.envs(options.agent_env.iter().map(|(k, v)| (k, v)));
        self.procs.spawn("kiam-agent", agent)?;
        let agent_local = SocketAddr::from(([127, 0, 0, 1], agent_port));
        self.wait_until("kiam agent (/ping)", "kiam-agent", || {
            matches!(self.http_get(node_ns, agent_local, "/ping"), Ok((200, body)) if body == "pong")
        })?;
        if node_ns.is_some() {
            self.wait_until("kiam agent's iptables rule", "kiam-agent", || {
                self.rule_present()
            })?;
        }

        match node_ns {
            Some(ns) => {
                self.endpoints.agent = self.forward_to_node(ns, agent_port)?;
                self.endpoints.agent_metrics = self.forward_to_node(ns, agent_metrics)?;
                self.endpoints.server_metrics = self.forward_to_node(ns, server_metrics)?;
            }
            None => {
                self.endpoints.agent = format!("http://{agent_local}");
                self.endpoints.agent_metrics = format!("http://127.0.0.1:{agent_metrics}");
                self.endpoints.server_metrics = format!("http://127.0.0.1:{server_metrics}");
            }
        }
        Ok(())
    }

    fn kiam_command(&self, node_ns: Option<&NetNs>) -> Result<Command, SandboxError> {
        let mut cmd = match node_ns {
            Some(ns) => ns.command(&self.kiam)?,
            None => Command::new(&self.kiam),
        };
        // Children must not pick up a developer's KIAM_* settings.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KIAM_") {
                cmd.env_remove(key);
            }
        }
        // Logs go to files: plain text, no colour codes.
        cmd.env("NO_COLOR", "1");
        Ok(cmd)
    }

    fn server_healthy(&self, node_ns: Option<&NetNs>) -> bool {
        let Ok(mut cmd) = self.kiam_command(node_ns) else {
            return false;
        };
        cmd.args(["health", "--server-address", &self.endpoints.server_address])
            .args(["--timeout", "2s"]);
        procs::tls_args(&mut cmd, &self.certs, "agent");
        cmd.output().is_ok_and(|out| out.status.success())
    }

    /// Polls `ready` until it holds, failing early (with its log) if the
    /// child `log_name` or any other child dies.
    fn wait_until(
        &self,
        what: &str,
        log_name: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), SandboxError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.procs.check()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.procs.log_path(log_name);
                return Err(SandboxError::NotReady {
                    what: what.into(),
                    tail: procs::log_tail(&log, 30),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn connects(&self, node_ns: Option<&NetNs>, addr: SocketAddr) -> bool {
        match node_ns {
            Some(ns) => ns.connect_tcp(addr, Duration::from_millis(500)).is_ok(),
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok(),
        }
    }

    /// A tiny blocking HTTP/1.1 GET (on the node in namespace mode).
    fn http_get(
        &self,
        node_ns: Option<&NetNs>,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), String> {
        let stream = match node_ns {
            Some(ns) => ns
                .connect_tcp(addr, Duration::from_secs(2))
                .map_err(|e| e.to_string())?,
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| e.to_string())?,
        };
        raw_get(stream, &addr.to_string(), path)
    }

    /// Whether the agent's DNAT rule is in the node's `nat PREROUTING`.
    pub fn rule_present(&self) -> bool {
        let Some(ns) = self.node_ns() else {
            return false;
        };
        let out = ns.exec(&["iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING"]);
        let target = format!("--to-destination {NODE_IP}:{NODE_AGENT_PORT}");
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&target))
    }

    fn with_node<T>(&self, f: impl FnOnce(&mut Node) -> T) -> T {
        let mut node = self.cluster.node.lock().unwrap_or_else(|e| e.into_inner());
        f(node.as_mut().expect("namespace mode has a node"))
    }

    /// Gives every seeded Pod with an IP its namespace.
    fn adopt_seeded_pods(&self) -> Result<(), SandboxError> {
        for pod in self.cluster.api.list(Resource::Pods, None) {
            let Some(view) = PodView::of(&pod) else {
                continue;
            };
            let Some(ip) = view.ip else {
                continue;
            };
            self.cluster.add(&view.namespace, &view.name, ip)?;
            let running = pod["status"]["phase"] == "Running";
            if running && pod["status"]["containerStatuses"].is_null() {
                let _ = self.cluster.mark_running(&view.namespace, &view.name, ip);
            }
        }
        Ok(())
    }

    fn start_kubelet(&mut self) {
        let cluster = self.cluster.clone();
        let stop = self.stop_kubelet.clone();
        self.kubelet = Some(
            std::thread::Builder::new()
                .name("kiam-sandbox-kubelet".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        cluster.sync_once();
                        std::thread::sleep(KUBELET_INTERVAL);
                    }
                })
                .expect("start the kubelet thread"),
        );
    }

    /// Creates a running Pod with a free IP (and its namespace), annotated
    /// with `role` if given. The Kubernetes namespace must exist.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        role: Option<&str>,
    ) -> Result<SandboxPod, SandboxError> {
        // The kubelet stand-in must not see the Pod half made, nor take its IP.
        let _paused = self.cluster.pause();
        let ip = self.cluster.next_free_ip();
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("sandbox-{namespace}-{name}-{ip}")},
            "spec": {"nodeName": NODE_NAME, "serviceAccountName": "default",
                     "containers": [{"name": "main", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
        });
        if let Some(role) = role {
            pod["metadata"]["annotations"] = json!({"iam.amazonaws.com/role": role});
        }
        let added = self.cluster.add(namespace, name, ip)?;
        let created = self
            .cluster
            .api
            .apply_pod(pod)
            .and_then(|_| self.cluster.mark_running(namespace, name, ip));
        if let Err(e) = created {
            self.cluster.remove(namespace, name);
            return Err(SandboxError::Pod(format!(
                "creating pod {namespace}/{name}: {e}"
            )));
        }
        Ok(added)
    }

    /// Creates (or replaces) a Kubernetes namespace, permitting roles that
    /// match `permitted` (`None`: no annotation, nothing permitted).
    pub fn add_namespace(&self, name: &str, permitted: Option<&str>) -> Result<(), SandboxError> {
        let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        if let Some(p) = permitted {
            ns["metadata"]["annotations"] = json!({"iam.amazonaws.com/permitted": p});
        }
        self.cluster
            .api
            .create_namespace(ns)
            .map(drop)
            .map_err(|e| SandboxError::Pod(format!("creating namespace {name}: {e}")))
    }

    /// Deletes a Pod from the API server and removes its namespace.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), SandboxError> {
        let _paused = self.cluster.pause();
        let _ = self.cluster.api.delete_pod(namespace, name);
        self.cluster.remove(namespace, name);
        Ok(())
    }

    /// GETs a metadata path (e.g. `/latest/meta-data/iam/security-credentials/`)
    /// as the Pod: with curl inside its namespace through 169.254.169.254,
    /// or in loopback mode from here with `?ip=`. Returns status and body.
    pub fn metadata_get(&self, pod: &SandboxPod, path: &str) -> Result<(u16, String), String> {
        match &pod.netns {
            Some(ns) => {
                let url = format!("{}{path}", netns::METADATA_URL);
                let out = NetNs::named(ns.clone())
                    .exec(&[
                        "curl",
                        "-sS",
                        "--connect-timeout",
                        "3",
                        "--max-time",
                        "10",
                        "-w",
                        "\n%{http_code}",
                        &url,
                    ])
                    .map_err(|e| format!("cannot run curl in {ns}: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "curl {url} in {ns}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
                let code = code
                    .trim()
                    .parse()
                    .map_err(|_| format!("curl said {text:?}"))?;
                Ok((code, body.to_string()))
            }
            None => {
                let sep = if path.contains('?') { '&' } else { '?' };
                let addr: SocketAddr = self
                    .endpoints
                    .agent
                    .trim_start_matches("http://")
                    .parse()
                    .map_err(|e| format!("agent address: {e}"))?;
                let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .map_err(|e| e.to_string())?;
                raw_get(
                    stream,
                    &addr.to_string(),
                    &format!("{path}{sep}ip={}", pod.ip),
                )
            }
        }
    }

    /// The token path as the Pod's SDK takes it: `GET /v1/credentials` with
    /// `token` in `Authorization`, through `169.254.170.23` inside the Pod
    /// (needs [`SandboxOptions::container_credentials`]), or to the agent
    /// from here in loopback mode. Returns status and body.
    pub fn container_credentials_get(
        &self,
        pod: &SandboxPod,
        token: &str,
    ) -> Result<(u16, String), String> {
        let auth = format!("Authorization: {token}");
        let (mut cmd, url) = match &pod.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, "curl"]);
                (cmd, "http://169.254.170.23/v1/credentials".to_string())
            }
            None => (
                Command::new("curl"),
                format!("{}/v1/credentials", self.endpoints.agent),
            ),
        };
        let out = cmd
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "-H",
                &auth,
                &url,
            ])
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "curl {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code
            .trim()
            .parse()
            .map_err(|_| format!("curl said {text:?}"))?;
        Ok((code, body.to_string()))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn sts_kind(&self) -> StsKind {
        self.sts_kind
    }

    pub fn api(&self) -> &FakeApiServer {
        &self.cluster.api
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The node's metadata service (its role must never reach a Pod).
    pub fn node_metadata(&self) -> &ImdsEmulator {
        &self.imds
    }

    /// The node's metadata service at `[fd00:ec2::254]` (with `ipv6`).
    pub fn node_metadata_v6(&self) -> Option<&ImdsEmulator> {
        self.imds_v6.as_ref()
    }

    /// Gives `pod` an IPv6 address too ([`pod_ipv6`] of its IPv4 one), on
    /// its `eth0` with a default route via the node, and reports it to the
    /// API server: `podIPs` lists both addresses, the IPv6 one first when
    /// `primary` (then it is also `podIP`). With `ipv4_too` false the API
    /// server knows only the IPv6 address (a single-stack IPv6 Pod, as far
    /// as kiam can tell; its namespace keeps IPv4 to reach STS).
    /// Needs [`SandboxOptions::ipv6`].
    pub fn add_ipv6(
        &self,
        pod: &SandboxPod,
        primary: bool,
        ipv4_too: bool,
    ) -> Result<Ipv6Addr, SandboxError> {
        if self.imds_v6.is_none() {
            return Err(SandboxError::Pod(
                "add_ipv6 needs SandboxOptions::ipv6 in namespace mode".into(),
            ));
        }
        let _paused = self.cluster.pause();
        let ip6 = pod_ipv6(pod.ip);
        let netns = pod.netns.clone().ok_or(SandboxError::NoNamespaces)?;
        let (node_ns, host_if) = {
            let node = self.cluster.node.lock().unwrap_or_else(|e| e.into_inner());
            let node = node.as_ref().ok_or(SandboxError::NoNamespaces)?;
            let host_if = node
                .pods()
                .iter()
                .find(|p| p.ns == netns)
                .map(|p| p.host_if.clone())
                .ok_or_else(|| SandboxError::Pod(format!("no link for pod {}", pod.name)))?;
            (
                node.node_ns().expect("isolated").name().to_string(),
                host_if,
            )
        };
        let address = format!("{ip6}/128");
        #[rustfmt::skip]
        let steps: [&[&str]; 4] = [
            &["ip", "-n", &netns, "-6", "addr", "add", &address, "dev", "eth0", "nodad"],
            &["ip", "-n", &node_ns, "-6", "addr", "replace", "fe80::1/64", "dev", &host_if, "nodad"],
            &["ip", "-n", &netns, "-6", "route", "replace", "default", "via", GATEWAY_IP6, "dev", "eth0"],
            &["ip", "-n", &node_ns, "-6", "route", "replace", &address, "dev", &host_if],
        ];
        for step in steps {
            run_quiet(step)?;
        }
        let (v4, v6) = (pod.ip.to_string(), ip6.to_string());
        let ips: Vec<&str> = match (primary, ipv4_too) {
            (_, false) => vec![&v6],
            (true, true) => vec![&v6, &v4],
            (false, true) => vec![&v4, &v6],
        };
        let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
        self.cluster
            .api
            .patch_pod(
                &pod.namespace,
                &pod.name,
                json!({"status": {"podIP": ips[0], "podIPs": pod_ips}}),
            )
            .map_err(|e| SandboxError::Pod(format!("pod {}: {e}", pod.name)))?;
        Ok(ip6)
    }

    /// The built-in STS, when it is the one running.
    pub fn builtin_sts(&self) -> Option<&StsEmulator> {
        self.builtin_sts.as_ref()
    }

    /// The node's namespace (namespace mode).
    pub fn node_ns(&self) -> Option<NetNs> {
        let node = self.cluster.node.lock().unwrap_or_else(|e| e.into_inner());
        node.as_ref().and_then(|n| n.node_ns().cloned())
    }

    /// The agent's `--host-interface` (namespace mode).
    pub fn host_interface(&self) -> Option<String> {
        let node = self.cluster.node.lock().unwrap_or_else(|e| e.into_inner());
        node.as_ref().map(Node::interface_wildcard)
    }

    /// Every Pod that has an IP, in creation order.
    pub fn pods(&self) -> Vec<SandboxPod> {
        self.cluster
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<SandboxPod> {
        self.pods()
            .into_iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Why the sandbox is degraded (e.g. no namespaces), for printing.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where a child's output goes: "kiam-server", "kiam-agent" or "moto".
    pub fn log_path(&self, child: &str) -> PathBuf {
        self.procs.log_path(child)
    }

    /// An error naming the child that died, with the end of its log.
    pub fn check(&self) -> Result<(), SandboxError> {
        Ok(self.procs.check()?)
    }

    /// The directory `kiam certs` wrote the CA, server and agent files to.
    pub fn certs(&self) -> &Path {
        &self.certs
    }

    /// The `kiam` binary in use.
    pub fn kiam(&self) -> &Path {
        &self.kiam
    }

    /// Names and pids of the running children.
    pub fn children(&self) -> Vec<(String, u32)> {
        self.procs.running()
    }

    /// Stops a child ("kiam-server", "kiam-agent", "moto") as a crash would
    /// look to the others; [`Sandbox::check`] then reports it.
    pub fn kill_child(&self, name: &str) -> bool {
        self.procs.stop(name)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_kubelet.store(true, Ordering::SeqCst);
        if let Some(kubelet) = self.kubelet.take() {
            let _ = kubelet.join();
        }
        // The agent first (it removes its rule), then the server, then STS.
        self.procs.stop_all();
        let pods =
            std::mem::take(&mut *self.cluster.pods.lock().unwrap_or_else(|e| e.into_inner()));
        drop(pods);
        // Namespaces, links, and (with the node's namespace) every rule.
        drop(
            self.cluster
                .node
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if self.remove_state_dir {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// The parts of a Pod object the sandbox cares about.
struct PodView {
    namespace: String,
    name: String,
    ip: Option<Ipv4Addr>,
    pending_without_ip: bool,
}

impl PodView {
    /// `None` for host-network Pods (they have the node's address).
    fn of(pod: &Value) -> Option<PodView> {
        if pod["spec"]["hostNetwork"].as_bool() == Some(true) {
            return None;
        }
        let ip = pod["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
        let phase = pod["status"]["phase"].as_str().unwrap_or("Pending");
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        Some(PodView {
            namespace: pod["metadata"]["namespace"].as_str()?.to_string(),
            name: pod["metadata"]["name"].as_str()?.to_string(),
            ip,
            pending_without_ip: ip.is_none() && phase == "Pending" && !deleting,
        })
    }
}

impl Cluster {
    fn pause(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a Pod and (namespace mode) gives it a namespace.
    fn add(&self, namespace: &str, name: &str, ip: Ipv4Addr) -> Result<SandboxPod, SandboxError> {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
        {
            return Err(SandboxError::Pod(format!(
                "pod {namespace}/{name} already exists ({})",
                existing.ip
            )));
        }
        if pods.iter().any(|p| p.ip == ip) {
            return Err(SandboxError::Pod(format!(
                "pod {namespace}/{name}: IP {ip} is already taken"
            )));
        }
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        let netns = match node.as_mut() {
            Some(node) => Some(
                node.add_pod(Some(ip), Some(&format!("{namespace}-{name}")))
                    .map_err(|e| SandboxError::Pod(format!("pod {namespace}/{name}: {e}")))?
                    .ns
                    .clone(),
            ),
            None => None,
        };
        let pod = SandboxPod {
            namespace: namespace.into(),
            name: name.into(),
            ip,
            netns,
        };
        pods.push(pod.clone());
        Ok(pod)
    }

    /// What the kubelet reports for a started Pod: on this node, with an IP,
    /// Running, every container ready (so `kubectl get pods` says 1/1).
    fn mark_running(
        &self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<Value, crate::apiserver::ApiError> {
        let pod = self.api.pod(namespace, name).unwrap_or_default();
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let statuses: Vec<Value> = pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                json!({"name": c["name"], "image": c["image"], "ready": true, "started": true,
                       "restartCount": 0, "state": {"running": {"startedAt": now}}})
            })
            .collect();
        self.api.patch_pod(
            namespace,
            name,
            json!({
                "spec": {"nodeName": pod["spec"]["nodeName"].as_str().unwrap_or(NODE_NAME)},
                "status": {
                    "phase": "Running",
                    "hostIP": NODE_IP.to_string(),
                    "podIP": ip.to_string(),
                    "podIPs": [{"ip": ip.to_string()}],
                    "startTime": now,
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                    "containerStatuses": statuses,
                }
            }),
        )
    }

    fn remove(&self, namespace: &str, name: &str) -> Option<SandboxPod> {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let at = pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)?;
        let pod = pods.remove(at);
        if let (Some(ns), Some(node)) = (
            &pod.netns,
            self.node.lock().unwrap_or_else(|e| e.into_inner()).as_mut(),
        ) {
            node.remove_pod(ns);
        }
        Some(pod)
    }

    /// The lowest address from 198.18.1.1 up that no Pod (here or in the
    /// API server) has.
    fn next_free_ip(&self) -> Ipv4Addr {
        let mut taken: Vec<Ipv4Addr> = self
            .api
            .list(Resource::Pods, None)
            .iter()
            .filter_map(|p| p["status"]["podIP"].as_str()?.parse().ok())
            .collect();
        taken.extend(
            self.pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|p| p.ip),
        );
        let mut candidate = u32::from(FIRST_DYNAMIC_IP);
        while taken.contains(&Ipv4Addr::from(candidate)) || candidate.to_be_bytes()[3] == 0 {
            candidate += 1;
        }
        Ipv4Addr::from(candidate)
    }

    /// One kubelet pass: Pods created through the API get an IP, a namespace
    /// and phase Running; deleted Pods lose their namespace.
    fn sync_once(&self) {
        let _paused = self.pause();
        let objects = self.api.list(Resource::Pods, None);
        let views: Vec<PodView> = objects.iter().filter_map(PodView::of).collect();
        for view in &views {
            let known = self
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|p| p.namespace == view.namespace && p.name == view.name);
            if known || !view.pending_without_ip {
                continue;
            }
            let ip = self.next_free_ip();
            match self.add(&view.namespace, &view.name, ip) {
                Ok(pod) => {
                    if self.mark_running(&view.namespace, &view.name, ip).is_err() {
                        // Deleted meanwhile; the next pass removes it.
                        continue;
                    }
                    if self.announce {
                        eprintln!(
                            "kiam-sandbox: pod {}/{} is running with IP {ip}{}",
                            pod.namespace,
                            pod.name,
                            pod.netns
                                .as_ref()
                                .map(|ns| format!(" in network namespace {ns}"))
                                .unwrap_or_default()
                        );
                    }
                }
                Err(e) => eprintln!("kiam-sandbox: {e}"),
            }
        }
        let gone: Vec<SandboxPod> = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| {
                !views
                    .iter()
                    .any(|v| v.namespace == p.namespace && v.name == p.name)
            })
            .cloned()
            .collect();
        for pod in gone {
            self.remove(&pod.namespace, &pod.name);
            if self.announce {
                eprintln!(
                    "kiam-sandbox: pod {}/{} was deleted; its network namespace is gone",
                    pod.namespace, pod.name
                );
            }
        }
    }
}

/// A listener at `node_addr` on the node (namespace mode), or on a free
/// loopback port here, as a tokio listener of `runtime`.
fn listen(
    runtime: &tokio::runtime::Runtime,
    node_ns: Option<&NetNs>,
    node_addr: SocketAddr,
) -> Result<tokio::net::TcpListener, SandboxError> {
    let std_listener = match node_ns {
        Some(ns) => ns.bind_tcp(node_addr)?,
        None => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(io("binding a loopback port"))?;
            l.set_nonblocking(true)
                .map_err(io("binding a loopback port"))?;
            l
        }
    };
    let _entered = runtime.enter();
    tokio::net::TcpListener::from_std(std_listener).map_err(io("listening"))
}

/// Where a forwarded connection goes.
enum Target {
    /// An address in this process's own namespace.
    Here(SocketAddr),
    /// An address inside the node's namespace.
    Node(NetNs, SocketAddr),
}

/// Accepts connections and splices each to `target`.
async fn forward(listener: tokio::net::TcpListener, target: Target) {
    let target = Arc::new(target);
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let outbound = match &*target {
                Target::Here(addr) => tokio::net::TcpStream::connect(addr).await,
                Target::Node(ns, addr) => {
                    let (ns, addr) = (ns.clone(), *addr);
                    // The namespace switch happens on a thread of its own
                    // inside connect_tcp, never on a pooled thread.
                    let connected = tokio::task::spawn_blocking(move || {
                        let s = ns
                            .connect_tcp(addr, Duration::from_secs(5))
                            .map_err(std::io::Error::other)?;
                        s.set_nonblocking(true)?;
                        Ok::<_, std::io::Error>(s)
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    connected.and_then(tokio::net::TcpStream::from_std)
                }
            };
            let (Ok(mut outbound), mut inbound) = (outbound, inbound) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// A blocking HTTP/1.1 GET on an open connection: status and body.
fn raw_get(
    mut stream: std::net::TcpStream,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `kiam certs --out-dir <dir>`.
fn make_certs(kiam: &Path, dir: &Path) -> Result<(), SandboxError> {
    let out = Command::new(kiam)
        .arg("certs")
        .arg("--out-dir")
        .arg(dir)
        .arg("--force")
        .output()
        .map_err(io(format!("running {} certs", kiam.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Certs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn run_quiet(args: &[&str]) -> Result<(), SandboxError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io(args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Io {
            what: args.join(" "),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

/// Removes `kiam-sandbox-<pid>-<n>` state directories of runs that are gone.
fn sweep_state_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kiam-sandbox-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The IPv6 address [`Sandbox::add_ipv6`] gives the Pod with IPv4 `ip`:
/// 198.18.a.b becomes 2001:2::12:a:b (2001:2::/48, the benchmarking range).
pub fn pod_ipv6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, second, third, fourth] = ip.octets();
    Ipv6Addr::new(
        0x2001,
        2,
        0,
        0,
        0,
        u16::from(second),
        u16::from(third),
        u16::from(fourth),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\npong\r\n0\r\n\r\n"), "pong");
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }

    #[test]
    fn host_network_pods_are_not_given_namespaces() {
        let pod = json!({"metadata": {"namespace": "a", "name": "b"},
                         "spec": {"hostNetwork": true}, "status": {"podIP": "198.18.0.9"}});
        assert!(PodView::of(&pod).is_none());
        let pending =
            json!({"metadata": {"namespace": "a", "name": "c"}, "spec": {}, "status": {}});
        let view = PodView::of(&pending).unwrap();
        assert!(view.pending_without_ip && view.ip.is_none());
    }

    #[test]
    fn the_demo_seed_loads() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(FakeApiServer::start()).unwrap();
        let objects = api.load_yaml(DEMO_CLUSTER).unwrap();
        let pods: Vec<PodView> = objects
            .iter()
            .filter_map(|o| (o["kind"] == "Pod").then(|| PodView::of(o)).flatten())
            .collect();
        assert!(pods.len() >= 3);
        for pod in pods {
            let ip = pod.ip.expect("every demo Pod has an IP");
            assert_ne!(ip, NODE_IP);
            let octets = ip.octets();
            assert!(
                octets[0] == 198 && (octets[1] & 0xfe) == 18,
                "{ip} in 198.18.0.0/15"
            );
        }
    }
}
