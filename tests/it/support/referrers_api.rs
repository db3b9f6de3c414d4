//! An EMULATION of the OCI 1.1 referrers API, for the fault proxy: no registry that serves the
//! API can be installed here (distribution 2.8 answers 404 there), so the proxy answers
//! `GET /v2/<name>/referrers/<digest>` itself, from its own record of the manifests with a
//! `subject` that were pushed through it, and answers those pushes with `OCI-Subject` as a
//! registry serving the API does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use serde_json::{Value, json};

use imagemirror::registry::digest::sha256_digest;
use imagemirror::registry::manifest::OCI_INDEX;

/// The emulation's switch and record.
#[derive(Default)]
pub struct ReferrersApi {
    /// Answer the referrers API (off: requests pass to the registry, which answers 404).
    pub enabled: AtomicBool,
    /// (repository, subject digest) → descriptors of the manifests pushed with that subject.
    record: Mutex<HashMap<(String, String), Vec<Value>>>,
    /// The referrers requests answered, as `path?query`.
    pub answered: Mutex<Vec<String>>,
}

impl ReferrersApi {
    /// The digests recorded as referrers of `subject` in `repo`.
    pub fn listed(&self, repo: &str, subject: &str) -> Vec<String> {
        self.record
            .lock()
            .unwrap()
            .get(&(repo.to_string(), subject.to_string()))
            .map(|v| {
                v.iter()
                    .map(|d| d["digest"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Answers a referrers request, or forwards a manifest PUT and records its subject; gives the
/// request back untouched for everything else.
pub async fn intercept(
    api: &ReferrersApi,
    http: &reqwest::Client,
    upstream: &str,
    req: Request,
) -> Result<Response, Request> {
    if !api.enabled.load(Ordering::SeqCst) {
        return Err(req);
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(req);
    };
    if req.method() == axum::http::Method::GET
        && let Some((repo, subject)) = rest.split_once("/referrers/")
    {
        api.answered.lock().unwrap().push(format!("{path}?{query}"));
        let wanted = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("artifactType="))
            .map(urlencoding_decode);
        let key = (repo.to_string(), subject.to_string());
        let entries: Vec<Value> = api
            .record
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| {
                wanted
                    .as_ref()
                    .is_none_or(|t| d["artifactType"] == t.as_str())
            })
            .collect();
        let body = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
        let mut answer = Response::builder()
            .status(200)
            .header("Content-Type", OCI_INDEX);
        if wanted.is_some() {
            answer = answer.header("OCI-Filters-Applied", "artifactType");
        }
        return Ok(answer.body(Body::from(body.to_string())).unwrap());
    }
    let Some((repo, _)) = rest.split_once("/manifests/") else {
        return Err(req);
    };
    if req.method() != axum::http::Method::PUT {
        return Err(req);
    }
    let repo = repo.to_string();
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 4 << 20)
        .await
        .unwrap_or_default();
    let mut up = http.put(format!("http://{upstream}{path}?{query}"));
    for (k, v) in &parts.headers {
        if k != axum::http::header::HOST {
            up = up.header(k, v);
        }
    }
    let Ok(resp) = up.body(bytes.clone()).send().await else {
        return Ok(Response::builder().status(502).body(Body::empty()).unwrap());
    };
    let status = resp.status().as_u16();
    let mut answer = Response::builder().status(status);
    for (k, v) in resp.headers() {
        answer = answer.header(k.as_str(), v.as_bytes());
    }
    let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let (201, Some(subject)) = (
        status,
        doc.pointer("/subject/digest").and_then(|d| d.as_str()),
    ) {
        let artifact_type = doc
            .get("artifactType")
            .or_else(|| doc.pointer("/config/mediaType"))
            .cloned()
            .unwrap_or(Value::Null);
        let mut descriptor = json!({
            "mediaType": parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or(""),
            "digest": sha256_digest(&bytes),
            "size": bytes.len(),
            "artifactType": artifact_type,
        });
        if let Some(a) = doc.get("annotations") {
            descriptor["annotations"] = a.clone();
        }
        api.record
            .lock()
            .unwrap()
            .entry((repo, subject.to_string()))
            .or_default()
            .push(descriptor);
        answer = answer.header("OCI-Subject", subject);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Ok(answer.body(Body::from(body)).unwrap())
}

/// `%2F` → `/`, `%2B` → `+`: enough for media types.
fn urlencoding_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(Ok(v)) = hex.map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
