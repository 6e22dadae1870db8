//! The containers of rendered manifests (kustomize or Helm) as a kubelet
//! would run them: their Secret volumes written out as local directories,
//! their command lines pointed at those, their environment from the
//! downward API; shared by tests/deploy.rs and tests/helm.rs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::Value;

use super::procs;

/// What `status.podIP`/`status.hostIP` give a simulated container.
pub const FAKE_POD_IP: &str = "10.20.30.40";
/// The second address of a dual-stack node (`status.podIPs`).
pub const FAKE_POD_IPV6: &str = "2001:2::10";
pub const FAKE_NODE_NAME: &str = "ip-10-20-30-40.eu-west-1.compute.internal";

/// Secret name -> key -> bytes.
pub type Secrets = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// `Kind/name` of a manifest object.
pub fn kind_name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// A Secret's `data`, decoded.
pub fn decode_data(secret: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for (k, v) in secret["data"].as_object().unwrap() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap_or_else(|e| panic!("Secret {} key {k}: {e}", kind_name(secret)));
        files.insert(k.clone(), bytes);
    }
    files
}

/// A container of a rendered workload, with its Secret mounts turned into
/// local directories.
pub struct Container {
    pub workload: String,
    pub spec: Value,
    /// mountPath -> local directory holding the Secret's files.
    pub mounts: Vec<(String, PathBuf)>,
}

pub fn containers(docs: &[Value], secrets: &Secrets, dir: &Path) -> Vec<Container> {
    let mut out = Vec::new();
    for doc in docs {
        let pod = &doc["spec"]["template"]["spec"];
        if pod.is_null() {
            continue;
        }
        let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
        for c in pod["containers"].as_array().unwrap() {
            let mut mounts = Vec::new();
            for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
                let vol = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("{}: no volume {}", kind_name(doc), m["name"]));
                let Some(secret) = vol["secret"]["secretName"].as_str() else {
                    continue;
                };
                let files = secrets.get(secret).unwrap_or_else(|| {
                    panic!(
                        "{} mounts Secret {secret}, which nothing makes",
                        kind_name(doc)
                    )
                });
                let local = dir.join(format!("{}-{}", kind_name(doc).replace('/', "-"), secret));
                std::fs::create_dir_all(&local).unwrap();
                for (key, bytes) in files {
                    // `items` maps keys to other file names; none means all keys.
                    let path = match vol["secret"]["items"].as_array() {
                        Some(items) => match items.iter().find(|i| i["key"] == key.as_str()) {
                            Some(i) => i["path"].as_str().unwrap().to_string(),
                            None => continue,
                        },
                        None => key.clone(),
                    };
                    std::fs::write(local.join(path), bytes).unwrap();
                }
                mounts.push((m["mountPath"].as_str().unwrap().to_string(), local));
            }
            out.push(Container {
                workload: kind_name(doc),
                spec: c.clone(),
                mounts,
            });
        }
    }
    out
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

impl Container {
    /// The kiam argv (without the program) of `command` + `args`, or `None`
    /// when the container does not run kiam.
    pub fn kiam_argv(&self, command: &[String]) -> Option<Vec<String>> {
        let program = command.first()?;
        if !program.ends_with("/kiam") && program != "kiam" {
            return None;
        }
        // The image provides these two paths (Containerfile).
        assert!(
            ["/usr/local/bin/kiam", "/kiam"].contains(&program.as_str()),
            "{}: {program} is not where the image installs kiam",
            self.workload
        );
        Some(command[1..].iter().map(|a| self.local_paths(a)).collect())
    }

    pub fn main_argv(&self) -> Option<Vec<String>> {
        let mut cmd = strings(&self.spec["command"]);
        cmd.extend(strings(&self.spec["args"]));
        self.kiam_argv(&cmd)
    }

    /// Exec probes that run kiam, by probe name.
    pub fn probe_argvs(&self) -> Vec<(String, Vec<String>)> {
        ["startupProbe", "readinessProbe", "livenessProbe"]
            .iter()
            .filter_map(|p| {
                let cmd = strings(&self.spec[*p]["exec"]["command"]);
                self.kiam_argv(&cmd).map(|a| (p.to_string(), a))
            })
            .collect()
    }

    /// Points paths under a Secret mount at the local copy of that Secret.
    pub fn local_paths(&self, arg: &str) -> String {
        let mut arg = arg.to_string();
        for (mount, local) in &self.mounts {
            let prefix = format!("{}/", mount.trim_end_matches('/'));
            arg = arg.replace(&prefix, &format!("{}/", local.display()));
        }
        arg
    }

    /// The container's environment as the kubelet would set it.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in self.spec["env"].as_array().cloned().unwrap_or_default() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("status.podIP" | "status.hostIP") => FAKE_POD_IP.to_string(),
                    // A dual-stack node: the list the downward API gives.
                    Some("status.podIPs" | "status.hostIPs") => {
                        format!("{FAKE_POD_IP},{FAKE_POD_IPV6}")
                    }
                    Some("spec.nodeName") => FAKE_NODE_NAME.to_string(),
                    other => panic!(
                        "{}: env {name} from {other:?} is not simulated",
                        self.workload
                    ),
                }
            };
            out.push((name, value));
        }
        out
    }
}

/// `kiam` with only the container's environment (and PATH), so no KIAM_*
/// variable of the test run leaks in.
pub fn kiam_in(c: &Container, argv: &[String]) -> Command {
    let mut cmd = procs::kiam_bin();
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(c.env())
        .args(argv);
    cmd
}

/// Replaces `--flag=...` (or adds it).
pub fn set_flag(argv: &mut Vec<String>, name: &str, value: &str) {
    let prefix = format!("--{name}=");
    argv.retain(|a| !a.starts_with(&prefix) && a != &format!("--{name}"));
    argv.push(format!("{prefix}{value}"));
}

/// One HTTP GET to a probe's port: the status code (0 when nothing
/// answered within 15 s).
pub async fn http_status(port: u16, path: &str) -> u16 {
    procs::http_get(port, path, std::time::Duration::from_secs(15))
        .await
        .map(|(status, _)| status)
        .unwrap_or(0)
}
