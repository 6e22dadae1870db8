//! Validated `kiam server` configuration: every check that needs no file or
//! network happens here, once, into typed values, so bad flags exit 64
//! before anything starts and nothing downstream parses a flag again.

use std::path::PathBuf;
use std::time::Duration;

use crate::arn::RoleArn;
use crate::cli::ServerArgs;

use super::credentials::{CacheConfig, DEFAULT_CALL_TIMEOUT};
use super::error::ServerError;
use super::peers::PeersConfig;
use super::policy::{ArnResolver, NamespacePolicyConfig, Policy};

/// STS rejects sessions shorter than this.
const MIN_SESSION_DURATION: Duration = Duration::from_secs(15 * 60);
/// botocore starts refreshing at 15 minutes left and treats 10 as mandatory;
/// credentials served with less than this cause refetch storms.
const SDK_COMFORT: Duration = Duration::from_secs(20 * 60);

/// Where role names are resolved against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseArn {
    /// `--role-base-arn`, validated.
    Fixed(ArnResolver),
    /// `--role-base-arn-autodetect`: from the instance profile in IMDS `iam/info`.
    Autodetect,
}

/// `kiam server`'s validated configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: String,
    pub kubeconfig: Option<PathBuf>,
    pub sync: Duration,
    pub base_arn: BaseArn,
    /// `--disable-strict-namespace-regexp` and `--default-permitted-regexp`, compiled.
    pub namespaces: NamespacePolicyConfig,
    pub session: String,
    pub session_duration: Duration,
    pub session_refresh: Duration,
    pub session_tags: bool,
    pub assume_role_arn: Option<String>,
    pub region: Option<String>,
    pub fetchers: usize,
    pub prefetch_buffer_size: usize,
    /// `--pod-confirmations-per-second`.
    pub pod_confirmations_per_second: u32,
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    /// `--token-audience`.
    pub token_audience: String,
    /// `--prefetch-peers` with `--advertise-ip`; `None` when unset.
    pub peers: Option<PeersConfig>,
}

/// `--prefetch-peers` and `--advertise-ip`: both or neither.
fn peers_config(args: &ServerArgs) -> Result<Option<PeersConfig>, ServerError> {
    match (
        non_empty(&args.prefetch_peers),
        non_empty(&args.advertise_ip),
    ) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ServerError::PeersHalfSet("--advertise-ip")),
        (None, Some(_)) => Err(ServerError::PeersHalfSet("--prefetch-peers")),
        (Some(peers), Some(ip)) => {
            let targets =
                crate::agent::server_address::parse_server_address(&peers).map_err(|e| {
                    // The parser speaks of --server-address, the agent's flag.
                    let why = e.to_string().replace("--server-address ", "");
                    ServerError::PrefetchPeers(why)
                })?;
            let advertise_ip = ip
                .parse()
                .map_err(|_| ServerError::AdvertiseIp(ip.clone()))?;
            Ok(Some(PeersConfig {
                targets,
                advertise_ip,
            }))
        }
    }
}

/// Default `--session-refresh`: half the duration, at most 30 minutes, so a
/// served credential always has at least that long to live.
pub fn default_refresh(duration: Duration) -> Duration {
    (duration / 2).min(Duration::from_secs(30 * 60))
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl ServerConfig {
    /// Checks the flags that do not need any file or network.
    pub fn from_args(args: &ServerArgs) -> Result<Self, ServerError> {
        let base_arn = match (
            non_empty(&args.role_base_arn),
            args.role_base_arn_autodetect,
        ) {
            (Some(_), true) => return Err(ServerError::TwoBaseArns),
            (Some(arn), false) => BaseArn::Fixed(ArnResolver::new(&arn)?),
            (None, true) => BaseArn::Autodetect,
            (None, false) => return Err(ServerError::NoBaseArn),
        };
        if args.session_duration < MIN_SESSION_DURATION {
            return Err(ServerError::SessionDuration(format(args.session_duration)));
        }
        let session_refresh = args
            .session_refresh
            .unwrap_or_else(|| default_refresh(args.session_duration));
        if session_refresh >= args.session_duration {
            return Err(ServerError::RefreshNotShorter {
                refresh: format(session_refresh),
                duration: format(args.session_duration),
            });
        }
        if session_refresh.is_zero() {
            return Err(ServerError::RefreshZero);
        }
        if args.session.trim().is_empty() {
            return Err(ServerError::EmptySession);
        }
        let token_audience = args.token_audience.trim().to_string();
        if token_audience.is_empty() {
            return Err(ServerError::EmptyTokenAudience);
        }
        let namespaces = NamespacePolicyConfig::new(
            !args.disable_strict_namespace_regexp,
            non_empty(&args.default_permitted_regexp).as_deref(),
        )?;
        let assume_role_arn = non_empty(&args.assume_role_arn);
        if let Some(arn) = &assume_role_arn {
            RoleArn::parse(arn).map_err(|reason| ServerError::AssumeRoleArn {
                arn: arn.clone(),
                reason,
            })?;
        }
        let region = non_empty(&args.region);
        if let Some(region) = &region {
            let ok = region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                return Err(ServerError::Region(region.clone()));
            }
        }
        let peers = peers_config(args)?;
        let kubeconfig = non_empty(&args.kubeconfig).map(PathBuf::from);
        if let Some(path) = &kubeconfig {
            if !path.is_file() {
                return Err(ServerError::Kubeconfig {
                    path: path.display().to_string(),
                    reason: "no such file".into(),
                });
            }
        }
        Ok(ServerConfig {
            bind: crate::telemetry::normalise_listen_addr(&args.bind),
            kubeconfig,
            sync: args.sync,
            base_arn,
            namespaces,
            session: args.session.trim().to_string(),
            session_duration: args.session_duration,
            session_refresh,
            session_tags: args.session_tags,
            assume_role_arn,
            region,
            fetchers: args.fetchers as usize,
            prefetch_buffer_size: args.prefetch_buffer_size as usize,
            pod_confirmations_per_second: args.pod_confirmations_per_second,
            keepalive_time: args.grpc_keepalive_time_duration,
            keepalive_timeout: args.grpc_keepalive_timeout_duration,
            max_connection_age: args.grpc_max_connection_age_duration,
            max_connection_age_grace: args.grpc_max_connection_age_grace_duration,
            token_audience,
            peers,
        })
    }

    /// The one [`Policy`] of a server resolving role names with `resolver`.
    pub fn policy(&self, resolver: ArnResolver) -> Policy {
        Policy::new(
            resolver,
            &self.session,
            self.session_tags,
            self.namespaces.clone(),
        )
    }

    /// What the credential cache needs of these flags.
    pub fn cache(&self) -> CacheConfig {
        CacheConfig {
            session_duration: self.session_duration,
            session_refresh: self.session_refresh,
            fetchers: self.fetchers,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Why this configuration may hurt SDK clients, if it does.
    pub fn freshness_warning(&self) -> Option<String> {
        (self.session_refresh < SDK_COMFORT).then(|| {
            format!(
                "--session-refresh {} means pods may be served credentials with under 20m left; \
                 botocore refreshes at 15m left and other SDKs similarly, so they will refetch often. \
                 Prefer --session-duration=60m with the default refresh (30m)",
                format(self.session_refresh)
            )
        })
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<ServerConfig, ServerError> {
        let mut argv = vec!["kiam", "server", "--cert", "c", "--key", "k", "--ca", "a"];
        argv.extend_from_slice(extra);
        let Command::Server(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not server")
        };
        ServerConfig::from_args(&args)
    }

    fn usage(extra: &[&str]) -> String {
        match parse(extra) {
            Err(e) if e.is_usage() => e.to_string(),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_behaviour_section_6() {
        let c = parse(&["--role-base-arn", "arn:aws:iam::123456789012:role/"]).unwrap();
        assert_eq!(c.session_duration, Duration::from_secs(3600));
        assert_eq!(c.session_refresh, Duration::from_secs(1800));
        assert_eq!(c.bind, "localhost:9610");
        assert_eq!(c.sync, Duration::from_secs(60));
        assert_eq!(c.fetchers, 128);
        assert_eq!(c.prefetch_buffer_size, 1000);
        assert_eq!(c.session, "kiam");
        assert!(c.namespaces.strict());
        assert!(c.freshness_warning().is_none());
    }

    #[test]
    fn kiam_values_still_work_but_warn() {
        let c = parse(&[
            "--role-base-arn-autodetect",
            "--session-duration",
            "15m",
            "--session-refresh",
            "5m",
        ])
        .unwrap();
        assert_eq!(c.base_arn, BaseArn::Autodetect);
        let w = c.freshness_warning().expect("a warning");
        assert!(w.contains("--session-refresh"), "{w}");
    }

    #[test]
    fn refresh_default_is_capped() {
        assert_eq!(
            default_refresh(Duration::from_secs(4 * 3600)),
            Duration::from_secs(1800)
        );
        assert_eq!(
            default_refresh(Duration::from_secs(20 * 60)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn bad_flags_name_the_flag() {
        assert!(usage(&[]).contains("--role-base-arn"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--session-duration",
            "10m"
        ])
        .contains("--session-duration"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--session-duration",
            "20m",
            "--session-refresh",
            "20m"
        ])
        .contains("--session-refresh"));
        assert!(usage(&["--role-base-arn", "not-an-arn"]).contains("--role-base-arn"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--default-permitted-regexp",
            "("
        ])
        .contains("--default-permitted-regexp"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--kubeconfig",
            "/nonexistent/kubeconfig"
        ])
        .contains("--kubeconfig"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--assume-role-arn",
            "not-an-arn"
        ])
        .contains("--assume-role-arn"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--region",
            "eu west"
        ])
        .contains("--region"));
        assert!(usage(&[
            "--role-base-arn",
            "arn:aws:iam::1:role/",
            "--role-base-arn-autodetect"
        ])
        .contains("mutually exclusive"));
    }

    #[test]
    fn prefetch_peers_and_advertise_ip_go_together() {
        const ARN: [&str; 2] = ["--role-base-arn", "arn:aws:iam::1:role/"];
        fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            [&ARN[..], extra].concat()
        }
        assert_eq!(parse(&ARN).unwrap().peers, None);
        let c = parse(&with(&[
            "--prefetch-peers",
            "dns:///kiam-server:443",
            "--advertise-ip",
            "198.18.0.7",
        ]))
        .unwrap();
        let peers = c.peers.unwrap();
        assert_eq!(
            peers.advertise_ip,
            "198.18.0.7".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(peers.targets.len(), 1);
        assert!(usage(&with(&["--prefetch-peers", "kiam-server:443"])).contains("--advertise-ip"));
        assert!(usage(&with(&["--advertise-ip", "198.18.0.7"])).contains("--prefetch-peers"));
        let bad = usage(&with(&[
            "--prefetch-peers",
            "kiam-server",
            "--advertise-ip",
            "198.18.0.7",
        ]));
        assert!(bad.starts_with("--prefetch-peers entry"), "{bad}");
        assert!(usage(&with(&[
            "--prefetch-peers",
            "a:1",
            "--advertise-ip",
            "pod-ip"
        ]))
        .contains("--advertise-ip"));
    }
}
