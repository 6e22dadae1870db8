//! `kiam webhook` in the sandbox: started next to the fake API server (on
//! the host, where that server calls it) and registered with the
//! repository's own MutatingWebhookConfiguration, its `clientConfig` pointed
//! at the process by URL. Pods created through the API (`kubectl apply`) in
//! a namespace labelled `iam.amazonaws.com/token-identity=enabled` then get
//! the token path; pods the sandbox adds itself are written directly, as a
//! kubelet's view, and go through no admission.

use std::net::SocketAddr;
use std::process::Command;

use base64::Engine;
use serde_json::{json, Value};

use super::{Sandbox, SandboxError};
use crate::procs;

/// Where the configuration lives in the repository.
const CONFIGURATION: &str = "deploy/components/webhook/webhook-configuration.yaml";

impl Sandbox {
    /// Starts `kiam webhook` and registers it. A checkout without the
    /// manifest (an installed sandbox) runs without the webhook, with a
    /// warning.
    pub(super) fn start_webhook(&mut self) -> Result<(), SandboxError> {
        let path = procs::workspace_root().join(CONFIGURATION);
        let Ok(text) = std::fs::read_to_string(&path) else {
            self.warnings.push(format!(
                "kiam webhook not started: {} is missing",
                path.display()
            ));
            return Ok(());
        };
        let port = procs::free_port().map_err(super::io("picking a port"))?;
        let mut cmd = Command::new(&self.kiam);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KIAM_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("NO_COLOR", "1")
            .args(["webhook", "--bind", &format!("127.0.0.1:{port}")]);
        procs::tls_args(&mut cmd, &self.certs, "server");
        self.procs.spawn("kiam-webhook", cmd)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.wait_until("kiam webhook", "kiam-webhook", || {
            std::net::TcpStream::connect(addr).is_ok()
        })?;
        let ca = std::fs::read(self.certs.join("ca.pem")).map_err(super::io("reading ca.pem"))?;
        let mut config: Value = serde_yaml::from_str(&text)
            .map_err(|e| SandboxError::Pod(format!("{}: {e}", path.display())))?;
        for w in config["webhooks"].as_array_mut().into_iter().flatten() {
            w["clientConfig"] = json!({
                "url": format!("https://{addr}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca),
            });
        }
        self.api()
            .register_mutating_webhook_configuration(config)
            .map_err(|e| SandboxError::Pod(format!("registering the webhook: {e}")))?;
        Ok(())
    }
}
