use super::*;

fn pod(annotations: Value, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "team-a", "annotations": annotations},
           "spec": spec})
}

/// A pod with a role, and the service account the ServiceAccount
/// admission plugin sets before webhooks run.
fn with_role(mut spec: Value) -> Value {
    if let Some(s) = spec.as_object_mut() {
        s.entry("serviceAccountName").or_insert("default".into());
    }
    pod(json!({ROLE_ANNOTATION: "reader"}), spec)
}

/// Applies the operations as the API server would (RFC 6902).
fn apply(pod: &Value, ops: &[Value]) -> Value {
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_string)
}

fn mounts(c: &Value) -> Vec<&Value> {
    c["volumeMounts"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["name"] == VOLUME_NAME).collect())
        .unwrap_or_default()
}

#[test]
fn every_container_and_init_container_gets_env_and_mount() {
    let p = with_role(json!({
        "initContainers": [{"name": "init", "image": "busybox"}],
        "containers": [
            {"name": "a", "image": "x", "env": [{"name": "KEEP", "value": "1"}]},
            {"name": "b", "image": "y", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
        ],
        "volumes": [{"name": "data", "emptyDir": {}}]
    }));
    let (ops, outcome) = operations(&p, &Injection::default()).unwrap();
    assert_eq!(outcome, Outcome::Injected);
    let out = apply(&p, &ops);
    let spec = &out["spec"];
    let all: Vec<&Value> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["containers"].as_array().unwrap())
        .collect();
    assert_eq!(all.len(), 3);
    for c in all {
        assert_eq!(env_value(c, ENV_FULL_URI).as_deref(), Some(CREDENTIALS_URI));
        assert_eq!(
            env_value(c, ENV_TOKEN_FILE).as_deref(),
            Some("/var/run/secrets/kiam/serviceaccount/token")
        );
        let m = mounts(c);
        assert_eq!(m.len(), 1, "{c}");
        assert_eq!(m[0]["readOnly"], true);
        assert_eq!(m[0]["mountPath"], MOUNT_PATH);
    }
    // Existing entries stay, in order, before ours.
    assert_eq!(spec["containers"][0]["env"][0]["name"], "KEEP");
    assert_eq!(spec["containers"][1]["volumeMounts"][0]["name"], "data");
    let volumes = spec["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    assert_eq!(
        volumes[1],
        json!({"name": VOLUME_NAME, "projected": {"sources": [{"serviceAccountToken":
            {"audience": "kiam", "expirationSeconds": 3600, "path": "token"}}]}})
    );
}

#[test]
fn audience_and_expiry_come_from_the_flags() {
    let p = with_role(json!({"containers": [{"name": "a", "image": "x"}]}));
    let inj = Injection {
        audience: "sts.kiam.example".into(),
        expiration_seconds: 7200,
    };
    let out = apply(&p, &operations(&p, &inj).unwrap().0);
    let sat = &out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "sts.kiam.example");
    assert_eq!(sat["expirationSeconds"], 7200);
}

#[test]
fn missing_arrays_are_added_whole() {
    let p = with_role(json!({"containers": [{"name": "a", "image": "x"}]}));
    let (ops, _) = operations(&p, &Injection::default()).unwrap();
    let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/spec/containers/0/env",
            "/spec/containers/0/volumeMounts",
            "/spec/volumes"
        ]
    );
    // A null array (as some clients send) is treated as missing.
    let p = with_role(json!({"containers": [{"name": "a", "env": null}], "volumes": null}));
    let out = apply(&p, &operations(&p, &Injection::default()).unwrap().0);
    assert_eq!(
        out["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn variables_a_container_sets_are_never_overwritten() {
    let p = with_role(json!({"containers": [
        {"name": "own-uri", "env": [{"name": ENV_FULL_URI, "value": "http://127.0.0.1:9911/creds"}]},
        {"name": "own-file", "env": [{"name": ENV_TOKEN_FILE, "value": "/mine"}]},
        {"name": "relative", "env": [{"name": "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "value": "/v2/x"}]},
        {"name": "plain"}
    ]}));
    let out = apply(&p, &operations(&p, &Injection::default()).unwrap().0);
    let cs = out["spec"]["containers"].as_array().unwrap();
    assert_eq!(
        env_value(&cs[0], ENV_FULL_URI).as_deref(),
        Some("http://127.0.0.1:9911/creds")
    );
    // Never our token file next to a URL the container chose.
    assert_eq!(env_value(&cs[0], ENV_TOKEN_FILE), None);
    assert_eq!(env_value(&cs[1], ENV_TOKEN_FILE).as_deref(), Some("/mine"));
    assert_eq!(env_value(&cs[1], ENV_FULL_URI), None);
    assert_eq!(cs[2]["env"].as_array().unwrap().len(), 1);
    assert_eq!(
        env_value(&cs[3], ENV_FULL_URI).as_deref(),
        Some(CREDENTIALS_URI)
    );
    for c in cs {
        let uris = c["env"].as_array().unwrap().iter();
        assert!(uris.filter(|e| e["name"] == ENV_FULL_URI).count() <= 1);
    }
}

#[test]
fn mounts_and_volumes_a_pod_has_are_kept() {
    // The pod wrote the YAML itself (docs/WEBHOOK.md): nothing to add.
    let own_volume = json!({"name": VOLUME_NAME, "projected": {"sources": [
        {"serviceAccountToken": {"audience": "kiam", "path": "token"}}]}});
    let p = with_role(json!({
        "containers": [{"name": "a",
            "env": [{"name": ENV_FULL_URI, "value": CREDENTIALS_URI},
                    {"name": ENV_TOKEN_FILE, "value": "/var/run/secrets/kiam/serviceaccount/token"}],
            "volumeMounts": [{"name": VOLUME_NAME, "mountPath": MOUNT_PATH, "readOnly": true}]}],
        "volumes": [own_volume.clone()]
    }));
    let (ops, outcome) = operations(&p, &Injection::default()).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(outcome, Outcome::AlreadySet);
    // Something else mounted at our path: that mount stays, ours is not added.
    let p = with_role(json!({"containers": [{"name": "a",
        "volumeMounts": [{"name": "other", "mountPath": format!("{MOUNT_PATH}/")}]}],
        "volumes": [{"name": "other", "emptyDir": {}}]}));
    let out = apply(&p, &operations(&p, &Injection::default()).unwrap().0);
    assert_eq!(
        out["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 1);
}

#[test]
fn patching_twice_changes_nothing_the_second_time() {
    let p = with_role(json!({
        "initContainers": [{"name": "i"}],
        "containers": [{"name": "a"}, {"name": "b", "env": [{"name": "X", "value": "y"}]}]
    }));
    let once = apply(&p, &operations(&p, &Injection::default()).unwrap().0);
    let (ops, outcome) = operations(&once, &Injection::default()).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(outcome, Outcome::AlreadySet);
}

#[test]
fn a_container_added_after_the_first_call_is_patched_on_reinvocation() {
    // reinvocationPolicy: IfNeeded — another webhook added a sidecar after ours.
    let p = with_role(json!({"containers": [{"name": "a"}]}));
    let mut once = apply(&p, &operations(&p, &Injection::default()).unwrap().0);
    once["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "sidecar"}));
    let (ops, outcome) = operations(&once, &Injection::default()).unwrap();
    assert_eq!(outcome, Outcome::Injected);
    let twice = apply(&once, &ops);
    assert_eq!(twice["spec"]["volumes"].as_array().unwrap().len(), 1);
    let sidecar = &twice["spec"]["containers"][1];
    assert_eq!(
        env_value(sidecar, ENV_FULL_URI).as_deref(),
        Some(CREDENTIALS_URI)
    );
    assert_eq!(mounts(sidecar).len(), 1);
}

#[test]
fn no_service_account_no_patch() {
    // The ServiceAccount admission plugin is off: a projected token would
    // make the API server refuse the pod.
    let p = pod(
        json!({ROLE_ANNOTATION: "reader"}),
        json!({"containers": [{"name": "a"}]}),
    );
    let (ops, outcome) = operations(&p, &Injection::default()).unwrap();
    assert!(ops.is_empty());
    assert_eq!(outcome, Outcome::NoServiceAccount);
    // The deprecated field counts too.
    let p = pod(
        json!({ROLE_ANNOTATION: "reader"}),
        json!({"serviceAccount": "app", "containers": [{"name": "a"}]}),
    );
    assert_eq!(
        operations(&p, &Injection::default()).unwrap().1,
        Outcome::Injected
    );
}

#[test]
fn no_role_no_patch() {
    for annotations in [
        json!({}),
        json!(null),
        json!({ROLE_ANNOTATION: " "}),
        json!({"other": "x"}),
    ] {
        let p = pod(annotations, json!({"containers": [{"name": "a"}]}));
        let (ops, outcome) = operations(&p, &Injection::default()).unwrap();
        assert!(ops.is_empty());
        assert_eq!(outcome, Outcome::NoRole);
    }
    let p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
    assert_eq!(
        operations(&p, &Injection::default()).unwrap().1,
        Outcome::NoRole
    );
}

#[test]
fn malformed_pods_are_refused_to_patch_not_panicked_on() {
    let inj = Injection::default();
    for bad in [
        json!("a string"),
        json!([1, 2]),
        with_role(json!(null)),
        with_role(json!({"containers": {"name": "a"}})),
        with_role(json!({"containers": ["a"]})),
        with_role(json!({"containers": [{"name": "a", "env": "X=1"}]})),
        with_role(json!({"containers": [{"name": "a", "volumeMounts": {}}]})),
        with_role(json!({"containers": [{"name": "a"}], "volumes": 3})),
    ] {
        assert!(operations(&bad, &inj).is_err(), "{bad}");
    }
    // A role annotation that is not a string counts as no role.
    let p = pod(json!({ROLE_ANNOTATION: 7}), json!({"containers": []}));
    assert_eq!(operations(&p, &inj).unwrap().1, Outcome::NoRole);
}
