//! `/health`: the node's instance-id, and with `?deep=1` a server's health.
//!
//! The surprise: the instance-id is asked of the node's metadata service
//! once and kept (it never changes for a node), so a kubelet probing every
//! few seconds costs the metadata service nothing; `?deep=1` asks a server
//! every time. Bodies name no server: details go to the log.

use axum::response::Response;
use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;

use super::{text, Reject, RouterContext};
use crate::agent::retry::retry;

/// `/health`, and `/health?deep=1` when `deep`.
pub(super) async fn health(ctx: &RouterContext, deep: bool) -> Result<Response, Reject> {
    let deadline = Instant::now() + ctx.cfg.health_deadline;
    if deep {
        let msg = retry(deadline, |d| ctx.client.health(d), |_| false)
            .await
            .map_err(|f| {
                tracing::warn!(error = %f.err, "health: no kiam server is healthy");
                Reject::Internal("kiam server health: no server answered".into())
            })?;
        if msg != "ok" {
            tracing::warn!(health = %msg, "health: kiam server is not healthy");
            // Servers answer a one-word state; anything longer is logged only.
            let word = msg.len() <= 32 && msg.bytes().all(|b| b.is_ascii_alphanumeric());
            let state = if word { msg.as_str() } else { "not ok" };
            return Err(Reject::Internal(format!("kiam server health: {state}")));
        }
    }
    instance_id(ctx, deadline).await.map(text)
}

/// The node's instance-id, asked of the node's metadata service once: it
/// never changes for a node, and a probe every few seconds need not cost
/// the metadata service a request each.
async fn instance_id(ctx: &RouterContext, deadline: Instant) -> Result<String, Reject> {
    if let Some(id) = ctx.instance_id.get() {
        return Ok(id.clone());
    }
    let no_headers = HeaderMap::new();
    let fetch = ctx
        .upstream
        .fetch(&Method::GET, "/latest/meta-data/instance-id", &no_headers);
    let failed = match tokio::time::timeout_at(deadline, fetch).await {
        Ok(Ok(resp)) if resp.status() == StatusCode::OK && !resp.body().is_empty() => {
            let id = String::from_utf8_lossy(resp.body()).into_owned();
            return Ok(ctx.instance_id.get_or_init(|| id).clone());
        }
        Ok(Ok(resp)) => format!("answered {} for instance-id", resp.status()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer in time".to_string(),
    };
    tracing::warn!(error = %failed, "health: the node's metadata service did not give the instance-id");
    Err(Reject::Internal(
        "metadata endpoint did not give the instance-id".into(),
    ))
}
