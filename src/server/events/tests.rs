use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use super::*;
use crate::server::model::PodPhase;

fn pod(uid: &str) -> PodInfo {
    PodInfo {
        namespace: "team".into(),
        name: "web-1".into(),
        uid: uid.into(),
        ips: Some("10.0.0.5".parse().unwrap()),
        phase: PodPhase::Running,
        host_network: false,
        deletion: None,
        role: Some("reader".into()),
        session_name: None,
        external_id: None,
        service_account: Some("default".into()),
        node: None,
    }
}

const DENIAL: &str = "failed assuming role \"x\": forbidden";

/// One write the fake API server received.
#[derive(Debug)]
struct Write {
    method: Method,
    path: String,
    content_type: String,
    body: Value,
    at: Instant,
}

/// The test's side of a fake API server that keeps core/v1 Events in memory
/// the way the real one does: POST creates (409 AlreadyExists if the name is
/// taken), a merge PATCH merges (404 NotFound if the Event is gone). Every
/// write is handed to the test.
struct FakeApi {
    /// Stored Events by name.
    events: Arc<Mutex<BTreeMap<String, Value>>>,
    writes: mpsc::UnboundedReceiver<Write>,
    /// Creates that are stored but answered 500, as if the answer was lost.
    lose_answers: Arc<AtomicUsize>,
}

fn status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "reason": reason, "code": code.as_u16(), "message": reason});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// RFC 7386 JSON merge patch, as the API server applies
/// `application/merge-patch+json`.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().unwrap();
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn fake_api() -> (kube::Client, FakeApi) {
    let (tx, writes) = mpsc::unbounded_channel();
    let events: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let lose_answers = Arc::new(AtomicUsize::new(0));
    let (store, lose) = (events.clone(), lose_answers.clone());
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let (tx, store, lose) = (tx.clone(), store.clone(), lose.clone());
        async move {
            let path = req.uri().path().to_string();
            let method = req.method().clone();
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await?;
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let at = Instant::now();
            let mut store = store.lock().unwrap();
            let resp = match method {
                Method::POST => {
                    assert_eq!(path, "/api/v1/namespaces/team/events");
                    let name = body["metadata"]["name"].as_str().unwrap().to_string();
                    match store.entry(name) {
                        Entry::Occupied(_) => status(StatusCode::CONFLICT, "AlreadyExists"),
                        Entry::Vacant(slot) => {
                            slot.insert(body.clone());
                            let lost = lose
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            if lost {
                                status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
                            } else {
                                Response::builder()
                                    .status(StatusCode::CREATED)
                                    .header("content-type", "application/json")
                                    .body(Full::new(bytes))
                                    .unwrap()
                            }
                        }
                    }
                }
                Method::PATCH => {
                    let name = path
                        .strip_prefix("/api/v1/namespaces/team/events/")
                        .unwrap();
                    match store.get_mut(name) {
                        None => status(StatusCode::NOT_FOUND, "NotFound"),
                        Some(event) => {
                            merge(event, &body);
                            Response::builder()
                                .status(StatusCode::OK)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(event.to_string())))
                                .unwrap()
                        }
                    }
                }
                _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            };
            // Reported once done, so the test sees the store as it answered.
            let _ = tx.send(Write {
                method,
                path,
                content_type,
                body,
                at,
            });
            Ok::<_, kube::Error>(resp)
        }
    });
    let fake = FakeApi {
        events,
        writes,
        lose_answers,
    };
    (kube::Client::new(svc, "default"), fake)
}

impl FakeApi {
    /// The next write, or a panic if none comes within a minute (of the
    /// paused clock, in the tests that pause it).
    async fn next_write(&mut self) -> Write {
        tokio::time::timeout(Duration::from_secs(60), self.writes.recv())
            .await
            .expect("no write within a minute")
            .expect("the writer ended")
    }

    /// Every write until the writer ends (drop the recorder first).
    async fn all_writes(&mut self) -> Vec<Write> {
        let mut all = Vec::new();
        while let Some(w) = tokio::time::timeout(Duration::from_secs(60), self.writes.recv())
            .await
            .expect("the writer did not end")
        {
            all.push(w);
        }
        all
    }

    fn stored(&self) -> Vec<Value> {
        self.events.lock().unwrap().values().cloned().collect()
    }

    fn count_of(&self, uid: &str, reason: Reason) -> Vec<i64> {
        self.stored()
            .iter()
            .filter(|e| e["involvedObject"]["uid"] == uid && e["reason"] == reason.as_str())
            .map(|e| e["count"].as_i64().unwrap())
            .collect()
    }
}

#[tokio::test]
async fn the_first_occurrence_is_created_as_a_whole_event() {
    let (client, mut api) = fake_api();
    let recorder = EventRecorder::new(client);
    recorder.record(&pod("uid-1"), Reason::RoleForbidden, DENIAL.into());
    let w = api.next_write().await;
    assert_eq!(w.method, Method::POST);
    assert_eq!(w.path, "/api/v1/namespaces/team/events");
    let e = &w.body;
    assert_eq!(e["reason"], "KiamRoleForbidden");
    assert_eq!(e["message"], DENIAL);
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["involvedObject"]["kind"], "Pod");
    assert_eq!(e["involvedObject"]["name"], "web-1");
    assert_eq!(e["involvedObject"]["namespace"], "team");
    assert_eq!(e["involvedObject"]["uid"], "uid-1");
    assert_eq!(e["source"]["component"], "kiam");
    assert_eq!(e["reportingComponent"], "kiam-server");
    assert_eq!(e["count"], 1);
    assert!(e["firstTimestamp"].is_string());
    assert_eq!(e["firstTimestamp"], e["lastTimestamp"]);
    assert!(e["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("web-1."));
}

#[tokio::test(start_paused = true)]
async fn repeats_are_one_event_whose_count_grows() {
    let (client, mut api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    let created = api.next_write().await;
    assert_eq!(created.method, Method::POST);
    assert_eq!(created.body["count"], 1);
    let name = created.body["metadata"]["name"].as_str().unwrap();
    for _ in 0..99 {
        recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    }
    let updated = api.next_write().await;
    assert_eq!(updated.method, Method::PATCH);
    assert_eq!(
        updated.path,
        format!("/api/v1/namespaces/team/events/{name}")
    );
    assert_eq!(updated.content_type, "application/merge-patch+json");
    assert_eq!(updated.body["count"], 100);
    assert!(updated.body["lastTimestamp"].is_string());
    assert!(
        updated.at.duration_since(created.at) >= FLUSH_INTERVAL,
        "repeats wait for the flush interval"
    );
    drop(recorder);
    assert!(api.all_writes().await.is_empty(), "nothing left to write");
    assert_eq!(api.count_of("uid-1", Reason::RoleForbidden), [100]);
}

#[tokio::test(start_paused = true)]
async fn a_pod_retrying_in_a_loop_costs_one_write_per_interval() {
    let (client, mut api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    // Ten requests a second for a minute.
    for _ in 0..600 {
        recorder.record(&p, Reason::CredentialError, "boom".into());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(recorder);
    let writes = api.all_writes().await;
    assert!(
        (6..=8).contains(&writes.len()),
        "{} writes for 600 occurrences in 60 s",
        writes.len()
    );
    // The last write is the flush when the recorder went away.
    for pair in writes[..writes.len() - 1].windows(2) {
        assert!(pair[1].at.duration_since(pair[0].at) >= FLUSH_INTERVAL);
    }
    assert_eq!(writes[0].method, Method::POST);
    assert!(writes[1..].iter().all(|w| w.method == Method::PATCH));
    assert_eq!(
        api.count_of("uid-1", Reason::CredentialError),
        [600],
        "exact after the final flush"
    );
    println!(
        "RELIABILITY events: 600 occurrences in 60 s -> 1 Event (count 600), {} writes",
        writes.len()
    );
}

#[tokio::test]
async fn another_reason_message_or_pod_is_another_event() {
    let (client, api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    for _ in 0..100 {
        recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    }
    recorder.record(&p, Reason::CredentialError, DENIAL.into());
    recorder.record(&p, Reason::RoleForbidden, "another message".into());
    // Same name, new uid: another pod.
    recorder.record(&pod("uid-2"), Reason::RoleForbidden, DENIAL.into());
    recorder.flush().await;
    assert_eq!(api.stored().len(), 4);
    assert_eq!(api.count_of("uid-1", Reason::RoleForbidden), [100, 1]);
    assert_eq!(api.count_of("uid-1", Reason::CredentialError), [1]);
    assert_eq!(api.count_of("uid-2", Reason::RoleForbidden), [1]);
    let names: std::collections::HashSet<_> = api
        .stored()
        .iter()
        .map(|e| e["metadata"]["name"].to_string())
        .collect();
    assert_eq!(names.len(), 4, "one name per event");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_recorder_writes_what_it_counted_at_once() {
    let (client, mut api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    let created = api.next_write().await;
    for _ in 0..4 {
        recorder
            .clone()
            .record(&p, Reason::RoleForbidden, DENIAL.into());
    }
    drop(recorder);
    let rest = api.all_writes().await;
    assert_eq!(rest.len(), 1, "{rest:#?}");
    assert_eq!(rest[0].method, Method::PATCH);
    assert_eq!(rest[0].body["count"], 5);
    assert!(rest[0].at.duration_since(created.at) < FLUSH_INTERVAL);
}

#[tokio::test]
async fn a_deleted_event_is_created_again_with_its_whole_count() {
    let (client, mut api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.flush().await;
    let created = api.next_write().await;
    api.events.lock().unwrap().clear();
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.flush().await;
    let patch = api.next_write().await;
    assert_eq!(patch.method, Method::PATCH);
    let again = api.next_write().await;
    assert_eq!(again.method, Method::POST);
    assert_eq!(
        again.body["metadata"]["name"],
        created.body["metadata"]["name"]
    );
    assert_eq!(again.body["firstTimestamp"], created.body["firstTimestamp"]);
    assert_eq!(api.count_of("uid-1", Reason::RoleForbidden), [3]);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_not_made_twice() {
    let (client, mut api) = fake_api();
    api.lose_answers.store(1, Ordering::SeqCst);
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    recorder.record(&p, Reason::CredentialError, "boom".into());
    recorder.flush().await;
    recorder.record(&p, Reason::CredentialError, "boom".into());
    recorder.flush().await;
    drop(recorder);
    let methods: Vec<Method> = api
        .all_writes()
        .await
        .into_iter()
        .map(|w| w.method)
        .collect();
    assert_eq!(methods, [Method::POST, Method::POST, Method::PATCH]);
    assert_eq!(api.count_of("uid-1", Reason::CredentialError), [2]);
}

#[tokio::test]
async fn a_pod_gets_a_bounded_number_of_events() {
    let (client, api) = fake_api();
    let recorder = EventRecorder::new(client);
    // A pod asking for a new role name each time.
    for i in 0..100 {
        recorder.record(&pod("uid-1"), Reason::RoleForbidden, format!("role r{i}"));
    }
    // Repeats of an Event it has only count.
    recorder.record(&pod("uid-1"), Reason::RoleForbidden, "role r0".into());
    recorder.record(&pod("uid-2"), Reason::RoleForbidden, "role r0".into());
    recorder.flush().await;
    let counts = api.count_of("uid-1", Reason::RoleForbidden);
    assert_eq!(counts.len(), MAX_EVENTS_PER_POD as usize);
    assert_eq!(counts.iter().sum::<i64>(), MAX_EVENTS_PER_POD as i64 + 1);
    assert_eq!(
        api.count_of("uid-2", Reason::RoleForbidden),
        [1],
        "other pods keep their own budget"
    );
}

#[tokio::test(start_paused = true)]
async fn an_event_not_repeated_for_an_hour_starts_a_new_object() {
    let (client, api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.flush().await;
    tokio::time::advance(FORGET_AFTER).await;
    recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    recorder.flush().await;
    assert_eq!(api.count_of("uid-1", Reason::RoleForbidden), [2, 1]);
}

#[test]
fn a_write_that_could_not_be_queued_is_asked_for_again() {
    let mut book = Book::default();
    let now = Instant::now();
    let wall = Timestamp::now();
    let key = || Key {
        uid: "uid-1".into(),
        reason: Reason::CredentialError,
        message: "boom".into(),
    };
    // Never written: forgotten, so the next occurrence starts afresh.
    assert!(matches!(
        book.note(&pod("uid-1"), key(), now, wall),
        Noted::Write(..)
    ));
    book.unqueue(&key());
    assert!(book.tallies.is_empty());
    // Written once: the next repeat asks again and carries the count.
    assert!(matches!(
        book.note(&pod("uid-1"), key(), now, wall),
        Noted::Write(..)
    ));
    let pending = book.take(&key(), now).unwrap();
    book.written(&key(), &pending);
    assert!(
        matches!(book.note(&pod("uid-1"), key(), now, wall), Noted::Write(_, due) if due == now + FLUSH_INTERVAL)
    );
    assert_eq!(book.note(&pod("uid-1"), key(), now, wall), Noted::Counted);
    book.unqueue(&key());
    assert!(matches!(
        book.note(&pod("uid-1"), key(), now, wall),
        Noted::Write(..)
    ));
    assert_eq!(book.take(&key(), now).unwrap().count, 4);
}

#[test]
fn names_are_unique_even_within_one_nanosecond() {
    let mut book = Book::default();
    let wall = Timestamp::now();
    let a = book.new_name("web-1", wall);
    let b = book.new_name("web-1", wall);
    assert_ne!(a, b);
    assert!(book.new_name(&"p".repeat(400), wall).len() <= 253);
}

#[test]
fn memory_is_bounded() {
    let now = Instant::now();
    let mut book = Book::default();
    for i in 0..MAX_REMEMBERED {
        let key = Key {
            uid: format!("uid-{i}").into(),
            reason: Reason::RoleForbidden,
            message: String::new(),
        };
        let at = now + Duration::from_millis(i as u64);
        book.note(&pod(&format!("uid-{i}")), key, at, Timestamp::now());
    }
    assert_eq!(book.tallies.len(), MAX_REMEMBERED);
    book.evict(now + Duration::from_secs(5));
    assert!(book.tallies.len() < MAX_REMEMBERED);
    assert!(
        book.tallies.len() >= MAX_REMEMBERED / 2,
        "only the oldest go"
    );
    assert!(
        !book.tallies.keys().any(|k| &*k.uid == "uid-0"),
        "the oldest went first"
    );
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
    let recorder = EventRecorder::disabled();
    recorder.record(&pod("u"), Reason::RoleForbidden, "x".into());
    recorder.flush().await;
}

#[tokio::test(start_paused = true)]
async fn recent_lists_a_pods_events_newest_first() {
    let (client, _api) = fake_api();
    let recorder = EventRecorder::new(client);
    let p = pod("uid-1");
    for _ in 0..3 {
        recorder.record(&p, Reason::RoleForbidden, DENIAL.into());
    }
    // Wall-clock order decides "newest"; make it unambiguous.
    std::thread::sleep(std::time::Duration::from_millis(2));
    recorder.record(&p, Reason::CredentialError, "AccessDenied".into());
    recorder.record(&pod("uid-2"), Reason::RoleForbidden, DENIAL.into());

    let recent = recorder.recent("uid-1", 5);
    let seen: Vec<(Reason, i32)> = recent.iter().map(|e| (e.reason, e.count)).collect();
    assert_eq!(
        seen,
        [(Reason::CredentialError, 1), (Reason::RoleForbidden, 3)]
    );
    assert_eq!(recent[1].message, DENIAL);
    assert!(recent[1].first <= recent[1].last);
    assert_eq!(recorder.recent("uid-1", 1).len(), 1);
    assert_eq!(recorder.recent("uid-3", 5), []);
    assert_eq!(EventRecorder::disabled().recent("uid-1", 5), []);
}
