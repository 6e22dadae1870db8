//! The reloading core shared by both sides: holds the current config, polls
//! the files, swaps in a new config when they change and keeps the old one
//! when the new files are broken.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::load::{CertInfo, Material, Snapshot};
use super::verify::{explain, fmt_time, verify_chain};
use super::{provider, Side, TlsError, TlsFiles};

/// Go kiam's three gauges per side, same names and meaning.
#[derive(Clone, Default)]
pub(crate) struct TlsMetrics {
    /// 1 while the files on disk could not be loaded (the old certs are in use).
    update_error: Gauge,
    /// 1 when the loaded certificate does not verify against `--ca` for its
    /// role (expired, wrong CA, wrong usage).
    verify_error: Gauge,
    /// Earliest notAfter on the certificate's path, seconds since the epoch.
    expiry: Gauge,
}

impl TlsMetrics {
    fn register(side: Side, registry: &mut Registry) -> TlsMetrics {
        let m = TlsMetrics::default();
        let s = side.as_str();
        registry.register(
            format!("grpc_{s}_tls_certificate_update_error"),
            format!("1 if the latest gRPC {s} TLS certificate files could not be loaded (the previous ones stay in use)"),
            m.update_error.clone(),
        );
        registry.register(
            format!("grpc_{s}_tls_certificate_verify_error"),
            format!("1 if the gRPC {s} TLS certificate does not verify against --ca for its usage"),
            m.verify_error.clone(),
        );
        registry.register(
            format!("grpc_{s}_tls_certificate_expiry_seconds"),
            format!(
                "Expiration time of the gRPC {s} TLS certificate in seconds since the Unix epoch"
            ),
            m.expiry.clone(),
        );
        m
    }
}

/// Builds a side's rustls config from parsed material.
pub(crate) type Build<T> = fn(&Material) -> Result<T, TlsError>;

struct Loaded<T> {
    config: Arc<T>,
    info: CertInfo,
}

/// Bookkeeping for change detection; only touched by the poller and
/// `reload_now`, never across an `.await`, hence a std Mutex.
struct PollState {
    applied: Snapshot,
    /// A broken snapshot seen once: reported only if still there on the next
    /// poll, because rotating three files one by one passes through
    /// mismatched states that fix themselves a moment later.
    pending_failure: Option<Snapshot>,
    /// The last error logged, so a broken file is reported once per
    /// distinct problem, not every second.
    reported: Option<String>,
}

pub(crate) struct Reloading<T> {
    side: Side,
    files: TlsFiles,
    build: Build<T>,
    current: ArcSwap<Loaded<T>>,
    poll: Mutex<PollState>,
    metrics: TlsMetrics,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads the files once (errors are for the operator to fix before
    /// starting) and starts polling them every `interval`, if a Tokio runtime
    /// is running. The poller stops once the returned `Arc` is dropped.
    pub(super) fn load(
        side: Side,
        files: TlsFiles,
        build: Build<T>,
        registry: &mut Registry,
        interval: Duration,
    ) -> Result<Arc<Self>, TlsError> {
        let snap = Snapshot::read(&files)?;
        let material = Material::parse(&files, &snap)?;
        let config = build(&material)?;
        let metrics = TlsMetrics::register(side, registry);
        let this = Arc::new(Reloading {
            side,
            files,
            build,
            current: ArcSwap::from_pointee(Loaded {
                config: Arc::new(config),
                info: material.info.clone(),
            }),
            poll: Mutex::new(PollState {
                applied: snap,
                pending_failure: None,
                reported: None,
            }),
            metrics,
        });
        this.publish(&material);
        tracing::info!(
            role = side.as_str(),
            cert = %this.files.cert.display(),
            serial = %material.info.serial,
            subject = %material.info.subject,
            not_after = %fmt_time(material.info.not_after),
            "TLS certificate loaded; watching --cert, --key and --ca for changes"
        );
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(poll_loop(Arc::downgrade(&this), interval));
            }
            Err(_) => tracing::warn!("no async runtime: TLS certificates will not be reloaded"),
        }
        Ok(this)
    }

    pub(super) fn config(&self) -> Arc<T> {
        self.current.load().config.clone()
    }

    pub(super) fn info(&self) -> CertInfo {
        self.current.load().info.clone()
    }

    /// Re-reads the files now. `Ok(true)`: a new config is in use;
    /// `Ok(false)`: nothing changed; `Err`: the files are broken and the
    /// previous config stays.
    pub(super) fn reload_now(&self) -> Result<bool, TlsError> {
        let mut state = self.poll.lock().unwrap_or_else(|p| p.into_inner());
        self.check(&mut state, true)
    }

    fn poll_once(&self) {
        let mut state = self.poll.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.check(&mut state, false);
    }

    fn check(&self, state: &mut PollState, report_now: bool) -> Result<bool, TlsError> {
        let snap = match Snapshot::read(&self.files) {
            Ok(s) => s,
            Err(e) => {
                // A missing file has no snapshot to compare; report it on the
                // second poll in a row, like any other broken state.
                let marker = Snapshot {
                    cert: Vec::new(),
                    key: Vec::new(),
                    ca: e.to_string().into_bytes(),
                };
                return Err(self.failed(state, marker, e, report_now));
            }
        };
        if snap == state.applied {
            // Back to the files in use (a broken edit was reverted).
            state.pending_failure = None;
            state.reported = None;
            self.metrics.update_error.set(0);
            return Ok(false);
        }
        let built =
            Material::parse(&self.files, &snap).and_then(|m| (self.build)(&m).map(|c| (m, c)));
        match built {
            Ok((material, config)) => {
                let old = self.current.swap(Arc::new(Loaded {
                    config: Arc::new(config),
                    info: material.info.clone(),
                }));
                state.applied = snap;
                state.pending_failure = None;
                state.reported = None;
                self.metrics.update_error.set(0);
                self.publish(&material);
                tracing::info!(
                    role = self.side.as_str(),
                    cert = %self.files.cert.display(),
                    old_serial = %old.info.serial,
                    serial = %material.info.serial,
                    not_after = %fmt_time(material.info.not_after),
                    "TLS certificate files changed; new connections use the new certificate"
                );
                Ok(true)
            }
            Err(e) => Err(self.failed(state, snap, e, report_now)),
        }
    }

    fn failed(
        &self,
        state: &mut PollState,
        snap: Snapshot,
        err: TlsError,
        report_now: bool,
    ) -> TlsError {
        let stable = state.pending_failure.as_ref() == Some(&snap);
        if report_now || stable {
            let message = err.to_string();
            if state.reported.as_deref() != Some(message.as_str()) {
                tracing::error!(
                    role = self.side.as_str(),
                    error = %err,
                    serial = %self.current.load().info.serial,
                    "cannot load the new TLS certificate files; still using the previous certificate"
                );
                state.reported = Some(message);
            }
            self.metrics.update_error.set(1);
        } else {
            tracing::debug!(error = %err, "TLS files changed but do not load yet; checking again");
        }
        state.pending_failure = Some(snap);
        err
    }

    /// Updates the expiry/verify gauges and warns if the certificate would be
    /// refused by a peer using the same CA.
    fn publish(&self, material: &Material) {
        self.metrics.expiry.set(material.info.expiry);
        let algs = provider().signature_verification_algorithms;
        let now = rustls_pki_types::UnixTime::now();
        match verify_chain(
            self.side,
            &material.anchors,
            &algs,
            &material.chain[0],
            &material.chain[1..],
            now,
        ) {
            Ok(()) => {
                self.metrics.verify_error.set(0);
            }
            Err(e) => {
                self.metrics.verify_error.set(1);
                // `explain` phrases it from the checking side; here it is our own cert.
                tracing::warn!(
                    role = self.side.as_str(),
                    cert = %self.files.cert.display(),
                    ca = %self.files.ca.display(),
                    problem = %explain(self.side, &e),
                    "this TLS certificate will be refused by peers that trust --ca"
                );
            }
        }
    }
}

async fn poll_loop<T: Send + Sync + 'static>(weak: Weak<Reloading<T>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(this) = weak.upgrade() else { return };
        // The files are a few KiB: reading them inline costs less than a
        // blocking-pool hop.
        this.poll_once();
    }
}
