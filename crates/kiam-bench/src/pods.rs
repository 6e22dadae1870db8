//! Pod objects shaped like what a real API server returns for a Deployment's
//! pod (4-8 KB of JSON): labels, annotations including the iam role,
//! owner references, managed fields, containers with env, probes, resources
//! and volume mounts, volumes, tolerations, and a Running status with
//! conditions and container statuses. Deterministic: the same index gives
//! the same pod, so separate processes agree on what they measured.

use serde_json::{json, Value};

/// The base ARN every bench server resolves role names with.
pub const BASE_ARN: &str = "arn:aws:iam::123456789012:role/";

/// What varies between benchmark pods.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub role: Option<String>,
    /// Extra env vars, to spread sizes over 4-8 KB.
    pub extra_env: usize,
}

/// The pod with index `i` in a population of `namespaces` namespaces and
/// `roles` roles, on a 10.64.0.0/10-style address (never contacted: pod IPs
/// are only data to the server).
pub fn population(i: usize, namespaces: usize, roles: usize) -> PodSpec {
    let ns = i % namespaces.max(1);
    PodSpec {
        namespace: format!("team-{ns:03}"),
        name: format!(
            "svc-{:03}-{:08x}-{i:06}",
            i % 97,
            (i as u32).wrapping_mul(2654435761)
        ),
        ip: ip_for(i),
        role: Some(format!("team-{ns:03}-role-{:03}", i % roles.max(1))),
        extra_env: i % 24,
    }
}

/// A unique address in 10.64.0.0/10 for pod `i` (up to ~4M pods).
pub fn ip_for(i: usize) -> String {
    let n = i + 1;
    format!("10.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
}

/// The namespace object; `permitted` becomes `iam.amazonaws.com/permitted`.
pub fn namespace(name: &str, permitted: Option<&str>) -> Value {
    let mut ns = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    });
    if let Some(p) = permitted {
        ns["metadata"]["annotations"] = json!({"iam.amazonaws.com/permitted": p});
    }
    ns
}

/// The full pod object.
pub fn pod(p: &PodSpec) -> Value {
    let app = p.name.split('-').take(2).collect::<Vec<_>>().join("-");
    let hash = &p.name[p.name.len() - 15..p.name.len() - 7];
    let uid = uid_for(&p.namespace, &p.name);
    let mut annotations = json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9102",
        "checksum/config": "3c5e8f9d0b1a2c4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6",
        "kubectl.kubernetes.io/restartedAt": "2026-11-20T09:14:03Z",
    });
    if let Some(role) = &p.role {
        annotations["iam.amazonaws.com/role"] = json!(role);
    }
    let mut env = vec![
        json!({"name": "AWS_REGION", "value": "eu-west-1"}),
        json!({"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"}),
        json!({"name": "LOG_LEVEL", "value": "info"}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}),
        json!({"name": "DATABASE_PASSWORD", "valueFrom": {"secretKeyRef": {"name": format!("{app}-db"), "key": "password"}}}),
        json!({"name": "JAVA_OPTS", "value": "-XX:MaxRAMPercentage=75 -XX:+UseG1GC -Dfile.encoding=UTF-8"}),
    ];
    for k in 0..p.extra_env {
        env.push(json!({"name": format!("FEATURE_FLAG_{k:02}"), "value": format!("enabled-for-cohort-{k}-of-{app}")}));
    }
    let sidecar_env = json!([{"name": "STATSD_PORT", "value": "9125"}]);
    let app_container = |name: &str, image: &str, port: u16, env: &Value| {
        json!({
            "name": name, "image": image,
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "env": env,
            "resources": {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "256Mi"}},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": true},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}
            ],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": port, "scheme": "HTTP"}, "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": port, "scheme": "HTTP"}, "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}
        })
    };
    let image = format!(
        "registry.example.com/{app}:1.{}.{}",
        p.extra_env,
        p.extra_env * 7
    );
    let status_of = |name: &str, image: &str| {
        json!({
            "name": name, "ready": true, "restartCount": 0, "started": true,
            "image": image,
            "imageID": format!("registry.example.com/{app}@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
            "containerID": format!("containerd://{}{}", uid.replace('-', ""), &uid[..24]),
            "state": {"running": {"startedAt": "2026-11-27T10:00:07Z"}},
            "lastState": {}
        })
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name,
            "generateName": format!("{}-", &p.name[..p.name.len() - 7]),
            "namespace": p.namespace,
            "uid": uid,
            "creationTimestamp": "2026-11-27T10:00:00Z",
            "labels": {
                "app": app, "app.kubernetes.io/name": app, "app.kubernetes.io/instance": format!("{app}-prod"),
                "app.kubernetes.io/version": "1.4.2", "app.kubernetes.io/managed-by": "Helm",
                "helm.sh/chart": format!("{app}-0.3.1"), "pod-template-hash": hash, "team": p.namespace,
            },
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                "uid": uid_for(&p.namespace, &app), "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-27T10:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}}, "f:ownerReferences": {".": {}}},
                              "f:spec": {"f:containers": {}, "f:serviceAccountName": {}, "f:volumes": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-27T10:00:08Z", "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                {"name": "kube-api-access", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ], "defaultMode": 420}}
            ],
            "containers": [
                app_container("app", &image, 8080, &Value::from(env.clone())),
                json!({
                    "name": "metrics-sidecar", "image": "registry.example.com/statsd-exporter:0.26.1",
                    "ports": [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}],
                    "env": sidecar_env,
                    "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "32Mi"}},
                    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent"
                })
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app,
            "serviceAccount": app,
            "nodeName": format!("ip-10-0-{}-{}.eu-west-1.compute.internal", p.extra_env, p.name.len()),
            "securityContext": {"fsGroup": 2000, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-27T10:00:00Z"},
                {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-27T10:00:12Z"},
                {"type": "ContainersReady", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-27T10:00:12Z"},
                {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-27T10:00:00Z"}
            ],
            "hostIP": "10.0.12.34",
            "hostIPs": [{"ip": "10.0.12.34"}],
            "podIP": p.ip,
            "podIPs": [{"ip": p.ip}],
            "startTime": "2026-11-27T10:00:00Z",
            "containerStatuses": [status_of("app", &image), status_of("metrics-sidecar", "registry.example.com/statsd-exporter:0.26.1")],
            "qosClass": "Burstable"
        }
    })
}

/// A stable, uuid-shaped uid.
fn uid_for(ns: &str, name: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in ns.bytes().chain([b'/']).chain(name.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let h2 = h.rotate_left(29).wrapping_mul(0x9E3779B97F4A7C15);
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        h2 >> 52,
        h2 & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_realistically_sized_and_distinct() {
        let sizes: Vec<usize> = (0..40)
            .map(|i| {
                serde_json::to_vec(&pod(&population(i, 10, 5)))
                    .unwrap()
                    .len()
            })
            .collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*min >= 4000 && *max <= 8192, "{min}..{max}");
        assert_ne!(population(1, 10, 5).ip, population(2, 10, 5).ip);
        assert_ne!(
            uid_for("a", &population(1, 10, 5).name),
            uid_for("a", &population(2, 10, 5).name)
        );
    }
}
