//! The Namespace cache keeps no Namespace objects at all: only each
//! namespace's compiled `iam.amazonaws.com/permitted` policy, compiled once
//! when the namespace is seen or changes rather than on every request.
//!
//! It may lag the API server like any watch-based cache. A namespace created
//! moments before its first pod may be missing; [`NamespaceCache::find`]
//! then asks the API server once, so such a pod is not refused by policy
//! (a refusal is final for agents). `--sync` and the task's lifetime work as
//! in [`super::pods`]: the watch is re-established every `--sync`, and it
//! stops when the last handle is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::watcher;

use super::model::PERMITTED_ANNOTATION;
use super::policy::{NamespacePolicy, Policy};
use super::watch::{Synced, Watched};

/// A cheaply cloneable handle on the Namespace cache.
#[derive(Clone)]
pub struct NamespaceCache {
    handle: Arc<Watched<NamespaceCacheState>>,
}

struct NamespaceCacheState {
    // std Mutex: no `.await` happens while it is held.
    policies: Mutex<Policies>,
    /// Compiles each namespace's annotation (strictness, default regex).
    policy: Arc<Policy>,
    api: Api<Namespace>,
    synced: Synced,
}

#[derive(Default)]
struct Policies {
    by_name: HashMap<Arc<str>, Arc<NamespacePolicy>>,
    /// During a re-list: the namespaces it has listed so far.
    relisted: Option<HashSet<Arc<str>>>,
}

impl NamespaceCache {
    /// Starts watching every Namespace. `resync` is `--sync`. Must be called
    /// inside a tokio runtime.
    pub fn spawn(client: kube::Client, policy: Arc<Policy>, resync: Duration) -> Self {
        let state = Arc::new(NamespaceCacheState {
            policies: Mutex::new(Policies::default()),
            policy,
            api: Api::all(client),
            synced: Synced::default(),
        });
        let api = state.api.clone();
        let handle = Watched::spawn(
            state,
            api,
            resync,
            "namespace",
            NamespaceCacheState::on_event,
        );
        NamespaceCache { handle }
    }

    /// The cached policy of namespace `name`, or `None` if the cache has not
    /// seen it (yet).
    pub fn get(&self, name: &str) -> Option<Arc<NamespacePolicy>> {
        self.handle
            .state
            .policies
            .lock()
            .unwrap()
            .by_name
            .get(name)
            .cloned()
    }

    /// Like [`get`](Self::get), but a namespace missing from the cache is
    /// fetched from the API server once (and cached). `Ok(None)`: it does
    /// not exist.
    pub async fn find(&self, name: &str) -> Result<Option<Arc<NamespacePolicy>>, kube::Error> {
        if let Some(policy) = self.get(name) {
            return Ok(Some(policy));
        }
        let state = &self.handle.state;
        let Some(namespace) = state.api.get_opt(name).await? else {
            return Ok(None);
        };
        let policy = Arc::new(state.compile(&namespace));
        let mut policies = state.policies.lock().unwrap();
        // The watch may have delivered it meanwhile; its version wins.
        let cached = policies
            .by_name
            .entry(name.into())
            .or_insert(policy)
            .clone();
        Ok(Some(cached))
    }

    /// How many namespaces are cached.
    pub fn len(&self) -> usize {
        self.handle.state.policies.lock().unwrap().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the first full list has been applied.
    pub fn is_synced(&self) -> bool {
        self.handle.state.synced.is_synced()
    }

    /// Waits for the first full list. Never returns while the API server is
    /// unreachable; race it against shutdown.
    pub async fn wait_synced(&self) {
        self.handle.state.synced.wait().await
    }
}

impl NamespaceCacheState {
    fn compile(&self, namespace: &Namespace) -> NamespacePolicy {
        let annotation = namespace
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PERMITTED_ANNOTATION))
            .map(String::as_str);
        let policy = self.policy.namespace(annotation);
        if let NamespacePolicy::Invalid { expression, error } = &policy {
            tracing::warn!(
                namespace = namespace.metadata.name.as_deref().unwrap_or_default(),
                %expression, %error,
                "invalid {PERMITTED_ANNOTATION} regex; this namespace permits no roles"
            );
        }
        policy
    }

    fn on_event(&self, event: watcher::Event<Namespace>) {
        let name =
            |ns: &Namespace| -> Arc<str> { ns.metadata.name.as_deref().unwrap_or_default().into() };
        match event {
            watcher::Event::Init => {
                self.policies.lock().unwrap().relisted = Some(HashSet::new());
            }
            watcher::Event::InitApply(ns) | watcher::Event::Apply(ns) => {
                let name = name(&ns);
                let policy = Arc::new(self.compile(&ns));
                let mut policies = self.policies.lock().unwrap();
                if let Some(seen) = policies.relisted.as_mut() {
                    seen.insert(name.clone());
                }
                policies.by_name.insert(name, policy);
            }
            watcher::Event::Delete(ns) => {
                self.policies.lock().unwrap().by_name.remove(&name(&ns));
            }
            watcher::Event::InitDone => {
                {
                    let mut policies = self.policies.lock().unwrap();
                    if let Some(seen) = policies.relisted.take() {
                        policies.by_name.retain(|name, _| seen.contains(name));
                    }
                }
                if !self.synced.is_synced() {
                    tracing::info!("namespace cache synced");
                }
                self.synced.set();
            }
        }
    }
}
