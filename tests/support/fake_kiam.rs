//! A scripted `KiamClient` for router tests: answers per pod IP, counts
//! calls, and can play a queue of answers (e.g. "unavailable, then ok").
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use kiam::agent::client::{ClientError, Credentials, KiamClient, PodRole};
use kiam::agent::fallback::same_role;
use kiam::wire::Check;
use tokio::time::Instant;

/// Credentials with a marker key, valid for an hour.
pub fn creds(key: &str) -> Credentials {
    let now = jiff::Timestamp::now();
    Credentials {
        code: "Success".into(),
        kind: "AWS-HMAC".into(),
        access_key_id: key.into(),
        secret_access_key: format!("{key}-secret"),
        token: format!("{key}-token"),
        expiration: (now + jiff::SignedDuration::from_secs(3600)).to_string(),
        last_updated: now.to_string(),
    }
}

#[derive(Default)]
pub struct FakeKiam {
    /// Role per pod IP; IPs not listed answer `no pod found`.
    roles: Mutex<HashMap<IpAddr, Option<String>>>,
    /// The ARN a server resolved each pod's role to (`Role.arn`); none
    /// for a pod not listed, as from a Go kiam server.
    arns: Mutex<HashMap<IpAddr, String>>,
    /// Credentials per (IP, role); missing pairs answer `forbidden by policy`
    /// naming the check a kiam server would: the annotated role when `role`
    /// is not the pod's, else the namespace's permitted roles.
    creds: Mutex<HashMap<(IpAddr, String), Credentials>>,
    /// Errors played before the normal answers, one per call, for any method.
    script: Mutex<VecDeque<ClientError>>,
    /// When set, every call fails with this error.
    always: Mutex<Option<ClientError>>,
    health: Mutex<Option<String>>,
    delay: Mutex<Duration>,
    pub role_calls: AtomicUsize,
    pub cred_calls: AtomicUsize,
    pub health_calls: AtomicUsize,
}

impl FakeKiam {
    pub fn new() -> Self {
        let f = FakeKiam::default();
        *f.health.lock().unwrap() = Some("ok".into());
        f
    }

    pub fn pod(self, ip: &str, role: Option<&str>) -> Self {
        self.set_pod(ip, role);
        self
    }

    pub fn set_pod(&self, ip: &str, role: Option<&str>) {
        self.roles
            .lock()
            .unwrap()
            .insert(ip.parse().unwrap(), role.map(str::to_string));
    }

    /// Answers `arn` as the resolved ARN of the role of the pod at `ip`.
    pub fn resolved(self, ip: &str, arn: &str) -> Self {
        self.arns
            .lock()
            .unwrap()
            .insert(ip.parse().unwrap(), arn.to_string());
        self
    }

    pub fn remove_pod(&self, ip: &str) {
        let ip: IpAddr = ip.parse().unwrap();
        self.roles.lock().unwrap().remove(&ip);
        self.arns.lock().unwrap().remove(&ip);
        self.creds.lock().unwrap().retain(|(i, _), _| *i != ip);
    }

    pub fn grant(self, ip: &str, role: &str, c: Credentials) -> Self {
        self.creds
            .lock()
            .unwrap()
            .insert((ip.parse().unwrap(), role.to_string()), c);
        self
    }

    pub fn script(&self, errors: impl IntoIterator<Item = ClientError>) {
        self.script.lock().unwrap().extend(errors);
    }

    pub fn fail_always(&self, e: Option<ClientError>) {
        *self.always.lock().unwrap() = e;
    }

    pub fn set_health(&self, h: &str) {
        *self.health.lock().unwrap() = Some(h.to_string());
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    fn scripted(&self) -> Option<ClientError> {
        if let Some(e) = self.always.lock().unwrap().clone() {
            return Some(e);
        }
        self.script.lock().unwrap().pop_front()
    }

    /// The configured delay; like the pool, a call still waiting at its
    /// deadline ends there, as a server that had the request and was slow.
    async fn pause(&self, deadline: Instant) -> Result<(), ClientError> {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::timeout_at(deadline, tokio::time::sleep(d))
                .await
                .map_err(|_| ClientError::Timeout("fake: slow".into()))?;
        }
        Ok(())
    }
}

impl KiamClient for FakeKiam {
    fn get_pod_role(
        &self,
        ip: IpAddr,
        deadline: Instant,
    ) -> BoxFuture<'_, Result<Option<PodRole>, ClientError>> {
        Box::pin(async move {
            self.role_calls.fetch_add(1, Ordering::SeqCst);
            self.pause(deadline).await?;
            if let Some(e) = self.scripted() {
                return Err(e);
            }
            let name = self
                .roles
                .lock()
                .unwrap()
                .get(&ip)
                .cloned()
                .ok_or(ClientError::NotFound)?;
            let arn = self.arns.lock().unwrap().get(&ip).cloned();
            Ok(name.map(|name| PodRole { name, arn }))
        })
    }

    fn get_pod_credentials<'a>(
        &'a self,
        ip: IpAddr,
        role: &'a str,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Credentials, ClientError>> {
        Box::pin(async move {
            self.cred_calls.fetch_add(1, Ordering::SeqCst);
            self.pause(deadline).await?;
            if let Some(e) = self.scripted() {
                return Err(e);
            }
            let pods_role = match self.roles.lock().unwrap().get(&ip) {
                Some(r) => r.clone(),
                None => return Err(ClientError::NotFound),
            };
            self.creds
                .lock()
                .unwrap()
                .get(&(ip, role.to_string()))
                .cloned()
                .ok_or_else(|| {
                    let check = if pods_role.is_some_and(|r| same_role(&r, role)) {
                        Check::NamespacePermitted
                    } else {
                        Check::AnnotatedRole
                    };
                    ClientError::Forbidden(Some(check))
                })
        })
    }

    fn health(&self, _deadline: Instant) -> BoxFuture<'_, Result<String, ClientError>> {
        Box::pin(async move {
            self.health_calls.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = self.scripted() {
                return Err(e);
            }
            Ok(self.health.lock().unwrap().clone().unwrap_or_default())
        })
    }
}
