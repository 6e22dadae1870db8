//! Bounded fuzzing (proptest) of the agent's path handling, route decision
//! and IMDSv2 tokens. Runs in `cargo test`: `PROPTEST_CASES` cases per
//! property (default 2000; the raw-TCP property runs a quarter of that).
//! Failing inputs are saved in `tests/proptest-regressions/fuzz_agent.txt`
//! and replayed first on every run; inputs that once failed are also kept
//! below as explicit test cases.
//!
//! Properties:
//! - path normalisation never panics, and what it sends upstream re-parses
//!   to the same path;
//! - with everything allow-listed (`--allow-route-regexp .*`) and a
//!   deliberately lenient metadata service behind the agent, no path —
//!   any spelling, encoding, version prefix or method — is proxied if it
//!   normalises under `meta-data/iam/` (or looks like IAM at all), and no
//!   answer ever carries the node's role or credentials;
//! - arbitrary bytes on a real TCP connection never crash the agent;
//! - a token is valid only for the IP it was minted for, tampering breaks
//!   it, and token or TTL parsing never panics on arbitrary bytes.

#[path = "support/fake_kiam.rs"]
mod fake_kiam;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use fake_kiam::{creds, FakeKiam};
use http::{Request, Uri};
use http_body_util::BodyExt;
use kiam::agent::imdsv2::Tokens;
use kiam::agent::metadata::{router, Config, RouterContext};
use kiam::agent::metrics::Metrics;
use kiam::agent::path::NormalPath;
use kiam::agent::proxy::Upstream;
use kiam_sandbox::imds::{looks_like_iam, Behaviour, ImdsEmulator, NodeIdentity};
use prometheus_client::registry::Registry;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const POD: &str = "10.9.0.5";

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/fuzz_agent.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// Pieces paths are built from: the spellings that matter (IAM, versions,
/// encodings, dot segments, separators) and arbitrary text.
fn fragment() -> impl Strategy<Value = String> {
    let fixed: Vec<&'static str> = vec![
        "",
        "/",
        "//",
        "\\",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        "%252e%252e",
        "latest",
        "2009-04-04",
        "LATEST",
        "meta-data",
        "Meta-Data",
        "meta%2Ddata",
        "iam",
        "IAM",
        "i%61m",
        "%69%61%6d",
        "%2569%2561%256d",
        "I%41M",
        "security-credentials",
        "security-credentials-extended",
        "Security-Credentials",
        "security%2Dcredentials",
        "info",
        "identity-credentials",
        "ec2",
        "%2F",
        "%2f",
        "%252F",
        "%5C",
        "%5c",
        ";",
        ";x=1",
        "%3B",
        "%3b",
        "?",
        "?x=1",
        "#",
        "%00",
        "%",
        "%zz",
        "%e2%80%8b",
        "user-data",
        "instance-id",
        "node-role",
        "api",
        "token",
    ];
    prop_oneof![
        6 => proptest::sample::select(fixed).prop_map(str::to_string),
        2 => "[a-zA-Z0-9._~-]{1,8}",
        1 => ".{0,6}",
        1 => proptest::collection::vec(any::<u8>(), 0..6)
            .prop_map(|b| b.iter().map(|x| format!("%{x:02X}")).collect::<String>()),
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            fragment(),
            proptest::sample::select(vec!["/", "", "//", "/./", "\\"]),
        ),
        0..10,
    )
    .prop_map(|parts| {
        let mut p = String::from("/");
        for (f, sep) in parts {
            p.push_str(&f);
            p.push_str(sep);
        }
        p
    })
}

/// `raw` as a request target a client could send: bytes a URI cannot hold
/// are percent-encoded, everything else (`%`, `;`, `?`, `#`) is kept.
fn as_uri(raw: &str) -> Uri {
    if let Ok(u) = Uri::try_from(raw) {
        return u;
    }
    let mut out = String::new();
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%?".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Uri::try_from(out.as_str()).unwrap_or_else(|_| Uri::from_static("/"))
}

/// An agent (everything allow-listed) in front of a leaky metadata service.
struct Pair {
    imds: ImdsEmulator,
    state: Arc<RouterContext>,
}

/// Past this many upstream requests the routed pair is replaced: reading
/// the emulator's request log copies it, so a long run would slow down.
const FRESH_AFTER: usize = 500;

async fn pair() -> Pair {
    let imds = ImdsEmulator::start(NodeIdentity::default(), Behaviour::leaky())
        .await
        .unwrap();
    let fake = FakeKiam::new()
        .pod(POD, Some("pod-role"))
        .grant(POD, "pod-role", creds("PODKEY"));
    let mut cfg = Config::new(Regex::new(".*").unwrap());
    cfg.deadline = Duration::from_millis(100);
    let upstream = Upstream::new(&imds.url(), Duration::from_secs(2)).unwrap();
    let state = RouterContext::new(
        cfg,
        Arc::new(fake),
        Arc::new(upstream),
        Metrics::new(&mut Registry::default()),
    );
    Pair { imds, state }
}

/// The shared runtime, the pair routed in-process (replaced now and then),
/// and an agent on real TCP with its own pair.
struct Rig {
    rt: tokio::runtime::Runtime,
    routed: std::sync::Mutex<Pair>,
    agent: SocketAddr,
    _tcp: Pair,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (routed, tcp, agent) = rt.block_on(async {
            let tcp = pair().await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let agent = listener.local_addr().unwrap();
            tokio::spawn(kiam::agent::run(
                listener,
                tcp.state.clone(),
                tokio_util::sync::CancellationToken::new(),
            ));
            (pair().await, tcp, agent)
        });
        Rig {
            rt,
            routed: std::sync::Mutex::new(routed),
            agent,
            _tcp: tcp,
        }
    })
}

/// The first of the node's markers in `text` (every emulator here runs as
/// the default node).
fn leaks(text: &str) -> Option<String> {
    let text = text.to_lowercase();
    NodeIdentity::default()
        .markers()
        .into_iter()
        .find(|m| text.contains(&m.to_lowercase()))
        .map(str::to_string)
}

/// Routes one request through the router; returns (status, body, what
/// reached the upstream meanwhile).
fn route(method: &str, uri: Uri) -> (u16, String, Vec<String>) {
    let rig = rig();
    let _one_at_a_time = serial();
    let mut routed = rig.routed.lock().unwrap_or_else(|p| p.into_inner());
    rig.rt.block_on(async {
        let mut before = routed.imds.seen().len();
        if before > FRESH_AFTER {
            *routed = pair().await;
            before = 0;
        }
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(
            format!("{POD}:40000").parse::<SocketAddr>().unwrap(),
        ));
        let resp = router(routed.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let upstream = routed.imds.seen()[before..]
            .iter()
            .map(|s| s.path.clone())
            .collect();
        (
            status,
            String::from_utf8_lossy(&body).into_owned(),
            upstream,
        )
    })
}

/// Checks one routed request against the invariants.
fn check_route(method: &str, raw: &str) -> Result<(), TestCaseError> {
    let uri = as_uri(raw);
    let (status, body, upstream) = route(method, uri.clone());
    prop_assert!(leaks(&body).is_none(), "{method} {uri} leaked: {body}");
    for p in &upstream {
        prop_assert!(!looks_like_iam(p), "{method} {uri} proxied as {p}");
    }
    if let Ok(path) = NormalPath::parse(uri.path()) {
        let under_iam = path.segments.get(1).map(String::as_str) == Some("meta-data")
            && path.segments.get(2).map(String::as_str) == Some("iam");
        prop_assert!(
            !(under_iam || path.is_sensitive()) || upstream.is_empty(),
            "{method} {uri} (normalised {}) was proxied: {upstream:?}",
            path.decoded()
        );
    }
    prop_assert!(status >= 200, "{status}");
    Ok(())
}

proptest! {
    #![proptest_config(config(cases()))]

    #[test]
    fn normalisation_never_panics_and_round_trips(raw in any::<String>()) {
        if let Ok(p) = NormalPath::parse(&raw) {
            let _ = p.decoded();
            let again = NormalPath::parse(&p.encoded());
            prop_assert_eq!(again, Ok(p.clone()), "{:?} -> {}", raw, p.encoded());
        }
    }

    #[test]
    fn structured_paths_never_panic_and_round_trip(raw in raw_path()) {
        if let Ok(p) = NormalPath::parse(&raw) {
            prop_assert_eq!(NormalPath::parse(&p.encoded()), Ok(p.clone()), "{:?}", raw);
        }
    }

    #[test]
    fn nothing_under_meta_data_iam_is_ever_proxied(
        raw in raw_path(),
        method in proptest::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ) {
        check_route(method, &raw)?;
    }

    #[test]
    fn arbitrary_paths_never_leak(raw in "/[ -~]{0,80}") {
        check_route("GET", &raw)?;
    }

    #[test]
    fn a_token_is_valid_only_for_the_ip_it_was_minted_for(
        a in any::<IpAddr>(),
        b in any::<IpAddr>(),
        ttl in 1u64..=21600,
        at in any::<prop::sample::Index>(),
        with in proptest::sample::select(b"0123456789abcdef.xX-".to_vec()),
    ) {
        let tokens = tokens();
        let token = tokens.mint(a, Duration::from_secs(ttl));
        prop_assert!(tokens.verify(a, token.as_bytes()).is_ok());
        // An IPv4 caller and its IPv4-mapped IPv6 form are one caller (the
        // agent canonicalises the connection's source address).
        if a.to_canonical() != b.to_canonical() {
            prop_assert!(tokens.verify(b, token.as_bytes()).is_err(), "{a} token valid for {b}");
        }
        // Change one character to one that means something else.
        let i = at.index(token.len());
        let old = token.as_bytes()[i];
        if !old.eq_ignore_ascii_case(&with) {
            let mut tampered = token.clone().into_bytes();
            tampered[i] = with;
            prop_assert!(
                tokens.verify(a, &tampered).is_err(),
                "tampered token {:?} accepted", String::from_utf8_lossy(&tampered)
            );
        }
    }

    #[test]
    fn token_and_ttl_parsing_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), ip in any::<IpAddr>()) {
        prop_assert!(tokens().verify(ip, &bytes).is_err());
        if let Ok(ttl) = Tokens::parse_ttl(Some(&bytes)) {
            prop_assert!((1..=21600).contains(&ttl));
            prop_assert!(bytes.iter().all(u8::is_ascii_digit));
        }
    }
}

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(Tokens::new)
}

/// Raw bytes on a fresh connection to the running agent; the answer (or
/// nothing, if the agent closed the connection). With `half_close` the
/// write side is shut after sending, so an incomplete request ends at once
/// (hyper then closes, possibly before answering).
fn send_raw(bytes: &[u8], half_close: bool) -> Vec<u8> {
    let rig = rig();
    let _one_at_a_time = serial();
    rig.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(rig.agent).await.unwrap();
        let _ = s.write_all(bytes).await;
        if half_close {
            let _ = s.shutdown().await;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        out
    })
}

/// Requests through the shared rig run one at a time, so what reached the
/// upstream meanwhile belongs to the request being checked.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn raw_request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (
            proptest::sample::select(vec!["GET", "PUT", "HEAD", "G\0T", ""]),
            raw_path(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(m, p, junk, headers)| {
                let mut r = format!("{m} {p}").into_bytes();
                r.extend_from_slice(&junk);
                r.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n");
                r.extend_from_slice(&headers);
                r.extend_from_slice(b"\r\n\r\n");
                r
            }),
    ]
}

proptest! {
    #![proptest_config(config((cases() / 4).max(1)))]

    #[test]
    fn arbitrary_bytes_on_the_wire_never_crash_or_leak(bytes in raw_request()) {
        let answer = send_raw(&bytes, true);
        let text = String::from_utf8_lossy(&answer);
        prop_assert!(leaks(&text).is_none(), "{:?} leaked: {text}", String::from_utf8_lossy(&bytes));
        let ping = send_raw(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false);
        prop_assert!(
            String::from_utf8_lossy(&ping).ends_with("pong"),
            "the agent stopped answering after {:?}",
            text
        );
    }
}

/// Spellings worth keeping as explicit cases (and any input a fuzz run
/// ever found): each must satisfy the same invariants.
#[test]
fn known_tricky_paths() {
    for raw in [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/NODEROLEMARKER-e1f7c3",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/IAM/info",
        "/latest/Meta-Data/I%41M/security-credentials/",
        "/latest/meta-data%2Fiam%2Fsecurity-credentials%2F",
        "/latest/meta-data%252Fiam%252Finfo",
        "/latest/meta-data/x/../iam/info",
        "/latest/meta-data/./iam/./info",
        "/latest//meta-data//iam//info",
        "/latest\\meta-data\\iam\\info",
        "/latest/meta-data;x/iam;y/info",
        "/latest/meta-data/iam%3Bx/info",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/%2e%2e/latest/meta-data/iam/info",
        "/security%2Dcredentials\\N_6t~-/C//",
    ] {
        for method in ["GET", "HEAD", "OPTIONS"] {
            check_route(method, raw).unwrap_or_else(|e| panic!("{method} {raw}: {e}"));
        }
    }
}
