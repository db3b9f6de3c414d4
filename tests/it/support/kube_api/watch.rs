//! Watches: newline-delimited JSON events over a chunked HTTP response.
//!
//! - `resourceVersion` absent or "0": ADDED for every current object, then changes;
//! - `resourceVersion=N`: the changes after N replayed from the bounded history, then live ones;
//!   when N is older than the history, one ERROR event carrying a 410 Expired Status;
//! - `allowWatchBookmarks=true`: a BOOKMARK (only kind, apiVersion, metadata.resourceVersion)
//!   every bookmark interval, at a resourceVersion all events up to which were sent;
//! - selectors: an object that stops matching is sent as DELETED, one that starts as ADDED;
//! - the stream ends after `timeoutSeconds` (default 1800), or when the server stops;
//! - `Accept: ...;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`: objects as metadata only.
//!
//! A watcher too slow for the change channel gets a 410 ERROR and the stream ends, as when a real
//! server drops a lagging watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::Shared;
use super::error::ApiError;
use super::resources::{self, ResourceDef};
use super::select::Selector;
use super::store::{Change, EventType};

struct Filter {
    res: usize,
    namespace: Option<String>,
    selector: Selector,
    /// Send `PartialObjectMetadata` instead of the objects.
    metadata_only: bool,
}

impl Filter {
    /// The event this watch sees for a change, if any.
    fn translate(&self, c: &Change) -> Option<(&'static str, Value)> {
        if c.res != self.res || self.namespace.as_ref().is_some_and(|n| *n != c.namespace) {
            return None;
        }
        let now = self.selector.matches(&c.object);
        let before = c
            .previous
            .as_ref()
            .is_some_and(|p| self.selector.matches(p));
        let t = match (c.event, before, now) {
            (EventType::Added, _, true) => "ADDED",
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            _ => return None,
        };
        Some((t, self.shape(&c.object)))
    }

    fn shape(&self, obj: &Value) -> Value {
        if self.metadata_only {
            super::server::partial_metadata(obj)
        } else {
            obj.clone()
        }
    }
}

fn line(t: &str, object: &Value) -> Bytes {
    let mut v =
        serde_json::to_vec(&json!({"type": t, "object": object})).expect("JSON values serialise");
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(res: &ResourceDef, rv: u64) -> Bytes {
    let meta = json!({"resourceVersion": rv.to_string()});
    line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}),
    )
}

fn error_line(e: &ApiError) -> Bytes {
    line("ERROR", &e.to_status())
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

pub fn serve(
    shared: Arc<Shared>,
    res_idx: usize,
    namespace: Option<String>,
    q: &HashMap<String, String>,
    metadata_only: bool,
) -> Result<Response, ApiError> {
    let res = &resources::all()[res_idx];
    let selector = Selector::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    )?;
    let filter = Filter {
        res: res_idx,
        namespace,
        selector,
        metadata_only,
    };
    let from: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))?,
        ),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    if q.contains_key("sendInitialEvents") {
        // Streaming lists are not served (the controller's watchers list, then watch).
        return Err(ApiError::bad_request(
            "sendInitialEvents is not supported by the API double",
        ));
    }
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );

    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut first: Vec<Bytes> = Vec::new();
    let (mut changes, mut last) = {
        let store = shared.store.lock().expect("store lock");
        let snapshot = from.is_none();
        match store.watch_from(if snapshot { None } else { from }) {
            Err(e) => {
                // Too old: one ERROR event, then the stream ends (kube-runtime relists).
                let _ = tx.try_send(error_line(&e));
                return Ok(streaming(rx));
            }
            Ok((replay, changes, current)) => {
                if snapshot {
                    for obj in store.list(res_idx, filter.namespace.as_deref()) {
                        if filter.selector.matches(&obj) {
                            first.push(line("ADDED", &filter.shape(&obj)));
                        }
                    }
                }
                for c in replay {
                    if let Some((t, obj)) = filter.translate(&c) {
                        first.push(line(t, &obj));
                    }
                }
                (changes, current.max(from.unwrap_or(0)))
            }
        }
    };
    let interval = shared.bookmark_interval;
    let mut stop = shared.shutdown.subscribe();
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let next = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = stop.changed() => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let current = shared.store.lock().expect("store lock").resource_version();
                    // Everything committed up to `current` is in the channel already: send it first.
                    loop {
                        match changes.try_recv() {
                            Ok(c) => {
                                if !send_change(&tx, &filter, &c, &mut last).await {
                                    return;
                                }
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                let _ = tx.send(error_line(&ApiError::expired("watch fell behind; too old resource version"))).await;
                                return;
                            }
                            Err(broadcast::error::TryRecvError::Closed) => return,
                        }
                    }
                    last = last.max(current);
                    if tx.send(bookmark(res, last)).await.is_err() {
                        return;
                    }
                    continue;
                }
                r = changes.recv() => r,
            };
            match next {
                Ok(c) => {
                    if !send_change(&tx, &filter, &c, &mut last).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx
                        .send(error_line(&ApiError::expired(
                            "watch fell behind; too old resource version",
                        )))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(streaming(rx))
}

async fn send_change(
    tx: &mpsc::Sender<Bytes>,
    filter: &Filter,
    c: &Change,
    last: &mut u64,
) -> bool {
    if c.rv <= *last {
        return true;
    }
    *last = c.rv;
    match filter.translate(c) {
        Some((t, obj)) => tx.send(line(t, &obj)).await.is_ok(),
        None => true,
    }
}
