//! A small built-in STS for when moto is not installed: `AssumeRole` and
//! `GetCallerIdentity` over the AWS query protocol (form-encoded requests,
//! XML answers), which every AWS SDK speaks to STS.
//!
//! The one surprise: it never checks signatures. It reads only the access
//! key id out of the `Authorization` header (or a presigned URL), which is
//! enough for `GetCallerIdentity` to answer with the assumed-role ARN
//! (`arn:aws:sts::<account>:assumed-role/<role>/<session>`) of the
//! credentials a Pod received — the property the end-to-end tests check.
//! Keys it never issued are answered as the caller the sandbox itself signs
//! with (`arn:aws:iam::123456789012:user/kiam-sandbox`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use tokio::net::TcpListener;

/// The account of callers whose keys the emulator did not issue.
pub const DEFAULT_ACCOUNT: &str = "123456789012";
const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
const DEFAULT_DURATION_SECONDS: i64 = 3600;

/// One identity the emulator knows an access key by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    pub arn: String,
    pub user_id: String,
    pub account: String,
}

/// One `AssumeRole` call as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRoleCall {
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
    pub duration_seconds: i64,
}

#[derive(Default)]
struct Inner {
    // std Mutex: lookups and inserts only, never across an `.await`.
    keys: Mutex<HashMap<String, CallerIdentity>>,
    calls: Mutex<Vec<AssumeRoleCall>>,
}

/// A running emulator; it serves until the runtime it was started on ends.
#[derive(Clone)]
pub struct StsEmulator {
    addr: std::net::SocketAddr,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StsEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl StsEmulator {
    /// Serves on a listener the caller bound. Must be called inside a tokio runtime.
    pub fn serve(listener: TcpListener) -> std::io::Result<StsEmulator> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(handle).with_state(inner.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "built-in STS stopped");
            }
        });
        Ok(StsEmulator { addr, inner })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Every `AssumeRole` call so far, oldest first.
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whom an access key it issued belongs to.
    pub fn identity(&self, access_key_id: &str) -> Option<CallerIdentity> {
        self.inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key_id)
            .cloned()
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The query protocol puts parameters in a form body; GETs and presigned
    // URLs put them in the query string.
    let mut params: HashMap<String, String> = HashMap::new();
    for source in [query.as_deref().unwrap_or("").as_bytes(), &body[..]] {
        for (k, v) in form_urlencoded::parse(source) {
            params
                .entry(k.into_owned())
                .or_insert_with(|| v.into_owned());
        }
    }
    let access_key = access_key_id(&headers, &params);
    match params.get("Action").map(String::as_str) {
        Some("AssumeRole") => assume_role(&inner, &params),
        Some("GetCallerIdentity") => get_caller_identity(&inner, access_key.as_deref()),
        Some(other) => error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            &format!("the built-in STS only knows AssumeRole and GetCallerIdentity, not {other}"),
        ),
        None => error(
            StatusCode::BAD_REQUEST,
            "MissingAction",
            "no Action parameter",
        ),
    }
}

/// The access key id of a SigV4-signed request, from the header or a
/// presigned URL's `X-Amz-Credential`.
fn access_key_id(headers: &HeaderMap, params: &HashMap<String, String>) -> Option<String> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| auth.split("Credential=").nth(1))
        .map(str::to_string);
    from_header
        .or_else(|| params.get("X-Amz-Credential").cloned())
        .and_then(|cred| cred.split('/').next().map(str::to_string))
        .filter(|key| !key.is_empty())
}

fn assume_role(inner: &Inner, params: &HashMap<String, String>) -> Response {
    let Some(role_arn) = params.get("RoleArn") else {
        return validation("RoleArn is required");
    };
    let Some((account, role_name)) = parse_role_arn(role_arn) else {
        return validation(&format!(
            "RoleArn {role_arn:?} is not an IAM role ARN (arn:aws:iam::<12 digits>:role/<name>)"
        ));
    };
    let Some(session) = params.get("RoleSessionName") else {
        return validation("RoleSessionName is required");
    };
    if !(2..=64).contains(&session.len())
        || !session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    {
        return validation(&format!(
            "RoleSessionName {session:?} must be 2 to 64 characters of [\\w+=,.@-]"
        ));
    }
    let duration = match params.get("DurationSeconds").map(|d| d.parse::<i64>()) {
        None => DEFAULT_DURATION_SECONDS,
        Some(Ok(d)) if (900..=43200).contains(&d) => d,
        Some(_) => return validation("DurationSeconds must be between 900 and 43200"),
    };

    let access_key_id = format!("ASIA{}", upper_alphanumeric(16));
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 40);
    let token = format!(
        "FwoGZXIvYXdzE{}",
        Alphanumeric.sample_string(&mut rand::rng(), 300)
    );
    let expiration = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(duration))
        .unwrap_or(jiff::Timestamp::MAX)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let role_id = format!("AROA{}", upper_alphanumeric(17));
    let arn = format!("arn:aws:sts::{account}:assumed-role/{role_name}/{session}");
    let user_id = format!("{role_id}:{session}");
    inner.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(
        access_key_id.clone(),
        CallerIdentity {
            arn: arn.clone(),
            user_id: user_id.clone(),
            account: account.to_string(),
        },
    );
    inner
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(AssumeRoleCall {
            role_arn: role_arn.clone(),
            session_name: session.clone(),
            external_id: params.get("ExternalId").cloned(),
            duration_seconds: duration,
        });
    xml(format!(
        "<AssumeRoleResponse xmlns=\"{XMLNS}\">\
         <AssumeRoleResult>\
         <Credentials>\
         <AccessKeyId>{access_key_id}</AccessKeyId>\
         <SecretAccessKey>{secret}</SecretAccessKey>\
         <SessionToken>{token}</SessionToken>\
         <Expiration>{expiration}</Expiration>\
         </Credentials>\
         <AssumedRoleUser><AssumedRoleId>{}</AssumedRoleId><Arn>{}</Arn></AssumedRoleUser>\
         <PackedPolicySize>0</PackedPolicySize>\
         </AssumeRoleResult>\
         <ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata>\
         </AssumeRoleResponse>",
        escape(&user_id),
        escape(&arn),
        request_id()
    ))
}

fn get_caller_identity(inner: &Inner, access_key: Option<&str>) -> Response {
    let known = access_key.and_then(|key| {
        inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    });
    let identity = known.unwrap_or_else(|| CallerIdentity {
        arn: format!("arn:aws:iam::{DEFAULT_ACCOUNT}:user/kiam-sandbox"),
        user_id: "AIDASANDBOXUSER00001".into(),
        account: DEFAULT_ACCOUNT.into(),
    });
    xml(format!(
        "<GetCallerIdentityResponse xmlns=\"{XMLNS}\">\
         <GetCallerIdentityResult>\
         <Arn>{}</Arn><UserId>{}</UserId><Account>{}</Account>\
         </GetCallerIdentityResult>\
         <ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata>\
         </GetCallerIdentityResponse>",
        escape(&identity.arn),
        escape(&identity.user_id),
        escape(&identity.account),
        request_id()
    ))
}

/// `arn:aws:iam::<account>:role/<path/>name` -> (account, name).
fn parse_role_arn(arn: &str) -> Option<(&str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let path_and_name = resource.strip_prefix("role/")?;
    let name = path_and_name.rsplit('/').next()?;
    let valid_account = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    (valid_account && !name.is_empty()).then_some((account, name))
}

fn validation(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "ValidationError", message)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"{XMLNS}\">\
         <Error><Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error>\
         <RequestId>{}</RequestId>\
         </ErrorResponse>",
        escape(code),
        escape(message),
        request_id()
    );
    (status, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

fn xml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn upper_alphanumeric(n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

fn request_id() -> String {
    let mut rng = rand::rng();
    let hex = |n: usize, rng: &mut rand::rngs::ThreadRng| -> String {
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
            .collect()
    };
    format!(
        "{}-{}-{}-{}-{}",
        hex(8, &mut rng),
        hex(4, &mut rng),
        hex(4, &mut rng),
        hex(4, &mut rng),
        hex(12, &mut rng)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_with_paths_and_partitions_parse() {
        assert_eq!(
            parse_role_arn("arn:aws:iam::123456789012:role/reader"),
            Some(("123456789012", "reader"))
        );
        assert_eq!(
            parse_role_arn("arn:aws-cn:iam::210987654321:role/team/a/writer"),
            Some(("210987654321", "writer"))
        );
        assert_eq!(
            parse_role_arn("arn:aws:iam::12345:role/short-account"),
            None
        );
        assert_eq!(parse_role_arn("arn:aws:iam::123456789012:user/bob"), None);
        assert_eq!(parse_role_arn("reader"), None);
    }

    #[test]
    fn the_access_key_comes_from_the_signature_or_a_presigned_url() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20260101/us-east-1/sts/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abc"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            access_key_id(&headers, &HashMap::new()).as_deref(),
            Some("ASIAEXAMPLE")
        );
        let params = HashMap::from([(
            "X-Amz-Credential".to_string(),
            "AKIAPRESIGNED/20260101/us-east-1/sts/aws4_request".to_string(),
        )]);
        assert_eq!(
            access_key_id(&HeaderMap::new(), &params).as_deref(),
            Some("AKIAPRESIGNED")
        );
        assert_eq!(access_key_id(&HeaderMap::new(), &HashMap::new()), None);
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn post(addr: std::net::SocketAddr, auth: &str, form: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST / HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential={auth}/20260101/us-east-1/sts/aws4_request, \
             SignedHeaders=host, Signature=00\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head[9..12].parse().unwrap(), body.to_string())
    }

    fn between<'a>(text: &'a str, tag: &str) -> &'a str {
        let open = format!("<{tag}>");
        let start = text.find(&open).map(|i| i + open.len()).unwrap_or(0);
        let end = text[start..].find(&format!("</{tag}>")).unwrap_or(0);
        &text[start..start + end]
    }

    #[tokio::test]
    async fn assumed_role_keys_identify_as_the_assumed_role() {
        let sts = StsEmulator::serve(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
        let addr = sts.addr();
        let form = "Action=AssumeRole&Version=2011-06-15\
                    &RoleArn=arn%3Aaws%3Aiam%3A%3A210987654321%3Arole%2Fteam%2Freader\
                    &RoleSessionName=kiam-web&ExternalId=ext&DurationSeconds=900";
        let (status, body) = post(addr, "AKIASERVER", form).await;
        assert_eq!(status, 200, "{body}");
        let key = between(&body, "AccessKeyId");
        assert!(key.starts_with("ASIA") && key.len() == 20, "{key}");
        assert_eq!(
            between(&body, "Arn"),
            "arn:aws:sts::210987654321:assumed-role/reader/kiam-web"
        );
        let call = &sts.assume_role_calls()[0];
        assert_eq!(call.external_id.as_deref(), Some("ext"));
        assert_eq!(call.duration_seconds, 900);

        let (_, me) = post(addr, key, "Action=GetCallerIdentity&Version=2011-06-15").await;
        assert_eq!(
            between(&me, "Arn"),
            "arn:aws:sts::210987654321:assumed-role/reader/kiam-web"
        );
        assert_eq!(between(&me, "Account"), "210987654321");
        let (_, stranger) = post(addr, "AKIAOTHER", "Action=GetCallerIdentity").await;
        assert_eq!(
            between(&stranger, "Arn"),
            format!("arn:aws:iam::{DEFAULT_ACCOUNT}:user/kiam-sandbox")
        );

        let (status, error) = post(
            addr,
            "AKIASERVER",
            "Action=AssumeRole&RoleArn=nope&RoleSessionName=ok",
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(between(&error, "Code"), "ValidationError");
        let (status, _) = post(addr, "AKIASERVER", "Action=DeleteEverything").await;
        assert_eq!(status, 400);
    }
}
