//! `--iptables`: the DNAT rule that sends Pods' metadata requests to the agent.
//!
//! Unlike Go kiam, which appended the rule and then only checked that it
//! existed somewhere, this module keeps it the *first* rule of `nat
//! PREROUTING`. The nat table only decides the first packet of a connection,
//! and the first rule that accepts, returns or NATs it wins: an earlier rule
//! from a CNI plugin, Docker, an operator or a leftover kube2iam (a DNAT of
//! the same address to another port) would otherwise let a Pod reach the
//! node's real metadata service and its role, or another agent. So every
//! check reads the chain, and when something has been put above the rule it
//! moves the rule back to the top in one atomic `iptables-restore` (delete
//! kiam's copies, insert at 1): other programs' rules are never deleted, and
//! there is no moment without the rule. kube-proxy and most CNI plugins only
//! ensure their own jump rules exist, so a rule above them is left alone; a
//! program that also insists on being first (Calico's Felix in its default
//! `ChainInsertMode=Insert`) would trade places with kiam at every check,
//! which `kiam_agent_iptables_displaced_total` shows.
//!
//! The rule carries `-m comment --comment kiam-agent`, and only a rule with
//! that comment (and the same match and target) is kiam's. Without it a
//! kube2iam or Go kiam rule with the same match and target would be taken as
//! ours: `iptables -C` accepts an identical rule anywhere in the chain, so the
//! agent would keep "its" rule wherever the other one stood, and an operator
//! deleting the other program's rule would delete the only copy, letting Pods
//! reach the node's metadata service until the next check. Rules without the
//! comment are other programs' (a Go kiam or kube2iam leftover stays below
//! kiam's, where it never decides a packet) and are never moved or deleted.
//!
//! IPv6: where the node has an IPv6 address for the agent (`--host-ipv6`),
//! the same rule for `[fd00:ec2::254]:80`, EC2's IPv6 metadata endpoint, is
//! kept first in ip6tables' `nat PREROUTING` by the same code ([`Family`]
//! picks the binary and addresses). A node without IPv6 (no `ip6tables`, no
//! ip6 nat table) says so in one log line and the agent serves IPv4 only.
//!
//! Container credentials (`--iptables-container-credentials`): the same
//! rule for `169.254.170.23:80` (`[fd00:ec2::23]:80`), and one in `nat
//! OUTPUT` without an interface, for host-network Pods, kept first in that
//! chain by the same code.
//!
//! Everything runs the `iptables` and `conntrack` binaries (no shell) with
//! `-w` so that kube-proxy and CNI plugins holding the xtables lock are waited
//! for instead of clobbered. `iptables-restore` is run as the same binary as
//! `iptables` (the xtables multi-call binary, chosen by `argv[0]`), so the
//! move uses the same backend, nft or legacy, as every other call.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{ExitStatus, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The EC2 instance metadata address Pods talk to.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// EC2's IPv6 metadata endpoint, `fd00:ec2::254` (what the SDKs use with
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`).
pub const METADATA_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The metadata service's port.
pub const METADATA_PORT: u16 = 80;
/// The container credentials address the AWS SDKs accept in
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI` (EKS Pod Identity's), intercepted
/// with `--iptables-container-credentials` (port 80 too).
pub const CONTAINER_CREDENTIALS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// Its IPv6 twin, `fd00:ec2::23`.
pub const CONTAINER_CREDENTIALS_ADDRESS_V6: Ipv6Addr =
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// How often [`maintain`] re-checks that the rule is still there.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Seconds to wait for the xtables lock per call. Bounded rather than
/// forever so that a stuck lock holder turns into a retried error instead of
/// a shutdown that never finishes.
const LOCK_WAIT_SECONDS: &str = "5";
/// Removal attempts at shutdown and the first pause between them (doubled
/// after each failure: 0.2 s, 0.4 s, 0.8 s, 1.6 s).
const REMOVE_ATTEMPTS: u32 = 5;
const REMOVE_FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// What makes a rule kiam's: `-m comment --comment kiam-agent`, so that an
/// otherwise identical DNAT from kube2iam or Go kiam is never taken as ours
/// (and `iptables -D` of theirs never deletes ours). No spaces or quotes:
/// `iptables -S` prints it back as written.
pub const RULE_COMMENT: &str = "kiam-agent";
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_INTERFACE_LEN: usize = 15;

/// A missing `conntrack` binary is reported once per process, not on every
/// restore.
static CONNTRACK_MISSING_REPORTED: AtomicBool = AtomicBool::new(false);
/// A failed `iptables-restore` move is reported once per process at warning
/// level (it fails once in a while when a copy vanishes mid-move; always,
/// where `iptables` has no restore mode).
static RESTORE_FAILURE_REPORTED: AtomicBool = AtomicBool::new(false);

/// Which netfilter family a rule lives in: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The xtables binary (also run as `<binary>-restore`).
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore_program(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The metadata address this family intercepts.
    pub fn metadata_address(self) -> IpAddr {
        match self {
            Family::V4 => METADATA_ADDRESS.into(),
            Family::V6 => METADATA_ADDRESS_V6.into(),
        }
    }

    /// The container credentials address this family intercepts.
    pub fn container_credentials_address(self) -> IpAddr {
        match self {
            Family::V4 => CONTAINER_CREDENTIALS_ADDRESS.into(),
            Family::V6 => CONTAINER_CREDENTIALS_ADDRESS_V6.into(),
        }
    }

    /// The host-route suffix `iptables -S` adds to a single address.
    fn host_suffix(self) -> &'static str {
        match self {
            Family::V4 => "/32",
            Family::V6 => "/128",
        }
    }
}

/// What [`IptablesRule::ensure_first`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The rule was already the first rule of `nat PREROUTING`.
    Kept,
    /// The rule was missing; it was inserted at the top.
    Added,
    /// Another rule was above it; the rule is now first again.
    MovedToTop,
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("--host-interface {value:?} is not a usable interface name: {reason}")]
    InvalidInterface { value: String, reason: &'static str },
    #[error(
        "--host {0} is an IPv6 address, but the metadata address 169.254.169.254 is IPv4: \
         --iptables needs an IPv4 --host (the IPv6 rule's target is --host-ipv6)"
    )]
    Ipv6Host(IpAddr),
    #[error("--host-ipv6 {0} is not an IPv6 address")]
    Ipv4HostForIpv6(IpAddr),
    #[error("--port 0 cannot be the target of the --iptables rule")]
    ZeroPort,
    #[error("--iptables: cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--iptables: `{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// The metrics of [`maintain`], registered under Go kiam's `kiam_agent_` prefix.
#[derive(Debug, Clone, Default)]
pub struct IptablesMetrics {
    /// Counts rules put back after something deleted them; a rising value
    /// means another program (or a person) keeps flushing the nat table.
    pub restored: Counter,
    /// Counts rules moved back to the top of `nat PREROUTING` after another
    /// rule was put above them (which would have taken Pods' metadata
    /// traffic); a value rising at every check means another program insists
    /// on being first too.
    pub displaced: Counter,
}

impl IptablesMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kiam_agent_iptables_restored",
            "iptables DNAT rules restored after being removed by someone else",
            metrics.restored.clone(),
        );
        registry.register(
            "kiam_agent_iptables_displaced",
            "iptables DNAT rules moved back to the top of nat PREROUTING after another rule was put above them",
            metrics.displaced.clone(),
        );
        metrics
    }
}

/// The DNAT rule of `--iptables`, validated at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesRule {
    family: Family,
    /// The address intercepted: the metadata address, or the container
    /// credentials one.
    destination: IpAddr,
    /// `PREROUTING` (from Pods' interfaces) or, for the host's own
    /// processes (host-network Pods), `OUTPUT`.
    chain: &'static str,
    /// The rule's match and target, everything after the chain name.
    spec: Vec<String>,
    target: SocketAddr,
}

impl IptablesRule {
    /// The rule sending 169.254.169.254:80 arriving on `host_interface`
    /// (`!eth0`: on any interface but eth0; `cali+`: any interface starting
    /// with cali) to `host_ip:port`.
    pub fn new(host_ip: IpAddr, port: u16, host_interface: &str) -> Result<Self, IptablesError> {
        if host_ip.is_ipv6() {
            return Err(IptablesError::Ipv6Host(host_ip));
        }
        Self::build(
            Family::V4,
            METADATA_ADDRESS.into(),
            host_ip,
            port,
            host_interface,
        )
    }

    /// The same rule for the container credentials address,
    /// `169.254.170.23:80` (`--iptables-container-credentials`).
    pub fn container_credentials(
        host_ip: IpAddr,
        port: u16,
        host_interface: &str,
    ) -> Result<Self, IptablesError> {
        if host_ip.is_ipv6() {
            return Err(IptablesError::Ipv6Host(host_ip));
        }
        let to = CONTAINER_CREDENTIALS_ADDRESS.into();
        Self::build(Family::V4, to, host_ip, port, host_interface)
    }

    /// The rule in `nat OUTPUT` sending the node's own connections to
    /// `169.254.170.23:80` (host-network Pods') to the agent; `host_ip` picks
    /// the family. The token, not the address, identifies whoever asks, so
    /// serving host processes gives nothing away.
    pub fn container_credentials_local(host_ip: IpAddr, port: u16) -> Result<Self, IptablesError> {
        if port == 0 {
            return Err(IptablesError::ZeroPort);
        }
        let family = if host_ip.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        };
        let destination = family.container_credentials_address();
        let target = SocketAddr::new(host_ip, port);
        let spec = [
            "-p",
            "tcp",
            "-d",
            &destination.to_string(),
            "--dport",
            &METADATA_PORT.to_string(),
            "-m",
            "comment",
            "--comment",
            RULE_COMMENT,
            "-j",
            "DNAT",
            "--to-destination",
            &target.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Ok(Self {
            family,
            destination,
            chain: "OUTPUT",
            spec,
            target,
        })
    }

    /// The ip6tables rule for `[fd00:ec2::23]:80`.
    pub fn container_credentials_v6(
        host_ip: IpAddr,
        port: u16,
        host_interface: &str,
    ) -> Result<Self, IptablesError> {
        if !host_ip.is_ipv6() {
            return Err(IptablesError::Ipv4HostForIpv6(host_ip));
        }
        let to = CONTAINER_CREDENTIALS_ADDRESS_V6.into();
        Self::build(Family::V6, to, host_ip, port, host_interface)
    }

    /// The ip6tables rule sending `[fd00:ec2::254]:80` arriving on
    /// `host_interface` to `[host_ip]:port` (`--host-ipv6`).
    pub fn new_v6(host_ip: IpAddr, port: u16, host_interface: &str) -> Result<Self, IptablesError> {
        if !host_ip.is_ipv6() {
            return Err(IptablesError::Ipv4HostForIpv6(host_ip));
        }
        Self::build(
            Family::V6,
            METADATA_ADDRESS_V6.into(),
            host_ip,
            port,
            host_interface,
        )
    }

    fn build(
        family: Family,
        destination: IpAddr,
        host_ip: IpAddr,
        port: u16,
        host_interface: &str,
    ) -> Result<Self, IptablesError> {
        if port == 0 {
            return Err(IptablesError::ZeroPort);
        }
        let (negated, interface) = parse_interface(host_interface)?;
        let target = SocketAddr::new(host_ip, port);

        let mut spec: Vec<String> = [
            "-p",
            "tcp",
            "-d",
            &destination.to_string(),
            "--dport",
            &METADATA_PORT.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if negated {
            spec.push("!".into());
        }
        spec.extend(["-i".into(), interface.to_string()]);
        spec.extend([
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            RULE_COMMENT.into(),
        ]);
        spec.extend([
            "-j".into(),
            "DNAT".into(),
            "--to-destination".into(),
            target.to_string(),
        ]);
        Ok(Self {
            family,
            destination,
            chain: "PREROUTING",
            spec,
            target,
        })
    }

    /// The address the rule intercepts.
    pub fn destination(&self) -> IpAddr {
        self.destination
    }

    /// Whether this is the `iptables` or the `ip6tables` rule.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The rule's arguments after `-t nat -A PREROUTING`, e.g. for logs or to
    /// delete it by hand.
    pub fn spec(&self) -> &[String] {
        &self.spec
    }

    /// Where matching connections are sent: `--host:--port` (or
    /// `[--host-ipv6]:--port`).
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Whether the rule, with kiam's comment, is in `nat PREROUTING` (at any
    /// position).
    pub async fn exists(&self) -> Result<bool, IptablesError> {
        let args = self.args(&["-C", self.chain]);
        let out = run(self.family.program(), &args).await?;
        match out.status.code() {
            Some(0) => Ok(true),
            // 1 is "no such rule"; real failures (bad arguments, lock
            // timeout, no permission) exit with 2 or more.
            Some(1) => Ok(false),
            _ => Err(failed(self.family.program(), &args, &out)),
        }
    }

    /// Inserts the rule at the top of `nat PREROUTING` unless it is already
    /// there, then flushes conntrack entries to the metadata address so
    /// connections opened before the rule existed cannot keep talking to
    /// the real service. Returns whether the rule was inserted.
    pub async fn add(&self) -> Result<bool, IptablesError> {
        if self.exists().await? {
            return Ok(false);
        }
        self.insert_at_top().await?;
        flush_conntrack(self.family, self.destination).await;
        Ok(true)
    }

    /// Where kiam's rule stands in `nat PREROUTING`: whether it is the
    /// chain's first rule, and how many copies the chain holds.
    pub async fn position(&self) -> Result<Position, IptablesError> {
        let args: Vec<String> = ["-w", LOCK_WAIT_SECONDS, "-t", "nat", "-S", self.chain]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = run(self.family.program(), &args).await?;
        if !out.status.success() {
            return Err(failed(self.family.program(), &args, &out));
        }
        Ok(self.position_in(&String::from_utf8_lossy(&out.stdout)))
    }

    /// [`IptablesRule::position`] from `iptables -S PREROUTING` output.
    fn position_in(&self, listing: &str) -> Position {
        let mine = normalise(&self.spec, self.family);
        let prefix = format!("-A {} ", self.chain);
        let rules: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect();
        let is_mine = |rule: &str| {
            let words: Vec<String> = rule.split_whitespace().map(str::to_string).collect();
            normalise(&words, self.family) == mine
        };
        // Rules that send their traffic to the agent too (kiam's other
        // rules: metadata and container credentials share a chain) may stand
        // above this one without taking anything from it; two rules that
        // each insisted on the very top would trade places at every check.
        let target = self.target.to_string();
        let to_agent = |rule: &str| {
            let mut words = rule.split_whitespace();
            words.any(|w| w == "--to-destination") && words.next() == Some(target.as_str())
        };
        let first = match rules.iter().position(|r| is_mine(r)) {
            Some(i) => rules[..i].iter().all(|r| to_agent(r)),
            None => false,
        };
        Position {
            first,
            copies: rules.iter().filter(|r| is_mine(r)).count(),
        }
    }

    /// Makes the rule the first rule of `nat PREROUTING`: inserts it if it
    /// is missing, and if another rule has been put above it, moves it back
    /// to the top (deleting kiam's lower copies, never anyone else's rule).
    /// Conntrack entries to the metadata address are flushed after any
    /// change, so connections the other rule (or no rule) decided end.
    pub async fn ensure_first(&self) -> Result<Placement, IptablesError> {
        let position = self.position().await?;
        let placement = match position {
            Position { first: true, .. } => return Ok(Placement::Kept),
            Position { copies: 0, .. } => {
                self.insert_at_top().await?;
                Placement::Added
            }
            Position { copies, .. } => {
                self.move_to_top(copies).await?;
                Placement::MovedToTop
            }
        };
        flush_conntrack(self.family, self.destination).await;
        Ok(placement)
    }

    /// `iptables -I PREROUTING 1 <rule>`.
    async fn insert_at_top(&self) -> Result<(), IptablesError> {
        let args = self.args(&["-I", self.chain, "1"]);
        let out = run(self.family.program(), &args).await?;
        if !out.status.success() {
            return Err(failed(self.family.program(), &args, &out));
        }
        Ok(())
    }

    /// Deletes kiam's `copies` copies and inserts the rule at the top in one
    /// `iptables-restore --noflush` transaction: the chain is never without
    /// the rule, and `-D` by rule (not by number) cannot hit another
    /// program's rule. Should the transaction fail (a copy vanished in the
    /// meantime, or the binary has no restore mode), the rule is inserted at
    /// the top on its own; the copies left below it are never reached and go
    /// at shutdown with the rest.
    async fn move_to_top(&self, copies: usize) -> Result<(), IptablesError> {
        let rule = self.spec.join(" ");
        let mut script = String::from("*nat\n");
        for _ in 0..copies {
            script.push_str(&format!("-D {} {rule}\n", self.chain));
        }
        script.push_str(&format!("-I {} 1 {rule}\nCOMMIT\n", self.chain));
        match restore(self.family, &script).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if !RESTORE_FAILURE_REPORTED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "cannot move the iptables rule in one iptables-restore transaction; \
                         inserting it at the top instead and leaving its lower copies until shutdown"
                    );
                } else {
                    tracing::debug!(error = %e, "cannot move the iptables rule in one transaction");
                }
                self.insert_at_top().await
            }
        }
    }

    /// Deletes the rule (every copy, should there be several), retrying
    /// with backoff since kube-proxy or a CNI plugin may hold the lock for a
    /// while. Returns whether anything was deleted; the last error if every
    /// attempt failed.
    pub async fn remove(&self) -> Result<bool, IptablesError> {
        let mut removed = false;
        let mut backoff = REMOVE_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.delete_once().await {
                Ok(true) => removed = true,
                Ok(false) => return Ok(removed),
                Err(e) if attempt < REMOVE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "cannot remove the iptables rule yet, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One `-D` if the rule exists; `Ok(false)` once it is gone.
    async fn delete_once(&self) -> Result<bool, IptablesError> {
        if !self.exists().await? {
            return Ok(false);
        }
        let args = self.args(&["-D", self.chain]);
        let out = run(self.family.program(), &args).await?;
        match out.status.code() {
            Some(0) => Ok(true),
            // Deleted by someone else between the check and the delete.
            Some(1) if !self.exists().await? => Ok(false),
            _ => Err(failed(self.family.program(), &args, &out)),
        }
    }

    /// `-w <secs> -t nat <op...> <spec...>`.
    fn args(&self, op: &[&str]) -> Vec<String> {
        ["-w", LOCK_WAIT_SECONDS, "-t", "nat"]
            .iter()
            .chain(op)
            .map(|s| s.to_string())
            .chain(self.spec.iter().cloned())
            .collect()
    }
}

/// Where kiam's rule stands in `nat PREROUTING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Whether the chain's first rule is kiam's (only rules that also send
    /// to the agent, kiam's other rules, above it).
    pub first: bool,
    /// How many copies of kiam's rule the chain holds.
    pub copies: usize,
}

/// A rule's words in a form that compares equal however iptables prints
/// them: `-S` writes `-d 169.254.169.254/32` (`fd00:ec2::254/128`), adds `-m
/// tcp` for `--dport` and orders the options its own way, so each option
/// (with its `!` and values) becomes one entry and the entries are sorted.
fn normalise(words: &[String], family: Family) -> Vec<String> {
    let mut options: Vec<Vec<&str>> = Vec::new();
    let mut negate_next = false;
    for word in words {
        let word = word.as_str();
        if word == "!" {
            negate_next = true;
            continue;
        }
        if word.starts_with('-') || options.is_empty() {
            options.push(if negate_next {
                vec!["!", word]
            } else {
                vec![word]
            });
            negate_next = false;
        } else {
            options.last_mut().expect("checked above").push(word);
        }
    }
    let mut entries: Vec<String> = options
        .into_iter()
        .filter(|o| o[..] != ["-m", "tcp"])
        .map(|o| {
            let joined = o.join(" ");
            match joined.strip_suffix(family.host_suffix()) {
                Some(host) if joined.starts_with("-d ") || joined.starts_with("! -d ") => {
                    host.to_string()
                }
                _ => joined,
            }
        })
        .collect();
    entries.sort();
    entries
}

/// Runs `script` with `iptables-restore -w <secs> --noflush`, as the same
/// binary `iptables` is: the multi-call binary picks its restore mode from
/// `argv[0]`, which keeps a node's legacy or nft backend consistent (an
/// `iptables-restore` found on PATH might be the other backend).
async fn restore(family: Family, script: &str) -> Result<(), IptablesError> {
    use tokio::io::AsyncWriteExt;
    let args: Vec<String> = ["-w", LOCK_WAIT_SECONDS, "--noflush"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let spawn_error = |source| IptablesError::Spawn {
        program: family.restore_program(),
        source,
    };
    let mut child = Command::new(family.program())
        .arg0(family.restore_program())
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(script.as_bytes()).await;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(spawn_error)?;
    if !out.status.success() || written.is_err() {
        return Err(failed(family.restore_program(), &args, &out));
    }
    Ok(())
}

impl std::fmt::Display for IptablesRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let program = self.family.program();
        write!(f, "{program} -t nat {} {}", self.chain, self.spec.join(" "))
    }
}

/// Splits off a leading `!` and checks the rest is an interface name
/// iptables and the kernel accept. No shell is involved, so this is about
/// giving a clear error at start-up rather than an obscure one from iptables
/// (which only warns about some bad names and then never matches).
fn parse_interface(value: &str) -> Result<(bool, &str), IptablesError> {
    let invalid = |reason| IptablesError::InvalidInterface {
        value: value.to_string(),
        reason,
    };
    let (negated, name) = match value.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    if name.is_empty() {
        return Err(invalid("the name is empty"));
    }
    if name.len() > MAX_INTERFACE_LEN {
        return Err(invalid("longer than 15 characters, the kernel's limit"));
    }
    let (stem, wildcard) = match name.strip_suffix('+') {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@');
    if !stem.chars().all(allowed) {
        return Err(invalid(
            "use letters, digits, '-', '_', '.' or '@', a trailing '+' as wildcard \
             and a leading '!' (no space) to invert",
        ));
    }
    if !wildcard && (stem == "." || stem == "..") {
        return Err(invalid("'.' and '..' are not interface names"));
    }
    Ok((negated, name))
}

/// Drops conntrack entries for TCP to the family's metadata address, port
/// 80. Best effort: the rule itself is what matters, so a missing or failing
/// `conntrack` is only logged.
async fn flush_conntrack(family: Family, destination: IpAddr) {
    let args: Vec<String> = [
        "-D",
        "-f",
        match family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        },
        "-p",
        "tcp",
        "--orig-dst",
        &destination.to_string(),
        "--dport",
        &METADATA_PORT.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match run("conntrack", &args).await {
        // 1 means no entry matched, the usual case.
        Ok(out) if matches!(out.status.code(), Some(0 | 1)) => {}
        Ok(out) => {
            let e = failed("conntrack", &args, &out);
            tracing::warn!(error = %e, "cannot flush conntrack entries to the metadata address");
        }
        Err(IptablesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            if !CONNTRACK_MISSING_REPORTED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "conntrack is not installed: connections Pods opened to the metadata address \
                     before the iptables rule existed keep reaching the real metadata service \
                     until they close"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot flush conntrack entries to the metadata address")
        }
    }
}

async fn run(program: &'static str, args: &[String]) -> Result<Output, IptablesError> {
    Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| IptablesError::Spawn { program, source })
}

fn failed(program: &str, args: &[String], out: &Output) -> IptablesError {
    IptablesError::Failed {
        command: format!("{program} {}", args.join(" ")),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

mod maintain;
pub use maintain::{maintain, maintain_if_available};

#[cfg(test)]
mod tests;
