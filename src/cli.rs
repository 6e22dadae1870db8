//! Command-line flags. Names and defaults follow Go kiam v4 so that a kiam
//! manifest runs unchanged; every flag can also be set from `KIAM_<FLAG>`
//! (e.g. `KIAM_SESSION_DURATION`), and `--host` also reads `HOST_IP`.
//!
//! Booleans accept both `--flag` and `--flag=false`, as kingpin did, so that
//! `--iptables-remove=false` keeps working.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};

/// `--host` reads `KIAM_HOST` like every flag, and also `HOST_IP` (what kiam's
/// manifests set from `status.hostIP`): copy it across before parsing.
/// Call this before any thread is started, and only for `kiam agent`.
pub fn host_ip_fallback() {
    if std::env::var_os("KIAM_HOST").is_none() {
        if let Some(v) = std::env::var_os("HOST_IP") {
            std::env::set_var("KIAM_HOST", v);
        }
    }
}

/// Parses a Go-style duration (`1m`, `15m`, `1h30m`, `500ms`, `0s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 15m, 1h)"))
}

#[derive(Debug, Parser)]
#[command(
    name = "kiam",
    version,
    about = "Per-Pod AWS IAM credentials for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `args` as Go kiam's flag parser (kingpin) would: besides
    /// `--flag` and `--flag=false`, every boolean flag also takes the
    /// `--no-flag` form, which Go kiam manifests use (its Helm chart passes
    /// `--no-iptables-remove`). Those are rewritten to `--flag=false` before
    /// clap sees them; nothing else changes.
    pub fn try_parse_kingpin<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let command = <Cli as clap::CommandFactory>::command();
        let booleans: Vec<String> = args
            .get(1)
            .and_then(|role| role.to_str())
            .and_then(|role| command.find_subcommand(role))
            .map(|sub| {
                sub.get_arguments()
                    .filter(|a| {
                        a.get_value_parser().type_id()
                            == clap::builder::ValueParser::bool().type_id()
                    })
                    .filter_map(|a| a.get_long().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let rewritten = args.into_iter().map(|arg| {
            let negated = arg
                .to_str()
                .and_then(|a| a.strip_prefix("--no-"))
                .filter(|name| booleans.iter().any(|b| b == name))
                .map(|name| format!("--{name}=false"));
            negated.map(Into::into).unwrap_or(arg)
        });
        <Cli as Parser>::try_parse_from(rewritten)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: watch Pods and Namespaces, apply policy, fetch STS credentials.
    Server(Box<ServerArgs>),
    /// Run the agent on each node: answer Pods' metadata API requests.
    Agent(Box<AgentArgs>),
    /// Ask a server for its health (for liveness/readiness probes).
    Health(HealthArgs),
    /// Ask a server why a pod gets, or does not get, its role (exit 1: it does not).
    Explain(ExplainArgs),
    /// Create the CA, server and agent certificates for mutual TLS.
    Certs(CertsArgs),
    /// Run the mutating admission webhook that gives pods with a role the token path.
    Webhook(Box<WebhookArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Output log in JSON.
    #[arg(long, env = "KIAM_JSON_LOG", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub json_log: bool,
    /// Log level: debug, info, warn, error.
    #[arg(long, env = "KIAM_LEVEL", default_value = "info",
          value_parser = ["debug", "info", "warn", "error"])]
    pub level: String,
}

#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Prometheus HTTP listen address, e.g. localhost:9620 (empty: no metrics endpoint).
    #[arg(long, env = "KIAM_PROMETHEUS_LISTEN_ADDR", default_value = "")]
    pub prometheus_listen_addr: String,
    /// How frequently to update Prometheus gauges.
    #[arg(long, env = "KIAM_PROMETHEUS_SYNC_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub prometheus_sync_interval: Duration,
    /// Accepted for compatibility with Go kiam; there is no pprof in this build.
    #[arg(long, env = "KIAM_PPROF_LISTEN_ADDR", default_value = "", hide = true)]
    pub pprof_listen_addr: String,
}

/// Certificate paths. Files are re-read when they change on disk.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Certificate path (PEM; e.g. server.pem, agent.pem or tls.crt).
    #[arg(long, env = "KIAM_CERT")]
    pub cert: PathBuf,
    /// Private key path (PEM; e.g. server-key.pem or tls.key).
    #[arg(long, env = "KIAM_KEY")]
    pub key: PathBuf,
    /// CA certificate path (PEM; e.g. ca.pem or ca.crt).
    #[arg(long, env = "KIAM_CA")]
    pub ca: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub tls: TlsArgs,

    /// gRPC bind address.
    #[arg(long, env = "KIAM_BIND", default_value = "localhost:9610")]
    pub bind: String,
    /// Path to .kube/config (empty for in-cluster).
    #[arg(long, env = "KIAM_KUBECONFIG", default_value = "")]
    pub kubeconfig: String,
    /// Pod and Namespace cache resync interval.
    #[arg(long, env = "KIAM_SYNC", default_value = "1m", value_parser = parse_duration)]
    pub sync: Duration,
    /// Base ARN for roles, e.g. arn:aws:iam::123456789012:role/
    #[arg(long, env = "KIAM_ROLE_BASE_ARN", default_value = "")]
    pub role_base_arn: String,
    /// Detect the base ARN from the EC2 metadata service's instance profile
    /// (from a Pod's own network namespace, the instance needs a metadata
    /// hop limit of 2).
    #[arg(long, env = "KIAM_ROLE_BASE_ARN_AUTODETECT", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub role_base_arn_autodetect: bool,
    /// Match the namespace's iam.amazonaws.com/permitted regex without anchoring it.
    #[arg(long, env = "KIAM_DISABLE_STRICT_NAMESPACE_REGEXP", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub disable_strict_namespace_regexp: bool,
    /// Session name used when creating STS tokens (prefixed with `kiam-`).
    #[arg(long, env = "KIAM_SESSION", default_value = "kiam")]
    pub session: String,
    /// Requested session duration for STS tokens (at least 15m).
    #[arg(long, env = "KIAM_SESSION_DURATION", default_value = "60m", value_parser = parse_duration)]
    pub session_duration: Duration,
    /// How long before expiry credentials are refreshed; no credential with
    /// less life than this is served. Default: half the duration, at most 30m.
    #[arg(long, env = "KIAM_SESSION_REFRESH", value_parser = parse_duration)]
    pub session_refresh: Option<Duration>,
    /// IAM role the server assumes before assuming Pods' roles.
    #[arg(long, env = "KIAM_ASSUME_ROLE_ARN", default_value = "")]
    pub assume_role_arn: String,
    /// AWS region for STS calls, e.g. us-west-2 (its regional endpoint). Empty:
    /// AWS_REGION, else the AWS profile's region, else the EC2 instance
    /// metadata's region, else us-east-1.
    #[arg(long, env = "KIAM_REGION", default_value = "")]
    pub region: String,
    /// The most parallel background credential fetches. The number adapts
    /// below it: it starts at 8, grows while STS answers quickly and halves
    /// when STS throttles.
    #[arg(long, env = "KIAM_FETCHERS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub fetchers: u32,
    /// How many Pod events to buffer between the Pod watcher and the prefetcher.
    #[arg(long, env = "KIAM_PREFETCH_BUFFER_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefetch_buffer_size: u32,
    /// GETs per second this server may spend confirming that a cached pod
    /// still owns the IP a request came from (at most one per pod per
    /// second). When the budget is spent, cached pods are trusted as the
    /// watch shows them; 0 turns confirmation off (see docs/RELIABILITY.md).
    #[arg(long, env = "KIAM_POD_CONFIRMATIONS_PER_SECOND", default_value_t = 100)]
    pub pod_confirmations_per_second: u32,
    /// Permitted-role regex for namespaces without iam.amazonaws.com/permitted
    /// (empty: such namespaces permit nothing, as in kiam).
    #[arg(long, env = "KIAM_DEFAULT_PERMITTED_REGEXP", default_value = "")]
    pub default_permitted_regexp: String,
    /// Tag STS sessions with kiam-namespace, kiam-pod and kiam-service-account.
    #[arg(long, env = "KIAM_SESSION_TAGS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub session_tags: bool,
    /// The audience a projected service-account token must be issued for
    /// to identify a pod on the container credentials path
    /// (docs/TOKEN-IDENTITY.md); the pods' projected volumes request it.
    #[arg(long, env = "KIAM_TOKEN_AUDIENCE", default_value = "kiam")]
    pub token_audience: String,

    /// The kiam servers sharing prefetch by pod IP: the agents'
    /// --server-address (host:port, a list, dns:///; re-resolved every 10s).
    /// With --advertise-ip, each pod is prefetched only by the server that
    /// owns its IP, the one agents ask first. Empty: prefetch every pod.
    #[arg(long, env = "KIAM_PREFETCH_PEERS", default_value = "")]
    pub prefetch_peers: String,
    /// This server's pod IP (from the downward API, status.podIP): with the
    /// port of --bind, how it appears among --prefetch-peers.
    #[arg(long, env = "KIAM_ADVERTISE_IP", default_value = "")]
    pub advertise_ip: String,

    /// gRPC keepalive: HTTP/2 PING interval (0s: no pings).
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIME_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub grpc_keepalive_time_duration: Duration,
    /// gRPC keepalive: how long a PING may go unanswered.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIMEOUT_DURATION", default_value = "2s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout_duration: Duration,
    /// Accepted for compatibility with Go kiam and ignored (the gRPC server
    /// has no idle limit); connections are recycled by
    /// --grpc-max-connection-age-duration instead.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_IDLE_DURATION", default_value = "15m", value_parser = parse_duration)]
    pub grpc_max_connection_idle_duration: Duration,
    /// Close agent connections after this long, so agents rebalance across servers.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_AGE_DURATION", default_value = "15m", value_parser = parse_duration)]
    pub grpc_max_connection_age_duration: Duration,
    /// How long in-flight RPCs may finish on a connection closed for age.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_AGE_GRACE_DURATION", default_value = "15m", value_parser = parse_duration)]
    pub grpc_max_connection_age_grace_duration: Duration,

    /// Parse flags and read files, then exit without binding any port.
    #[arg(long, env = "KIAM_CHECK_CONFIG", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub check_config: bool,
}

/// Client-side gRPC options shared by `agent` and `health`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// gRPC address of the kiam server service (host:port; a DNS name is
    /// re-resolved and balanced over; a comma-separated list is accepted).
    #[arg(long, env = "KIAM_SERVER_ADDRESS", default_value = "localhost:9610")]
    pub server_address: String,
    /// Deprecated in kiam and unused; accepted so old manifests still run.
    #[arg(long, env = "KIAM_SERVER_ADDRESS_REFRESH", default_value = "0s", value_parser = parse_duration)]
    pub server_address_refresh: Duration,
    /// Timeout for one attempt to reach a server.
    #[arg(long, env = "KIAM_GATEWAY_TIMEOUT_CREATION", default_value = "1s", value_parser = parse_duration)]
    pub gateway_timeout_creation: Duration,
    /// gRPC keepalive: HTTP/2 PING interval (0s: no pings).
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIME_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub grpc_keepalive_time_duration: Duration,
    /// gRPC keepalive: how long a PING may go unanswered.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIMEOUT_DURATION", default_value = "2s", value_parser = parse_duration)]
    pub grpc_keepalive_timeout_duration: Duration,
    /// gRPC keepalive: ping even with no RPC in flight.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_PERMIT_WITHOUT_STREAM", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub grpc_keepalive_permit_without_stream: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client: ClientArgs,

    /// HTTP port.
    #[arg(long, env = "KIAM_PORT", default_value_t = 3100)]
    pub port: u16,
    /// Allow the client IP to be given with ?ip=. Development use only.
    #[arg(long, env = "KIAM_ALLOW_IP_QUERY", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub allow_ip_query: bool,
    /// Only paths matching this regular expression are proxied to the metadata endpoint.
    #[arg(long, env = "KIAM_ALLOW_ROUTE_REGEXP", default_value = "^$")]
    pub allow_route_regexp: String,
    /// Add the iptables DNAT rule for 169.254.169.254:80.
    #[arg(long, env = "KIAM_IPTABLES", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub iptables: bool,
    /// With --iptables, also send the container credentials address
    /// 169.254.170.23:80 (and [fd00:ec2::23]:80 with --host-ipv6) to the
    /// agent, from the pods' interfaces and from the node itself (host-network
    /// pods), for pods using the token path (docs/TOKEN-IDENTITY.md). Off by
    /// default: on EKS the Pod Identity Agent answers that address.
    #[arg(long, env = "KIAM_IPTABLES_CONTAINER_CREDENTIALS", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub iptables_container_credentials: bool,
    /// Remove the iptables rule at shutdown.
    #[arg(long, env = "KIAM_IPTABLES_REMOVE", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub iptables_remove: bool,
    /// Host IP address (the agent's address on the node). Also read from
    /// HOST_IP when KIAM_HOST is not set.
    #[arg(long, env = "KIAM_HOST")]
    pub host: String,
    /// The agent's IPv6 address on the node: with --iptables, [fd00:ec2::254]:80
    /// (EC2's IPv6 metadata endpoint) is sent here with ip6tables. A
    /// comma-separated list is accepted and its first IPv6 address used, so
    /// status.hostIPs can be passed as is (empty or no IPv6: not intercepted).
    #[arg(long, env = "KIAM_HOST_IPV6", default_value = "")]
    pub host_ipv6: String,
    /// Network interface of the pods, for the iptables rule: a trailing `+`
    /// matches a prefix (`cali+`), `+` alone every interface, a leading `!`
    /// inverts (`!eth0`); docs/CNI.md has the value for each CNI.
    #[arg(long, env = "KIAM_HOST_INTERFACE", default_value = "docker0")]
    pub host_interface: String,
    /// The node's real metadata service, for proxied paths.
    #[arg(
        long,
        env = "KIAM_METADATA_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    pub metadata_endpoint: String,
    /// Refuse metadata GETs without an IMDSv2 token (401), like EC2's HttpTokens=required.
    #[arg(long, env = "KIAM_REQUIRE_IMDSV2", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub require_imdsv2: bool,
    /// While no server answers, keep serving a pod's last good credentials for
    /// this long (never within 5m of their expiry). 0s turns this off.
    #[arg(long, env = "KIAM_STALE_CREDENTIALS_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub stale_credentials_window: Duration,
    /// Node start-up gate: remove the taint with this key (any effect) from
    /// --node-name once the --iptables rule is in place and a server is
    /// healthy. Register nodes with it (kubelet --register-with-taints) so no
    /// Pod starts before the agent is ready (empty: off).
    #[arg(long, env = "KIAM_NODE_STARTUP_TAINT", default_value = "")]
    pub node_startup_taint: String,
    /// This agent's node (empty: the NODE_NAME environment variable, which the
    /// manifests set from spec.nodeName), for --node-startup-taint, and sent to
    /// servers so a pod their watch has not seen yet is looked up among this
    /// node's pods before the whole cluster.
    #[arg(long, env = "KIAM_NODE_NAME", default_value = "")]
    pub node_name: String,

    /// Parse flags and read files, then exit without binding any port.
    #[arg(long, env = "KIAM_CHECK_CONFIG", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// The webhook's HTTPS certificate (--cert, --key; no client
    /// certificate is asked for) and the CA in the webhook configuration's
    /// caBundle (--ca; a certificate not chaining to it is warned about).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// HTTPS bind address (POST /mutate, GET /healthz).
    #[arg(long, env = "KIAM_BIND", default_value = "0.0.0.0:8443")]
    pub bind: String,
    /// Audience of the injected projected service-account token: the one
    /// the kiam server requires (its --token-audience).
    #[arg(long, env = "KIAM_TOKEN_AUDIENCE", default_value = "kiam")]
    pub token_audience: String,
    /// Lifetime of the injected token (at least 10m); the kubelet renews it
    /// at 80% of that.
    #[arg(long, env = "KIAM_TOKEN_EXPIRATION", default_value = "1h", value_parser = parse_duration)]
    pub token_expiration: Duration,

    /// Parse flags and read files, then exit without binding any port.
    #[arg(long, env = "KIAM_CHECK_CONFIG", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = ArgAction::Set)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Timeout for the health check.
    #[arg(long, env = "KIAM_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// The pod, as namespace/name (or give --ip).
    #[arg(value_name = "POD")]
    pub pod: Option<String>,
    /// The pod's IP address, instead of POD: the pod the metadata path would find.
    #[arg(long, env = "KIAM_IP")]
    pub ip: Option<String>,
    /// text (for people) or json (for scripts).
    #[arg(long, env = "KIAM_OUTPUT", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// Timeout for the explain call.
    #[arg(long, env = "KIAM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The metrics page of the agent on the pod's node (its
    /// --prometheus-listen-addr, e.g. http://NODE:9620/metrics): adds the
    /// checks only that agent can answer (--require-imdsv2, the node
    /// start-up gate).
    #[arg(long, env = "KIAM_AGENT_METRICS")]
    pub agent_metrics: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// Directory the PEM files are written to.
    #[arg(long, env = "KIAM_OUT_DIR", default_value = ".")]
    pub out_dir: PathBuf,
    /// Extra server names (DNS names or IPs) beyond kiam-server, localhost, 127.0.0.1.
    #[arg(long = "host", env = "KIAM_HOST", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Validity of the certificates, in days.
    #[arg(long, env = "KIAM_DAYS", default_value_t = 365)]
    pub days: u32,
    /// Overwrite existing files: a new CA and new certificates. Without it a
    /// complete set naming every --host is kept, and anything else refused.
    #[arg(long, env = "KIAM_FORCE", default_value_t = false)]
    pub force: bool,
    /// Reissue the server and agent certificates from the existing
    /// ca.pem/ca-key.pem, keeping server.pem's names and adding --host's.
    #[arg(long, env = "KIAM_REISSUE", default_value_t = false)]
    pub reissue: bool,
    /// Print the kiam-server-tls and kiam-agent-tls Secrets as YAML.
    #[arg(long, env = "KIAM_PRINT_SECRETS", default_value_t = false)]
    pub print_secrets: bool,
    /// Namespace of the printed Secrets.
    #[arg(long, env = "KIAM_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Drop-in rule: every flag of every role has the env var KIAM_<FLAG>.
    #[test]
    fn every_flag_has_its_kiam_env_var() {
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if long == "help" || long == "version" {
                    continue;
                }
                let want = format!("KIAM_{}", long.to_uppercase().replace('-', "_"));
                let got = arg.get_env().map(|e| e.to_string_lossy().to_string());
                assert_eq!(
                    got.as_deref(),
                    Some(want.as_str()),
                    "{} --{long}",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn kingpin_negations_of_booleans() {
        let cli = Cli::try_parse_kingpin([
            "kiam",
            "agent",
            "--host",
            "10.0.0.1",
            "--cert",
            "a",
            "--key",
            "b",
            "--ca",
            "c",
            "--iptables",
            "--no-iptables-remove",
            "--no-json-log",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not the agent")
        };
        assert!(a.iptables);
        assert!(!a.iptables_remove);
        assert!(!a.log.json_log);
        // Only booleans have a negation; anything else is still refused.
        let e = Cli::try_parse_kingpin(["kiam", "agent", "--no-port"]).unwrap_err();
        assert!(e.to_string().contains("--no-port"), "{e}");
        let e = Cli::try_parse_kingpin(["kiam", "server", "--no-iptables"]).unwrap_err();
        assert!(e.to_string().contains("--no-iptables"), "{e}");
    }

    #[test]
    fn kingpin_style_booleans() {
        let cli = Cli::try_parse_from([
            "kiam",
            "agent",
            "--host",
            "10.0.0.1",
            "--cert",
            "a",
            "--key",
            "b",
            "--ca",
            "c",
            "--iptables",
            "--iptables-remove=false",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert!(a.iptables);
        assert!(!a.iptables_remove);
    }
}
