//! `--prefetch-peers` and `--advertise-ip`: each pod is prefetched by one
//! server, the one that owns its IP among the servers ([`crate::shard`]),
//! and agents ask that server first.
//!
//! The surprise: sharing is an optimisation that turns itself off. Only
//! when this server finds itself (`--advertise-ip` and the port of
//! `--bind`) among two or more resolved peers does it skip pods it does not
//! own; with the flags unset, a lookup that fails, itself missing from the
//! answer or no other peer, it prefetches every pod as before and says why
//! once. Ownership never decides who may have which credentials: every
//! server answers every pod it can identify, so a stale or wrong membership
//! costs an STS call or a cold first request, never a wrong answer.
//!
//! Refresh follows ownership too ([`Peers::in_use`]): an identity this
//! server fetched only because an agent failed over to it is not kept
//! fresh here unless a live pod this server owns uses it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::model::{Identity, Prefetch};
use super::pods::PodCache;
use crate::agent::server_address::{Resolve, SystemResolver, Target};

/// How often `--prefetch-peers` is resolved again (servers come and go in
/// a rollout; agents re-resolve every 15 s).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Pods gone from the Pod cache are forgotten every this many refreshes
/// (a minute); identities the credential cache asks about are cleaned as
/// they are asked.
const PRUNE_EVERY: u64 = 6;
/// A lookup that hangs counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated `--prefetch-peers` / `--advertise-ip` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeersConfig {
    pub targets: Vec<Target>,
    pub advertise_ip: IpAddr,
}

/// The `kiam_server_prefetch_peers` gauge.
#[derive(Clone, Default)]
pub struct PeersMetrics {
    peers: Gauge,
}

impl PeersMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = PeersMetrics::default();
        registry.register(
            "kiam_server_prefetch_peers",
            "Servers sharing prefetch by pod IP, this one included (--prefetch-peers); 0: this server prefetches every pod",
            m.peers.clone(),
        );
        m
    }
}

/// Who shares prefetching now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Membership {
    /// This server prefetches every pod, for this reason.
    Off(String),
    /// The resolved peers (sorted) and which one is this server.
    On { members: Vec<SocketAddr>, me: usize },
}

/// A pod this server has heard of with an identity (through the prefetch
/// stream, owned or not): enough to find it again in the Pod cache.
struct Tracked {
    namespace: Arc<str>,
    name: Arc<str>,
    uid: Arc<str>,
}

#[derive(Default)]
struct Tracker {
    /// Pods per identity, keyed by uid.
    by_identity: HashMap<Identity, HashMap<Arc<str>, Tracked>>,
    /// Each tracked pod's identity, so a pod whose identity changed is
    /// counted under the new one only.
    by_uid: HashMap<Arc<str>, Identity>,
}

impl Tracker {
    fn remove(&mut self, uid: &Arc<str>) {
        if let Some(identity) = self.by_uid.remove(uid) {
            if let Some(pods) = self.by_identity.get_mut(&identity) {
                pods.remove(uid);
                if pods.is_empty() {
                    self.by_identity.remove(&identity);
                }
            }
        }
    }
}

/// Prefetch sharing for one server; see the module doc.
pub struct Peers {
    config: Option<PeersConfig>,
    /// This server's address as agents dial it: `--advertise-ip` and the
    /// port the gRPC listener is bound to.
    port: u16,
    resolver: Arc<dyn Resolve>,
    metrics: PeersMetrics,
    /// std RwLock: read per prefetched pod, replaced by the refresh; never
    /// held across an await.
    membership: RwLock<Arc<Membership>>,
    /// std Mutex: held while walking one identity's pods (taking the Pod
    /// cache's lock inside, never the other way round), never across an
    /// await.
    tracker: Mutex<Tracker>,
}

impl Peers {
    /// Sharing per `config` (`None`: the flags are unset, never sharing)
    /// for a server whose gRPC listener has `port`. Nothing is resolved
    /// until [`Peers::refresh`].
    pub fn new(config: Option<PeersConfig>, port: u16, metrics: PeersMetrics) -> Arc<Peers> {
        Self::with_resolver(config, port, metrics, Arc::new(SystemResolver))
    }

    pub fn with_resolver(
        config: Option<PeersConfig>,
        port: u16,
        metrics: PeersMetrics,
        resolver: Arc<dyn Resolve>,
    ) -> Arc<Peers> {
        let first = match &config {
            None => "--prefetch-peers is not set",
            Some(_) => "--prefetch-peers not resolved yet",
        };
        Arc::new(Peers {
            config,
            port,
            resolver,
            metrics,
            membership: RwLock::new(Arc::new(Membership::Off(first.into()))),
            tracker: Mutex::new(Tracker::default()),
        })
    }

    /// Is prefetching shared now?
    pub fn sharing(&self) -> bool {
        matches!(**self.membership.read().unwrap(), Membership::On { .. })
    }

    /// Does this server prefetch (and keep fresh) pods at `ip`? Yes for
    /// every IP while sharing is off.
    pub fn owns(&self, ip: IpAddr) -> bool {
        match &**self.membership.read().unwrap() {
            Membership::Off(_) => true,
            // Over the addresses as resolved: the ones agents rank too.
            Membership::On { members, me } => crate::shard::owner(ip, members) == Some(*me),
        }
    }

    /// Whether to prefetch for `prefetch`: remembers the pod (owned or not,
    /// for [`Peers::in_use`] after a membership change) and answers whether
    /// this server owns its IP (the primary, `status.podIP`).
    pub fn should_prefetch(&self, prefetch: &Prefetch) -> bool {
        let pod = &prefetch.pod;
        {
            let mut t = self.tracker.lock().unwrap();
            t.remove(&pod.uid);
            t.by_uid.insert(pod.uid.clone(), prefetch.identity.clone());
            t.by_identity
                .entry(prefetch.identity.clone())
                .or_default()
                .insert(
                    pod.uid.clone(),
                    Tracked {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                    },
                );
        }
        pod.ips.as_ref().is_none_or(|ips| self.owns(ips.primary()))
    }

    /// For the credential cache's refresh, beside the Pod cache's
    /// `identity_in_use`: while sharing, an identity is kept fresh only if
    /// a live pod this server owns uses it. Pods found gone are forgotten
    /// here. An identity no tracked pod has (its pod was dropped from a
    /// full prefetch buffer) counts as in use: better a refresh too many
    /// than a pod whose owner lets its credentials lapse.
    pub fn in_use(&self, identity: &Identity, pods: &PodCache) -> bool {
        if !self.sharing() {
            return true;
        }
        let mut t = self.tracker.lock().unwrap();
        let Some(tracked) = t.by_identity.get(identity) else {
            return true;
        };
        let mut gone = Vec::new();
        let mut owned = false;
        for p in tracked.values() {
            match pods.get(&p.namespace, &p.name) {
                Some(info) if info.uid == p.uid => {
                    if info.host_network || info.phase.is_completed() {
                        gone.push(p.uid.clone());
                    } else if info
                        .ips
                        .as_ref()
                        .is_some_and(|ips| self.owns(ips.primary()))
                    {
                        owned = true;
                        break;
                    }
                }
                _ => gone.push(p.uid.clone()),
            }
        }
        for uid in &gone {
            t.remove(uid);
        }
        owned
    }

    /// Forgets pods the Pod cache no longer has (or has completed), so
    /// pods this server never fetched for do not pile up here.
    fn prune(&self, pods: &PodCache) {
        let mut t = self.tracker.lock().unwrap();
        let gone: Vec<Arc<str>> = t
            .by_identity
            .values()
            .flat_map(|ps| ps.values())
            .filter(|p| {
                pods.get(&p.namespace, &p.name).is_none_or(|info| {
                    info.uid != p.uid || info.host_network || info.phase.is_completed()
                })
            })
            .map(|p| p.uid.clone())
            .collect();
        for uid in &gone {
            t.remove(uid);
        }
    }

    /// Resolves `--prefetch-peers` and decides whether to share; logs and
    /// sets the gauge when the answer changes.
    pub async fn refresh(&self) {
        let next = self.resolve().await;
        let changed = {
            let mut m = self.membership.write().unwrap();
            let changed = **m != next;
            if changed {
                *m = Arc::new(next.clone());
            }
            changed
        };
        if !changed {
            return;
        }
        match &next {
            Membership::Off(why) => {
                self.metrics.peers.set(0);
                tracing::info!(reason = %why, "prefetching every pod (not sharing prefetch by pod IP)");
            }
            Membership::On { members, me } => {
                self.metrics
                    .peers
                    .set(i64::try_from(members.len()).unwrap_or(i64::MAX));
                tracing::info!(peers = ?members, this_server = %members[*me],
                    "sharing prefetch by pod IP: prefetching only the pods this server owns");
            }
        }
    }

    async fn resolve(&self) -> Membership {
        let Some(config) = &self.config else {
            return Membership::Off("--prefetch-peers is not set".into());
        };
        let me = SocketAddr::new(config.advertise_ip.to_canonical(), self.port);
        let mut members: Vec<SocketAddr> = Vec::new();
        for t in &config.targets {
            let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, self.resolver.resolve(t)).await;
            match resolved {
                Ok(Ok(addrs)) if !addrs.is_empty() => members.extend(
                    addrs
                        .into_iter()
                        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())),
                ),
                Ok(Ok(_)) => {
                    return Membership::Off(format!("--prefetch-peers {t} resolved to nothing"))
                }
                Ok(Err(e)) => {
                    return Membership::Off(format!("--prefetch-peers {t} does not resolve: {e}"))
                }
                Err(_) => {
                    return Membership::Off(format!("--prefetch-peers {t}: DNS lookup timed out"))
                }
            }
        }
        members.sort();
        members.dedup();
        // By address and port; failing that, by address alone when only
        // one peer has it (a Service port that differs from --bind's).
        let by_ip = || {
            let mut same_ip = members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.ip() == me.ip());
            match (same_ip.next(), same_ip.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        };
        let Some(me_at) = members.iter().position(|m| *m == me).or_else(by_ip) else {
            return Membership::Off(format!(
                "this server ({me}: --advertise-ip and the port of --bind) is not among \
                 --prefetch-peers {members:?}"
            ));
        };
        if members.len() < 2 {
            return Membership::Off("--prefetch-peers resolves to this server only".into());
        }
        Membership::On { members, me: me_at }
    }

    /// Re-resolves every [`REFRESH_INTERVAL`] and, every
    /// [`PRUNE_EVERY`] of those, forgets pods gone from the Pod cache (one
    /// pass over every tracked pod), until `shutdown`.
    pub async fn run(self: Arc<Self>, pods: PodCache, shutdown: CancellationToken) {
        if self.config.is_none() {
            return;
        }
        for round in 1u64.. {
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            self.refresh().await;
            if round % PRUNE_EVERY == 0 {
                self.prune(&pods);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;

    /// A resolver answering what the test says (`None`: a lookup failure).
    struct Scripted(Mutex<Option<Vec<SocketAddr>>>);

    impl Resolve for Scripted {
        fn resolve<'a>(&'a self, _: &'a Target) -> BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
            let answer = self.0.lock().unwrap().clone();
            Box::pin(async move { answer.ok_or_else(|| std::io::Error::other("no such host")) })
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn peers(answer: Option<Vec<SocketAddr>>) -> (Arc<Peers>, Arc<Scripted>, Registry) {
        let mut registry = Registry::default();
        let resolver = Arc::new(Scripted(Mutex::new(answer)));
        let config = PeersConfig {
            targets: vec![Target {
                host: "kiam-server".into(),
                port: 443,
            }],
            advertise_ip: "198.18.1.2".parse().unwrap(),
        };
        let p = Peers::with_resolver(
            Some(config),
            443,
            PeersMetrics::register(&mut registry),
            resolver.clone(),
        );
        (p, resolver, registry)
    }

    fn gauge(registry: &Registry) -> String {
        crate::telemetry::encode(registry)
            .lines()
            .find(|l| l.starts_with("kiam_server_prefetch_peers "))
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn shares_only_when_it_finds_itself_among_two_or_more() {
        let three = vec![
            addr("198.18.1.3:443"),
            addr("198.18.1.2:443"),
            addr("198.18.1.1:443"),
        ];
        let (p, resolver, registry) = peers(Some(three.clone()));
        assert!(!p.sharing(), "nothing resolved yet");
        p.refresh().await;
        assert!(p.sharing());
        assert_eq!(gauge(&registry), "kiam_server_prefetch_peers 3");
        // Owns exactly the IPs kiam::shard gives it, whatever the DNS order.
        for i in 0..200u8 {
            let ip = IpAddr::from([198, 18, 30, i]);
            assert_eq!(
                p.owns(ip),
                three[crate::shard::owner(ip, &three).unwrap()] == addr("198.18.1.2:443")
            );
        }

        // DNS fails: every pod.
        *resolver.0.lock().unwrap() = None;
        p.refresh().await;
        assert!(!p.sharing());
        assert!((0..50u8).all(|i| p.owns(IpAddr::from([198, 18, 30, i]))));
        assert_eq!(gauge(&registry), "kiam_server_prefetch_peers 0");

        // Itself missing from the answer.
        *resolver.0.lock().unwrap() = Some(vec![addr("198.18.1.1:443"), addr("198.18.1.3:443")]);
        p.refresh().await;
        assert!(!p.sharing());

        // Alone.
        *resolver.0.lock().unwrap() = Some(vec![addr("198.18.1.2:443")]);
        p.refresh().await;
        assert!(!p.sharing());

        // A Service port that is not --bind's: found by its address alone.
        *resolver.0.lock().unwrap() = Some(vec![addr("198.18.1.2:8443"), addr("198.18.1.1:8443")]);
        p.refresh().await;
        assert!(p.sharing());
        assert_eq!(gauge(&registry), "kiam_server_prefetch_peers 2");
    }

    #[tokio::test]
    async fn unset_flags_never_share() {
        let p = Peers::new(None, 443, PeersMetrics::register(&mut Registry::default()));
        p.refresh().await;
        assert!(!p.sharing());
        assert!(p.owns("198.18.0.1".parse().unwrap()));
    }
}
