//! The fake's etcd: objects, the global resourceVersion counter, the bounded event history
//! that watches replay from, and the list snapshots that continue tokens read.
//!
//! Unlike etcd, events can be *held*: while held they are applied (LIST and GET see them)
//! but neither broadcast to watchers nor added to the replayable history, so tests can
//! open the window between a list and a watch that real clusters only open by chance.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

use super::resources::{metadata_mut, Resource};
use super::status::ApiError;

/// `(namespace, name)`; namespace is "" for cluster-scoped objects. Ordering it gives lists
/// etcd's key order.
pub type Key = (String, String);

/// All objects of one resource type. Copy-on-write behind an `Arc` so a list snapshot for
/// a continue token costs a pointer until the next write.
pub type Objects = Arc<BTreeMap<Key, Arc<Value>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as history keeps it and watchers receive it.
#[derive(Debug)]
pub struct Record {
    pub rv: u64,
    pub resource: Resource,
    /// Where the object is stored.
    pub key: Key,
    pub kind: EventType,
    /// The object after the change (for a deletion, the last state with the deletion's
    /// resourceVersion, as a real DELETED event carries).
    pub object: Arc<Value>,
    /// The object before the change, so a selector watch can tell "stopped matching"
    /// (sent as DELETED) from "changed while matching".
    pub previous: Option<Arc<Value>>,
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// resourceVersion "" or "0": synthetic ADDED events for what exists now, then changes.
    Now,
    /// A resourceVersion from an earlier list or event: replay every later change.
    After(u64),
}

/// What a new watch sends before live events.
pub struct Subscription {
    /// Objects to announce as synthetic ADDED events (for [`WatchStart::Now`]).
    pub initial: Vec<Arc<Value>>,
    /// Changes since the requested resourceVersion, oldest first.
    pub replay: Vec<Arc<Record>>,
    /// The resourceVersion the watch is at once `initial` and `replay` are sent.
    pub start_rv: u64,
    pub live: broadcast::Receiver<Arc<Record>>,
}

/// Fields of pods the store indexes for field selectors, so a `status.podIP=` or
/// `spec.nodeName=` LIST over a large cluster does not walk every pod. The real API
/// server's watch cache indexes `spec.nodeName` and scans for `status.podIP`; the results
/// are the same, only the cost differs.
pub const POD_INDEXED_FIELDS: [&str; 2] = ["status.podIP", "spec.nodeName"];

/// The indexed field's value of a pod, as a field selector compares it.
fn indexed_value<'v>(obj: &'v Value, field: &str) -> Option<&'v str> {
    let (a, b) = field.split_once('.')?;
    obj.get(a)?.get(b)?.as_str().filter(|v| !v.is_empty())
}

/// value -> keys of the pods that have it, per indexed field.
type FieldIndex = HashMap<String, BTreeSet<Key>>;

/// How many list snapshots continue tokens can refer to; older tokens get 410.
const SNAPSHOT_LIMIT: usize = 32;

/// Enough for every test; a watcher that falls further behind is disconnected and resumes
/// from history.
const BROADCAST_CAPACITY: usize = 4096;

struct State {
    rv: u64,
    objects: Vec<Objects>,
    history: VecDeque<Arc<Record>>,
    history_limit: usize,
    /// Watches and continue tokens older than this get 410 Expired.
    compacted_rv: u64,
    /// `Some` while events are held back from watchers.
    held: Option<Vec<Arc<Record>>>,
    /// Lists a continue token may read. `None` until a later page is asked for: the
    /// snapshot is then rebuilt from the current objects and the history since, so a
    /// first page (e.g. `limit=1` to read the resourceVersion) neither copies the map
    /// nor makes the next write copy it (which sharing the map's `Arc` would).
    snapshots: VecDeque<(Resource, u64, Option<Objects>)>,
    /// Pods by [`POD_INDEXED_FIELDS`] (same order), for the current objects only.
    pod_index: [FieldIndex; 2],
}

/// The object store shared by every connection.
pub struct Store {
    // std Mutex: no `.await` happens while it is held, and every operation is short.
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Record>>,
}

/// Write access inside one [`Store::write`] call; every change gets the next resourceVersion.
pub struct Writer<'a> {
    state: &'a mut State,
    live: &'a broadcast::Sender<Arc<Record>>,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (live, _) = broadcast::channel(BROADCAST_CAPACITY);
        Store {
            state: Mutex::new(State {
                rv: 1,
                objects: Resource::ALL.iter().map(|_| Objects::default()).collect(),
                history: VecDeque::new(),
                history_limit,
                compacted_rv: 0,
                held: None,
                snapshots: VecDeque::new(),
                pod_index: Default::default(),
            }),
            live,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock cannot leave the maps half-written in a way that matters
        // more than losing the whole fake, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, res: Resource, key: &Key) -> Option<Arc<Value>> {
        self.lock().objects[res.index()].get(key).cloned()
    }

    /// Every object of a type and the resourceVersion they are current at.
    pub fn list(&self, res: Resource) -> (u64, Objects) {
        let state = self.lock();
        (state.rv, state.objects[res.index()].clone())
    }

    /// Every current pod whose indexed `field` (one of [`POD_INDEXED_FIELDS`]) equals
    /// `value`, in key order, with the objects and the resourceVersion they are current at.
    /// `None` if the field is not indexed (or `value` is empty).
    pub fn list_indexed(
        &self,
        res: Resource,
        field: &str,
        value: &str,
    ) -> Option<(u64, Objects, Vec<Key>)> {
        let i = POD_INDEXED_FIELDS.iter().position(|f| *f == field)?;
        // Pods without the field match "" and are not indexed: scan for those.
        if res != Resource::Pods || value.is_empty() {
            return None;
        }
        let state = self.lock();
        let keys = state.pod_index[i]
            .get(value)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        Some((state.rv, state.objects[res.index()].clone(), keys))
    }

    /// Keeps a list at `rv` for later pages of a paginated LIST (built only if one is
    /// asked for; see [`State::snapshots`]).
    pub fn save_snapshot(&self, res: Resource, rv: u64) {
        let mut state = self.lock();
        if state
            .snapshots
            .iter()
            .any(|(r, v, _)| *r == res && *v == rv)
        {
            return;
        }
        state.snapshots.push_back((res, rv, None));
        while state.snapshots.len() > SNAPSHOT_LIMIT {
            state.snapshots.pop_front();
        }
    }

    /// The objects of a type as they were at `rv`, if a list at `rv` was saved and the
    /// changes since are still in history (else the token has expired: 410).
    pub fn snapshot(&self, res: Resource, rv: u64) -> Option<Objects> {
        let mut state = self.lock();
        let at = state
            .snapshots
            .iter()
            .position(|(r, v, _)| *r == res && *v == rv)?;
        if let Some(objects) = &state.snapshots[at].2 {
            return Some(objects.clone());
        }
        if rv < state.compacted_rv {
            return None;
        }
        // Undo every later change to this type, newest first.
        let mut objects = (*state.objects[res.index()]).clone();
        let later = state.history.iter().chain(state.held.iter().flatten());
        let mut undo: Vec<&Arc<Record>> =
            later.filter(|r| r.rv > rv && r.resource == res).collect();
        undo.sort_by_key(|r| std::cmp::Reverse(r.rv));
        for record in undo {
            match (&record.kind, &record.previous) {
                (EventType::Added, _) | (_, None) => {
                    objects.remove(&record.key);
                }
                (_, Some(previous)) => {
                    objects.insert(record.key.clone(), previous.clone());
                }
            }
        }
        let objects = Arc::new(objects);
        state.snapshots[at].2 = Some(objects.clone());
        Some(objects)
    }

    /// Runs `f` with exclusive write access; its changes are published when it returns.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut state = self.lock();
        let mut writer = Writer {
            state: &mut state,
            live: &self.live,
        };
        f(&mut writer)
    }

    pub fn subscribe(&self, res: Resource, start: WatchStart) -> Result<Subscription, ApiError> {
        let state = self.lock();
        let live = self.live.subscribe();
        match start {
            WatchStart::Now => Ok(Subscription {
                initial: state.objects[res.index()].values().cloned().collect(),
                replay: Vec::new(),
                start_rv: state.rv,
                live,
            }),
            WatchStart::After(rv) if rv < state.compacted_rv => Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                state.compacted_rv
            ))),
            WatchStart::After(rv) => Ok(Subscription {
                initial: Vec::new(),
                replay: state
                    .history
                    .iter()
                    .filter(|r| r.rv > rv && r.resource == res)
                    .cloned()
                    .collect(),
                start_rv: rv,
                live,
            }),
        }
    }

    /// Forgets history and list snapshots, like an etcd compaction at the current revision.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted_rv = state.rv;
        state.history.clear();
        state.snapshots.clear();
    }

    /// Starts or stops holding events back from watchers; stopping delivers the held
    /// events in order.
    pub fn hold(&self, hold: bool) {
        let mut state = self.lock();
        match (hold, state.held.take()) {
            (true, held) => state.held = Some(held.unwrap_or_default()),
            (false, Some(held)) => {
                for record in held {
                    publish(&mut state, &self.live, record);
                }
            }
            (false, None) => {}
        }
    }
}

fn publish(state: &mut State, live: &broadcast::Sender<Arc<Record>>, record: Arc<Record>) {
    if let Some(held) = &mut state.held {
        held.push(record);
        return;
    }
    // Events from before a compaction (released from hold afterwards) are not replayable.
    if record.rv > state.compacted_rv {
        state.history.push_back(record.clone());
    }
    while state.history.len() > state.history_limit {
        if let Some(old) = state.history.pop_front() {
            state.compacted_rv = state.compacted_rv.max(old.rv);
        }
    }
    // No receivers is fine: nobody is watching.
    let _ = live.send(record);
}

impl Writer<'_> {
    pub fn get(&self, res: Resource, key: &Key) -> Option<Arc<Value>> {
        self.state.objects[res.index()].get(key).cloned()
    }

    pub fn objects(&self, res: Resource) -> Objects {
        self.state.objects[res.index()].clone()
    }

    /// Stores `obj` under `key` with the next resourceVersion and emits ADDED or MODIFIED.
    /// Storing an unchanged object is a no-op that returns the stored one, as on a real server.
    pub fn put(&mut self, res: Resource, key: Key, mut obj: Value) -> Arc<Value> {
        let previous = self.get(res, &key);
        if let Some(prev) = &previous {
            if super::resources::same_content(prev, &obj) {
                return prev.clone();
            }
        }
        self.state.rv += 1;
        let rv = self.state.rv;
        metadata_mut(&mut obj).insert("resourceVersion".into(), rv.to_string().into());
        let obj = Arc::new(obj);
        if res == Resource::Pods {
            self.reindex(&key, previous.as_deref(), Some(&obj));
        }
        Arc::make_mut(&mut self.state.objects[res.index()]).insert(key.clone(), obj.clone());
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(Record {
            rv,
            resource: res,
            key,
            kind,
            object: obj.clone(),
            previous,
        });
        obj
    }

    /// Removes an object, emitting DELETED with a new resourceVersion; returns its last state.
    pub fn remove(&mut self, res: Resource, key: &Key) -> Option<Arc<Value>> {
        let previous = Arc::make_mut(&mut self.state.objects[res.index()]).remove(key)?;
        if res == Resource::Pods {
            self.reindex(key, Some(&previous), None);
        }
        self.state.rv += 1;
        let rv = self.state.rv;
        let mut last = (*previous).clone();
        metadata_mut(&mut last).insert("resourceVersion".into(), rv.to_string().into());
        let last = Arc::new(last);
        self.emit(Record {
            rv,
            resource: res,
            key: key.clone(),
            kind: EventType::Deleted,
            object: last.clone(),
            previous: Some(previous),
        });
        Some(last)
    }

    /// Moves `key` in the pod field indexes from `old`'s values to `new`'s.
    fn reindex(&mut self, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        for (i, field) in POD_INDEXED_FIELDS.iter().enumerate() {
            let before = old.and_then(|o| indexed_value(o, field));
            let after = new.and_then(|o| indexed_value(o, field));
            if before == after {
                continue;
            }
            let index = &mut self.state.pod_index[i];
            if let Some(v) = before {
                if let Some(keys) = index.get_mut(v) {
                    keys.remove(key);
                    if keys.is_empty() {
                        index.remove(v);
                    }
                }
            }
            if let Some(v) = after {
                index.entry(v.to_string()).or_default().insert(key.clone());
            }
        }
    }

    fn emit(&mut self, record: Record) {
        publish(self.state, self.live, Arc::new(record));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> Key {
        ("ns".into(), name.into())
    }

    fn put(store: &Store, name: &str, value: i64) -> Arc<Value> {
        store
            .write(|w| {
                Ok(w.put(
                    Resource::Pods,
                    key(name),
                    json!({"metadata": {"name": name}, "v": value}),
                ))
            })
            .unwrap()
    }

    #[test]
    fn every_change_gets_a_new_resource_version_and_noops_do_not() {
        let store = Store::new(100);
        let a = put(&store, "a", 1);
        let again = put(&store, "a", 1);
        let changed = put(&store, "a", 2);
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(again["metadata"]["resourceVersion"], "2");
        assert_eq!(changed["metadata"]["resourceVersion"], "3");
        let gone = store
            .write(|w| Ok(w.remove(Resource::Pods, &key("a"))))
            .unwrap()
            .unwrap();
        assert_eq!(gone["metadata"]["resourceVersion"], "4");
        assert_eq!(store.resource_version(), 4);
    }

    #[test]
    fn watches_replay_history_until_it_is_compacted() {
        let store = Store::new(100);
        put(&store, "a", 1);
        put(&store, "b", 1);
        let sub = store
            .subscribe(Resource::Pods, WatchStart::After(2))
            .unwrap();
        assert_eq!(sub.replay.len(), 1);
        assert_eq!(sub.replay[0].object["metadata"]["name"], "b");
        store.compact();
        let err = store
            .subscribe(Resource::Pods, WatchStart::After(2))
            .err()
            .unwrap();
        assert_eq!((err.code, err.reason), (410, "Expired"));
        assert!(store
            .subscribe(Resource::Pods, WatchStart::After(3))
            .is_ok());
    }

    #[test]
    fn bounded_history_expires_the_oldest_versions() {
        let store = Store::new(2);
        for v in 0..4 {
            put(&store, "a", v);
        }
        // rv 2..5 were written; only 4 and 5 are kept.
        assert!(store
            .subscribe(Resource::Pods, WatchStart::After(2))
            .is_err());
        assert_eq!(
            store
                .subscribe(Resource::Pods, WatchStart::After(3))
                .unwrap()
                .replay
                .len(),
            2
        );
    }

    #[test]
    fn held_events_are_visible_but_not_published_until_released() {
        let store = Store::new(100);
        let mut sub = store
            .subscribe(Resource::Pods, WatchStart::After(1))
            .unwrap();
        store.hold(true);
        put(&store, "a", 1);
        assert!(store.get(Resource::Pods, &key("a")).is_some());
        assert!(sub.live.try_recv().is_err());
        assert!(store
            .subscribe(Resource::Pods, WatchStart::After(1))
            .unwrap()
            .replay
            .is_empty());
        store.hold(false);
        assert_eq!(sub.live.try_recv().unwrap().rv, 2);
    }

    fn pod(name: &str, ip: &str, node: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"},
               "spec": {"nodeName": node}, "status": {"podIP": ip}})
    }

    #[test]
    fn a_saved_list_is_rebuilt_as_it_was_when_a_later_page_asks() {
        let store = Store::new(100);
        put(&store, "a", 1);
        put(&store, "b", 1);
        let (rv, _) = store.list(Resource::Pods);
        store.save_snapshot(Resource::Pods, rv);
        // Changes after the list: a modified, b deleted, c added.
        put(&store, "a", 2);
        store
            .write(|w| Ok(w.remove(Resource::Pods, &key("b"))))
            .unwrap();
        put(&store, "c", 1);
        let snap = store.snapshot(Resource::Pods, rv).unwrap();
        let names: Vec<&str> = snap.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(snap[&key("a")]["v"], 1);
        // The rebuilt list is kept: later writes do not change it.
        put(&store, "a", 3);
        assert_eq!(
            store.snapshot(Resource::Pods, rv).unwrap()[&key("a")]["v"],
            1
        );
        // An unsaved version, or one compacted away, is expired.
        assert!(store.snapshot(Resource::Pods, rv + 1).is_none());
        let (rv2, _) = store.list(Resource::Pods);
        store.save_snapshot(Resource::Pods, rv2);
        put(&store, "d", 1);
        store.compact();
        assert!(store.snapshot(Resource::Pods, rv2).is_none());
    }

    #[test]
    fn pods_are_indexed_by_ip_and_node_as_they_change() {
        let store = Store::new(100);
        let put_pod = |name: &str, ip: &str, node: &str| {
            store
                .write(|w| Ok(w.put(Resource::Pods, key(name), pod(name, ip, node))))
                .unwrap()
        };
        put_pod("a", "10.0.0.1", "n1");
        put_pod("b", "10.0.0.1", "n2");
        let keys = |field: &str, value: &str| {
            store
                .list_indexed(Resource::Pods, field, value)
                .unwrap()
                .2
                .into_iter()
                .map(|k| k.1)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys("status.podIP", "10.0.0.1"), ["a", "b"]);
        put_pod("b", "10.0.0.2", "n2");
        assert_eq!(keys("status.podIP", "10.0.0.1"), ["a"]);
        assert_eq!(keys("status.podIP", "10.0.0.2"), ["b"]);
        store
            .write(|w| Ok(w.remove(Resource::Pods, &key("a"))))
            .unwrap();
        assert!(keys("status.podIP", "10.0.0.1").is_empty());
        assert_eq!(keys("spec.nodeName", "n2"), ["b"]);
        assert!(store
            .list_indexed(Resource::Pods, "status.podIP", "")
            .is_none());
        assert!(store
            .list_indexed(Resource::Pods, "status.phase", "Running")
            .is_none());
    }
}
