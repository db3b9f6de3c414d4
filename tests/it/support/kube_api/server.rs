//! HTTP: routing `/api/v1/...` and `/apis/{group}/{version}/...` to verbs, query parsing, the
//! request log and injected failures.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use base64::Engine;
use serde_json::{Value, json};

use super::error::ApiError;
use super::resources::{self, ResourceDef};
use super::select::Selector;
use super::store::{PatchKind, WriteCtx};
use super::{RequestRecord, Shared, watch};

/// A request's target.
struct Route {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let owned = |s: Option<&&str>| s.map(|s| s.to_string());
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Some(res) = resources::find(group, version, rest[2])
    {
        if !resources::all()[res].namespaced || rest.len() > 5 {
            return None;
        }
        return Some(Route {
            res,
            namespace: Some(rest[1].to_string()),
            name: owned(rest.get(3)),
            subresource: owned(rest.get(4)),
        });
    }
    let res = resources::find(group, version, rest.first()?)?;
    if rest.len() > 3 || (resources::all()[res].namespaced && rest.len() > 1) {
        return None;
    }
    Some(Route {
        res,
        namespace: None,
        name: owned(rest.get(1)),
        subresource: owned(rest.get(2)),
    })
}

pub fn json_response(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(body).expect("JSON values serialise"),
        ))
        .expect("a valid response")
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let ct = content_type(headers);
    let parsed = if ct.contains("yaml") {
        serde_yaml::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the object provided is unrecognized: {e}")))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The field manager of a write: `?fieldManager=`, else the User-Agent's product, like the API server.
fn field_manager(q: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn verb(method: &Method, r: &Route, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method.as_str(), r.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        _ => "unsupported",
    }
}

pub async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let q: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let Some(r) = route(&path) else {
        return error_response(&ApiError::no_route());
    };
    let res = &resources::all()[r.res];
    let verb = verb(&method, &r, &q);
    let mut record = RequestRecord {
        method: method.to_string(),
        verb: verb.to_string(),
        group: res.group.to_string(),
        resource: res.plural.to_string(),
        subresource: r.subresource.clone(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        content_type: content_type(&headers),
        field_manager: q.get("fieldManager").cloned(),
        code: 0,
    };
    let injected = shared.injected_failure(&record);
    // Log before dispatching: a write's watch event can reach a test before this handler
    // returns, and the test must then already find the write in the log.
    let index = {
        let mut log = shared.log.lock().expect("log lock");
        log.push(record.clone());
        log.len() - 1
    };
    let response = match injected {
        Some(e) => error_response(&e),
        None => dispatch(&shared, res, &r, verb, &q, &headers, &body)
            .unwrap_or_else(|e| error_response(&e)),
    };
    record.code = response.status().as_u16();
    if let Some(entry) = shared.log.lock().expect("log lock").get_mut(index) {
        entry.code = record.code;
    }
    response
}

fn dispatch(
    shared: &Arc<Shared>,
    res: &ResourceDef,
    r: &Route,
    verb: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let ns = r.namespace.as_deref().unwrap_or("");
    let sub = r.subresource.as_deref().unwrap_or("");
    if !(sub.is_empty() || (sub == "status" && res.status_subresource)) {
        return Err(ApiError::no_route());
    }
    if res.namespaced && r.namespace.is_none() && !matches!(verb, "list" | "watch") {
        return Err(ApiError::method_not_allowed(verb));
    }
    if q.contains_key("dryRun") {
        // Not served: a dry run taken for a real write would hide a bug of the caller.
        return Err(ApiError::bad_request(
            "dryRun is not supported by the API double",
        ));
    }
    let manager = field_manager(q, headers);
    let ctx = WriteCtx {
        manager: &manager,
        subresource: sub,
    };
    let name = r.name.as_deref().unwrap_or("");
    let metadata_only = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let mut store = shared.store.lock().expect("store lock");
    let (code, value) = match verb {
        "get" => (200, store.get(r.res, ns, name)?),
        "list" if metadata_only => {
            let mut l = list(&store, res, r, q)?;
            l["kind"] = json!("PartialObjectMetadataList");
            l["apiVersion"] = json!("meta.k8s.io/v1");
            if let Some(items) = l["items"].as_array_mut() {
                items.iter_mut().for_each(|o| *o = partial_metadata(o));
            }
            (200, l)
        }
        "list" => (200, list(&store, res, r, q)?),
        "watch" => {
            drop(store);
            return watch::serve(shared.clone(), r.res, r.namespace.clone(), q, metadata_only);
        }
        "create" if sub.is_empty() => (
            201,
            store.create(r.res, ns, parse_body(headers, body)?, &ctx)?,
        ),
        "update" => (
            200,
            store.replace(r.res, ns, name, parse_body(headers, body)?, &ctx)?,
        ),
        "patch" => {
            let ct = content_type(headers);
            let force = q.get("force").is_some_and(|f| f == "true");
            let kind = match ct.as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" if !res.custom => PatchKind::Strategic,
                "application/apply-patch+yaml" => PatchKind::Apply { force },
                // JSON patch (RFC 6902) is not served: nothing the controller runs sends it.
                other => {
                    let accepted = if res.custom {
                        "application/merge-patch+json, application/apply-patch+yaml"
                    } else {
                        "application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
                    };
                    return Err(ApiError::unsupported_media_type(other, accepted));
                }
            };
            let is_apply = matches!(kind, PatchKind::Apply { .. });
            if is_apply && q.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            if force && !is_apply {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
                ));
            }
            let patch = if is_apply {
                serde_yaml::from_slice::<Value>(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
            } else {
                serde_json::from_slice::<Value>(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
            };
            let (obj, created) = store.patch(r.res, ns, name, kind, patch, &ctx)?;
            (if created { 201 } else { 200 }, obj)
        }
        "delete" if sub.is_empty() => {
            let obj = store.delete(r.res, ns, name)?;
            if !res.custom && r.res != resources::namespaces() {
                let details = json!({"name": name, "group": res.group, "kind": res.plural, "uid": obj["metadata"]["uid"]});
                (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                )
            } else {
                (200, obj)
            }
        }
        other => return Err(ApiError::method_not_allowed(other)),
    };
    Ok(json_response(code, &value))
}

/// An object as `PartialObjectMetadata` (what metadata-only clients ask for with
/// `Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`).
pub fn partial_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

/// A list, with `labelSelector`, `fieldSelector` and `limit`/`continue` (pages are cut from the
/// current state, not from a snapshot at the first page's resourceVersion).
fn list(
    store: &super::store::Store,
    res: &ResourceDef,
    r: &Route,
    q: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let sel = Selector::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    )?;
    let key = |o: &Value| {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let after = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|_| ApiError::bad_request("invalid continue token"))?;
            Some(String::from_utf8_lossy(&raw).into_owned())
        }
        None => None,
    };
    let mut items: Vec<Value> = store
        .list(r.res, r.namespace.as_deref())
        .into_iter()
        .filter(|o| sel.matches(o))
        .filter(|o| after.as_ref().is_none_or(|a| key(o) > *a))
        .collect();
    let mut metadata = json!({"resourceVersion": store.resource_version().to_string()});
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    if limit > 0 && items.len() > limit {
        let rest = items.len() - limit;
        items.truncate(limit);
        let last = key(items.last().expect("limit > 0"));
        metadata["continue"] = json!(base64::engine::general_purpose::STANDARD.encode(last));
        metadata["remainingItemCount"] = json!(rest);
    }
    Ok(
        json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": metadata, "items": items}),
    )
}
