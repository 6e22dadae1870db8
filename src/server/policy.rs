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

use super::model::{Identity, PodInfo, SessionTags, PERMITTED_ANNOTATION, ROLE_ANNOTATION};
pub use crate::wire::Check;

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

    /// The pattern as matched: `^(?:expression)$` unless
    /// `--disable-strict-namespace-regexp`.
    pub fn anchored(&self) -> &str {
        self.regex.as_str()
    }

    /// From `--default-permitted-regexp`, not the namespace's annotation.
    pub fn from_default(&self) -> bool {
        self.from_default
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

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Permitted: the identity to fetch credentials for, built here and
    /// nowhere else.
    Allowed(Identity),
    /// Refused; `explanation` is for logs and the `KiamRoleForbidden` Event.
    Forbidden { check: Check, explanation: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    /// Empty when allowed.
    pub fn explanation(&self) -> &str {
        match self {
            Decision::Allowed(_) => "",
            Decision::Forbidden { explanation, .. } => explanation,
        }
    }
}

/// The one place the server decides who a pod is and what it may assume:
/// role resolution, session settings and how namespaces are compiled. One
/// value is shared by the pod cache (which identity each pod uses), the
/// prefetcher and the gRPC service.
#[derive(Debug)]
pub struct Policy {
    resolver: ArnResolver,
    /// `--session`: the session-name suffix for pods without
    /// `iam.amazonaws.com/session-name`.
    session: String,
    /// `--session-tags`: tag each pod's credentials with the pod.
    session_tags: bool,
    namespaces: NamespacePolicyConfig,
}

impl Policy {
    pub fn new(
        resolver: ArnResolver,
        session: &str,
        session_tags: bool,
        namespaces: NamespacePolicyConfig,
    ) -> Self {
        Policy {
            resolver,
            session: session.to_string(),
            session_tags,
            namespaces,
        }
    }

    pub fn resolver(&self) -> &ArnResolver {
        &self.resolver
    }

    /// The identity `pod` uses (its annotated role, session name, external
    /// id and, with `--session-tags`, its tags), or `None` without a role
    /// annotation. Says nothing about whether its namespace permits it.
    pub fn identity(&self, pod: &PodInfo) -> Result<Option<Identity>, PolicyError> {
        let Some(role) = pod.role.as_deref() else {
            return Ok(None);
        };
        let role_arn = self.resolver.resolve(role)?;
        Ok(Some(self.build_identity(pod, role_arn)))
    }

    fn build_identity(&self, pod: &PodInfo, role_arn: String) -> Identity {
        Identity {
            role_arn: role_arn.into(),
            session_name: session_name(&self.session, pod.session_name.as_deref()).into(),
            external_id: pod.external_id.clone(),
            tags: self
                .session_tags
                .then(|| Arc::new(SessionTags::for_pod(pod))),
        }
    }

    /// Compiles a namespace's `iam.amazonaws.com/permitted` annotation.
    pub fn namespace(&self, annotation: Option<&str>) -> NamespacePolicy {
        NamespacePolicy::compile(annotation, &self.namespaces)
    }

    /// May `pod` assume `requested_role`? Only if it resolves to the same
    /// ARN as the pod's `iam.amazonaws.com/role` AND the pod's namespace
    /// permits that ARN. `namespace` is `None` when the namespace is not
    /// (yet) known, which permits nothing. The annotated-role check comes
    /// first, as in kiam.
    pub fn decide(
        &self,
        pod: &PodInfo,
        requested_role: &str,
        namespace: Option<&NamespacePolicy>,
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
        let annotated_arn = match self.resolver.resolve(annotated) {
            Ok(arn) => arn,
            Err(e) => {
                return forbid(
                    Check::AnnotatedRole,
                    format!("pod {}/{}: {e}", pod.namespace, pod.name),
                )
            }
        };
        let requested_arn = match self.resolver.resolve(requested_role) {
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
        if let Err(why) = permitted_in(&pod.namespace, namespace, &requested_arn) {
            return forbid(Check::NamespacePermitted, why);
        }
        Decision::Allowed(self.build_identity(pod, requested_arn))
    }
}

/// Does the namespace `name` (its compiled policy, `None` when unknown)
/// permit `role_arn`? The prefetcher asks this of an identity the pod cache
/// already decided; [`Policy::decide`] asks it of a request.
pub fn permitted_in(
    name: &str,
    namespace: Option<&NamespacePolicy>,
    role_arn: &str,
) -> Result<(), String> {
    match namespace {
        None => Err(format!(
            "namespace {name} is not known to this server yet, so it permits no roles (wanted {role_arn})"
        )),
        Some(policy) => policy
            .permits(role_arn)
            .map_err(|why| format!("namespace {name} {why}")),
    }
}

#[cfg(test)]
mod tests;
