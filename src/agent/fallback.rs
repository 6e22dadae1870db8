//! Last good answers per pod, served only while no kiam server answers.
//!
//! The surprise: this cache is never consulted when a server *does* answer,
//! even with an error. A `no pod found` or a role change drops what is kept
//! for that IP at once, so a reused IP cannot inherit another pod's role —
//! except during an outage, which is why the window is bounded
//! (`--stale-credentials-window`, `0s` turns it off) and credentials within
//! [`EXPIRY_MARGIN`] of their expiry are never served.
//!
//! An answer is kept only if nothing was forgotten for its IP after it was
//! asked for: a slow answer meant for the old pod must not land after a
//! `no pod found` already dropped that pod.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use prometheus_client::metrics::gauge::Gauge;

use super::client::{Credentials, PodRole};

/// Credentials this close to expiry are never served from the fallback:
/// SDKs would refresh them at once, and the server is not there to answer.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// At most this many pod IPs are remembered (a node runs ~110 pods); the
/// oldest entries go first.
const MAX_PODS: usize = 4096;

struct Kept<T> {
    value: T,
    fetched: Instant,
}

#[derive(Default)]
struct Pod {
    role: Option<Kept<PodRole>>,
    /// Keyed by the role name exactly as the pod asked for it.
    credentials: HashMap<String, Kept<(Credentials, Timestamp)>>,
}

impl Pod {
    fn newest(&self) -> Option<Instant> {
        let r = self.role.as_ref().map(|k| k.fetched);
        let c = self.credentials.values().map(|k| k.fetched).max();
        r.max(c)
    }
}

/// How long a forgotten IP is remembered as forgotten: longer than any
/// request is in flight.
const FORGOTTEN_FOR: Duration = Duration::from_secs(10);

/// The fallback store. Methods are cheap and synchronous.
pub struct Fallback {
    window: Duration,
    /// std Mutex: every critical section is a few map operations, no await.
    pods: Mutex<HashMap<IpAddr, Pod>>,
    /// When each IP was last forgotten (within [`FORGOTTEN_FOR`]); answers
    /// asked for before then are not kept. std Mutex: no await under it.
    forgotten: Mutex<HashMap<IpAddr, Instant>>,
    /// How many pod IPs are kept (`kiam_agent_fallback_pods`).
    held: Gauge,
}

impl Fallback {
    pub fn new(window: Duration, held: Gauge) -> Self {
        Fallback {
            window,
            pods: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(HashMap::new()),
            held,
        }
    }

    /// Publishes how many pod IPs `pods` holds.
    fn count(&self, pods: &HashMap<IpAddr, Pod>) {
        self.held.set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
    }

    /// Whether `ip` was forgotten after `asked` (so an answer asked for
    /// then may be about the pod that was forgotten).
    fn forgotten_since(&self, ip: IpAddr, asked: Instant) -> bool {
        self.forgotten
            .lock()
            .unwrap()
            .get(&ip)
            .is_some_and(|at| *at >= asked)
    }

    fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// A server said `ip` has `role` in answer to a question asked at
    /// `asked`: keep it, and forget credentials kept for any other role of
    /// that IP (the IP may belong to a new pod now).
    pub fn remember_role(&self, ip: IpAddr, role: &PodRole, asked: Instant) {
        if !self.enabled() || self.forgotten_since(ip, asked) {
            return;
        }
        let mut pods = self.pods.lock().unwrap();
        self.make_room(&mut pods, ip);
        let pod = pods.entry(ip).or_default();
        pod.credentials.retain(|r, _| same_role(r, &role.name));
        pod.role = Some(Kept {
            value: role.clone(),
            fetched: Instant::now(),
        });
        self.count(&pods);
    }

    /// A server said `ip` has no pod or no role: forget everything about it.
    pub fn forget_ip(&self, ip: IpAddr) {
        {
            let mut pods = self.pods.lock().unwrap();
            pods.remove(&ip);
            self.count(&pods);
        }
        let now = Instant::now();
        let mut forgotten = self.forgotten.lock().unwrap();
        if forgotten.len() >= MAX_PODS {
            forgotten.retain(|_, at| now.duration_since(*at) < FORGOTTEN_FOR);
        }
        forgotten.insert(ip, now);
    }

    /// A server refused `role` for `ip`.
    pub fn forget(&self, ip: IpAddr, role: &str) {
        let mut pods = self.pods.lock().unwrap();
        if let Some(pod) = pods.get_mut(&ip) {
            pod.credentials.remove(role);
            if pod
                .role
                .as_ref()
                .is_some_and(|r| same_role(&r.value.name, role))
            {
                pod.role = None;
            }
        }
    }

    /// Keeps credentials a server issued for (`ip`, `role`), asked for at
    /// `asked`. Ones whose expiry cannot be read are not kept: the expiry
    /// rule could not be applied.
    pub fn remember_credentials(
        &self,
        ip: IpAddr,
        role: &str,
        creds: &Credentials,
        asked: Instant,
    ) {
        if !self.enabled() || self.forgotten_since(ip, asked) {
            return;
        }
        {
            // The common case, on every answer: the same credentials as last
            // time for the role last seen. Only when they were seen changes;
            // no parsing, copying or re-inserting.
            let mut pods = self.pods.lock().unwrap();
            if let Some(pod) = pods.get_mut(&ip) {
                let role_agrees = pod
                    .role
                    .as_ref()
                    .is_none_or(|r| same_role(&r.value.name, role));
                if let Some(kept) = pod.credentials.get_mut(role) {
                    if role_agrees && kept.value.0 == *creds {
                        kept.fetched = Instant::now();
                        return;
                    }
                }
            }
        }
        let Ok(expiry) = creds.expiration.parse::<Timestamp>() else {
            return;
        };
        let mut pods = self.pods.lock().unwrap();
        self.make_room(&mut pods, ip);
        let pod = pods.entry(ip).or_default();
        if pod
            .role
            .as_ref()
            .is_some_and(|r| !same_role(&r.value.name, role))
        {
            // Credentials granted for a role other than the one we last
            // saw: the pod changed; the old role name is stale.
            pod.role = None;
        }
        pod.credentials.insert(
            role.to_string(),
            Kept {
                value: (creds.clone(), expiry),
                fetched: Instant::now(),
            },
        );
        self.count(&pods);
    }

    /// The role last seen for `ip`, if fetched within the window.
    pub fn role(&self, ip: IpAddr) -> Option<PodRole> {
        let pods = self.pods.lock().unwrap();
        let kept = pods.get(&ip)?.role.as_ref()?;
        (kept.fetched.elapsed() <= self.window).then(|| kept.value.clone())
    }

    /// The credentials last issued for (`ip`, `role`), if fetched within the
    /// window and not within [`EXPIRY_MARGIN`] of expiry.
    pub fn credentials(&self, ip: IpAddr, role: &str) -> Option<Credentials> {
        let mut pods = self.pods.lock().unwrap();
        let pod = pods.get_mut(&ip)?;
        let kept = pod.credentials.get(role)?;
        if kept.fetched.elapsed() > self.window || !outlives_margin(kept.value.1) {
            pod.credentials.remove(role);
            return None;
        }
        Some(kept.value.0.clone())
    }

    /// How many pod IPs are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pods.lock().unwrap().len()
    }

    /// Bounds memory before inserting for `ip`: drop everything outside the
    /// window, then the oldest pods.
    fn make_room(&self, pods: &mut HashMap<IpAddr, Pod>, ip: IpAddr) {
        if pods.len() < MAX_PODS || pods.contains_key(&ip) {
            return;
        }
        let window = self.window;
        pods.retain(|_, p| {
            p.credentials
                .retain(|_, k| k.fetched.elapsed() <= window && outlives_margin(k.value.1));
            p.newest().is_some_and(|t| t.elapsed() <= window)
        });
        while pods.len() >= MAX_PODS {
            let Some(oldest) = pods
                .iter()
                .min_by_key(|(_, p)| p.newest())
                .map(|(ip, _)| *ip)
            else {
                break;
            };
            pods.remove(&oldest);
        }
    }
}

fn outlives_margin(expiry: Timestamp) -> bool {
    let margin = jiff::SignedDuration::try_from(EXPIRY_MARGIN).expect("small duration");
    Timestamp::now()
        .checked_add(margin)
        .is_ok_and(|limit| expiry > limit)
}

/// Role names as pods write them: `name` and `/name` are the same role.
pub fn same_role(a: &str, b: &str) -> bool {
    a.trim_start_matches('/') == b.trim_start_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(key: &str, expires_in: i64) -> Credentials {
        let exp = Timestamp::now() + jiff::SignedDuration::from_secs(expires_in);
        Credentials {
            code: "Success".into(),
            kind: "AWS-HMAC".into(),
            access_key_id: key.into(),
            secret_access_key: "s".into(),
            token: "t".into(),
            expiration: exp.to_string(),
            last_updated: Timestamp::now().to_string(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keyed_by_ip_and_role() {
        let f = Fallback::new(Duration::from_secs(60), Gauge::default());
        f.remember_credentials(ip("10.0.0.1"), "a", &creds("K1", 3600), Instant::now());
        assert_eq!(
            f.credentials(ip("10.0.0.1"), "a").unwrap().access_key_id,
            "K1"
        );
        assert!(f.credentials(ip("10.0.0.2"), "a").is_none());
        assert!(f.credentials(ip("10.0.0.1"), "b").is_none());
    }

    #[test]
    fn role_change_drops_other_roles_credentials() {
        let f = Fallback::new(Duration::from_secs(60), Gauge::default());
        f.remember_role(ip("10.0.0.1"), &PodRole::named("a"), Instant::now());
        f.remember_credentials(ip("10.0.0.1"), "a", &creds("K1", 3600), Instant::now());
        f.remember_role(ip("10.0.0.1"), &PodRole::named("b"), Instant::now());
        assert!(f.credentials(ip("10.0.0.1"), "a").is_none());
        assert_eq!(f.role(ip("10.0.0.1")).map(|r| r.name).as_deref(), Some("b"));
        f.forget_ip(ip("10.0.0.1"));
        assert!(f.role(ip("10.0.0.1")).is_none());
    }

    #[test]
    fn never_near_expiry() {
        let f = Fallback::new(Duration::from_secs(60), Gauge::default());
        f.remember_credentials(ip("10.0.0.1"), "a", &creds("K1", 4 * 60), Instant::now());
        assert!(f.credentials(ip("10.0.0.1"), "a").is_none());
    }

    #[test]
    fn zero_window_keeps_nothing() {
        let f = Fallback::new(Duration::ZERO, Gauge::default());
        f.remember_role(ip("10.0.0.1"), &PodRole::named("a"), Instant::now());
        f.remember_credentials(ip("10.0.0.1"), "a", &creds("K1", 3600), Instant::now());
        assert_eq!(f.len(), 0);
        assert!(f.role(ip("10.0.0.1")).is_none());
    }

    #[test]
    fn outside_window_not_served() {
        let f = Fallback::new(Duration::from_millis(1), Gauge::default());
        f.remember_role(ip("10.0.0.1"), &PodRole::named("a"), Instant::now());
        f.remember_credentials(ip("10.0.0.1"), "a", &creds("K1", 3600), Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        assert!(f.role(ip("10.0.0.1")).is_none());
        assert!(f.credentials(ip("10.0.0.1"), "a").is_none());
    }

    /// Issue 12: an answer asked for before the IP was forgotten (a slow
    /// reply about the old pod, landing after `no pod found`) is not kept.
    #[test]
    fn an_answer_asked_before_a_forget_is_not_kept() {
        let f = Fallback::new(Duration::from_secs(60), Gauge::default());
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        f.forget_ip(ip("10.0.0.1"));
        f.remember_role(ip("10.0.0.1"), &PodRole::named("old"), asked);
        f.remember_credentials(ip("10.0.0.1"), "old", &creds("OLD", 3600), asked);
        assert_eq!(f.len(), 0);
        // Asked after the forget: kept.
        f.remember_role(ip("10.0.0.1"), &PodRole::named("new"), Instant::now());
        assert_eq!(
            f.role(ip("10.0.0.1")).map(|r| r.name).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn memory_is_bounded() {
        let f = Fallback::new(Duration::from_secs(60), Gauge::default());
        for i in 0..(MAX_PODS as u32 + 100) {
            f.remember_role(
                IpAddr::from(i.to_be_bytes()),
                &PodRole::named("a"),
                Instant::now(),
            );
        }
        assert!(f.len() <= MAX_PODS);
    }
}
