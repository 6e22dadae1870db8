//! Request routing: Kubernetes URL paths to discovery documents and resource verbs.
//!
//! Routing is by hand rather than with an axum `Router` because Kubernetes paths overlap
//! (`/api/v1/namespaces/{name}/status` versus `/api/v1/namespaces/{ns}/pods`) in ways that
//! are clearer as one `match` over path segments.

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use super::admission;
use super::ops::{self, Patch, Preconditions};
use super::resources::{namespace_of, Origin, Resource};
use super::selector::{FieldSelector, LabelSelector, Selectors};
use super::status::ApiError;
use super::store::{Key, WatchStart};
use super::watch::{self, WatchRequest};
use super::{table, RecordedRequest, Shared};

/// The real API server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The resource a request is about.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    /// The `/status` subresource.
    status: bool,
}

#[derive(Debug, PartialEq)]
enum Route {
    Document(Value),
    Text(&'static str),
    Resource(Target),
    /// `POST .../serviceaccounts/{name}/token`.
    TokenRequest {
        namespace: String,
        name: String,
    },
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    TokenReview,
    /// `/.well-known/openid-configuration`.
    OpenIdConfiguration,
    /// `/openid/v1/jwks`.
    Jwks,
}

fn route(path: &str, server_address: &str) -> Option<Route> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let doc = |v: Value| Some(Route::Document(v));
    match segments.as_slice() {
        ["version"] => doc(super::discovery::version()),
        ["healthz" | "readyz" | "livez"] => Some(Route::Text("ok")),
        [".well-known", "openid-configuration"] => Some(Route::OpenIdConfiguration),
        ["openid", "v1", "jwks"] => Some(Route::Jwks),
        ["api", "v1", "namespaces", ns, "serviceaccounts", name, "token"] => {
            Some(Route::TokenRequest {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Some(Route::TokenReview),
        ["api"] => doc(super::discovery::core_versions(server_address)),
        ["api", "v1"] => doc(super::discovery::resource_list("")),
        ["api", "v1", rest @ ..] => target("", rest).map(Route::Resource),
        ["apis"] => doc(super::discovery::groups()),
        ["openapi", "v3"] => doc(super::discovery::openapi_root()),
        ["openapi", "v3", rest @ ..] => {
            super::discovery::openapi_group_version(&rest.join("/")).map(Route::Document)
        }
        ["apis", group] => super::discovery::group_document(group).map(Route::Document),
        ["apis", group, "v1"] => super::discovery::group_document(group)
            .map(|_| Route::Document(super::discovery::resource_list(group))),
        ["apis", group, "v1", rest @ ..] if !group.is_empty() => {
            target(group, rest).map(Route::Resource)
        }
        _ => None,
    }
}

fn target(group: &str, rest: &[&str]) -> Option<Target> {
    let namespaced = |plural: &str| Resource::from_url(group, plural).filter(|r| r.namespaced());
    let cluster = |plural: &str| Resource::from_url(group, plural).filter(|r| !r.namespaced());
    let make = |resource: Resource, namespace: Option<&str>, name: Option<&str>, status: bool| {
        (!status || resource.has_status()).then(|| Target {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            status,
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced(plural).is_some() => {
            let res = namespaced(plural)?;
            match tail {
                [] => make(res, Some(ns), None, false),
                [name] => make(res, Some(ns), Some(name), false),
                [name, "status"] => make(res, Some(ns), Some(name), true),
                _ => None,
            }
        }
        [plural] => {
            let res = Resource::from_url(group, plural)?;
            make(res, None, None, false)
        }
        [plural, name] => make(cluster(plural)?, None, Some(name), false),
        [plural, name, "status"] => make(cluster(plural)?, None, Some(name), true),
        _ => None,
    }
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(value).expect("JSON values always serialise"),
        ))
        .expect("static headers are valid")
}

pub(crate) fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

/// Query parameters, decoded; the first occurrence of a key wins, as in Go's `url.Values.Get`.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "True"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun").is_some_and(|v| !v.is_empty())
    }

    fn selectors(&self, res: Resource) -> Result<Selectors, ApiError> {
        Ok(Selectors {
            labels: LabelSelector::parse(self.get("labelSelector").unwrap_or(""))?,
            fields: FieldSelector::parse(self.get("fieldSelector").unwrap_or(""), res)?,
        })
    }
}

/// The Kubernetes verb of a request, for the request log.
fn verb(method: &Method, target: Option<&Target>, watch: bool) -> &'static str {
    let named = target.is_some_and(|t| t.name.is_some());
    match *method {
        Method::GET if watch => "watch",
        Method::GET if target.is_some() && !named => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

/// Serves one request; never fails, since every failure is a `Status` response.
pub(crate) async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let params = match Query::<Vec<(String, String)>>::try_from_uri(&parts.uri) {
        Ok(Query(pairs)) => Params(pairs),
        Err(e) => return error_response(&ApiError::bad_request(format!("bad query: {e}"))),
    };
    let server_address = shared.addr.to_string();
    let routed = route(parts.uri.path(), &server_address);
    let target = match &routed {
        Some(Route::Resource(t)) => Some(t),
        _ => None,
    };
    shared.record(RecordedRequest {
        method: parts.method.to_string(),
        verb: verb(&parts.method, target, params.flag("watch")),
        path: parts.uri.path().to_string(),
        query: params.0.clone(),
    });
    if shared.is_unavailable() {
        return error_response(&ApiError::unavailable());
    }
    let result = match routed {
        None => Err(ApiError::not_found_path()),
        Some(Route::Text(text)) => Ok(Response::new(Body::from(text))),
        Some(Route::Document(doc)) if parts.method == Method::GET => Ok(json_response(200, &doc)),
        Some(Route::Document(_)) => Err(ApiError::method_not_allowed(&parts.method)),
        Some(Route::OpenIdConfiguration) if parts.method == Method::GET => Ok(issuer_document(
            "application/json",
            &shared.tokens.discovery(),
        )),
        Some(Route::Jwks) if parts.method == Method::GET => Ok(issuer_document(
            "application/jwk-set+json",
            &shared.tokens.jwks(),
        )),
        Some(Route::OpenIdConfiguration | Route::Jwks) => {
            Err(ApiError::method_not_allowed(&parts.method))
        }
        Some(Route::TokenRequest { namespace, name }) if parts.method == Method::POST => {
            authentication_body(&parts.headers, body, true)
                .await
                .and_then(|obj| {
                    let tokens = &shared.tokens;
                    super::tokens::token_request(&shared.store, tokens, &namespace, &name, obj)
                })
                .map(|created| json_response(201, &created))
        }
        Some(Route::TokenReview) if parts.method == Method::POST => {
            authentication_body(&parts.headers, body, false)
                .await
                .and_then(|obj| super::tokens::token_review(&shared.store, &shared.tokens, obj))
                .map(|reviewed| json_response(201, &reviewed))
        }
        Some(Route::TokenRequest { .. } | Route::TokenReview) => {
            Err(ApiError::method_not_allowed(&parts.method))
        }
        Some(Route::Resource(target)) => {
            serve_resource(
                &shared,
                target,
                &parts.method,
                &parts.headers,
                &params,
                body,
            )
            .await
        }
    };
    result.unwrap_or_else(|err| error_response(&err))
}

/// The issuer's public documents, which (unlike API responses) caches may keep for an
/// hour, as the real server says.
fn issuer_document(content_type: &'static str, value: &Value) -> Response<Body> {
    let mut response = json_response(200, value);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    headers.insert(
        header::CACHE_CONTROL,
        "public, max-age=3600".parse().expect("static"),
    );
    response
}

/// The body of a TokenRequest or TokenReview (created, never stored), as JSON. A
/// TokenRequest may also come in protobuf, as `kubectl create token` sends it.
async fn authentication_body<B>(
    headers: &HeaderMap,
    body: B,
    token_request: bool,
) -> Result<Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    check_accept(headers)?;
    let ct = content_type(headers);
    let bytes = read_body(body).await?;
    if token_request && ct == super::protobuf::CONTENT_TYPE {
        return super::protobuf::decode_token_request(&bytes);
    }
    decode(&ct, &bytes)
}

async fn read_body<B>(body: B) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Decodes a JSON (or YAML, which the real server also takes) object body.
fn decode(content_type: &str, bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = match content_type {
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}")))?,
        "" | "application/json" | "*/*" => serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}")))?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

fn decode_patch(content_type: &str, bytes: &[u8]) -> Result<Patch, ApiError> {
    let parse = || -> Result<Value, ApiError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
    };
    match content_type {
        "application/merge-patch+json" => Ok(Patch::Merge(parse()?)),
        "application/strategic-merge-patch+json" => Ok(Patch::Strategic(parse()?)),
        "application/json-patch+json" => serde_json::from_value(parse()?)
            .map(Patch::Json)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}"))),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Plain protobuf-only clients cannot be served; everything else gets JSON.
fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let accept = accept(headers);
    if accept.is_empty() {
        return Ok(());
    }
    let ok = accept.split(',').any(|media| {
        let media = media.split(';').next().unwrap_or("").trim();
        matches!(
            media,
            "application/json" | "*/*" | "application/*" | "application/yaml"
        )
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_acceptable())
    }
}

fn object_response(
    status: u16,
    res: Resource,
    obj: &Value,
    headers: &HeaderMap,
    params: &Params,
) -> Response<Body> {
    if table::wants_table(accept(headers)) {
        let rv = super::resources::resource_version_of(obj).to_string();
        let doc = table::render(
            res,
            &[obj],
            json!({"resourceVersion": rv}),
            params.get("includeObject").unwrap_or("Metadata"),
        );
        return json_response(status, &doc);
    }
    json_response(status, obj)
}

async fn serve_resource<B>(
    shared: &Arc<Shared>,
    target: Target,
    method: &Method,
    headers: &HeaderMap,
    params: &Params,
    body: B,
) -> Result<Response<Body>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    check_accept(headers)?;
    let res = target.resource;
    let store = &shared.store;
    let ns = target.namespace.as_deref().unwrap_or("");
    let dry_run = params.dry_run();
    match (method, target.name.as_deref()) {
        (&Method::GET, _) if params.flag("watch") => {
            let mut selectors = params.selectors(res)?;
            if let Some(name) = &target.name {
                selectors.fields = selectors.fields.and_name(name);
            }
            let mut req = watch_request(&target, params, selectors)?;
            if table::wants_table(accept(headers)) {
                req.table = Some(
                    params
                        .get("includeObject")
                        .unwrap_or("Metadata")
                        .to_string(),
                );
            }
            Ok(watch::respond(shared.clone(), req))
        }
        (&Method::GET, None) => list(shared, &target, headers, params),
        (&Method::GET, Some(name)) => {
            let key: Key = (ns.to_string(), name.to_string());
            let obj = store
                .get(res, &key)
                .ok_or_else(|| ApiError::not_found(res, name))?;
            Ok(object_response(200, res, &obj, headers, params))
        }
        (&Method::POST, None)
            if !target.status && (target.namespace.is_some() || !res.namespaced()) =>
        {
            let ct = content_type(headers);
            let obj = decode(&ct, &read_body(body).await?)?;
            let (obj, warnings) = admission::mutate(shared, res, ns, obj, dry_run).await?;
            let created = ops::create(store, res, ns, obj, Origin::Api, dry_run)?;
            let mut response = object_response(201, res, &created, headers, params);
            admission::add_warnings(&mut response, &warnings);
            Ok(response)
        }
        (&Method::PUT, Some(name)) => {
            let ct = content_type(headers);
            let obj = decode(&ct, &read_body(body).await?)?;
            let stored = ops::replace(store, res, ns, name, obj, target.status, dry_run)?;
            Ok(object_response(200, res, &stored, headers, params))
        }
        (&Method::PATCH, Some(name)) => {
            let ct = content_type(headers);
            let patch = decode_patch(&ct, &read_body(body).await?)?;
            let stored = ops::patch(store, res, ns, name, &patch, target.status, dry_run)?;
            Ok(object_response(200, res, &stored, headers, params))
        }
        (&Method::DELETE, Some(name)) if !target.status => {
            let bytes = read_body(body).await?;
            let pre = delete_options(&bytes)?;
            let dry_run = dry_run || pre.1;
            let deleted = ops::delete(store, res, ns, name, &pre.0, dry_run)?;
            Ok(object_response(200, res, &deleted, headers, params))
        }
        (&Method::DELETE, None) if res.namespaced() && target.namespace.is_some() => {
            let selectors = params.selectors(res)?;
            let (rv, objects) = store.list(res);
            let mut deleted = Vec::new();
            for obj in objects.values() {
                if namespace_of(obj) == ns && selectors.matches(obj) {
                    let name = super::resources::name_of(obj);
                    match ops::delete(store, res, ns, name, &Preconditions::default(), dry_run) {
                        Ok(gone) => deleted.push(strip_type((*gone).clone())),
                        // Deleted concurrently: it is gone either way.
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            let list = json!({
                "kind": res.list_kind(),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": rv.max(store.resource_version()).to_string()},
                "items": deleted,
            });
            Ok(json_response(200, &list))
        }
        _ => Err(ApiError::method_not_allowed(method)),
    }
}

/// `DeleteOptions`: preconditions and whether it is a dry run. An empty body is fine.
fn delete_options(bytes: &[u8]) -> Result<(Preconditions, bool), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok((Preconditions::default(), false));
    }
    let opts: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
    let text = |p: &str| opts.pointer(p).and_then(Value::as_str).map(str::to_string);
    let dry_run = opts
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty());
    Ok((
        Preconditions {
            uid: text("/preconditions/uid"),
            resource_version: text("/preconditions/resourceVersion"),
        },
        dry_run,
    ))
}

fn watch_request(
    target: &Target,
    params: &Params,
    selectors: Selectors,
) -> Result<WatchRequest, ApiError> {
    let start = match params.get("resourceVersion").unwrap_or("") {
        "" | "0" => WatchStart::Now,
        rv => WatchStart::After(rv.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid resource version {rv:?}: must be an integer"
            ))
        })?),
    };
    // Zero means "the server's default" on a real server, which is to run for a long time.
    let timeout = match params.get("timeoutSeconds") {
        None | Some("" | "0") => None,
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {s:?}"))
        })?)),
    };
    let send_initial_events = params.flag("sendInitialEvents");
    // Initial events only come with a starting point of "now", as on the real server.
    let start = if send_initial_events {
        WatchStart::Now
    } else {
        start
    };
    Ok(WatchRequest {
        resource: target.resource,
        namespace: target.namespace.clone(),
        selectors,
        start,
        bookmarks: params.flag("allowWatchBookmarks"),
        send_initial_events,
        timeout,
        table: None,
    })
}

/// List items, like the real server's JSON, carry no apiVersion or kind.
fn strip_type(mut obj: Value) -> Value {
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    obj
}

/// Where a paginated list continues: the snapshot's resourceVersion and the last key sent.
fn encode_continue(rv: u64, last: &Key) -> String {
    let raw = json!({"rv": rv, "ns": last.0, "name": last.1}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(u64, Key), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    if token.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, ApiError>>()?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = value.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let text = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
    Ok((
        rv,
        (text("ns").ok_or_else(bad)?, text("name").ok_or_else(bad)?),
    ))
}

fn list(
    shared: &Arc<Shared>,
    target: &Target,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response<Body>, ApiError> {
    let res = target.resource;
    let selectors = params.selectors(res)?;
    let limit = match params.get("limit") {
        None | Some("") | Some("0") => None,
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
    };
    let continued = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, last) = decode_continue(token)?;
            let objects = shared.store.snapshot(res, rv).ok_or_else(|| {
                ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                )
            })?;
            Some((rv, objects, last))
        }
        None => None,
    };
    // A first page whose field selector asks for one value of an indexed pod field reads
    // only the pods the store's index has for it (every selector is still applied).
    let indexed = match continued {
        Some(_) => None,
        None => selectors
            .fields
            .equalities()
            .find_map(|(field, value)| shared.store.list_indexed(res, field, value)),
    };
    let (rv, objects, after, candidates) = match (continued, indexed) {
        (Some((rv, objects, last)), _) => (rv, objects, Some(last), None),
        (None, Some((rv, objects, keys))) => (rv, objects, None, Some(keys)),
        (None, None) => {
            let (rv, objects) = shared.store.list(res);
            (rv, objects, None, None)
        }
    };
    let unscoped_first_page = after.is_none() && candidates.is_none() && target.namespace.is_none();
    // Owned copies of the page's objects, taken inside this block so the list's handle on
    // the whole map is dropped before the page is serialized: a write meanwhile would
    // otherwise copy the map (copy-on-write), which a real server never does.
    let (page, rest): (Vec<(Key, Arc<Value>)>, usize) = {
        let in_scope = |obj: &Value| selectors.matches(obj);
        // Objects in key order after the continue key, within the namespace if one is given:
        // a range of the map (keys are `(namespace, name)`), not a walk from its start.
        let scoped: Box<dyn Iterator<Item = (&Key, &Arc<Value>)>> =
            match (&candidates, &target.namespace) {
                (Some(keys), ns) => Box::new(
                    keys.iter()
                        .filter(move |k| ns.as_deref().is_none_or(|ns| k.0 == ns))
                        .filter_map(|k| objects.get_key_value(k)),
                ),
                (None, Some(ns)) => {
                    let from = match &after {
                        Some(last) if last.0.as_str() >= ns.as_str() => {
                            Bound::Excluded(last.clone())
                        }
                        _ => Bound::Included((ns.clone(), String::new())),
                    };
                    Box::new(
                        objects
                            .range((from, Bound::Unbounded))
                            .take_while(move |(k, _)| k.0 == *ns),
                    )
                }
                (None, None) => {
                    let from = match &after {
                        Some(last) => Bound::Excluded(last.clone()),
                        None => Bound::Unbounded,
                    };
                    Box::new(objects.range((from, Bound::Unbounded)))
                }
            };
        let filtered = !selectors.is_empty();
        let mut remaining = scoped.filter(|(_, obj)| !filtered || in_scope(obj));
        let page: Vec<(&Key, &Arc<Value>)> = match limit {
            Some(limit) => remaining.by_ref().take(limit).collect(),
            None => remaining.by_ref().collect(),
        };
        // Only an unfiltered list says how many remain (as the real server does), so a
        // filtered one stops at the first match left.
        let rest = if !filtered && unscoped_first_page {
            // Every object not on the page: no walk over the map.
            objects.len() - page.len()
        } else if !filtered {
            remaining.count()
        } else {
            usize::from(remaining.next().is_some())
        };
        let page = page
            .into_iter()
            .map(|(k, o)| (k.clone(), Arc::clone(o)))
            .collect();
        (page, rest)
    };
    drop(objects);
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if rest > 0 {
        let (last, _) = page.last().expect("a limit of 0 means no limit");
        metadata["continue"] = encode_continue(rv, last).into();
        if selectors.is_empty() {
            metadata["remainingItemCount"] = rest.into();
        }
        shared.store.save_snapshot(res, rv);
    }
    if table::wants_table(accept(headers)) {
        let objs: Vec<&Value> = page.iter().map(|(_, o)| o.as_ref()).collect();
        let doc = table::render(
            res,
            &objs,
            metadata,
            params.get("includeObject").unwrap_or("Metadata"),
        );
        return Ok(json_response(200, &doc));
    }
    let items: Vec<ListItem<'_>> = page.iter().map(|(_, obj)| ListItem(obj)).collect();
    let body = serde_json::to_vec(&json!({
        "kind": res.list_kind(),
        "apiVersion": res.api_version(),
        "metadata": metadata,
    }))
    .expect("JSON values always serialise");
    // `{...,"items":[...]}`: the head's closing brace gives way to the items, written
    // from the stored objects without copying them.
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(&body[..body.len() - 1]);
    out.extend_from_slice(b",\"items\":");
    serde_json::to_writer(&mut out, &items).expect("JSON values always serialise");
    out.push(b'}');
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(out))
        .expect("static headers are valid"))
}

/// A stored object as a list item: without apiVersion and kind, like the real server's
/// JSON lists.
struct ListItem<'a>(&'a Value);

impl serde::Serialize for ListItem<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0.as_object() {
            Some(map) => {
                let fields = map
                    .iter()
                    .filter(|(k, _)| *k != "apiVersion" && *k != "kind");
                let mut out = s.serialize_map(None)?;
                for (k, v) in fields {
                    out.serialize_entry(k, v)?;
                }
                out.end()
            }
            None => self.0.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(res: Resource, ns: Option<&str>, name: Option<&str>, status: bool) -> Option<Route> {
        Some(Route::Resource(Target {
            resource: res,
            namespace: ns.map(str::to_string),
            name: name.map(str::to_string),
            status,
        }))
    }

    #[test]
    fn routes_follow_kubernetes_paths() {
        let r = |p: &str| route(p, "127.0.0.1:1");
        assert_eq!(r("/api/v1/pods"), t(Resource::Pods, None, None, false));
        assert_eq!(
            r("/api/v1/namespaces/a/pods"),
            t(Resource::Pods, Some("a"), None, false)
        );
        assert_eq!(
            r("/api/v1/namespaces/a/pods/p"),
            t(Resource::Pods, Some("a"), Some("p"), false)
        );
        assert_eq!(
            r("/api/v1/namespaces/a/pods/p/status"),
            t(Resource::Pods, Some("a"), Some("p"), true)
        );
        assert_eq!(
            r("/api/v1/namespaces"),
            t(Resource::Namespaces, None, None, false)
        );
        assert_eq!(
            r("/api/v1/namespaces/a"),
            t(Resource::Namespaces, None, Some("a"), false)
        );
        assert_eq!(
            r("/api/v1/namespaces/a/status"),
            t(Resource::Namespaces, None, Some("a"), true)
        );
        assert_eq!(r("/api/v1/events"), t(Resource::Events, None, None, false));
        assert_eq!(r("/api/v1/nodes"), t(Resource::Nodes, None, None, false));
        assert_eq!(
            r("/api/v1/nodes/n1"),
            t(Resource::Nodes, None, Some("n1"), false)
        );
        assert_eq!(
            r("/api/v1/nodes/n1/status"),
            t(Resource::Nodes, None, Some("n1"), true)
        );
        assert_eq!(r("/api/v1/namespaces/a/nodes/n1"), None);
        assert_eq!(
            r("/apis/events.k8s.io/v1/namespaces/a/events/e"),
            t(Resource::EventsV1, Some("a"), Some("e"), false)
        );
        assert_eq!(r("/api/v1/namespaces/a/events/e/status"), None);
        assert_eq!(r("/api/v1/namespaces/a/pods/p/log"), None);
        assert_eq!(r("/api/v1/pods/p"), None);
        assert_eq!(r("/api/v1/secrets"), None);
        assert_eq!(r("/apis/apps/v1"), None);
        assert!(matches!(
            r("/apis/events.k8s.io/v1"),
            Some(Route::Document(_))
        ));
        assert_eq!(
            r("/api/v1/namespaces/a/serviceaccounts/default/token"),
            Some(Route::TokenRequest {
                namespace: "a".into(),
                name: "default".into()
            })
        );
        assert_eq!(
            r("/api/v1/namespaces/a/serviceaccounts/default"),
            t(Resource::ServiceAccounts, Some("a"), Some("default"), false)
        );
        assert_eq!(
            r("/api/v1/namespaces/a/serviceaccounts/default/status"),
            None
        );
        assert_eq!(
            r("/apis/authentication.k8s.io/v1/tokenreviews"),
            Some(Route::TokenReview)
        );
        assert_eq!(r("/apis/authentication.k8s.io/v1/tokenreviews/x"), None);
        assert_eq!(
            r("/.well-known/openid-configuration"),
            Some(Route::OpenIdConfiguration)
        );
        assert_eq!(r("/openid/v1/jwks"), Some(Route::Jwks));
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let key = ("ns".to_string(), "pod-1".to_string());
        let token = encode_continue(42, &key);
        assert_eq!(decode_continue(&token).unwrap(), (42, key));
        assert_eq!(decode_continue("zz").unwrap_err().code, 400);
        assert_eq!(decode_continue("abc").unwrap_err().code, 400);
    }
}
