//! `--node-startup-taint`: the node start-up gate.
//!
//! The surprise: this is the agent's only write to the Kubernetes API, and it
//! removes a taint rather than adding one. A node registers with a
//! `NoSchedule` taint (kubelet `--register-with-taints`), so no workload can
//! start there and reach the node's own metadata service (and its role)
//! before the agent's DNAT rule exists; the agent takes the taint off its own
//! node once its rule is first in `nat PREROUTING` (with `--iptables`) and a
//! kiam server answered `GetHealth` with `ok`. An agent that never gets there
//! leaves the node tainted, which is the point.
//!
//! Only the taint with the configured key goes (every effect of it). The
//! change is a JSON patch whose `test` operation pins the taints list as it
//! was read: if anything else changed the list in between (another
//! controller adding its own taint), the API server refuses the patch and
//! the agent reads the node again, so a concurrent taint is never dropped.
//! Strategic merge would not do: `spec.taints` has no merge key, so a patch
//! replaces the whole list.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::client::KiamClient;

/// Bound on one request to the API server; kube-rs has no overall timeout.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed API request, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Pause before reading the node again after the guard refused a patch.
const REREAD_PAUSE: Duration = Duration::from_millis(100);
/// How long one health question may take.
const HEALTH_DEADLINE: Duration = Duration::from_secs(1);
/// How often the servers' health is asked while none says `ok`.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// Longest taint key Kubernetes accepts: a 253-byte DNS prefix, `/`, a 63-byte name.
const MAX_KEY_LEN: usize = 253 + 1 + 63;

#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("--node-startup-taint {key:?} is not a valid taint key: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error(
        "--node-startup-taint needs --node-name (or NODE_NAME, set from the downward API's \
         spec.nodeName in the agent's DaemonSet)"
    )]
    NoNodeName,
    #[error("--node-name {0:?} is not a valid node name")]
    InvalidNodeName(String),
    #[error("--node-startup-taint: no Kubernetes config (in-cluster or KUBECONFIG): {0}")]
    Config(String),
    #[error("node {node}: {source}")]
    Api {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {0}: the API server did not answer within {API_TIMEOUT:?}")]
    Timeout(String),
    #[error("node {node}: unexpected object: {reason}")]
    Malformed { node: String, reason: &'static str },
}

/// What to remove from where, checked at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupTaint {
    /// The taint key the node registered with.
    pub key: String,
    /// The agent's own node.
    pub node: String,
}

impl StartupTaint {
    /// `None` when the gate is off (`--node-startup-taint` empty). `node` is
    /// `--node-name`, or else `NODE_NAME`.
    pub fn new(key: &str, node: &str) -> Result<Option<Self>, TaintError> {
        let key = key.trim();
        if key.is_empty() {
            return Ok(None);
        }
        check_key(key)?;
        let node = node.trim();
        if node.is_empty() {
            return Err(TaintError::NoNodeName);
        }
        if !is_dns_subdomain(node) {
            return Err(TaintError::InvalidNodeName(node.to_string()));
        }
        Ok(Some(StartupTaint {
            key: key.to_string(),
            node: node.to_string(),
        }))
    }
}

/// A Kubernetes qualified name: `[prefix/]name`, the prefix a DNS
/// subdomain, the name up to 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn check_key(key: &str) -> Result<(), TaintError> {
    let invalid = |reason| TaintError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    if key.len() > MAX_KEY_LEN {
        return Err(invalid("longer than 317 characters"));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if !is_dns_subdomain(prefix) {
            return Err(invalid(
                "the part before '/' must be a lowercase DNS subdomain, e.g. kiam.example.com",
            ));
        }
    }
    let ends_ok = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if name.is_empty()
        || name.len() > 63
        || !ends_ok(name)
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            "the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending \
             with a letter or digit",
        ));
    }
    Ok(())
}

/// Lowercase RFC 1123 subdomain, as node names and key prefixes are.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The gate's metrics, under Go kiam's `kiam_agent_` prefix.
#[derive(Debug, Clone, Default)]
pub struct TaintMetrics {
    /// 1 once this agent took the start-up taint off its node.
    pub removed: Counter,
    /// Failed requests to the API server while removing it (each retried).
    pub api_errors: Counter,
    /// 1 while this agent still holds its node's start-up taint (it has not
    /// become ready), 0 otherwise; `kiam explain --agent-metrics` reads it.
    pub gate_closed: Gauge,
}

impl TaintMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "kiam_agent_node_startup_taint_removed",
            "times the agent removed --node-startup-taint from its node",
            metrics.removed.clone(),
        );
        registry.register(
            "kiam_agent_node_startup_taint_errors",
            "failed API requests while removing --node-startup-taint (retried with backoff)",
            metrics.api_errors.clone(),
        );
        registry.register(
            "kiam_agent_node_startup_gate_closed",
            "1 while the agent has not yet taken --node-startup-taint off its node, 0 otherwise",
            metrics.gate_closed.clone(),
        );
        metrics
    }
}

/// A client for the API server: the local kubeconfig (`KUBECONFIG`) if
/// there is one, else the Pod's service account.
pub async fn kube_client() -> Result<kube::Client, TaintError> {
    crate::ensure_crypto_provider();
    let config = kube::Config::infer()
        .await
        .map_err(|e| TaintError::Config(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| TaintError::Config(e.to_string()))
}

/// [`run`] with a client from [`kube_client`], retried with backoff while
/// there is no usable config (the agent keeps serving meanwhile; the node
/// stays tainted and the error is logged and counted).
pub async fn run_in_cluster(
    taint: StartupTaint,
    rule_in_place: Option<oneshot::Receiver<()>>,
    servers: Arc<dyn KiamClient>,
    metrics: TaintMetrics,
    shutdown: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    let client = loop {
        match kube_client().await {
            Ok(client) => break client,
            Err(e) => {
                metrics.api_errors.inc();
                tracing::error!(error = %e, retry_in = ?backoff, "cannot reach the Kubernetes API; the node keeps its start-up taint");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    run(taint, client, rule_in_place, servers, metrics, shutdown).await
}

/// What one removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The taint was there and is gone now.
    Removed,
    /// The node had no taint with the key (removed earlier, or never set).
    Absent,
}

/// Waits until the rule is in place (`rule_in_place`, when `--iptables`)
/// and a server answers health `ok`, then removes the taint, retrying API
/// failures with backoff until it is gone or `shutdown`. If the rule task
/// ends without saying the rule is in place, the taint stays.
pub async fn run(
    taint: StartupTaint,
    client: kube::Client,
    rule_in_place: Option<oneshot::Receiver<()>>,
    servers: Arc<dyn KiamClient>,
    metrics: TaintMetrics,
    shutdown: CancellationToken,
) {
    metrics.gate_closed.set(1);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = gate(taint, client, rule_in_place, servers, metrics) => {}
    }
}

async fn gate(
    taint: StartupTaint,
    client: kube::Client,
    rule_in_place: Option<oneshot::Receiver<()>>,
    servers: Arc<dyn KiamClient>,
    metrics: TaintMetrics,
) {
    if let Some(in_place) = rule_in_place {
        if in_place.await.is_err() {
            tracing::error!(
                taint = %taint.key,
                node = %taint.node,
                "the iptables rule was never put in place; keeping the node start-up taint"
            );
            return;
        }
    }
    wait_for_a_healthy_server(servers.as_ref()).await;

    let mut backoff = FIRST_BACKOFF;
    loop {
        match remove(&client, &taint).await {
            Ok(Some(Removal::Removed)) => {
                metrics.removed.inc();
                metrics.gate_closed.set(0);
                tracing::info!(
                    taint = %taint.key,
                    node = %taint.node,
                    "removed the node start-up taint: the agent is ready (its iptables rule is first, if --iptables, and a server is healthy)"
                );
                return;
            }
            Ok(Some(Removal::Absent)) => {
                metrics.gate_closed.set(0);
                tracing::info!(taint = %taint.key, node = %taint.node, "the node has no start-up taint to remove");
                return;
            }
            // Someone changed the taints between our read and our patch:
            // read again after a moment (a moment, so that a server that
            // keeps refusing cannot turn this into a busy loop).
            Ok(None) => tokio::time::sleep(REREAD_PAUSE).await,
            Err(e) => {
                metrics.api_errors.inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot remove the node start-up taint yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Asks the servers' health until one says `ok`.
async fn wait_for_a_healthy_server(servers: &dyn KiamClient) {
    let mut said = false;
    loop {
        let deadline = tokio::time::Instant::now() + HEALTH_DEADLINE;
        match servers.health(deadline).await {
            Ok(msg) if msg == "ok" => return,
            answer => {
                if !said {
                    said = true;
                    let answer = match answer {
                        Ok(msg) => msg,
                        Err(e) => e.to_string(),
                    };
                    tracing::info!(%answer, "waiting for a healthy kiam server before removing the node start-up taint");
                }
            }
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// One read of the node and, if it has the taint, one guarded patch.
/// `Ok(None)` means the taints changed in between (the guard refused).
pub async fn remove(
    client: &kube::Client,
    taint: &StartupTaint,
) -> Result<Option<Removal>, TaintError> {
    let path = format!("/api/v1/nodes/{}", taint.node);
    let get = http::Request::get(&path)
        .body(Vec::new())
        .expect("a path from a checked node name is a valid URI");
    let node: Value = call(client, &taint.node, get).await?;
    remove_as_read(client, taint, &node).await
}

/// The patch half of [`remove`], against `node` as it was read: refused
/// (`Ok(None)`) if the node's taints are no longer what `node` says.
pub async fn remove_as_read(
    client: &kube::Client,
    taint: &StartupTaint,
    node: &Value,
) -> Result<Option<Removal>, TaintError> {
    let path = format!("/api/v1/nodes/{}", taint.node);
    let Some(patch) = patch_removing(node, &taint.key).map_err(|reason| TaintError::Malformed {
        node: taint.node.clone(),
        reason,
    })?
    else {
        return Ok(Some(Removal::Absent));
    };
    let body = serde_json::to_vec(&patch).expect("JSON values serialise");
    let request = http::Request::patch(&path)
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(body)
        .expect("a path from a checked node name is a valid URI");
    match call::<Value>(client, &taint.node, request).await {
        Ok(_) => Ok(Some(Removal::Removed)),
        // 422: the `test` operation failed; 409: a conflict all the same.
        Err(TaintError::Api {
            source: kube::Error::Api(status),
            ..
        }) if matches!(status.code, 409 | 422) => {
            tracing::debug!(message = %status.message, "the node's taints changed meanwhile; reading them again");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn call<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    node: &str,
    request: http::Request<Vec<u8>>,
) -> Result<T, TaintError> {
    match tokio::time::timeout(API_TIMEOUT, client.request::<T>(request)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(TaintError::Api {
            node: node.to_string(),
            source,
        }),
        Err(_) => Err(TaintError::Timeout(node.to_string())),
    }
}

/// The JSON patch taking every taint with `key` off `node`, guarded by a
/// `test` of the whole list as read; `None` when there is no such taint.
fn patch_removing(node: &Value, key: &str) -> Result<Option<Value>, &'static str> {
    let taints = match node.pointer("/spec/taints") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(taints)) => taints,
        Some(_) => return Err("spec.taints is not a list"),
    };
    let kept: Vec<&Value> = taints.iter().filter(|t| t["key"] != key).collect();
    if kept.len() == taints.len() {
        return Ok(None);
    }
    let change = if kept.is_empty() {
        json!({"op": "remove", "path": "/spec/taints"})
    } else {
        json!({"op": "replace", "path": "/spec/taints", "value": kept})
    };
    Ok(Some(json!([
        {"op": "test", "path": "/spec/taints", "value": taints},
        change,
    ])))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "kiam.example.com/agent-not-ready";

    #[test]
    fn the_gate_is_off_without_a_key() {
        assert_eq!(StartupTaint::new("", "").unwrap(), None);
        assert_eq!(StartupTaint::new("  ", "n1").unwrap(), None);
    }

    #[test]
    fn a_key_needs_a_node_name() {
        let err = StartupTaint::new(KEY, "").unwrap_err();
        assert!(matches!(err, TaintError::NoNodeName));
        assert!(err.to_string().contains("--node-name"), "{err}");
        assert!(err.to_string().contains("NODE_NAME"), "{err}");
        let ok = StartupTaint::new(KEY, "ip-10-0-0-1.eu-west-1.compute.internal").unwrap();
        assert_eq!(ok.unwrap().key, KEY);
    }

    #[test]
    fn bad_keys_and_node_names_are_refused_naming_the_flag() {
        for bad in [
            "/x",
            "a/",
            "Kiam.Example/x",
            "a/b/c",
            "-x",
            "x-",
            "x y",
            "x\"y",
            &"x".repeat(64),
        ] {
            let err = StartupTaint::new(bad, "n1").expect_err(bad);
            assert!(
                err.to_string().starts_with("--node-startup-taint "),
                "{bad}: {err}"
            );
        }
        for good in ["node.kubernetes.io/kiam-not-ready", "kiam", "a.b_c-D"] {
            assert!(StartupTaint::new(good, "n1").is_ok(), "{good}");
        }
        let err = StartupTaint::new(KEY, "Node_1").unwrap_err();
        assert!(err.to_string().starts_with("--node-name "), "{err}");
        assert!(StartupTaint::new(KEY, "../nodes").is_err());
    }

    #[test]
    fn the_patch_tests_the_list_as_read_and_keeps_other_taints() {
        let node = json!({"spec": {"taints": [
            {"key": "other", "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoSchedule"},
            {"key": KEY, "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
        ]}});
        let patch = patch_removing(&node, KEY).unwrap().unwrap();
        assert_eq!(patch[0]["op"], "test");
        assert_eq!(patch[0]["value"], node["spec"]["taints"]);
        assert_eq!(patch[1]["op"], "replace");
        assert_eq!(
            patch[1]["value"],
            json!([{"key": "other", "effect": "NoSchedule"}])
        );
    }

    #[test]
    fn the_last_taint_removes_the_list_and_no_taint_is_no_patch() {
        let only = json!({"spec": {"taints": [{"key": KEY, "effect": "NoSchedule"}]}});
        let patch = patch_removing(&only, KEY).unwrap().unwrap();
        assert_eq!(patch[1], json!({"op": "remove", "path": "/spec/taints"}));
        let others = json!({"spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}});
        assert_eq!(patch_removing(&others, KEY).unwrap(), None);
        assert_eq!(patch_removing(&json!({"spec": {}}), KEY).unwrap(), None);
        assert!(patch_removing(&json!({"spec": {"taints": {}}}), KEY).is_err());
    }
}
