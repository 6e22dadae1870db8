//! What agents and servers agree on beyond the messages in `proto/kiam.proto`.
//!
//! The surprise: Go kiam agents tell refusals apart by the status *message*,
//! not its code, so the two strings below are wire format and must stay
//! byte for byte what Go kiam sends. Everything else here travels in
//! response metadata, which Go kiam agents ignore.

use jiff::Timestamp;

/// The status message for an IP with no live pod (Go kiam's `ErrPodNotFound`).
pub const NO_POD_FOUND: &str = "no pod found";
/// What a Go kiam server says instead of [`NO_POD_FOUND`] when GetPodRole
/// finds no pod (its pod cache's error, passed through). Agents read both.
pub const GO_POD_NOT_FOUND: &str = "pod not found";
/// The status message for a policy refusal (Go kiam's `ErrPolicyForbidden`).
pub const FORBIDDEN_BY_POLICY: &str = "forbidden by policy";

/// The start of every GetTokenCredentials refusal of the token itself
/// (status UNAUTHENTICATED); the rest of the message says why, in words fit
/// for the pod. Agents answer such refusals 401.
pub const TOKEN_REFUSED: &str = "token refused";

/// Response metadata key naming which [`Check`] refused a credentials
/// request, so an agent can answer 404 (not the pod's role) or 403 (the
/// pod's role, but its namespace does not permit it) without asking again.
pub const DENIED_CHECK_KEY: &str = "kiam-denied-check";

/// Response metadata key on a successful GetPodRole or GetPodCredentials:
/// for how many milliseconds from when the agent sent the request it may
/// answer the same question (the same pod IP, and role) from memory
/// without asking again. Absent (Go kiam servers, or a pod this server
/// could not just confirm with the API): ask every time. The window ends no
/// later than the server's own trust in its last API confirmation of the
/// pod, so a reused answer is never based on an older look at the API than
/// the server's own answer would be.
pub const REUSE_KEY: &str = "kiam-reuse-ms";

/// Request metadata key on GetPodRole and GetPodCredentials: the agent's
/// node (`--node-name`), so a pod the server's watch has not delivered yet
/// is looked up among that node's pods (`spec.nodeName`, indexed by the API
/// server) before the whole cluster (`status.podIP`, not indexed). Only a
/// hint: an answer is still a live pod the API reports on exactly that IP.
/// Go kiam servers ignore it.
pub const NODE_KEY: &str = "kiam-node";

/// Which half of the policy refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The requested role is not the pod's `iam.amazonaws.com/role`.
    AnnotatedRole,
    /// The namespace's `iam.amazonaws.com/permitted` does not allow it.
    NamespacePermitted,
}

impl Check {
    /// The value sent under [`DENIED_CHECK_KEY`].
    pub fn as_str(self) -> &'static str {
        match self {
            Check::AnnotatedRole => "annotated-role",
            Check::NamespacePermitted => "namespace-permitted",
        }
    }

    /// Reads a [`DENIED_CHECK_KEY`] value; `None` for anything else (a newer
    /// server's check this agent does not know).
    pub fn parse(value: &str) -> Option<Check> {
        match value {
            "annotated-role" => Some(Check::AnnotatedRole),
            "namespace-permitted" => Some(Check::NamespacePermitted),
            _ => None,
        }
    }
}

/// A time as the EC2 metadata API prints it: `2026-11-28T12:00:00Z` (UTC,
/// whole seconds). Servers send credentials' times in this form.
pub fn ec2_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Is `s` exactly in [`ec2_time`]'s form (`YYYY-MM-DDTHH:MM:SSZ`)?
pub fn is_ec2_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_look_like_the_metadata_api() {
        let t: Timestamp = "2026-11-28T12:34:56.789Z".parse().unwrap();
        assert_eq!(ec2_time(t), "2026-11-28T12:34:56Z");
        assert!(is_ec2_time(&ec2_time(t)));
        assert!(!is_ec2_time("2026-11-28T12:34:56.789Z"));
        assert!(!is_ec2_time("2026-11-28 12:34:56Z"));
    }

    #[test]
    fn checks_round_trip_and_unknown_values_are_none() {
        for c in [Check::AnnotatedRole, Check::NamespacePermitted] {
            assert_eq!(Check::parse(c.as_str()), Some(c));
        }
        assert_eq!(Check::parse("something-new"), None);
    }
}
