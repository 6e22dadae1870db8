//! WATCH responses: one task per watch writes newline-delimited JSON events into a chunked
//! body until the client goes away, the timeout passes, or a test cuts it.
//!
//! As on the real server, a too-old resourceVersion is not an HTTP error: the response
//! is 200 with a single ERROR event carrying a 410 `Status`, which is what makes
//! kube-runtime's watcher re-list instead of retrying the same version forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::resources::{namespace_of, Resource};
use super::selector::Selectors;
use super::store::{EventType, Record, WatchStart};
use super::Shared;

/// What one WATCH request asked for.
pub struct WatchRequest {
    pub resource: Resource,
    pub namespace: Option<String>,
    pub selectors: Selectors,
    pub start: WatchStart,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the synthetic ADDED events with a marked BOOKMARK.
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    /// For `kubectl get -w`: send each object as a one-row Table; the value is `includeObject`.
    pub table: Option<String>,
}

type Chunk = Result<Bytes, std::io::Error>;

fn line(event_type: &str, object: &Value) -> Chunk {
    let mut bytes = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values always serialise");
    bytes.push(b'\n');
    Ok(Bytes::from(bytes))
}

/// An ADDED/MODIFIED/DELETED event line, in the representation the watch asked for.
fn object_line(req: &WatchRequest, event_type: &str, object: &Value) -> Chunk {
    match &req.table {
        None => line(event_type, object),
        Some(include_object) => {
            let rv = super::resources::resource_version_of(object).to_string();
            let table = super::table::render(
                req.resource,
                &[object],
                json!({"resourceVersion": rv}),
                include_object,
            );
            line(event_type, &table)
        }
    }
}

fn bookmark(res: Resource, rv: u64, initial_events_end: bool) -> Chunk {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": res.kind(), "apiVersion": res.api_version(), "metadata": metadata}),
    )
}

/// The event type this watch sees for a change, if any: an object that starts matching the
/// watch's namespace and selectors is ADDED, one that stops matching is DELETED.
fn event_type(req: &WatchRequest, record: &Record) -> Option<&'static str> {
    if record.resource != req.resource {
        return None;
    }
    let in_scope = |obj: &Value| {
        req.namespace
            .as_deref()
            .is_none_or(|ns| namespace_of(obj) == ns)
            && req.selectors.matches(obj)
    };
    let now = in_scope(&record.object);
    let before = record.previous.as_deref().is_some_and(in_scope);
    match (record.kind, before, now) {
        (EventType::Added, _, true) => Some("ADDED"),
        (EventType::Modified, true, true) => Some("MODIFIED"),
        (EventType::Modified, false, true) => Some("ADDED"),
        (EventType::Modified, true, false) => Some("DELETED"),
        (EventType::Deleted, true, _) => Some("DELETED"),
        _ => None,
    }
}

/// Starts the watch and returns its streaming response.
pub fn respond(shared: Arc<Shared>, req: WatchRequest) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Chunk>(64);
    match shared.store.subscribe(req.resource, req.start) {
        Ok(sub) => {
            tokio::spawn(run(shared, req, sub, tx));
        }
        Err(err) => {
            // Capacity 64 and a fresh channel: this cannot fail.
            let _ = tx.try_send(line("ERROR", &err.to_status()));
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .expect("static headers are valid")
}

/// Decrements the open-watch count however the task ends.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.send_modify(|n| *n -= 1);
    }
}

async fn run(
    shared: Arc<Shared>,
    req: WatchRequest,
    sub: super::store::Subscription,
    tx: mpsc::Sender<Chunk>,
) -> Result<(), Infallible> {
    shared.open_watches.send_modify(|n| *n += 1);
    let _open = OpenWatch(shared.clone());
    let mut cut = shared.cut.subscribe();
    let mut live = sub.live;
    let start_rv = sub.start_rv;
    // The newest resourceVersion this watch has caught up with, which bookmarks report.
    let mut seen_rv = start_rv;
    let send = |chunk: Chunk| {
        let tx = tx.clone();
        async move { tx.send(chunk).await.is_ok() }
    };

    for obj in &sub.initial {
        if req.selectors.matches(obj)
            && req
                .namespace
                .as_deref()
                .is_none_or(|ns| namespace_of(obj) == ns)
            && !send(object_line(&req, "ADDED", obj)).await
        {
            return Ok(());
        }
    }
    if req.send_initial_events && !send(bookmark(req.resource, start_rv, true)).await {
        return Ok(());
    }
    for record in &sub.replay {
        seen_rv = seen_rv.max(record.rv);
        if let Some(kind) = event_type(&req, record) {
            if !send(object_line(&req, kind, &record.object)).await {
                return Ok(());
            }
        }
    }

    let interval = shared.bookmark_interval();
    let mut bookmarks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    let timeout = async move {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    loop {
        tokio::select! {
            () = tx.closed() => return Ok(()),
            _ = cut.changed() => {
                // An error frame makes hyper drop the connection mid-body, which the client
                // sees as an abrupt end, like a crashed or restarted API server.
                let _ = tx.send(Err(std::io::Error::other("watch cut by test"))).await;
                return Ok(());
            }
            () = &mut timeout => return Ok(()),
            _ = bookmarks.tick(), if req.bookmarks => {
                if !send(bookmark(req.resource, seen_rv, false)).await {
                    return Ok(());
                }
            }
            received = live.recv() => match received {
                // Events released from hold that the watch's start already covers.
                Ok(record) if record.rv <= start_rv => {}
                Ok(record) => {
                    seen_rv = seen_rv.max(record.rv);
                    if let Some(kind) = event_type(&req, &record) {
                        if !send(object_line(&req, kind, &record.object)).await {
                            return Ok(());
                        }
                    }
                }
                // Too slow to keep up: end the stream; the client resumes from history.
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}
