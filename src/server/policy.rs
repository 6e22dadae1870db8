//! Role resolution, session names and the assume-role policy. Everything
//! here is pure: no I/O, no clocks, so the rules can be tested exhaustively.
//!
//! The surprise: a pod may only assume the role it is annotated with, but
//! "the same role" is decided on *resolved ARNs*, so `foo`, `/foo` and
//! `arn:aws:iam::<base account>:role/foo` are one role, while the namespace
//! regex (`iam.amazonaws.com/permitted`) is matched against the full ARN, not
//! the name written in the annotation.
//!
//! Deliberate differences from Go kiam, all in the direction of refusing more
//! garbage or of matching what the documentation promises:
//! - strict namespace regexes are anchored as `^(?:re)$`; kiam wrote
//!   `^re$`, which anchors only the first and last alternative of `a|b`;
//! - malformed role annotations (whitespace, control characters, an `arn:`
//!   that is not an IAM role ARN) are refused here instead of by STS;
//! - session names are sanitised first and then cut to STS's limit of 64
//!   characters; kiam cut to 63 bytes first (splitting UTF-8) and then
//!   sanitised.

use std::sync::Arc;

use regex::{Regex, RegexBuilder};

use crate::arn::{check_role_path, is_iam_name_byte, IamArn, RoleArn};

use super::pods::PodInfo;
use super::sts::Identity;

/// Pod annotation naming the role (name, `/name`, path or full ARN).
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// Pod annotation overriding `--session` in the STS session name.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// Pod annotation passed to STS as the external id.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// Namespace annotation: a regex over resolved role ARNs.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// STS's limit on `RoleSessionName`.
pub const MAX_SESSION_NAME: usize = 64;
/// Compiled-program budget for namespace regexes. Matching is linear-time
/// whatever the pattern (the `regex` crate has no backtracking), so the only
/// thing a hostile annotation can inflate is compilation; this caps it.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
const REGEX_NEST_LIMIT: u32 = 64;

/// Why a role, base ARN or regex could not be used. Messages name the
/// annotation or flag to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("iam.amazonaws.com/role is empty; set it to a role name, /name or a role ARN")]
    EmptyRole,
    #[error("iam.amazonaws.com/role {role:?} is not a valid role: {reason}")]
    InvalidRole { role: String, reason: &'static str },
    #[error(
        "iam.amazonaws.com/role {role:?} is not an IAM role ARN \
         (expected arn:<partition>:iam::<account>:role/<name>): {reason}"
    )]
    NotRoleArn { role: String, reason: &'static str },
    #[error(
        "--role-base-arn {base:?} is not a role base ARN \
         (expected e.g. arn:aws:iam::123456789012:role/): {reason}"
    )]
    InvalidBase { base: String, reason: &'static str },
    #[error(
        "instance profile ARN {arn:?} from the EC2 metadata service (iam/info) is not \
         arn:<partition>:iam::<account>:instance-profile/<name>; set --role-base-arn instead"
    )]
    InvalidInstanceProfile { arn: String },
    #[error("--default-permitted-regexp {expression:?} is not a valid regex: {error}")]
    InvalidDefaultRegex { expression: String, error: String },
}

/// Turns what a pod wrote in `iam.amazonaws.com/role` into a role ARN.
///
/// Cheap to clone; the server builds one at start-up from `--role-base-arn`
/// or from the instance profile (`--role-base-arn-autodetect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArnResolver {
    /// Always ends with `/`, e.g. `arn:aws:iam::123456789012:role/`.
    base: Arc<str>,
}

impl ArnResolver {
    /// From `--role-base-arn`. A base without its trailing slash
    /// (`...:role`) is accepted; a base with a path (`...:role/team/`) makes
    /// every bare name resolve under that path.
    pub fn new(base: &str) -> Result<Self, PolicyError> {
        let invalid = |reason| PolicyError::InvalidBase {
            base: base.to_string(),
            reason,
        };
        let trimmed = base.trim();
        let arn = IamArn::parse(trimmed).map_err(invalid)?;
        let path = if arn.resource == "role" {
            ""
        } else if let Some(path) = arn.resource.strip_prefix("role/") {
            path
        } else {
            return Err(invalid("the resource is not role/"));
        };
        if !path.is_empty() {
            // The path must be a valid IAM path; check it as if a name followed.
            check_role_path(&format!("{}/x", path.trim_end_matches('/'))).map_err(invalid)?;
        }
        let mut base = trimmed.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Ok(ArnResolver { base: base.into() })
    }

    /// For `--role-base-arn-autodetect`: the base from the instance profile
    /// ARN that IMDS `/latest/meta-data/iam/info` reports.
    pub fn from_instance_profile(instance_profile_arn: &str) -> Result<Self, PolicyError> {
        let base = base_arn_from_instance_profile(instance_profile_arn)?;
        Self::new(&base)
    }

    /// The base every bare name is appended to; ends with `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Resolves a role as written in `iam.amazonaws.com/role` (or as an agent
    /// requested it): `foo` and `/foo` become `<base>foo`, `team/foo` keeps
    /// its path, and a full role ARN (any account or partition) is returned
    /// unchanged.
    pub fn resolve(&self, role: &str) -> Result<String, PolicyError> {
        if role.is_empty() {
            return Err(PolicyError::EmptyRole);
        }
        if role.starts_with("arn:") {
            let not_role = |reason| PolicyError::NotRoleArn {
                role: role.to_string(),
                reason,
            };
            RoleArn::parse(role).map_err(not_role)?;
            return Ok(role.to_string());
        }
        // kiam strips one leading slash: `/foo` and `foo` are the same role.
        let path_and_name = role.strip_prefix('/').unwrap_or(role);
        check_role_path(path_and_name).map_err(|reason| PolicyError::InvalidRole {
            role: role.to_string(),
            reason,
        })?;
        Ok(format!("{}{}", self.base, path_and_name))
    }
}

/// `arn:aws:iam::123:instance-profile/path/name` -> `arn:aws:iam::123:role/`.
///
/// As in kiam, the instance profile's path is dropped: roles are resolved
/// at the account's root, whatever path the node's profile lives under.
pub fn base_arn_from_instance_profile(instance_profile_arn: &str) -> Result<String, PolicyError> {
    let invalid = || PolicyError::InvalidInstanceProfile {
        arn: instance_profile_arn.to_string(),
    };
    let arn = IamArn::parse(instance_profile_arn.trim()).map_err(|_| invalid())?;
    if !arn.resource.starts_with("instance-profile/") {
        return Err(invalid());
    }
    Ok(format!("arn:{}:iam::{}:role/", arn.partition, arn.account))
}

/// The STS session name: `kiam-` followed by the pod's
/// `iam.amazonaws.com/session-name` or else `--session`.
///
/// Every character outside `[\w+=,.@-]` (ASCII `\w`) becomes `-`, one per
/// character (as kiam did), and the result is cut to STS's 64 characters.
/// An empty annotation counts as absent, as in kiam.
pub fn session_name(prefix_flag: &str, annotation: Option<&str>) -> String {
    let chosen = annotation.filter(|a| !a.is_empty()).unwrap_or(prefix_flag);
    let mut name: String = "kiam-"
        .chars()
        .chain(chosen.chars())
        .map(|c| {
            if c.is_ascii() && is_iam_name_byte(c as u8) {
                c
            } else {
                '-'
            }
        })
        .collect();
    // Every character is ASCII now, so a byte cut is a character cut.
    name.truncate(MAX_SESSION_NAME);
    name
}

/// The identity whose credentials `pod` would receive, or `None` when it has
/// no `iam.amazonaws.com/role` annotation. `session_flag` is `--session`.
pub fn identity_for(
    pod: &PodInfo,
    resolver: &ArnResolver,
    session_flag: &str,
) -> Result<Option<Identity>, PolicyError> {
    let Some(role) = pod.role.as_deref() else {
        return Ok(None);
    };
    let role_arn = resolver.resolve(role)?;
    Ok(Some(Identity {
        role_arn: role_arn.into(),
        session_name: session_name(session_flag, pod.session_name.as_deref()).into(),
        external_id: pod.external_id.clone(),
    }))
}

/// How namespace annotations are compiled: `--disable-strict-namespace-regexp`
/// and `--default-permitted-regexp`, checked once at start-up.
#[derive(Debug, Clone)]
pub struct NamespacePolicyConfig {
    strict: bool,
    /// Compiled once and shared by every namespace without an annotation.
    default: Option<PermittedRegex>,
}

impl NamespacePolicyConfig {
    /// `strict` is `!--disable-strict-namespace-regexp`; `default` is
    /// `--default-permitted-regexp` (None or empty: namespaces without the
    /// annotation permit nothing, as in kiam). The default regex is anchored
    /// like an annotation would be.
    pub fn new(strict: bool, default: Option<&str>) -> Result<Self, PolicyError> {
        let default = match default.filter(|d| !d.trim().is_empty()) {
            None => None,
            Some(expression) => Some(PermittedRegex::compile(expression, strict, true).map_err(
                |error| PolicyError::InvalidDefaultRegex {
                    expression: expression.to_string(),
                    error,
                },
            )?),
        };
        Ok(NamespacePolicyConfig { strict, default })
    }

    pub fn strict(&self) -> bool {
        self.strict
    }
}

impl Default for NamespacePolicyConfig {
    /// kiam's defaults: strict, no default regex.
    fn default() -> Self {
        NamespacePolicyConfig {
            strict: true,
            default: None,
        }
    }
}

/// A compiled `iam.amazonaws.com/permitted` (or `--default-permitted-regexp`).
#[derive(Debug, Clone)]
pub struct PermittedRegex {
    /// As written, for explanations.
    expression: Arc<str>,
    regex: Regex,
    strict: bool,
    /// From `--default-permitted-regexp`, not the namespace's annotation.
    from_default: bool,
}

impl PermittedRegex {
    fn compile(expression: &str, strict: bool, from_default: bool) -> Result<Self, String> {
        let pattern = if strict {
            format!("^(?:{expression})$")
        } else {
            expression.to_string()
        };
        let regex = RegexBuilder::new(&pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .nest_limit(REGEX_NEST_LIMIT)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(_) => {
                    "it compiles to more than the allowed size; simplify it".to_string()
                }
                // The syntax error's own text spans several lines with a caret;
                // keep it, but on one line for logs and Events.
                other => other
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            })?;
        Ok(PermittedRegex {
            expression: expression.into(),
            regex,
            strict,
            from_default,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn is_match(&self, role_arn: &str) -> bool {
        self.regex.is_match(role_arn)
    }
}

/// What a namespace permits, compiled once when the namespace is seen.
#[derive(Debug, Clone)]
pub enum NamespacePolicy {
    /// No `iam.amazonaws.com/permitted` and no `--default-permitted-regexp`:
    /// nothing is permitted.
    Missing,
    /// Roles whose ARN matches are permitted.
    Permits(PermittedRegex),
    /// The annotation does not compile: nothing is permitted (the default
    /// regex does not apply, so a typo never silently changes what a
    /// namespace may assume).
    Invalid {
        expression: Arc<str>,
        error: Arc<str>,
    },
}

impl NamespacePolicy {
    /// Compiles a namespace's `iam.amazonaws.com/permitted` annotation. An
    /// empty annotation counts as absent, as in kiam.
    pub fn compile(annotation: Option<&str>, config: &NamespacePolicyConfig) -> Self {
        match annotation.filter(|a| !a.is_empty()) {
            None => match &config.default {
                Some(default) => NamespacePolicy::Permits(default.clone()),
                None => NamespacePolicy::Missing,
            },
            Some(expression) => match PermittedRegex::compile(expression, config.strict, false) {
                Ok(re) => NamespacePolicy::Permits(re),
                Err(error) => NamespacePolicy::Invalid {
                    expression: expression.into(),
                    error: error.into(),
                },
            },
        }
    }

    /// `Ok(())` if `role_arn` is permitted, else why not (without the
    /// namespace's name, which the caller adds).
    pub fn permits(&self, role_arn: &str) -> Result<(), String> {
        match self {
            NamespacePolicy::Missing => Err(format!(
                "has no {PERMITTED_ANNOTATION} annotation, so it permits no roles (wanted {role_arn})"
            )),
            NamespacePolicy::Invalid { expression, error } => Err(format!(
                "has an invalid {PERMITTED_ANNOTATION} regex {expression:?} ({error}), \
                 so it permits no roles (wanted {role_arn})"
            )),
            NamespacePolicy::Permits(re) if re.is_match(role_arn) => Ok(()),
            NamespacePolicy::Permits(re) => {
                let source = if re.from_default {
                    format!("it has no {PERMITTED_ANNOTATION} and --default-permitted-regexp")
                } else {
                    PERMITTED_ANNOTATION.to_string()
                };
                let anchoring = if re.strict {
                    "anchored at both ends"
                } else {
                    "unanchored: --disable-strict-namespace-regexp"
                };
                Err(format!(
                    "does not permit {role_arn}: {source} {:?} ({anchoring}) does not match it",
                    re.expression
                ))
            }
        }
    }
}

/// Which half of the policy refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The requested role is not the pod's `iam.amazonaws.com/role`.
    AnnotatedRole,
    /// The namespace's `iam.amazonaws.com/permitted` does not allow it.
    NamespacePermitted,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Permitted; `role_arn` is what to ask STS for.
    Allowed { role_arn: String },
    /// Refused; `explanation` is for logs and the `KiamRoleForbidden` Event.
    Forbidden { check: Check, explanation: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }

    /// Empty when allowed.
    pub fn explanation(&self) -> &str {
        match self {
            Decision::Allowed { .. } => "",
            Decision::Forbidden { explanation, .. } => explanation,
        }
    }
}

/// May `pod` assume `requested_role`? Only if it resolves to the same ARN as
/// the pod's `iam.amazonaws.com/role` AND the pod's namespace permits that
/// ARN. `namespace` is `None` when the namespace is not (yet) known, which
/// permits nothing. The annotated-role check comes first, as in kiam.
pub fn check(
    pod: &PodInfo,
    requested_role: &str,
    namespace: Option<&NamespacePolicy>,
    resolver: &ArnResolver,
) -> Decision {
    let forbid = |check, explanation| Decision::Forbidden { check, explanation };
    let Some(annotated) = pod.role.as_deref() else {
        return forbid(
            Check::AnnotatedRole,
            format!(
                "requested {requested_role:?} but pod {}/{} has no {ROLE_ANNOTATION} annotation",
                pod.namespace, pod.name
            ),
        );
    };
    let annotated_arn = match resolver.resolve(annotated) {
        Ok(arn) => arn,
        Err(e) => {
            return forbid(
                Check::AnnotatedRole,
                format!("pod {}/{}: {e}", pod.namespace, pod.name),
            )
        }
    };
    let requested_arn = match resolver.resolve(requested_role) {
        Ok(arn) => arn,
        // The same rules apply to what the agent asked for, but the
        // annotation is not at fault: say "requested".
        Err(e) => {
            return forbid(
                Check::AnnotatedRole,
                format!(
                    "requested role {requested_role:?} is invalid ({}); pod is annotated with {annotated:?}",
                    e.to_string().replace(ROLE_ANNOTATION, "role")
                ),
            )
        }
    };
    if requested_arn != annotated_arn {
        return forbid(
            Check::AnnotatedRole,
            format!(
                "requested {requested_role:?} ({requested_arn}) but pod {}/{} is annotated with \
                 {annotated:?} ({annotated_arn})",
                pod.namespace, pod.name
            ),
        );
    }
    let Some(namespace_policy) = namespace else {
        return forbid(
            Check::NamespacePermitted,
            format!(
                "namespace {} is not known to this server yet, so it permits no roles (wanted {requested_arn})",
                pod.namespace
            ),
        );
    };
    match namespace_policy.permits(&requested_arn) {
        Ok(()) => Decision::Allowed {
            role_arn: requested_arn,
        },
        Err(why) => forbid(
            Check::NamespacePermitted,
            format!("namespace {} {why}", pod.namespace),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::pods::PodPhase;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn resolver() -> ArnResolver {
        ArnResolver::new(BASE).unwrap()
    }

    fn pod(role: Option<&str>) -> PodInfo {
        PodInfo {
            namespace: "team-a".into(),
            name: "web-1".into(),
            uid: "uid-1".into(),
            ip: Some("10.0.0.5".parse().unwrap()),
            phase: PodPhase::Running,
            host_network: false,
            deletion: None,
            role: role.map(Into::into),
            session_name: None,
            external_id: None,
            service_account: Some("default".into()),
        }
    }

    fn ns(annotation: Option<&str>, strict: bool) -> NamespacePolicy {
        NamespacePolicy::compile(
            annotation,
            &NamespacePolicyConfig::new(strict, None).unwrap(),
        )
    }

    #[test]
    fn resolves_names_paths_and_full_arns() {
        let r = resolver();
        assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
        assert_eq!(r.resolve("/foo").unwrap(), format!("{BASE}foo"));
        assert_eq!(r.resolve("team/foo").unwrap(), format!("{BASE}team/foo"));
        assert_eq!(r.resolve("/team/foo").unwrap(), format!("{BASE}team/foo"));
        let other_account = "arn:aws:iam::210987654321:role/path-prefix/another-role";
        assert_eq!(r.resolve(other_account).unwrap(), other_account);
        let china = "arn:aws-cn:iam::123456789012:role/foo";
        assert_eq!(r.resolve(china).unwrap(), china);
    }

    #[test]
    fn base_without_trailing_slash_or_with_a_path() {
        let r = ArnResolver::new("arn:aws:iam::123456789012:role").unwrap();
        assert_eq!(r.base(), BASE);
        assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
        let r = ArnResolver::new("arn:aws:iam::123456789012:role/kiam/").unwrap();
        assert_eq!(r.resolve("/foo").unwrap(), format!("{BASE}kiam/foo"));
        let r = ArnResolver::new("arn:aws:iam::123456789012:role/kiam").unwrap();
        assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}kiam/foo"));
    }

    #[test]
    fn bad_bases_name_the_flag() {
        for bad in [
            "",
            "role/",
            "arn:aws:s3:::bucket/",
            "arn:aws:iam::123456789012:user/",
            "arn:aws:iam:eu-west-1:123456789012:role/",
            "arn:aws:iam:::role/",
        ] {
            let e = ArnResolver::new(bad).unwrap_err();
            assert!(e.to_string().contains("--role-base-arn"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn garbage_roles_are_refused_naming_the_annotation() {
        let r = resolver();
        assert_eq!(r.resolve("").unwrap_err(), PolicyError::EmptyRole);
        for bad in [
            "/",
            "foo/",
            " foo",
            "foo bar",
            "foo\n",
            "fo\u{7}o",
            "rôle",
            "a//b",
            "foo:bar",
            "arn:",
            "arn:aws:iam::123456789012:user/foo",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "arn:aws:iam:us-east-1:123456789012:role/foo",
            &"x".repeat(65),
        ] {
            let e = r.resolve(bad).unwrap_err();
            assert!(
                e.to_string().contains(ROLE_ANNOTATION),
                "{bad:?} gave {e} without naming the annotation"
            );
        }
        // The longest legal name is fine.
        assert!(r.resolve(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn base_from_instance_profile() {
        assert_eq!(
            base_arn_from_instance_profile("arn:aws:iam::123456789012:instance-profile/node")
                .unwrap(),
            BASE
        );
        assert_eq!(
            base_arn_from_instance_profile("arn:aws:iam::123456789012:instance-profile/path/node")
                .unwrap(),
            BASE
        );
        assert_eq!(
            base_arn_from_instance_profile("arn:aws-us-gov:iam::123456789012:instance-profile/n")
                .unwrap(),
            "arn:aws-us-gov:iam::123456789012:role/"
        );
        let r = ArnResolver::from_instance_profile("arn:aws:iam::123456789012:instance-profile/n")
            .unwrap();
        assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
        for bad in ["", "arn:aws:iam::123456789012:role/node", "not an arn"] {
            assert!(matches!(
                base_arn_from_instance_profile(bad),
                Err(PolicyError::InvalidInstanceProfile { .. })
            ));
        }
    }

    #[test]
    fn session_names() {
        assert_eq!(session_name("kiam", None), "kiam-kiam");
        assert_eq!(session_name("kiam", Some("")), "kiam-kiam");
        assert_eq!(session_name("kiam", Some("batch-job")), "kiam-batch-job");
        assert_eq!(
            session_name("kiam", Some("a+b=c,d.e@f_g-h")),
            "kiam-a+b=c,d.e@f_g-h"
        );
        // One hyphen per character, including multi-byte ones.
        assert_eq!(session_name("kiam", Some("a b/c:é")), "kiam-a-b-c--");
        assert_eq!(session_name("my session", None), "kiam-my-session");
    }

    #[test]
    fn session_names_are_cut_to_64_characters() {
        let long = session_name("kiam", Some(&"x".repeat(100)));
        assert_eq!(long.len(), MAX_SESSION_NAME);
        assert_eq!(long, format!("kiam-{}", "x".repeat(59)));
        // Sanitising happens first, so multi-byte input cannot split a character.
        let unicode = session_name("kiam", Some(&"é".repeat(100)));
        assert_eq!(unicode, format!("kiam-{}", "-".repeat(59)));
        let exact = session_name("kiam", Some(&"y".repeat(59)));
        assert_eq!(exact.len(), 64);
    }

    #[test]
    fn identity_uses_resolved_arn_session_and_external_id() {
        let mut p = pod(Some("/foo"));
        p.session_name = Some("job 7".into());
        p.external_id = Some("ext".into());
        let id = identity_for(&p, &resolver(), "kiam").unwrap().unwrap();
        assert_eq!(&*id.role_arn, format!("{BASE}foo"));
        assert_eq!(&*id.session_name, "kiam-job-7");
        assert_eq!(id.external_id.as_deref(), Some("ext"));
        assert_eq!(identity_for(&pod(None), &resolver(), "kiam").unwrap(), None);
        assert!(identity_for(&pod(Some("bad role")), &resolver(), "kiam").is_err());
        // `foo` and its full ARN are one identity: they share credentials.
        let full = identity_for(&pod(Some(&format!("{BASE}foo"))), &resolver(), "kiam").unwrap();
        let bare = identity_for(&pod(Some("foo")), &resolver(), "kiam").unwrap();
        assert_eq!(full, bare);
    }

    fn forbidden(d: &Decision) -> (Check, &str) {
        match d {
            Decision::Forbidden { check, explanation } => (*check, explanation),
            Decision::Allowed { role_arn } => panic!("unexpectedly allowed {role_arn}"),
        }
    }

    #[test]
    fn allowed_when_requested_is_annotated_and_namespace_permits() {
        let r = resolver();
        let p = pod(Some("foo"));
        let any = ns(Some(".*"), true);
        for requested in ["foo", "/foo", &format!("{BASE}foo")] {
            let d = check(&p, requested, Some(&any), &r);
            assert_eq!(
                d,
                Decision::Allowed {
                    role_arn: format!("{BASE}foo")
                },
                "{requested}"
            );
            assert!(d.is_allowed());
            assert_eq!(d.explanation(), "");
        }
    }

    #[test]
    fn requested_other_than_annotated_is_forbidden() {
        let r = resolver();
        let any = ns(Some(".*"), true);
        let d = check(&pod(Some("foo")), "bar", Some(&any), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::AnnotatedRole);
        assert!(
            why.contains("requested \"bar\"") && why.contains("annotated with \"foo\""),
            "{why}"
        );
        // Same name, other account: a different role.
        let d = check(
            &pod(Some("foo")),
            "arn:aws:iam::999999999999:role/foo",
            Some(&any),
            &r,
        );
        assert_eq!(forbidden(&d).0, Check::AnnotatedRole);
    }

    #[test]
    fn missing_or_invalid_role_annotation_is_forbidden() {
        let r = resolver();
        let any = ns(Some(".*"), true);
        let d = check(&pod(None), "foo", Some(&any), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::AnnotatedRole);
        assert!(why.contains(ROLE_ANNOTATION), "{why}");
        let d = check(&pod(Some("foo bar")), "foo bar", Some(&any), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::AnnotatedRole);
        assert!(why.contains("whitespace"), "{why}");
        let d = check(&pod(Some("foo")), "", Some(&any), &r);
        assert!(forbidden(&d).1.contains("requested role \"\" is invalid"));
    }

    #[test]
    fn strict_regex_is_anchored_around_alternatives() {
        let r = resolver();
        let p = pod(Some("foo-admin"));
        // Unanchored, `foo` is found inside the ARN.
        assert!(check(&p, "foo-admin", Some(&ns(Some("foo"), false)), &r).is_allowed());
        // Strict, it must match the whole ARN.
        let d = check(&p, "foo-admin", Some(&ns(Some("foo"), true)), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::NamespacePermitted);
        assert!(
            why.contains("anchored") && why.contains(PERMITTED_ANNOTATION),
            "{why}"
        );
        // kiam's `^a|b$` would let `b` match anywhere at the end; ours anchors both.
        let alt = ns(Some("arn:aws:iam::123456789012:role/foo|admin"), true);
        assert!(!check(&p, "foo-admin", Some(&alt), &r).is_allowed());
        let alt = ns(Some(&format!("{BASE}foo|{BASE}foo-admin")), true);
        assert!(check(&p, "foo-admin", Some(&alt), &r).is_allowed());
    }

    #[test]
    fn namespace_without_annotation_permits_nothing_unless_a_default_is_set() {
        let r = resolver();
        let p = pod(Some("foo"));
        for missing in [ns(None, true), ns(Some(""), true)] {
            let d = check(&p, "foo", Some(&missing), &r);
            let (which, why) = forbidden(&d);
            assert_eq!(which, Check::NamespacePermitted);
            assert!(why.contains("no iam.amazonaws.com/permitted"), "{why}");
        }
        let cfg = NamespacePolicyConfig::new(true, Some(".*/foo")).unwrap();
        let default = NamespacePolicy::compile(None, &cfg);
        assert!(check(&p, "foo", Some(&default), &r).is_allowed());
        let d = check(&pod(Some("bar")), "bar", Some(&default), &r);
        assert!(forbidden(&d).1.contains("--default-permitted-regexp"));
        // An annotation replaces the default, it does not add to it.
        let own = NamespacePolicy::compile(Some(".*/bar"), &cfg);
        assert!(!check(&p, "foo", Some(&own), &r).is_allowed());
        // Unknown namespace: nothing.
        let d = check(&p, "foo", None, &r);
        assert_eq!(forbidden(&d).0, Check::NamespacePermitted);
    }

    #[test]
    fn invalid_or_huge_regex_denies_with_an_explanation() {
        let r = resolver();
        let p = pod(Some("foo"));
        let cfg = NamespacePolicyConfig::new(true, Some(".*")).unwrap();
        let bad = NamespacePolicy::compile(Some("(unclosed"), &cfg);
        assert!(matches!(bad, NamespacePolicy::Invalid { .. }));
        let d = check(&p, "foo", Some(&bad), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::NamespacePermitted);
        assert!(
            why.contains("invalid") && why.contains("(unclosed"),
            "{why}"
        );
        assert!(!why.contains('\n'), "{why}");
        let huge = NamespacePolicy::compile(Some("(?:a{1000}){1000}"), &cfg);
        let d = check(&p, "foo", Some(&huge), &r);
        assert!(
            forbidden(&d).1.contains("allowed size"),
            "{}",
            d.explanation()
        );
        let deep = format!("{}a{}", "(".repeat(500), ")".repeat(500));
        assert!(!check(
            &p,
            "foo",
            Some(&NamespacePolicy::compile(Some(&deep), &cfg)),
            &r
        )
        .is_allowed());
    }

    #[test]
    fn invalid_default_regex_names_the_flag() {
        let e = NamespacePolicyConfig::new(true, Some("(")).unwrap_err();
        assert!(e.to_string().contains("--default-permitted-regexp"), "{e}");
        assert!(NamespacePolicyConfig::new(true, Some("  "))
            .unwrap()
            .default
            .is_none());
    }
}
