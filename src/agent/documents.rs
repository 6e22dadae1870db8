//! The JSON documents the agent answers with: the credentials document SDKs
//! parse, and `iam/info`.
//!
//! The surprise: `AccountId` and `iam/info` are only ever answered for a
//! role annotated as a full role ARN. The agent knows a pod's role only as
//! annotated; a bare name has no account, and a guessed one (say, the
//! node's) would send account-routed SDK calls to the wrong place.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header;
use jiff::Timestamp;
use serde::Serialize;

use super::client::Credentials;
use crate::arn::RoleArn;
use crate::wire::{ec2_time, is_ec2_time};

/// The role as a full role ARN, when it was annotated as one: the only
/// case in which the pod's account is known.
pub(super) fn full_arn(role: &str) -> Option<RoleArn<'_>> {
    RoleArn::parse(role).ok()
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
/// (`security-credentials-extended/{role}`).
pub(super) fn credentials(c: &Credentials, role: &str, extended: bool) -> Response {
    json_response(credentials_body(c, role, extended))
}

/// The body of [`credentials`], rendered once so that answers reused from
/// memory (the warm path) send the same bytes without rendering again.
pub(super) fn credentials_body(c: &Credentials, role: &str, extended: bool) -> Bytes {
    let doc = CredentialsDoc {
        code: "Success",
        last_updated: ec2_form(&c.last_updated),
        kind: "AWS-HMAC",
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.token,
        expiration: ec2_form(&c.expiration),
        account_id: if extended {
            full_arn(role).map(|a| a.account)
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

/// What `iam/info` answers for `role`; `None` (so 404) unless the role is a
/// full role ARN. The profile ARN and id are derived from the role: there
/// is no real instance profile behind a pod, and the node's must never show.
pub(super) fn iam_info(role: &str) -> Option<Response> {
    let arn = full_arn(role)?;
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
