//! The JSON documents the agent answers with: the credentials document SDKs
//! parse, and `iam/info`.
//!
//! The surprise: `AccountId` and `iam/info` are only ever answered when the
//! role's ARN is known: annotated as a full role ARN, or a name that the
//! server resolved (`Role.arn`, which our servers send and Go kiam servers
//! do not). A Go server's answer for a bare name has no account, and a
//! guessed one (say, the node's) would send account-routed SDK calls to the
//! wrong place, so then `AccountId` is left out and `iam/info` is 404.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use jiff::Timestamp;
use serde::Serialize;

use super::client::{Credentials, PodRole};
use super::fallback::same_role;
use crate::arn::RoleArn;
use crate::wire::{ec2_time, is_ec2_time};

/// The role as a full role ARN, when it was annotated as one.
pub(super) fn full_arn(role: &str) -> Option<RoleArn<'_>> {
    RoleArn::parse(role).ok()
}

/// The ARN of the role a pod has or asked for (`role`, as annotated or as
/// in the request path): the role itself when it is a full ARN, else what
/// the server resolved the pod's role to (`pod`), but only when that is the
/// same role and the ARN names it (a server never makes the agent show an
/// account for a role it did not resolve).
pub(super) fn role_arn<'a>(role: &'a str, pod: Option<&'a PodRole>) -> Option<RoleArn<'a>> {
    if let Some(arn) = full_arn(role) {
        return Some(arn);
    }
    let pod = pod.filter(|p| same_role(&p.name, role))?;
    let arn = full_arn(pod.arn.as_deref()?)?;
    let name = role.trim_start_matches('/');
    let names_it = arn
        .path_and_name
        .strip_suffix(name)
        .is_some_and(|path| path.is_empty() || path.ends_with('/'));
    names_it.then_some(arn)
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDoc<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

/// What `security-credentials/{role}` answers; `extended` adds `AccountId`
/// (`security-credentials-extended/{role}`) when the role's ARN is known
/// (see [`role_arn`]). Rendered once per answer, so that answers reused
/// from memory (the warm path) send the same bytes without rendering again.
pub(super) fn credentials_body(c: &Credentials, arn: Option<RoleArn<'_>>, extended: bool) -> Bytes {
    let doc = CredentialsDoc {
        code: "Success",
        last_updated: ec2_form(&c.last_updated),
        kind: "AWS-HMAC",
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.token,
        expiration: ec2_form(&c.expiration),
        account_id: if extended {
            arn.map(|a| a.account)
        } else {
            None
        },
    };
    Bytes::from(serde_json::to_vec(&doc).expect("plain strings serialise"))
}

/// A JSON answer with an already rendered body.
pub(super) fn json_response(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct InfoDoc {
    code: &'static str,
    last_updated: String,
    instance_profile_arn: String,
    instance_profile_id: String,
}

/// What `iam/info` answers for the pod's role; `None` (so 404) unless its
/// ARN is known (see [`role_arn`]). The profile ARN and id are derived from
/// the role: there is no real instance profile behind a pod, and the
/// node's must never show.
pub(super) fn iam_info(role: &PodRole) -> Option<Response> {
    let arn = role_arn(&role.name, Some(role))?;
    let profile = format!(
        "arn:{}:iam::{}:instance-profile/{}",
        arn.partition, arn.account, arn.path_and_name
    );
    let doc = InfoDoc {
        code: "Success",
        last_updated: ec2_time(Timestamp::now()),
        instance_profile_id: format!("AIPA{}", profile_id(&profile)),
        instance_profile_arn: profile,
    };
    Some(json(&doc))
}

/// A stable, id-shaped stand-in for an instance profile id: 17 base32
/// characters of the profile ARN's digest, so one role always has one id.
fn profile_id(profile: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, profile.as_bytes());
    const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    digest.as_ref()[..17]
        .iter()
        .map(|b| B32[(b & 31) as usize] as char)
        .collect()
}

/// A server's time in the form the EC2 metadata API prints. kiam servers
/// already send that form and it is passed through as is (parsing and
/// formatting on every answer was measurable per request); other forms are
/// re-rendered, and what does not parse is passed on untouched.
fn ec2_form(s: &str) -> String {
    if is_ec2_time(s) {
        return s.to_string();
    }
    match s.parse::<Timestamp>() {
        Ok(t) => ec2_time(t),
        Err(_) => s.to_string(),
    }
}

fn json(doc: &impl Serialize) -> Response {
    let body = serde_json::to_string(doc).expect("plain strings serialise");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_the_metadata_api_form() {
        assert_eq!(ec2_form("2024-01-02T03:04:05Z"), "2024-01-02T03:04:05Z");
        assert_eq!(ec2_form("2024-01-02T03:04:05.678Z"), "2024-01-02T03:04:05Z");
        assert_eq!(
            ec2_form("2024-01-02T04:04:05+01:00"),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(ec2_form("garbage"), "garbage");
    }

    #[test]
    fn only_full_role_arns_name_an_account() {
        let a = full_arn("arn:aws:iam::123456789012:role/path/name").unwrap();
        assert_eq!(
            (a.partition, a.account, a.path_and_name),
            ("aws", "123456789012", "path/name")
        );
        // The shared parser checks the account's characters, not AWS's
        // twelve digits (emulators use shorter ids).
        assert_eq!(
            full_arn("arn:aws:iam::12345:role/x").map(|a| a.account),
            Some("12345")
        );
        assert!(full_arn("name").is_none());
        assert!(full_arn("/path/name").is_none());
        assert!(full_arn("arn:aws:s3:::bucket").is_none());
    }

    #[test]
    fn a_resolved_arn_names_the_account_of_a_bare_name() {
        let pod = |name: &str, arn: Option<&str>| PodRole {
            name: name.into(),
            arn: arn.map(str::to_string),
        };
        fn account<'a>(role: &'a str, p: &'a PodRole) -> Option<&'a str> {
            role_arn(role, Some(p)).map(|a| a.account)
        }
        let resolved = pod("app", Some("arn:aws:iam::123456789012:role/app"));
        assert_eq!(account("app", &resolved), Some("123456789012"));
        // `/app` is the same role; the request path may differ in its slash.
        assert_eq!(account("/app", &resolved), Some("123456789012"));
        let slashed = pod("/app", Some("arn:aws:iam::123456789012:role/app"));
        assert_eq!(account("app", &slashed), Some("123456789012"));
        // A base ARN with a path: the name sits under it.
        let pathed = pod("app", Some("arn:aws:iam::123456789012:role/team/app"));
        assert_eq!(account("app", &pathed), Some("123456789012"));
        let nested = pod("team/app", Some("arn:aws:iam::123456789012:role/team/app"));
        assert_eq!(account("team/app", &nested), Some("123456789012"));
        // A Go kiam server sends no ARN: today's answer (none).
        assert_eq!(account("app", &pod("app", None)), None);
        assert!(role_arn("app", None).is_none());
        // Another role than the one asked about, or an ARN that does not
        // name the role (or is no role ARN): no account.
        assert_eq!(account("other", &resolved), None);
        let wrong = pod("app", Some("arn:aws:iam::123456789012:role/webapp"));
        assert_eq!(account("app", &wrong), None);
        let not_role = pod("app", Some("arn:aws:iam::123456789012:user/app"));
        assert_eq!(account("app", &not_role), None);
        // A full ARN stands for itself, whatever the server said.
        assert_eq!(
            account("arn:aws:iam::210987654321:role/x", &resolved),
            Some("210987654321")
        );
    }

    #[test]
    fn iam_info_for_a_resolved_bare_name() {
        let role = PodRole {
            name: "app".into(),
            arn: Some("arn:aws:iam::123456789012:role/team/app".into()),
        };
        assert!(iam_info(&role).is_some());
        assert!(iam_info(&PodRole::named("app")).is_none());
        assert!(iam_info(&PodRole::named("arn:aws:iam::123456789012:role/app")).is_some());
    }

    #[test]
    fn one_role_has_one_profile_id() {
        let id = profile_id("arn:aws:iam::123456789012:instance-profile/app");
        assert_eq!(id.len(), 17);
        assert_eq!(
            id,
            profile_id("arn:aws:iam::123456789012:instance-profile/app")
        );
        assert_ne!(
            id,
            profile_id("arn:aws:iam::123456789012:instance-profile/other")
        );
    }
}
