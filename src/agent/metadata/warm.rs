//! The warm path: answers a kiam server said may be reused, kept per pod
//! IP (and role) and sent again without asking it.
//!
//! The surprise: this is not a cache with a TTL of its own. An answer is
//! kept only when the server granted a window ([`Answer::reuse_until`],
//! from response metadata), which ends no later than the server's own trust
//! in its last API confirmation of the pod on that IP (at most
//! [`MAX_REUSE`](super::super::client::MAX_REUSE) after the API answered,
//! never past the pod's deletion deadline nor, for credentials, past
//! expiry minus `--session-refresh`). So every answer, from here or from a
//! server, rests on a look at the API no older than the server's
//! confirmation window: the guarantee about reused IPs is the server's.
//! What a kept answer does not see is what the server's watch delivers
//! within that window (a changed role annotation or namespace policy, a pod
//! deleted and its IP handed over faster than the window); the server
//! confirms a pod at most once per window for the same reason. A Go kiam
//! server grants no window, and nothing is kept.
//!
//! A refusal from a server (`no pod found`, `forbidden by policy`, a final
//! error) drops everything kept for that IP, and an answer asked for before
//! that refusal is not kept afterwards.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use super::super::client::{Answer, Credentials, PodRole};
use super::super::documents;

/// At most this many pod addresses are kept. A node runs a few hundred pods
/// at most and a window is about a second, so this is only reached by
/// something odd (`--allow-ip-query` from many addresses); then expired
/// entries are pruned and, if none are, new answers are not kept.
const MAX_PODS: usize = 4096;
/// At most this many roles per pod address (a pod asks for its one role;
/// anything else is refused and drops the address's entries).
const MAX_ROLES_PER_POD: usize = 4;

/// Credentials kept for one (IP, role), rendered at most once per form.
pub(super) struct Rendered {
    credentials: Credentials,
    plain: OnceLock<Bytes>,
    extended: OnceLock<Bytes>,
}

impl Rendered {
    fn new(credentials: Credentials) -> Self {
        Rendered {
            credentials,
            plain: OnceLock::new(),
            extended: OnceLock::new(),
        }
    }

    /// Credentials not kept (served from the fallback), to render once.
    pub(super) fn unkept(credentials: Credentials) -> Arc<Self> {
        Arc::new(Self::new(credentials))
    }

    /// The JSON document, with `AccountId` from `arn` when `extended`;
    /// rendered on first use of each form, then the same bytes. `arn` is
    /// asked only for that first rendering (it is the same for one pod and
    /// role within a window), so repeats do no work beyond the lookup.
    pub(super) fn body<'a>(
        &self,
        arn: impl FnOnce() -> Option<crate::arn::RoleArn<'a>>,
        extended: bool,
    ) -> Bytes {
        let cell = if extended {
            &self.extended
        } else {
            &self.plain
        };
        cell.get_or_init(|| documents::credentials_body(&self.credentials, arn(), extended))
            .clone()
    }
}

struct KeptCredentials {
    role: Box<str>,
    until: Instant,
    rendered: Arc<Rendered>,
}

#[derive(Default)]
struct Pod {
    /// The role answer (`None`: the pod has no role) and until when.
    role: Option<(Option<PodRole>, Instant)>,
    credentials: Vec<KeptCredentials>,
    /// When a refusal last dropped this address's answers: an answer asked
    /// for before then is not kept.
    forgotten: Option<Instant>,
}

impl Pod {
    fn prune(&mut self, now: Instant) {
        if self.role.as_ref().is_some_and(|(_, until)| *until <= now) {
            self.role = None;
        }
        self.credentials.retain(|c| c.until > now);
    }

    /// Nothing kept, and no refusal recent enough to matter (an answer
    /// asked before it would have expired by now).
    fn is_idle(&self, now: Instant) -> bool {
        self.role.is_none()
            && self.credentials.is_empty()
            && self
                .forgotten
                .is_none_or(|f| now.duration_since(f) > super::super::client::MAX_REUSE)
    }

    fn forgotten_since(&self, asked: Instant) -> bool {
        self.forgotten.is_some_and(|f| f >= asked)
    }
}

/// The kept answers of one agent.
#[derive(Default)]
pub(super) struct Warm {
    // std Mutex: held to look up, insert or remove, never across an await
    // and never while rendering.
    pods: Mutex<HashMap<IpAddr, Pod>>,
}

impl Warm {
    /// The kept role answer for `ip`: `Some(None)` when the pod has none.
    pub(super) fn role(&self, ip: IpAddr) -> Option<Option<PodRole>> {
        let pods = self.pods.lock().unwrap();
        let (role, until) = pods.get(&ip)?.role.as_ref()?;
        (*until > Instant::now()).then(|| role.clone())
    }

    /// Keeps a role answer asked for at `asked`, if the server granted a
    /// window. Either way, credentials kept for any other role on `ip` are
    /// dropped: the pod there now has this role (a spelling of the same
    /// role that differs costs one more server call, nothing else).
    pub(super) fn keep_role(&self, ip: IpAddr, answer: &Answer<Option<PodRole>>, asked: Instant) {
        let role = answer.value.clone();
        let same = |kept: &str| {
            role.as_ref()
                .is_some_and(|r| kept == r.name || kept == r.name.trim_start_matches('/'))
        };
        {
            let mut pods = self.pods.lock().unwrap();
            if let Some(pod) = pods.get_mut(&ip) {
                pod.credentials.retain(|c| same(&c.role));
            }
        }
        let Some(until) = answer.reuse_until.map(|u| u.into_std()) else {
            return;
        };
        self.with_pod(ip, asked, |pod| pod.role = Some((role.clone(), until)));
    }

    /// The kept credentials for (`ip`, `role`).
    pub(super) fn credentials(&self, ip: IpAddr, role: &str) -> Option<Arc<Rendered>> {
        let pods = self.pods.lock().unwrap();
        let now = Instant::now();
        pods.get(&ip)?
            .credentials
            .iter()
            .find(|c| &*c.role == role && c.until > now)
            .map(|c| c.rendered.clone())
    }

    /// Keeps a credentials answer asked for at `asked` if the server
    /// granted a window; returns it ready to render either way.
    pub(super) fn keep_credentials(
        &self,
        ip: IpAddr,
        role: &str,
        answer: Answer<Credentials>,
        asked: Instant,
    ) -> Arc<Rendered> {
        let rendered = Arc::new(Rendered::new(answer.value));
        if let Some(until) = answer.reuse_until.map(|u| u.into_std()) {
            self.with_pod(ip, asked, |pod| {
                pod.credentials.retain(|c| &*c.role != role);
                if pod.credentials.len() >= MAX_ROLES_PER_POD {
                    pod.credentials.remove(0);
                }
                pod.credentials.push(KeptCredentials {
                    role: role.into(),
                    until,
                    rendered: rendered.clone(),
                });
            });
        }
        rendered
    }

    /// Drops every answer kept for `ip` (a server refused it), including
    /// answers still on their way from a server.
    pub(super) fn forget_ip(&self, ip: IpAddr) {
        let mut pods = self.pods.lock().unwrap();
        let now = Instant::now();
        if let Some(pod) = pods.get_mut(&ip) {
            pod.role = None;
            pod.credentials.clear();
            pod.forgotten = Some(now);
        } else if pods.len() < MAX_PODS {
            pods.insert(
                ip,
                Pod {
                    forgotten: Some(now),
                    ..Pod::default()
                },
            );
        }
    }

    fn with_pod(&self, ip: IpAddr, asked: Instant, update: impl FnOnce(&mut Pod)) {
        let mut pods = self.pods.lock().unwrap();
        let now = Instant::now();
        if !pods.contains_key(&ip) && pods.len() >= MAX_PODS {
            pods.retain(|_, pod| {
                pod.prune(now);
                !pod.is_idle(now)
            });
            if pods.len() >= MAX_PODS {
                return;
            }
        }
        let pod = pods.entry(ip).or_default();
        if pod.forgotten_since(asked) {
            return;
        }
        pod.prune(now);
        update(pod);
    }

    /// How many pod addresses have something kept (tests, metrics).
    #[cfg(test)]
    fn len(&self) -> usize {
        let now = Instant::now();
        let mut pods = self.pods.lock().unwrap();
        pods.retain(|_, pod| {
            pod.prune(now);
            !pod.is_idle(now)
        });
        pods.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn creds(key: &str) -> Credentials {
        Credentials {
            code: "Success".into(),
            kind: "AWS-HMAC".into(),
            access_key_id: key.into(),
            secret_access_key: "secret".into(),
            token: "token".into(),
            expiration: "2030-01-01T00:00:00Z".into(),
            last_updated: "2029-12-31T23:00:00Z".into(),
        }
    }

    fn answer<T>(value: T, window: Option<Duration>) -> Answer<T> {
        Answer {
            value,
            reuse_until: window.map(|w| tokio::time::Instant::now() + w),
        }
    }

    fn role(name: &str) -> PodRole {
        PodRole {
            name: name.into(),
            arn: None,
        }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 5));

    #[test]
    fn only_answers_with_a_window_are_kept() {
        let warm = Warm::default();
        let asked = Instant::now();
        warm.keep_role(IP, &answer(Some(role("r")), None), asked);
        warm.keep_credentials(IP, "r", answer(creds("A"), None), asked);
        assert!(warm.role(IP).is_none());
        assert!(warm.credentials(IP, "r").is_none());

        warm.keep_role(
            IP,
            &answer(Some(role("r")), Some(Duration::from_secs(60))),
            asked,
        );
        warm.keep_credentials(
            IP,
            "r",
            answer(creds("A"), Some(Duration::from_secs(60))),
            asked,
        );
        assert_eq!(warm.role(IP), Some(Some(role("r"))));
        let kept = warm.credentials(IP, "r").unwrap();
        assert!(warm.credentials(IP, "other").is_none());
        // Rendered once: the same bytes, not an equal copy.
        let a = kept.body(|| None, false);
        let b = warm.credentials(IP, "r").unwrap().body(|| None, false);
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert!(std::str::from_utf8(&a)
            .unwrap()
            .contains("\"AccessKeyId\":\"A\""));
    }

    #[test]
    fn a_new_role_on_the_address_drops_credentials_for_others() {
        let warm = Warm::default();
        let w = Some(Duration::from_secs(60));
        warm.keep_credentials(IP, "old", answer(creds("A"), w), Instant::now());
        warm.keep_credentials(IP, "new", answer(creds("B"), w), Instant::now());
        // Even an answer with no window (a Go kiam server) says who is there.
        warm.keep_role(IP, &answer(Some(role("/new")), None), Instant::now());
        assert!(warm.credentials(IP, "old").is_none());
        assert!(warm.credentials(IP, "new").is_some());
        warm.keep_role(IP, &answer(None, w), Instant::now());
        assert!(warm.credentials(IP, "new").is_none());
    }

    #[test]
    fn an_expired_window_is_not_served() {
        let warm = Warm::default();
        let mut a = answer(creds("A"), Some(Duration::from_secs(60)));
        a.reuse_until = Some(tokio::time::Instant::now() - Duration::from_millis(1));
        warm.keep_credentials(IP, "r", a, Instant::now());
        assert!(warm.credentials(IP, "r").is_none());
    }

    #[test]
    fn a_refusal_drops_the_address_and_answers_asked_before_it() {
        let warm = Warm::default();
        let w = Some(Duration::from_secs(60));
        let before = Instant::now();
        warm.keep_credentials(IP, "r", answer(creds("A"), w), before);
        warm.keep_role(IP, &answer(None, w), before);
        warm.forget_ip(IP);
        assert!(warm.credentials(IP, "r").is_none());
        assert!(warm.role(IP).is_none());
        // An answer that was on its way when the refusal came is not kept.
        warm.keep_credentials(IP, "r", answer(creds("A"), w), before);
        assert!(warm.credentials(IP, "r").is_none());
        // One asked for afterwards is.
        std::thread::sleep(Duration::from_millis(2));
        warm.keep_credentials(IP, "r", answer(creds("B"), w), Instant::now());
        assert!(warm.credentials(IP, "r").is_some());
    }

    #[test]
    fn the_number_of_addresses_is_bounded() {
        let warm = Warm::default();
        let w = Some(Duration::from_secs(60));
        for i in 0..(MAX_PODS as u32 + 100) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            warm.keep_role(ip, &answer(Some(role("r")), w), Instant::now());
        }
        assert_eq!(warm.len(), MAX_PODS);
        warm.keep_role(IP, &answer(Some(role("r")), w), Instant::now());
        assert!(
            warm.role(IP).is_none(),
            "over the bound nothing new is kept"
        );

        let warm = Warm::default();
        for i in 0..20 {
            warm.keep_credentials(IP, &format!("r{i}"), answer(creds("A"), w), Instant::now());
        }
        let pods = warm.pods.lock().unwrap();
        assert_eq!(pods[&IP].credentials.len(), MAX_ROLES_PER_POD);
    }
}
