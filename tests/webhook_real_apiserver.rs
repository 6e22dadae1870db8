//! The real `kiam webhook` process behind a real kube-apiserver's admission
//! chain (etcd and kube-apiserver built by scripts/peers.sh): this
//! repository's MutatingWebhookConfiguration, with only its `clientConfig`
//! pointed at the process by URL, is created through the API, and pods
//! created through the API come back with the token path — or without it
//! when they have no role (the `matchConditions` CEL is the real one) or
//! their namespace did not opt in. The API server also validates the
//! patched pod, so the injected volume and mounts are proven valid.
//! SKIPPED without KIAM_ETCD_BIN and KIAM_KUBE_APISERVER_BIN.

#[path = "support/kubeapi.rs"]
mod kubeapi;
#[path = "support/procs.rs"]
mod procs;

use std::time::{Duration, Instant};

use base64::Engine;
use procs::{free_port, kiam_bin, wait_for_port, ChildGuard};
use serde_json::{json, Value};

const TOKEN_FILE: &str = "/var/run/secrets/kiam/serviceaccount/token";

fn pod(name: &str, role: Option<&str>, spec: Value) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name}, "spec": spec});
    // What the ServiceAccount admission plugin sets before webhooks run.
    p["spec"]["serviceAccountName"] = json!("default");
    if let Some(role) = role {
        p["metadata"]["annotations"] = json!({"iam.amazonaws.com/role": role});
    }
    p
}

/// POSTs a pod; (status, the answer as JSON).
fn create(api: &kubeapi::KubeApi, ns: &str, pod: &Value, dry_run: bool) -> (u16, Value) {
    let query = if dry_run { "?dryRun=All" } else { "" };
    let (code, text) = api
        .curl(
            "POST",
            &format!("/api/v1/namespaces/{ns}/pods{query}"),
            Some("application/json"),
            Some(pod),
        )
        .unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn env_of(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_string)
}

fn injected(pod: &Value) -> bool {
    let spec = &pod["spec"];
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|f| spec[*f].as_array().into_iter().flatten())
        .collect();
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "kiam-token");
    !containers.is_empty()
        && containers.iter().all(|c| {
            env_of(c, "AWS_CONTAINER_CREDENTIALS_FULL_URI").as_deref()
                == Some("http://169.254.170.23/v1/credentials")
                && env_of(c, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").as_deref()
                    == Some(TOKEN_FILE)
                && c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"] == "kiam-token" && m["readOnly"] == true)
        })
        && volume.is_some_and(|v| {
            let sat = &v["projected"]["sources"][0]["serviceAccountToken"];
            sat["audience"] == "kiam" && sat["expirationSeconds"] == 3600
        })
}

fn untouched(pod: &Value) -> bool {
    !pod.to_string().contains("kiam-token") && !pod.to_string().contains("169.254.170.23")
}

/// Another mutating webhook, as service meshes run: adds a `sidecar`
/// container to every pod it sees (once).
async fn sidecar_injector(pki: &kiam::certs::Pki) -> u16 {
    use axum::routing::post;
    kiam::ensure_crypto_provider();
    let tls = kiam::tls::HttpsTls::load(
        pki.server_files(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/mutate",
        post(|body: axum::body::Bytes| async move {
            let review: Value = serde_json::from_slice(&body).unwrap();
            let request = &review["request"];
            let has = request["object"]["spec"]["containers"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"] == "sidecar"));
            let mut response = json!({"uid": request["uid"], "allowed": true});
            if !has {
                let patch = json!([{"op": "add", "path": "/spec/containers/-",
                    "value": {"name": "sidecar", "image": "sidecar"}}]);
                response["patchType"] = json!("JSONPatch");
                response["patch"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
            }
            axum::Json(json!({"apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview", "response": response}))
        }),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(conn) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(conn),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
            });
        }
    });
    port
}

#[test]
fn real_apiserver_calls_kiam_webhook() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    let pki = kiam::certs::generate(&api.dir.path().join("kiam-certs"), &[], 1).unwrap();
    let port = free_port();
    let mut cmd = kiam_bin();
    cmd.args(["webhook", "--bind", &format!("127.0.0.1:{port}")]);
    kiam_sandbox::procs::tls_args(&mut cmd, &pki.dir, "server");
    let webhook = ChildGuard::spawn("kiam webhook", cmd).unwrap();
    assert!(wait_for_port(port, Duration::from_secs(20)));

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/components/webhook/webhook-configuration.yaml"
    );
    let mut config: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    for w in config["webhooks"].as_array_mut().unwrap() {
        w["clientConfig"] = json!({
            "url": format!("https://127.0.0.1:{port}/mutate"),
            "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca),
        });
    }
    api.must(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        "application/json",
        &config,
    );
    for (name, labels) in [
        (
            "team-a",
            json!({"iam.amazonaws.com/token-identity": "enabled"}),
        ),
        ("team-b", json!({})),
    ] {
        api.must(
            "POST",
            "/api/v1/namespaces",
            "application/json",
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}}),
        );
    }

    let spec = json!({"nodeName": "node-1",
        "initContainers": [{"name": "init", "image": "busybox"}],
        "containers": [{"name": "app", "image": "app"}, {"name": "side", "image": "side"}]});
    // The API server picks the new configuration up from its own watch:
    // dry runs (allowed: sideEffects None) until it does.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, shown) = create(&api, "team-a", &pod("probe", Some("r"), spec.clone()), true);
        if code == 201 && injected(&shown) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the real API server never applied the webhook's patch: {code} {shown}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let (code, web) = create(
        &api,
        "team-a",
        &pod("web", Some("reader"), spec.clone()),
        false,
    );
    assert_eq!(code, 201, "{web}");
    assert!(injected(&web), "{web}");
    let (_, stored) = api
        .curl("GET", "/api/v1/namespaces/team-a/pods/web", None, None)
        .unwrap();
    assert!(injected(&serde_json::from_str(&stored).unwrap()));

    // hostNetwork pods are the ones that need the token path most.
    let mut host = spec.clone();
    host["hostNetwork"] = json!(true);
    let (code, shown) = create(&api, "team-a", &pod("host", Some("reader"), host), false);
    assert_eq!(code, 201, "{shown}");
    assert!(injected(&shown), "{shown}");

    // No role: the configuration's matchConditions (real CEL) skip it.
    let (code, shown) = create(&api, "team-a", &pod("plain", None, spec.clone()), false);
    assert_eq!(code, 201, "{shown}");
    assert!(untouched(&shown), "{shown}");
    // A namespace that did not opt in.
    let (code, shown) = create(
        &api,
        "team-b",
        &pod("web", Some("reader"), spec.clone()),
        false,
    );
    assert_eq!(code, 201, "{shown}");
    assert!(untouched(&shown), "{shown}");

    // A pod that wrote the token path itself is left exactly as written.
    let own = json!({"nodeName": "node-1",
        "containers": [{"name": "app", "image": "app",
            "env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9911/x"}]}]});
    let (code, shown) = create(&api, "team-a", &pod("own", Some("reader"), own), false);
    assert_eq!(code, 201, "{shown}");
    let c = &shown["spec"]["containers"][0];
    assert_eq!(
        env_of(c, "AWS_CONTAINER_CREDENTIALS_FULL_URI").as_deref(),
        Some("http://127.0.0.1:9911/x")
    );
    assert_eq!(env_of(c, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"), None);

    // reinvocationPolicy: IfNeeded. A sidecar injector ordered after ours
    // ("z-..." > "kiam-webhook") adds a container; the real API server calls
    // kiam's webhook again and the sidecar gets the token path too, with
    // nothing added twice.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sidecar_port = rt.block_on(sidecar_injector(&pki));
    let mut sidecar = config.clone();
    sidecar["metadata"] = json!({"name": "z-sidecar-injector"});
    let w = &mut sidecar["webhooks"][0];
    w["name"] = json!("sidecar.injector.example.com");
    w["reinvocationPolicy"] = json!("Never");
    w["clientConfig"]["url"] = json!(format!("https://127.0.0.1:{sidecar_port}/mutate"));
    api.must(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        "application/json",
        &sidecar,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, shown) = create(
            &api,
            "team-a",
            &pod("probe2", Some("r"), spec.clone()),
            true,
        );
        let containers = shown["spec"]["containers"].as_array().map_or(0, Vec::len);
        if code == 201 && containers == 3 {
            assert!(
                injected(&shown),
                "the sidecar was not given the token path: {shown}"
            );
            let volumes = shown["spec"]["volumes"].as_array().unwrap();
            assert_eq!(
                volumes.iter().filter(|v| v["name"] == "kiam-token").count(),
                1,
                "{shown}"
            );
            for c in shown["spec"]["containers"].as_array().unwrap() {
                let n = c["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["name"] == "AWS_CONTAINER_CREDENTIALS_FULL_URI")
                    .count();
                assert_eq!(n, 1, "{c}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar injector was never called: {code} {shown}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    api.must(
        "DELETE",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/z-sidecar-injector",
        "application/json",
        &json!({}),
    );
    drop(rt);

    // failurePolicy: Fail. With the webhook gone, role pods in opted-in
    // namespaces are refused; pods without a role are not held up.
    drop(webhook);
    let (code, status) = create(
        &api,
        "team-a",
        &pod("down", Some("reader"), spec.clone()),
        false,
    );
    assert_eq!(code, 500, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or("")
            .contains("failed calling webhook \"token-identity.kiam.amazonaws.com\""),
        "{status}"
    );
    let (code, shown) = create(&api, "team-a", &pod("plain-down", None, spec), false);
    assert_eq!(code, 201, "{shown}");
}
