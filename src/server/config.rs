//! Validated `kiam server` configuration: every check that needs no file or
//! network happens here, so bad flags exit 64 before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::ServerArgs;
use crate::Fatal;

/// STS rejects sessions shorter than this.
const MIN_SESSION_DURATION: Duration = Duration::from_secs(15 * 60);
/// botocore starts refreshing at 15 minutes left and treats 10 as mandatory;
/// credentials served with less than this cause refetch storms.
const SDK_COMFORT: Duration = Duration::from_secs(20 * 60);

/// Where role names are resolved against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseArn {
    /// `--role-base-arn`.
    Fixed(String),
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
    pub strict_namespace_regexp: bool,
    pub default_permitted_regexp: Option<String>,
    pub session: String,
    pub session_duration: Duration,
    pub session_refresh: Duration,
    pub session_tags: bool,
    pub assume_role_arn: Option<String>,
    pub region: Option<String>,
    pub fetchers: usize,
    pub prefetch_buffer_size: usize,
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub max_connection_idle: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
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

impl ServerConfig {
    /// Checks the flags that do not need any file or network.
    pub fn from_args(args: &ServerArgs) -> Result<Self, Fatal> {
        let base_arn = match (non_empty(&args.role_base_arn), args.role_base_arn_autodetect) {
            (Some(_), true) => {
                return Err(Fatal::Usage(
                    "--role-base-arn and --role-base-arn-autodetect are mutually exclusive; set one".into(),
                ))
            }
            (Some(arn), false) => {
                if !arn.starts_with("arn:") {
                    return Err(Fatal::Usage(format!(
                        "--role-base-arn {arn:?} is not an ARN; expected e.g. arn:aws:iam::123456789012:role/"
                    )));
                }
                BaseArn::Fixed(arn)
            }
            (None, true) => BaseArn::Autodetect,
            (None, false) => {
                return Err(Fatal::Usage(
                    "--role-base-arn or --role-base-arn-autodetect must be set (e.g. --role-base-arn=arn:aws:iam::123456789012:role/)".into(),
                ))
            }
        };
        if args.session_duration < MIN_SESSION_DURATION {
            return Err(Fatal::Usage(format!(
                "--session-duration {} is below STS's minimum of 15m",
                humantime::format_duration(args.session_duration)
            )));
        }
        let session_refresh = args
            .session_refresh
            .unwrap_or_else(|| default_refresh(args.session_duration));
        if session_refresh >= args.session_duration {
            return Err(Fatal::Usage(format!(
                "--session-refresh {} must be shorter than --session-duration {}",
                humantime::format_duration(session_refresh),
                humantime::format_duration(args.session_duration)
            )));
        }
        if session_refresh.is_zero() {
            return Err(Fatal::Usage(
                "--session-refresh must be greater than 0s".into(),
            ));
        }
        if args.session.trim().is_empty() {
            return Err(Fatal::Usage("--session must not be empty".into()));
        }
        if let Some(re) = non_empty(&args.default_permitted_regexp) {
            if let Err(e) = regex::Regex::new(&re) {
                return Err(Fatal::Usage(format!(
                    "--default-permitted-regexp {re:?} is not a valid regex: {e}"
                )));
            }
        }
        if let Some(arn) = non_empty(&args.assume_role_arn) {
            if !arn.starts_with("arn:") {
                return Err(Fatal::Usage(format!(
                    "--assume-role-arn {arn:?} is not a role ARN"
                )));
            }
        }
        if !args.kubeconfig.is_empty() && !std::path::Path::new(&args.kubeconfig).is_file() {
            return Err(Fatal::Usage(format!(
                "--kubeconfig {}: no such file",
                args.kubeconfig
            )));
        }
        Ok(ServerConfig {
            bind: crate::telemetry::normalise_listen_addr(&args.bind),
            kubeconfig: non_empty(&args.kubeconfig).map(PathBuf::from),
            sync: args.sync,
            base_arn,
            strict_namespace_regexp: !args.disable_strict_namespace_regexp,
            default_permitted_regexp: non_empty(&args.default_permitted_regexp),
            session: args.session.trim().to_string(),
            session_duration: args.session_duration,
            session_refresh,
            session_tags: args.session_tags,
            assume_role_arn: non_empty(&args.assume_role_arn),
            region: non_empty(&args.region),
            fetchers: args.fetchers as usize,
            prefetch_buffer_size: args.prefetch_buffer_size as usize,
            keepalive_time: args.grpc_keepalive_time_duration,
            keepalive_timeout: args.grpc_keepalive_timeout_duration,
            max_connection_idle: args.grpc_max_connection_idle_duration,
            max_connection_age: args.grpc_max_connection_age_duration,
            max_connection_age_grace: args.grpc_max_connection_age_grace_duration,
        })
    }

    /// Why this configuration may hurt SDK clients, if it does.
    pub fn freshness_warning(&self) -> Option<String> {
        (self.session_refresh < SDK_COMFORT).then(|| {
            format!(
                "--session-refresh {} means pods may be served credentials with under 20m left; \
                 botocore refreshes at 15m left and other SDKs similarly, so they will refetch often. \
                 Prefer --session-duration=60m with the default refresh (30m)",
                humantime::format_duration(self.session_refresh)
            )
        })
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<ServerConfig, Fatal> {
        let mut argv = vec!["kiam", "server", "--cert", "c", "--key", "k", "--ca", "a"];
        argv.extend_from_slice(extra);
        let Command::Server(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not server")
        };
        ServerConfig::from_args(&args)
    }

    fn usage(extra: &[&str]) -> String {
        match parse(extra) {
            Err(Fatal::Usage(m)) => m,
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
        assert_eq!(c.fetchers, 8);
        assert_eq!(c.prefetch_buffer_size, 1000);
        assert_eq!(c.session, "kiam");
        assert!(c.strict_namespace_regexp);
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
    }
}
