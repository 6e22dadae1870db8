//! Kubernetes Events on a Pod when kiam refuses it a role or cannot fetch
//! its credentials, so `kubectl describe pod` shows why.
//!
//! Events are deduplicated before they reach the API: the same (pod uid,
//! reason, message) is written at most once per five minutes and repeats in
//! that window are skipped, not counted (a pod retrying in a loop would
//! otherwise turn every retry into an API write), and a pod gets at most
//! [`MAX_EVENTS_PER_POD`] Events per five minutes whatever their messages
//! (which quote the role a pod asked for, so could be made new each time).
//! Recording never blocks and never fails: events go through a bounded
//! queue to one writer task, a full queue drops the event, and API errors
//! are only logged.
//!
//! Events are core/v1 (`/api/v1/namespaces/{ns}/events`), the API kiam and
//! `kubectl describe` use, with `source.component: kiam` and
//! `reportingComponent: kiam-server`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::model::PodInfo;

/// Why kiam writes an Event (its `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The policy refused the requested role.
    RoleForbidden,
    /// STS (or the cache in front of it) failed.
    CredentialError,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RoleForbidden => "KiamRoleForbidden",
            Reason::CredentialError => "KiamCredentialError",
        }
    }
}

/// The same event is written at most once per this window.
const DEDUP_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Bounds the dedup memory; past it the oldest entries are evicted.
const MAX_REMEMBERED: usize = 4096;
/// Events waiting for the writer; more are dropped.
const QUEUE: usize = 256;
/// One API write may not hold the queue longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Kubernetes object names are at most 253 characters; the suffix is ≤ 17.
const MAX_NAME_PREFIX: usize = 200;
/// At most this many Events per pod per [`DEDUP_WINDOW`], whatever their
/// messages: a pod asking for ever-new role names must not turn kiam into
/// a stream of API writes.
pub const MAX_EVENTS_PER_POD: u32 = 10;
/// Messages are cut to this many bytes (the limit events.k8s.io puts on a
/// note): they may quote annotations and requested roles, which a pod or a
/// namespace owner can make arbitrarily long. Cutting also bounds the
/// deduplication memory.
pub const MAX_MESSAGE: usize = 1024;

const SOURCE_COMPONENT: &str = "kiam";
const REPORTING_COMPONENT: &str = "kiam-server";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: Arc<str>,
    reason: Reason,
    message: String,
}

struct Shared {
    // No `.await` happens under this lock.
    seen: Mutex<HashMap<Key, Instant>>,
    /// Per pod uid: when its budget window started and how many Events it
    /// got since. Locked after `seen`, never across `.await`.
    per_pod: Mutex<HashMap<Arc<str>, (Instant, u32)>>,
    tx: mpsc::Sender<Event>,
    /// Who reports (`reportingInstance`): the server's pod name.
    instance: String,
}

/// Writes deduplicated Warning Events on Pods. Cheap to clone; the writer
/// task ends when the last clone is dropped.
#[derive(Clone)]
pub struct EventRecorder {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("enabled", &self.shared.is_some())
            .finish()
    }
}

impl EventRecorder {
    /// Spawns the writer task (so call it inside a tokio runtime).
    pub fn new(client: kube::Client) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(client, rx));
        let instance = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| REPORTING_COMPONENT.to_string());
        EventRecorder {
            shared: Some(Arc::new(Shared {
                seen: Mutex::new(HashMap::new()),
                per_pod: Mutex::new(HashMap::new()),
                tx,
                instance,
            })),
        }
    }

    /// A recorder that writes nothing (tests, tools).
    pub fn disabled() -> Self {
        EventRecorder { shared: None }
    }

    /// Records a Warning Event on `pod` unless the same one was recorded in
    /// the last five minutes. Never blocks, never fails.
    pub fn record(&self, pod: &PodInfo, reason: Reason, message: String) {
        let Some(shared) = &self.shared else { return };
        let key = Key {
            uid: pod.uid.clone(),
            reason,
            message: shorten(message),
        };
        let now = Instant::now();
        {
            let mut seen = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < DEDUP_WINDOW)
            {
                return;
            }
            if !take_budget(&shared.per_pod, &pod.uid, now) {
                tracing::debug!(
                    pod.namespace = %pod.namespace, pod.name = %pod.name, reason = reason.as_str(),
                    "the pod had {MAX_EVENTS_PER_POD} Events in the last five minutes; not writing another"
                );
                return;
            }
            if seen.len() >= MAX_REMEMBERED {
                evict(&mut seen, now);
            }
            seen.insert(key.clone(), now);
        }
        let event = build_event(pod, reason, &key.message, &shared.instance);
        if let Err(e) = shared.tx.try_send(event) {
            tracing::debug!(
                pod.namespace = %pod.namespace, pod.name = %pod.name, reason = reason.as_str(),
                error = %e, "event queue full; dropping the event"
            );
            // Not written, so a later repeat may try again.
            shared
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    }
}

/// Counts one Event against `uid`'s budget; false when it is spent.
fn take_budget(
    per_pod: &Mutex<HashMap<Arc<str>, (Instant, u32)>>,
    uid: &Arc<str>,
    now: Instant,
) -> bool {
    let mut per_pod = per_pod.lock().unwrap_or_else(|p| p.into_inner());
    if per_pod.len() >= MAX_REMEMBERED && !per_pod.contains_key(uid) {
        per_pod.retain(|_, (start, _)| now.duration_since(*start) < DEDUP_WINDOW);
        if per_pod.len() >= MAX_REMEMBERED {
            // Only loosens the budget for a moment; memory stays bounded.
            per_pod.clear();
        }
    }
    let (start, count) = per_pod.entry(uid.clone()).or_insert((now, 0));
    if now.duration_since(*start) >= DEDUP_WINDOW {
        (*start, *count) = (now, 0);
    }
    if *count >= MAX_EVENTS_PER_POD {
        return false;
    }
    *count += 1;
    true
}

/// Cuts `message` to [`MAX_MESSAGE`] bytes by dropping its middle (marked
/// `…`): the start says what was refused and the end, usually, why.
fn shorten(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mark = " … ";
    let budget = MAX_MESSAGE - mark.len();
    let mut head = budget * 3 / 5;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - (budget - head);
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{mark}{}", &message[..head], &message[tail..])
}

/// Drops expired entries, then the oldest ones until there is room.
fn evict(seen: &mut HashMap<Key, Instant>, now: Instant) {
    seen.retain(|_, at| now.duration_since(*at) < DEDUP_WINDOW);
    if seen.len() >= MAX_REMEMBERED {
        let mut ages: Vec<Instant> = seen.values().copied().collect();
        ages.sort_unstable();
        // Free a quarter at once so eviction is not paid on every insert.
        let cutoff = ages[ages.len() / 4];
        seen.retain(|_, at| *at > cutoff);
    }
}

fn build_event(pod: &PodInfo, reason: Reason, message: &str, instance: &str) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let prefix: String = pod.name.chars().take(MAX_NAME_PREFIX).collect();
    let nanos = now.0.as_nanosecond();
    Event {
        metadata: ObjectMeta {
            // client-go's convention: `<object>.<hex unix nanos>`.
            name: Some(format!("{prefix}.{nanos:x}")),
            namespace: Some(pod.namespace.to_string()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.to_string()),
            name: Some(pod.name.to_string()),
            uid: Some(pod.uid.to_string()),
            ..Default::default()
        },
        reason: Some(reason.as_str().into()),
        message: Some(message.to_string()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(SOURCE_COMPONENT.into()),
            host: None,
        }),
        reporting_component: Some(REPORTING_COMPONENT.into()),
        reporting_instance: Some(instance.to_string()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    }
}

async fn write_events(client: kube::Client, mut rx: mpsc::Receiver<Event>) {
    while let Some(event) = rx.recv().await {
        let ns = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        let reason = event.reason.clone().unwrap_or_default();
        let pod = event.involved_object.name.clone().unwrap_or_default();
        match tokio::time::timeout(WRITE_TIMEOUT, api.create(&PostParams::default(), &event)).await
        {
            Ok(Ok(_)) => {
                tracing::debug!(pod.namespace = %ns, pod.name = %pod, reason = %reason, "recorded event");
            }
            Ok(Err(e)) => {
                tracing::warn!(pod.namespace = %ns, pod.name = %pod, reason = %reason, error = %e,
                    "could not record event");
            }
            Err(_) => {
                tracing::warn!(pod.namespace = %ns, pod.name = %pod, reason = %reason,
                    "could not record event: the API server did not answer in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::PodPhase;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;

    fn pod(uid: &str) -> PodInfo {
        PodInfo {
            namespace: "team".into(),
            name: "web-1".into(),
            uid: uid.into(),
            ip: Some("10.0.0.5".parse().unwrap()),
            phase: PodPhase::Running,
            host_network: false,
            deletion: None,
            role: Some("reader".into()),
            session_name: None,
            external_id: None,
            service_account: Some("default".into()),
        }
    }

    /// A kube client whose API server only accepts Event POSTs and hands
    /// each posted body (with its path) to the test.
    fn fake_client() -> (
        kube::Client,
        mpsc::UnboundedReceiver<(String, serde_json::Value)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let tx = tx.clone();
            async move {
                let path = req.uri().path().to_string();
                let method = req.method().clone();
                let body = req.into_body().collect_bytes().await?;
                if method != http::Method::POST {
                    let resp = Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .body(Full::new(Bytes::from_static(b"{}")))
                        .unwrap();
                    return Ok::<_, kube::Error>(resp);
                }
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let _ = tx.send((path, value));
                Ok(Response::builder()
                    .status(StatusCode::CREATED)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap())
            }
        });
        (kube::Client::new(svc, "default"), rx)
    }

    #[tokio::test]
    async fn a_repeated_denial_is_written_once() {
        let (client, mut posted) = fake_client();
        let recorder = EventRecorder::new(client);
        let p = pod("uid-1");
        for _ in 0..100 {
            recorder.record(
                &p,
                Reason::RoleForbidden,
                "failed assuming role \"x\": forbidden".into(),
            );
        }
        // A different message or another pod (same name, new uid) is a new event.
        recorder.record(
            &p,
            Reason::CredentialError,
            "failed retrieving credentials: AccessDenied: no".into(),
        );
        recorder.record(
            &pod("uid-2"),
            Reason::RoleForbidden,
            "failed assuming role \"x\": forbidden".into(),
        );
        drop(recorder);
        let mut events = Vec::new();
        while let Some(e) = posted.recv().await {
            events.push(e);
        }
        assert_eq!(events.len(), 3, "{events:#?}");
        let (path, first) = &events[0];
        assert_eq!(path, "/api/v1/namespaces/team/events");
        assert_eq!(first["reason"], "KiamRoleForbidden");
        assert_eq!(first["type"], "Warning");
        assert_eq!(first["involvedObject"]["kind"], "Pod");
        assert_eq!(first["involvedObject"]["name"], "web-1");
        assert_eq!(first["involvedObject"]["namespace"], "team");
        assert_eq!(first["involvedObject"]["uid"], "uid-1");
        assert_eq!(first["source"]["component"], "kiam");
        assert_eq!(first["reportingComponent"], "kiam-server");
        assert_eq!(first["count"], 1);
        assert!(first["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web-1."));
        assert_eq!(events[1].1["reason"], "KiamCredentialError");
        assert_eq!(events[2].1["involvedObject"]["uid"], "uid-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_after_the_window_is_written_again() {
        let (client, mut posted) = fake_client();
        let recorder = EventRecorder::new(client);
        let p = pod("uid-1");
        recorder.record(&p, Reason::CredentialError, "boom".into());
        recorder.record(&p, Reason::CredentialError, "boom".into());
        tokio::time::advance(DEDUP_WINDOW).await;
        recorder.record(&p, Reason::CredentialError, "boom".into());
        drop(recorder);
        let mut n = 0;
        while posted.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn dedup_memory_is_bounded() {
        let now = Instant::now();
        let mut seen = HashMap::new();
        for i in 0..MAX_REMEMBERED {
            let key = Key {
                uid: format!("uid-{i}").into(),
                reason: Reason::RoleForbidden,
                message: String::new(),
            };
            seen.insert(key, now + Duration::from_millis(i as u64));
        }
        evict(&mut seen, now + Duration::from_secs(1));
        assert!(seen.len() < MAX_REMEMBERED);
        assert!(seen.len() >= MAX_REMEMBERED / 2, "only the oldest go");
        assert!(
            !seen.keys().any(|k| &*k.uid == "uid-0"),
            "the oldest went first"
        );
    }

    #[tokio::test]
    async fn a_pod_gets_a_bounded_number_of_events() {
        let (client, mut posted) = fake_client();
        let recorder = EventRecorder::new(client);
        // A pod asking for a new role name each time.
        for i in 0..100 {
            recorder.record(&pod("uid-1"), Reason::RoleForbidden, format!("role r{i}"));
        }
        recorder.record(&pod("uid-2"), Reason::RoleForbidden, "role r0".into());
        drop(recorder);
        let mut per_pod: HashMap<String, usize> = HashMap::new();
        while let Some((_, e)) = posted.recv().await {
            let uid = e["involvedObject"]["uid"].as_str().unwrap().to_string();
            *per_pod.entry(uid).or_default() += 1;
        }
        assert_eq!(per_pod["uid-1"], MAX_EVENTS_PER_POD as usize);
        assert_eq!(per_pod["uid-2"], 1, "other pods keep their own budget");
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(shorten("short".into()), "short");
        let cut = shorten(format!("start{}end", "é".repeat(MAX_MESSAGE)));
        assert!(cut.len() <= MAX_MESSAGE, "{}", cut.len());
        assert!(cut.starts_with("start") && cut.ends_with("end"), "{cut}");
        assert!(cut.contains(" … "));
        assert_eq!(shorten("x".repeat(MAX_MESSAGE)).len(), MAX_MESSAGE);
        assert_eq!(shorten("x".repeat(MAX_MESSAGE + 1)).len(), MAX_MESSAGE);
    }

    #[tokio::test]
    async fn disabled_records_nothing_and_does_not_panic() {
        EventRecorder::disabled().record(&pod("u"), Reason::RoleForbidden, "x".into());
    }
}
