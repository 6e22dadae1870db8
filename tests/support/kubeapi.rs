//! A real Kubernetes API server for tests: etcd and kube-apiserver, the
//! binaries `scripts/peers.sh etcd` and `scripts/peers.sh kube-apiserver`
//! build, given in `KIAM_ETCD_BIN` and `KIAM_KUBE_APISERVER_BIN`
//! (scripts/test.sh sets them). Both listen on loopback only, on free ports,
//! with their state in a temporary directory. There is no kubelet and no
//! controller manager: tests create pods with `spec.nodeName` and set their
//! `status` through the status subresource. The admin credential is a static
//! token in `system:masters`; authorization is RBAC.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiam_sandbox::procs::{wait_for_port, wait_until, ChildGuard};

/// The admin's bearer token (a static token file entry).
const ADMIN_TOKEN: &str = "kiam-test-admin-token";

/// The two binaries, or `None` after a loud SKIPPED line when either
/// variable is unset. Panics when a variable names no file.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let var = |name: &str| std::env::var_os(name).filter(|p| !p.is_empty());
    let (Some(etcd), Some(apiserver)) = (var("KIAM_ETCD_BIN"), var("KIAM_KUBE_APISERVER_BIN"))
    else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: KIAM_ETCD_BIN or KIAM_KUBE_APISERVER_BIN is not set \
             (scripts/test.sh sets them from scripts/peers.sh etcd / kube-apiserver); \
             nothing was tested against a real kube-apiserver ***\n"
        );
        return None;
    };
    let (etcd, apiserver) = (PathBuf::from(etcd), PathBuf::from(apiserver));
    for p in [&etcd, &apiserver] {
        assert!(p.is_file(), "{} is not a file", p.display());
    }
    Some((etcd, apiserver))
}

/// A running etcd and kube-apiserver; both are killed when dropped.
pub struct KubeApi {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig with the admin token and the serving certificate's CA.
    pub kubeconfig: PathBuf,
    /// The CA (bundle) that verifies the API server's serving certificate.
    pub ca: PathBuf,
    // Dropped in this order: the API server before its etcd.
    apiserver: ChildGuard,
    etcd: ChildGuard,
    pub dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    kiam_sandbox::procs::free_port().expect("a free loopback port")
}

fn child_log(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
}

fn log_tail(dir: &Path, name: &str) -> String {
    kiam_sandbox::procs::log_tail(&dir.join(format!("{name}.log")), 30)
}

impl KubeApi {
    /// Starts etcd, then kube-apiserver against it, and waits (up to two
    /// minutes, for a loaded machine) until the API server is ready.
    pub fn start(etcd_bin: &Path, apiserver_bin: &Path) -> KubeApi {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        let client = free_port();
        let peer = free_port();
        let mut cmd = Command::new(etcd_bin);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=test=http://127.0.0.1:{peer}"))
            .arg("--listen-metrics-urls=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(child_log(d, "etcd"));
        let etcd = ChildGuard {
            child: cmd.spawn().expect("start etcd"),
            name: "etcd".into(),
        };
        assert!(
            wait_for_port(client, Duration::from_secs(60)),
            "etcd did not listen on {client}:\n{}",
            log_tail(d, "etcd")
        );

        // The service-account signing key, and the static admin token.
        let sa_key = d.join("sa.key");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&sa_key, key.serialize_pem()).unwrap();
        let sa_pub = d.join("sa.pub");
        std::fs::write(&sa_pub, key.public_key_pem()).unwrap();
        let tokens = d.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{ADMIN_TOKEN},kiam-test-admin,kiam-test-admin,system:masters\n"),
        )
        .unwrap();

        let port = free_port();
        let certs = d.join("apiserver-certs");
        let mut cmd = Command::new(apiserver_bin);
        cmd.arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", certs.display()))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            // No controller manager makes the namespaces' default service
            // accounts, which this admission plugin would require of pods.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--enable-priority-and-fairness=false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(child_log(d, "kube-apiserver"));
        let apiserver = ChildGuard {
            child: cmd.spawn().expect("start kube-apiserver"),
            name: "kube-apiserver".into(),
        };

        // Self-signed by kube-apiserver into --cert-dir: the file holds the
        // serving certificate and the CA that signed it.
        let ca = certs.join("apiserver.crt");
        let url = format!("https://127.0.0.1:{port}");
        let mut api = KubeApi {
            url: url.clone(),
            kubeconfig: d.join("kubeconfig"),
            ca: ca.clone(),
            apiserver,
            etcd,
            dir,
        };
        let ready = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
            // Stop waiting when it exited (a flag it refuses, ...).
            matches!(api.apiserver.child.try_wait(), Ok(Some(_)))
                || ca.is_file()
                    && api
                        .curl("GET", "/readyz", None, None)
                        .map(|(code, _)| code == 200)
                        .unwrap_or(false)
        });
        assert!(
            ready && matches!(api.apiserver.child.try_wait(), Ok(None)),
            "kube-apiserver was not ready within 120 s:\n{}",
            log_tail(api.dir.path(), "kube-apiserver")
        );
        api.write_kubeconfig();
        api
    }

    fn write_kubeconfig(&mut self) {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "real", "cluster": {
                "server": self.url,
                "certificate-authority": self.ca,
            }}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": "admin"}}],
            "current-context": "real",
        });
        std::fs::write(
            &self.kubeconfig,
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
    }

    /// One request as the admin, with curl: (HTTP status, body).
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method])
            .arg("--cacert")
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .args(["-w", "\n%{http_code}"]);
        if let Some(ct) = content_type {
            cmd.args(["-H", &format!("Content-Type: {ct}")]);
        }
        if let Some(b) = body {
            cmd.args(["--data-binary", &b.to_string()]);
        }
        cmd.arg(format!("{}{path}", self.url));
        let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code
            .trim()
            .parse()
            .map_err(|_| format!("bad curl output {text:?}"))?;
        Ok((code, body.to_string()))
    }

    /// A request that must succeed (2xx); panics with the answer otherwise.
    pub fn must(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &serde_json::Value,
    ) -> String {
        let (code, text) = self
            .curl(method, path, Some(content_type), Some(body))
            .unwrap();
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        text
    }

    /// A namespace with `iam.amazonaws.com/permitted: permitted`.
    pub fn namespace(&self, name: &str, permitted: &str) {
        self.must(
            "POST",
            "/api/v1/namespaces",
            "application/json",
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name,
                    "annotations": {"iam.amazonaws.com/permitted": permitted}}}),
        );
    }

    /// A pod on a (nonexistent) node annotated with `role`, made Running
    /// with `ip` through the status subresource, as a kubelet would.
    pub fn pod(&self, ns: &str, name: &str, ip: &str, role: &str) {
        self.must(
            "POST",
            &format!("/api/v1/namespaces/{ns}/pods"),
            "application/json",
            &serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns,
                    "annotations": {"iam.amazonaws.com/role": role}},
                "spec": {"nodeName": "node-1",
                    "containers": [{"name": "app", "image": "busybox"}]}}),
        );
        self.must(
            "PATCH",
            &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            "application/merge-patch+json",
            &serde_json::json!({"status": {"phase": "Running", "podIP": ip,
                "podIPs": [{"ip": ip}]}}),
        );
    }
}

/// The API path that creates objects of `doc`'s kind (cluster-scoped, or
/// in `namespace`), for the kinds the manifests hold.
fn collection_path(doc: &serde_json::Value, namespace: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let (base, plural, namespaced) = match kind {
        "ServiceAccount" => ("/api/v1", "serviceaccounts", true),
        "Secret" => ("/api/v1", "secrets", true),
        "Service" => ("/api/v1", "services", true),
        "ClusterRole" => ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", false),
        "ClusterRoleBinding" => (
            "/apis/rbac.authorization.k8s.io/v1",
            "clusterrolebindings",
            false,
        ),
        "Deployment" => ("/apis/apps/v1", "deployments", true),
        "DaemonSet" => ("/apis/apps/v1", "daemonsets", true),
        "PodDisruptionBudget" => ("/apis/policy/v1", "poddisruptionbudgets", true),
        other => panic!("kubeapi: no path known for kind {other}"),
    };
    if namespaced {
        format!("{base}/namespaces/{namespace}/{plural}")
    } else {
        format!("{base}/{plural}")
    }
}

impl KubeApi {
    /// Creates `doc` as the admin (in `namespace` when it is namespaced),
    /// with strict field validation (an unknown or duplicated field is an
    /// error, as `kubectl apply` makes it); returns (HTTP status, body) so
    /// callers can tell a refusal apart.
    pub fn create(&self, doc: &serde_json::Value, namespace: &str) -> (u16, String) {
        let mut doc = doc.clone();
        if let Some(meta) = doc["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        self.curl(
            "POST",
            &format!(
                "{}?fieldValidation=Strict",
                collection_path(&doc, namespace)
            ),
            Some("application/json"),
            Some(&doc),
        )
        .unwrap()
    }

    /// A token for service account `ns/name` (the TokenRequest API), as a
    /// kubelet would mount it.
    pub fn service_account_token(&self, ns: &str, name: &str) -> String {
        let text = self.must(
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}/token"),
            "application/json",
            &serde_json::json!({"apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}),
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["status"]["token"]
            .as_str()
            .expect("a token in the TokenRequest status")
            .to_string()
    }

    /// A kubeconfig at `path` that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "real", "cluster": {
                "server": self.url,
                "certificate-authority": self.ca,
            }}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": "sa"}}],
            "current-context": "real",
        });
        std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }

    /// GET `path` as the admin, parsed.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (code, text) = self.curl("GET", path, None, None).unwrap();
        assert_eq!(code, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}
