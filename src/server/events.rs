//! Kubernetes Events on a Pod when kiam refuses it a role or cannot fetch
//! its credentials, so `kubectl describe pod` shows why.
//!
//! Repeats are counted, not written each time: the same (pod uid, reason,
//! message) is one Event object whose `count` and `lastTimestamp` grow, as
//! with client-go's event recorder, so `kubectl describe pod` shows
//! "(x10 over 2m)". The first occurrence is created at once; later ones are
//! coalesced and written (a merge PATCH of `count` and `lastTimestamp`) at
//! most once per ten seconds per event, so a Pod retrying in a loop costs
//! one API write per ten seconds, not one per request. Counts still
//! waiting when the last clone of the recorder is dropped, or on
//! [`EventRecorder::flush`], are written then, so the final count is exact.
//! An Event deleted meanwhile (the API server's `--event-ttl` is an hour by
//! default) is created again, under the same name and with the whole count.
//!
//! A Pod gets at most [`MAX_EVENTS_PER_POD`] distinct Events per five
//! minutes whatever their messages (which quote the role a pod asked for,
//! so could be made new each time), and messages are cut to
//! [`MAX_MESSAGE`] bytes. Recording never blocks and never fails: writes go
//! through a bounded queue to one writer task, a full queue drops the write
//! (the next repeat carries its count), and API errors are only logged.
//!
//! Each server replica counts its own Events (they differ in
//! `reportingInstance`), as each client-go recorder does: a denial repeated
//! across N replicas is at most N objects.
//!
//! Events are core/v1 (`/api/v1/namespaces/{ns}/events`), the API kiam and
//! `kubectl describe` use, with `source.component: kiam` and
//! `reportingComponent: kiam-server`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::model::PodInfo;

/// Why kiam writes an Event (its `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Repeats of one event are written at most once per this interval.
const FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// The window of the per-pod budget ([`MAX_EVENTS_PER_POD`]).
const BUDGET_WINDOW: Duration = Duration::from_secs(5 * 60);
/// An event not repeated for this long is forgotten, and a later repeat
/// starts a new object: by then the API server has usually dropped the old
/// one (its default `--event-ttl` is an hour).
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// Bounds the events (and pod budgets) remembered; past it the oldest are
/// forgotten.
const MAX_REMEMBERED: usize = 4096;
/// Writes waiting for the writer; more are dropped.
const QUEUE: usize = 256;
/// One API write may not hold the queue longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Kubernetes object names are at most 253 characters; the suffix is ≤ 33.
const MAX_NAME_PREFIX: usize = 200;
/// At most this many distinct Events per pod per five minutes, whatever
/// their messages: a pod asking for ever-new role names must not turn kiam
/// into a stream of new objects. Repeats of an Event it has only count.
pub const MAX_EVENTS_PER_POD: u32 = 10;
/// Messages are cut to this many bytes (the limit events.k8s.io puts on a
/// note): they may quote annotations and requested roles, which a pod or a
/// namespace owner can make arbitrarily long. Cutting also bounds the
/// recorder's memory.
pub const MAX_MESSAGE: usize = 1024;

const SOURCE_COMPONENT: &str = "kiam";
const REPORTING_COMPONENT: &str = "kiam-server";

/// What makes two occurrences the same Event. The pod's namespace and name
/// are not part of it: the uid already tells pods apart, including a new
/// pod that took an old one's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    uid: Arc<str>,
    reason: Reason,
    message: String,
}

/// One Event object as this recorder knows it.
struct Tally {
    namespace: Arc<str>,
    pod: Arc<str>,
    /// `metadata.name`, chosen at the first occurrence and kept, so every
    /// write of this event goes to one object.
    name: String,
    first: Timestamp,
    last: Timestamp,
    /// Occurrences recorded.
    count: i32,
    /// The count the API server was last told; 0 until the object exists.
    written: i32,
    /// A write of this event waits in the queue or the writer's schedule, so
    /// a repeat only counts.
    queued: bool,
    last_seen: Instant,
    /// When the writer last took this event: the next write waits
    /// [`FLUSH_INTERVAL`] from here.
    last_write: Option<Instant>,
}

/// Everything the recorder remembers, behind one lock.
#[derive(Default)]
struct Book {
    tallies: HashMap<Arc<Key>, Tally>,
    /// Per pod uid: when its budget window started and how many Events it
    /// got since.
    per_pod: HashMap<Arc<str>, (Instant, u32)>,
    /// The last name suffix handed out: two Events of one pod recorded in
    /// the same nanosecond still get different names.
    last_nanos: i128,
}

/// What [`Book::note`] made of one occurrence.
#[derive(Debug, PartialEq)]
enum Noted {
    /// Counted; a write is already on its way.
    Counted,
    /// A new event, but its pod's budget is spent.
    OverBudget,
    /// The writer must write this event at `due` or later.
    Write(Arc<Key>, Instant),
}

impl Book {
    fn note(&mut self, pod: &PodInfo, key: Key, now: Instant, wall: Timestamp) -> Noted {
        let key = Arc::new(key);
        if let Some(tally) = self.tallies.get_mut(&key) {
            if now.duration_since(tally.last_seen) < FORGET_AFTER {
                tally.count = tally.count.saturating_add(1);
                tally.last = wall;
                tally.last_seen = now;
                if tally.queued {
                    return Noted::Counted;
                }
                tally.queued = true;
                let due = tally
                    .last_write
                    .map_or(now, |at| (at + FLUSH_INTERVAL).max(now));
                return Noted::Write(key, due);
            }
            self.tallies.remove(&key);
        }
        if !self.take_budget(&pod.uid, now) {
            return Noted::OverBudget;
        }
        if self.tallies.len() >= MAX_REMEMBERED {
            self.evict(now);
        }
        let name = self.new_name(&pod.name, wall);
        self.tallies.insert(
            key.clone(),
            Tally {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                name,
                first: wall,
                last: wall,
                count: 1,
                written: 0,
                queued: true,
                last_seen: now,
                last_write: None,
            },
        );
        Noted::Write(key, now)
    }

    /// The write [`Book::note`] asked for could not be queued. An event never
    /// written is forgotten, so its next occurrence tries again from
    /// scratch; otherwise the next repeat asks again and carries the count.
    fn unqueue(&mut self, key: &Key) {
        let Some(tally) = self.tallies.get_mut(key) else {
            return;
        };
        if tally.last_write.is_none() {
            self.tallies.remove(key);
        } else {
            tally.queued = false;
        }
    }

    /// Counts one new Event against `uid`'s budget; false when it is spent.
    fn take_budget(&mut self, uid: &Arc<str>, now: Instant) -> bool {
        let per_pod = &mut self.per_pod;
        if per_pod.len() >= MAX_REMEMBERED && !per_pod.contains_key(uid) {
            per_pod.retain(|_, (start, _)| now.duration_since(*start) < BUDGET_WINDOW);
            if per_pod.len() >= MAX_REMEMBERED {
                // Only loosens the budget for a moment; memory stays bounded.
                per_pod.clear();
            }
        }
        let (start, count) = per_pod.entry(uid.clone()).or_insert((now, 0));
        if now.duration_since(*start) >= BUDGET_WINDOW {
            (*start, *count) = (now, 0);
        }
        if *count >= MAX_EVENTS_PER_POD {
            return false;
        }
        *count += 1;
        true
    }

    /// Forgets events not repeated for [`FORGET_AFTER`], then the least
    /// recently seen ones until there is room. A count not yet written is
    /// lost with its event: memory stays bounded.
    fn evict(&mut self, now: Instant) {
        let tallies = &mut self.tallies;
        tallies.retain(|_, t| now.duration_since(t.last_seen) < FORGET_AFTER);
        if tallies.len() >= MAX_REMEMBERED {
            let mut ages: Vec<Instant> = tallies.values().map(|t| t.last_seen).collect();
            ages.sort_unstable();
            // Free a quarter at once so eviction is not paid on every insert.
            let cutoff = ages[ages.len() / 4];
            tallies.retain(|_, t| t.last_seen > cutoff);
        }
    }

    /// client-go's convention, `<object>.<hex unix nanos>`, made unique.
    fn new_name(&mut self, pod: &str, wall: Timestamp) -> String {
        let nanos = wall.as_nanosecond().max(self.last_nanos + 1);
        self.last_nanos = nanos;
        let prefix: String = pod.chars().take(MAX_NAME_PREFIX).collect();
        format!("{prefix}.{nanos:x}")
    }

    /// Copies out what the writer needs to write `key`, and marks it taken;
    /// `None` when there is nothing new to write.
    fn take(&mut self, key: &Key, now: Instant) -> Option<Pending> {
        let tally = self.tallies.get_mut(key)?;
        tally.queued = false;
        if tally.written == tally.count {
            return None;
        }
        tally.last_write = Some(now);
        Some(Pending {
            namespace: tally.namespace.clone(),
            pod: tally.pod.clone(),
            uid: key.uid.clone(),
            reason: key.reason,
            message: key.message.clone(),
            name: tally.name.clone(),
            first: tally.first,
            last: tally.last,
            count: tally.count,
            written: tally.written,
        })
    }

    /// The API server now has `pending`'s count.
    fn written(&mut self, key: &Key, pending: &Pending) {
        if let Some(tally) = self.tallies.get_mut(key) {
            // The event may have been forgotten and started anew meanwhile.
            if tally.name == pending.name {
                tally.written = tally.written.max(pending.count);
            }
        }
    }

    /// Events with a write waiting or a count not yet written.
    fn unwritten(&self) -> Vec<Arc<Key>> {
        self.tallies
            .iter()
            .filter(|(_, t)| t.queued || t.written != t.count)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// What the recorder asks of the writer.
enum Command {
    /// Write this event's count at `due` or later.
    Write { key: Arc<Key>, due: Instant },
    /// Write every count not yet written now, then answer.
    Flush(oneshot::Sender<()>),
}

/// The recorders' side; the writer holds the book too, but not the sender,
/// so the queue closes when the last recorder goes.
struct RecorderState {
    book: Arc<Mutex<Book>>,
    tx: mpsc::Sender<Command>,
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    // A std Mutex: no `.await` happens under it, and it is held only to
    // count or copy.
    book.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes aggregated Warning Events on Pods. Cheap to clone; the writer
/// task writes what is left and ends when the last clone is dropped.
#[derive(Clone)]
pub struct EventRecorder {
    shared: Option<Arc<RecorderState>>,
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
        let book = Arc::new(Mutex::new(Book::default()));
        let instance = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| REPORTING_COMPONENT.to_string());
        let writer = Writer {
            client,
            book: book.clone(),
            instance,
        };
        tokio::spawn(writer.run(rx));
        EventRecorder {
            shared: Some(Arc::new(RecorderState { book, tx })),
        }
    }

    /// A recorder that writes nothing (tests, tools).
    pub fn disabled() -> Self {
        EventRecorder { shared: None }
    }

    /// Records one occurrence of a Warning Event on `pod`: a new Event, or
    /// one more in the count of the same one. Never blocks, never fails.
    pub fn record(&self, pod: &PodInfo, reason: Reason, message: String) {
        let Some(shared) = &self.shared else { return };
        let key = Key {
            uid: pod.uid.clone(),
            reason,
            message: shorten(message),
        };
        let noted = lock(&shared.book).note(pod, key, Instant::now(), Timestamp::now());
        match noted {
            Noted::Counted => {}
            Noted::OverBudget => tracing::debug!(
                pod.namespace = %pod.namespace, pod.name = %pod.name, reason = reason.as_str(),
                "the pod had {MAX_EVENTS_PER_POD} Events in the last five minutes; not writing another"
            ),
            Noted::Write(key, due) => {
                if let Err(e) = shared.tx.try_send(Command::Write {
                    key: key.clone(),
                    due,
                }) {
                    tracing::debug!(
                        pod.namespace = %pod.namespace, pod.name = %pod.name, reason = reason.as_str(),
                        error = %e, "event queue full; dropping the write"
                    );
                    lock(&shared.book).unqueue(&key);
                }
            }
        }
    }

    /// The last `n` Events recorded for the pod with this uid (newest
    /// first), as this server counted them, for `kiam explain`.
    pub fn recent(&self, uid: &str, n: usize) -> Vec<Recorded> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let book = lock(&shared.book);
        let mut found: Vec<Recorded> = book
            .tallies
            .iter()
            .filter(|(key, _)| &*key.uid == uid)
            .map(|(key, t)| Recorded {
                reason: key.reason,
                message: key.message.clone(),
                count: t.count,
                first: t.first,
                last: t.last,
            })
            .collect();
        found.sort_by_key(|e| std::cmp::Reverse(e.last));
        found.truncate(n);
        found
    }

    /// Writes every count not yet written without waiting for the flush
    /// interval, and returns once that is done (or the writer is gone).
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else { return };
        let (done, wait) = oneshot::channel();
        if shared.tx.send(Command::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// One Event as [`EventRecorder::recent`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub reason: Reason,
    pub message: String,
    pub count: i32,
    pub first: Timestamp,
    pub last: Timestamp,
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

/// One write's worth of an event, copied out of the book so that no lock
/// is held across the API call.
struct Pending {
    namespace: Arc<str>,
    pod: Arc<str>,
    uid: Arc<str>,
    reason: Reason,
    message: String,
    name: String,
    first: Timestamp,
    last: Timestamp,
    count: i32,
    /// What the API server has (0: the object does not exist yet).
    written: i32,
}

impl Pending {
    fn event(&self, instance: &str) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.to_string()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(self.namespace.to_string()),
                name: Some(self.pod.to_string()),
                uid: Some(self.uid.to_string()),
                ..Default::default()
            },
            reason: Some(self.reason.as_str().into()),
            message: Some(self.message.clone()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(SOURCE_COMPONENT.into()),
                host: None,
            }),
            reporting_component: Some(REPORTING_COMPONENT.into()),
            reporting_instance: Some(instance.to_string()),
            first_timestamp: Some(Time(self.first)),
            last_timestamp: Some(Time(self.last)),
            count: Some(self.count),
            ..Default::default()
        }
    }

    /// What a repeat changes. The count is absolute, not an increment, so a
    /// write that is retried or lands twice cannot over-count.
    fn patch(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "lastTimestamp": Time(self.last),
        })
    }
}

/// The task that writes: the only one talking to the API server.
struct Writer {
    client: kube::Client,
    book: Arc<Mutex<Book>>,
    /// Who reports (`reportingInstance`): the server's pod name.
    instance: String,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Command>) {
        // Writes asked for, by when they are due.
        let mut schedule: BinaryHeap<Reverse<(Instant, Arc<Key>)>> = BinaryHeap::new();
        loop {
            let next = schedule.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                // Commands first: taking one is cheap, and a flush must see
                // the writes asked for before it.
                biased;
                command = rx.recv() => match command {
                    Some(Command::Write { key, due }) => schedule.push(Reverse((due, key))),
                    Some(Command::Flush(done)) => {
                        self.flush(&mut schedule).await;
                        let _ = done.send(());
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    if let Some(Reverse((_, key))) = schedule.pop() {
                        self.write(&key).await;
                    }
                }
            }
        }
        // Every recorder is gone: write what they counted.
        self.flush(&mut schedule).await;
    }

    /// Writes everything scheduled or not yet written, now.
    async fn flush(&self, schedule: &mut BinaryHeap<Reverse<(Instant, Arc<Key>)>>) {
        let mut keys: Vec<Arc<Key>> = Vec::with_capacity(schedule.len());
        while let Some(Reverse((_, key))) = schedule.pop() {
            keys.push(key);
        }
        keys.extend(lock(&self.book).unwritten());
        // Once each: a write that fails is not retried at once.
        let mut done = HashSet::with_capacity(keys.len());
        for key in keys {
            if done.insert(key.clone()) {
                self.write(&key).await;
            }
        }
    }

    async fn write(&self, key: &Key) {
        let Some(pending) = lock(&self.book).take(key, Instant::now()) else {
            return;
        };
        let (ns, pod, reason) = (&pending.namespace, &pending.pod, key.reason.as_str());
        match tokio::time::timeout(WRITE_TIMEOUT, self.put(&pending)).await {
            Ok(Ok(())) => {
                lock(&self.book).written(key, &pending);
                tracing::debug!(pod.namespace = %ns, pod.name = %pod, reason, count = pending.count,
                    "recorded event");
            }
            // The count stays unwritten; the next repeat or flush carries it.
            Ok(Err(e)) => {
                tracing::warn!(pod.namespace = %ns, pod.name = %pod, reason, error = %e,
                    "could not record event");
            }
            Err(_) => {
                tracing::warn!(pod.namespace = %ns, pod.name = %pod, reason,
                    "could not record event: the API server did not answer in time");
            }
        }
    }

    async fn put(&self, pending: &Pending) -> Result<(), kube::Error> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pending.namespace);
        let event = pending.event(&self.instance);
        let patch = Patch::Merge(pending.patch());
        let (post, merge) = (PostParams::default(), PatchParams::default());
        let create = || api.create(&post, &event);
        let patch = || api.patch(&pending.name, &merge, &patch);
        if pending.written > 0 {
            match patch().await {
                // Deleted meanwhile (by hand, or its TTL ran out): create it
                // again, whole count and all, as client-go does.
                Err(kube::Error::Api(s)) if s.is_not_found() => create().await.map(drop),
                other => other.map(drop),
            }
        } else {
            match create().await {
                // An earlier create whose answer was lost did land.
                Err(kube::Error::Api(s)) if s.is_already_exists() => patch().await.map(drop),
                other => other.map(drop),
            }
        }
    }
}

#[cfg(test)]
mod tests;
