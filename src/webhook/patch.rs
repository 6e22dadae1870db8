//! What `kiam webhook` adds to a pod, as a JSON patch. Pure: a pod in, the
//! operations out, so every rule is unit-tested without a server.
//!
//! The surprise: a container that already configures the container
//! credential provider itself is left completely alone — neither variable is
//! added when it sets either of them. Adding only the token file next to a
//! URL the container chose would send kiam's token to that URL.

use serde_json::{json, Value};

/// The pod annotation that makes a pod a candidate (kiam's role annotation).
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The URL the agent answers the container credential provider on.
pub const CREDENTIALS_URI: &str = "http://169.254.170.23/v1/credentials";
/// The two variables the AWS SDKs read.
pub const ENV_FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
pub const ENV_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
/// Variables that mean "this container configures container credentials
/// itself": if any is set, the container's env is not touched.
const OWN_CONFIG: [&str; 4] = [
    ENV_FULL_URI,
    ENV_TOKEN_FILE,
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
];
/// The projected volume's name and where it is mounted.
pub const VOLUME_NAME: &str = "kiam-token";
pub const MOUNT_PATH: &str = "/var/run/secrets/kiam/serviceaccount";
/// The file in the volume, so the token is at `MOUNT_PATH/token`.
pub const TOKEN_PATH: &str = "token";

/// What the webhook injects; from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// `--token-audience`: the `aud` the kiam server requires.
    pub audience: String,
    /// `--token-expiration`: the projected token's lifetime in seconds
    /// (the kubelet refreshes it at 80% of that).
    pub expiration_seconds: i64,
}

impl Default for Injection {
    fn default() -> Self {
        Injection {
            audience: "kiam".to_string(),
            expiration_seconds: 3600,
        }
    }
}

/// Why a pod got no (or a partial) patch, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Operations were produced.
    Injected,
    /// No `iam.amazonaws.com/role` annotation (or an empty one).
    NoRole,
    /// Every container already had what would be added (a re-invocation,
    /// or a pod that configured itself).
    AlreadySet,
    /// No `serviceAccountName`: a projected token would make the pod invalid.
    NoServiceAccount,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::NoRole => "no_role",
            Outcome::AlreadySet => "already_set",
            Outcome::NoServiceAccount => "no_service_account",
        }
    }
}

/// The pod is not something we can patch; the review is allowed unchanged
/// with this as a warning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// The JSON patch operations that give `pod` the token path, and why.
pub fn operations(pod: &Value, inj: &Injection) -> Result<(Vec<Value>, Outcome), Malformed> {
    let Some(pod_obj) = pod.as_object() else {
        return Err(Malformed("the object is not a JSON object".into()));
    };
    let role = pod_obj
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(ROLE_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if role.is_empty() {
        return Ok((Vec::new(), Outcome::NoRole));
    }
    let spec = match pod_obj.get("spec") {
        Some(Value::Object(s)) => s,
        _ => return Err(Malformed("the pod has no spec".into())),
    };
    // The API server refuses a projected token without a service account.
    // Its ServiceAccount admission plugin fills in `default` before webhooks
    // run, so an empty one means that plugin is off: patching would make the
    // pod invalid, so leave it as it is.
    let account = |k: &str| spec.get(k).and_then(Value::as_str).unwrap_or("");
    if account("serviceAccountName").is_empty() && account("serviceAccount").is_empty() {
        return Ok((Vec::new(), Outcome::NoServiceAccount));
    }
    let mut ops = Vec::new();
    let mut mounts_added = false;
    for field in ["initContainers", "containers"] {
        let list = match spec.get(field) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list,
            Some(_) => return Err(Malformed(format!("spec.{field} is not a list"))),
        };
        for (i, c) in list.iter().enumerate() {
            let Some(c) = c.as_object() else {
                return Err(Malformed(format!("spec.{field}[{i}] is not an object")));
            };
            let base = format!("/spec/{field}/{i}");
            let env = array_field(c, "env", &base)?;
            if !env.iter().any(|e| {
                e.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| OWN_CONFIG.contains(&n))
            }) {
                let vars = [
                    json!({"name": ENV_FULL_URI, "value": CREDENTIALS_URI}),
                    json!({"name": ENV_TOKEN_FILE, "value": format!("{MOUNT_PATH}/{TOKEN_PATH}")}),
                ];
                append(
                    &mut ops,
                    &format!("{base}/env"),
                    c.contains_key("env") && !c["env"].is_null(),
                    &vars,
                );
            }
            let mounts = array_field(c, "volumeMounts", &base)?;
            let taken = mounts.iter().any(|m| {
                m.get("name").and_then(Value::as_str) == Some(VOLUME_NAME)
                    || m.get("mountPath")
                        .and_then(Value::as_str)
                        .is_some_and(|p| p.trim_end_matches('/') == MOUNT_PATH)
            });
            if !taken {
                let mount = json!({"name": VOLUME_NAME, "mountPath": MOUNT_PATH, "readOnly": true});
                let exists = c.contains_key("volumeMounts") && !c["volumeMounts"].is_null();
                append(&mut ops, &format!("{base}/volumeMounts"), exists, &[mount]);
                mounts_added = true;
            }
        }
    }
    let volumes = match spec.get("volumes") {
        None | Some(Value::Null) => None,
        Some(Value::Array(v)) => Some(v),
        Some(_) => return Err(Malformed("spec.volumes is not a list".into())),
    };
    let has_volume = volumes.is_some_and(|v| {
        v.iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(VOLUME_NAME))
    });
    // The volume is added when a mount refers to it, or when containers
    // already mount it by name but the pod lacks it (it would not start).
    let needs_volume = mounts_added || referenced(spec);
    if needs_volume && !has_volume {
        let volume = json!({
            "name": VOLUME_NAME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": inj.audience,
                "expirationSeconds": inj.expiration_seconds,
                "path": TOKEN_PATH,
            }}]}
        });
        append(&mut ops, "/spec/volumes", volumes.is_some(), &[volume]);
    }
    let outcome = if ops.is_empty() {
        Outcome::AlreadySet
    } else {
        Outcome::Injected
    };
    Ok((ops, outcome))
}

/// Whether some container mounts a volume named [`VOLUME_NAME`].
fn referenced(spec: &serde_json::Map<String, Value>) -> bool {
    ["initContainers", "containers"].iter().any(|f| {
        spec.get(*f).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("volumeMounts")
                    .and_then(Value::as_array)
                    .is_some_and(|ms| {
                        ms.iter()
                            .any(|m| m.get("name").and_then(Value::as_str) == Some(VOLUME_NAME))
                    })
            })
        })
    })
}

fn array_field<'a>(
    c: &'a serde_json::Map<String, Value>,
    name: &str,
    base: &str,
) -> Result<&'a [Value], Malformed> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(Malformed(format!(
            "{}/{name} is not a list",
            base.trim_start_matches('/').replace('/', ".")
        ))),
    }
}

/// Appends `items` to the array at `path`: one `add` per item with `/-`
/// when it exists, else one `add` of the whole array (JSON patch cannot
/// append to a missing array).
fn append(ops: &mut Vec<Value>, path: &str, exists: bool, items: &[Value]) {
    if exists {
        for item in items {
            ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": item}));
        }
    } else {
        ops.push(json!({"op": "add", "path": path, "value": items}));
    }
}

#[cfg(test)]
mod tests;
