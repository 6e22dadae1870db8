//! The Pod cache's index: pods by name, by IP and by identity, plus the
//! uids deleted recently.
//!
//! The surprise: the IP index keeps pods that are no longer live (completed,
//! past their deletion deadline). Liveness depends on the clock, so it is
//! decided when a request asks ([`PodIndex::live_on`]), not when an event
//! arrives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::model::{Identity, PodInfo, PodPhase, Prefetch};

/// How long a deleted pod's uid is remembered, so that a direct lookup that
/// raced with the deletion cannot re-insert it. A lookup's answer is at most
/// its timeout (5s) old when it is inserted, so this is ample.
const TOMBSTONE_TTL: Duration = Duration::from_secs(60);

pub(super) type PodKey = (Arc<str>, Arc<str>);

pub(super) struct CachedPod {
    pub info: Arc<PodInfo>,
    /// Resolved once per change, not per request; `None` without a
    /// (resolvable) role.
    pub identity: Option<Identity>,
    /// Lets a direct lookup replace only an older cached state of a pod.
    pub resource_version: Option<u64>,
}

impl CachedPod {
    pub(super) fn key(&self) -> PodKey {
        (self.info.namespace.clone(), self.info.name.clone())
    }

    /// Counted in the identity index: it may still ask for credentials.
    pub(super) fn uses_identity(&self) -> bool {
        self.identity.is_some() && !self.info.host_network && !self.info.phase.is_completed()
    }

    /// Worth prefetching for: has a role and an IP, and runs or is about to.
    pub(super) fn wants_prefetch(&self) -> bool {
        self.identity.is_some()
            && self.info.ips.is_some()
            && !self.info.host_network
            && self.info.deletion.is_none()
            && matches!(self.info.phase, PodPhase::Pending | PodPhase::Running)
    }
}

#[derive(Default)]
pub(super) struct PodIndex {
    pub pods: HashMap<PodKey, CachedPod>,
    /// Every cached pod under each of its IPs, live or not (liveness
    /// depends on time).
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
    /// Live pods per identity.
    pub identities: HashMap<Identity, usize>,
    /// Uids deleted in the last [`TOMBSTONE_TTL`], oldest first.
    tombstones: VecDeque<(Instant, Arc<str>)>,
    tombstoned: HashSet<Arc<str>>,
    /// During a re-list: the pods it has listed so far.
    pub relisted: Option<HashSet<PodKey>>,
}

impl PodIndex {
    pub(super) fn live_on(&self, ip: IpAddr, now: Timestamp) -> Vec<Arc<PodInfo>> {
        let Some(keys) = self.by_ip.get(&ip.to_canonical()) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| self.pods.get(k))
            .filter(|e| e.info.matches_ip_at(now))
            .map(|e| e.info.clone())
            .collect()
    }

    /// Stores `entry`; returns what to prefetch, if anything: when the pod
    /// became worth prefetching for, or what it would be given changed.
    pub(super) fn upsert(&mut self, entry: CachedPod) -> Option<Prefetch> {
        let key = entry.key();
        let old = self.remove(&key);
        let changed = old.as_ref().is_none_or(|old| {
            !old.wants_prefetch()
                || old.info.uid != entry.info.uid
                || old.identity != entry.identity
                || old.info.ips != entry.info.ips
        });
        let prefetch = match &entry.identity {
            Some(identity) if entry.wants_prefetch() && changed => Some(Prefetch {
                pod: entry.info.clone(),
                identity: identity.clone(),
            }),
            _ => None,
        };
        // Every address: a dual-stack pod is found by either.
        for ip in entry.info.ips.iter().flat_map(|ips| ips.iter()) {
            self.by_ip.entry(ip).or_default().push(key.clone());
        }
        if entry.uses_identity() {
            if let Some(identity) = &entry.identity {
                *self.identities.entry(identity.clone()).or_default() += 1;
            }
        }
        self.pods.insert(key, entry);
        prefetch
    }

    /// Stores what a direct lookup found, unless the watch already knows
    /// better: the pod was deleted meanwhile (its uid is tombstoned), or the
    /// cache holds another pod under that name or a state at least as new.
    pub(super) fn insert_fresh(&mut self, entry: CachedPod) -> Option<Prefetch> {
        if self.tombstoned.contains(&entry.info.uid) {
            return None;
        }
        let newer = match self.pods.get(&entry.key()) {
            None => true,
            Some(old) => {
                old.info.uid == entry.info.uid
                    && matches!((old.resource_version, entry.resource_version),
                                (Some(cached), Some(fresh)) if cached < fresh)
            }
        };
        if newer {
            self.upsert(entry)
        } else {
            None
        }
    }

    pub(super) fn remove(&mut self, key: &PodKey) -> Option<CachedPod> {
        let old = self.pods.remove(key)?;
        for ip in old.info.ips.iter().flat_map(|ips| ips.iter()) {
            if let Some(keys) = self.by_ip.get_mut(&ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        if old.uses_identity() {
            if let Some(identity) = &old.identity {
                if let Some(count) = self.identities.get_mut(identity) {
                    *count -= 1;
                    if *count == 0 {
                        self.identities.remove(identity);
                    }
                }
            }
        }
        Some(old)
    }

    pub(super) fn delete(&mut self, key: &PodKey, uid: &Arc<str>) {
        // A Delete for an older pod of the same name must not remove its successor.
        if self.pods.get(key).is_some_and(|e| e.info.uid == *uid) {
            self.remove(key);
        }
        self.tombstone(uid.clone());
    }

    pub(super) fn tombstone(&mut self, uid: Arc<str>) {
        let now = Instant::now();
        while let Some((at, _)) = self.tombstones.front() {
            if now.duration_since(*at) < TOMBSTONE_TTL {
                break;
            }
            if let Some((_, old)) = self.tombstones.pop_front() {
                self.tombstoned.remove(&old);
            }
        }
        if self.tombstoned.insert(uid.clone()) {
            self.tombstones.push_back((now, uid));
        }
    }

    /// Ends a re-list: pods it did not list were deleted meanwhile. Returns
    /// how many were dropped.
    pub(super) fn finish_relist(&mut self) -> usize {
        let Some(seen) = self.relisted.take() else {
            return 0;
        };
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            if let Some(old) = self.remove(key) {
                self.tombstone(old.info.uid.clone());
            }
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests;
