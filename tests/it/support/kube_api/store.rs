//! The object store: one global resourceVersion counter, object metadata semantics, the status
//! subresource, field ownership, and a bounded history of changes for watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::fields::{self, ManagedEntry};
use super::resources::{self, ResourceDef};

/// (resource index, namespace or "" for cluster-scoped, name); iteration order is list order.
pub type ObjKey = (usize, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// What a watch starts from: changes to replay, a receiver for the next ones, the current
/// resourceVersion.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>, u64);

/// One committed change, as replayed to watches.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub res: usize,
    pub namespace: String,
    pub event: EventType,
    pub object: Value,
    /// The object before the change (for selector transitions).
    pub previous: Option<Value>,
}

pub(super) struct Stored {
    pub(super) obj: Value,
    pub(super) managed: Vec<ManagedEntry>,
}

/// Who writes, and where.
pub struct WriteCtx<'a> {
    pub manager: &'a str,
    pub subresource: &'a str,
}

pub enum PatchKind {
    Merge,
    /// Treated as a JSON merge patch (no `$patch` directives; the served built-in types have no
    /// lists whose strategy differs). kube-lease-manager renews and releases Leases with it.
    /// Refused for custom resources, like a real server.
    Strategic,
    Apply {
        force: bool,
    },
}

pub struct Store {
    rv: u64,
    pub(super) objects: BTreeMap<ObjKey, Stored>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// Highest resourceVersion dropped from the history: watches from before it get 410.
    compacted: u64,
    tx: broadcast::Sender<Arc<Change>>,
}

pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(super) fn meta(v: &Value) -> &Value {
    &v["metadata"]
}

pub(super) fn meta_mut(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !v["metadata"].is_object() {
        v["metadata"] = json!({});
    }
    v["metadata"].as_object_mut().expect("made an object above")
}

pub(super) fn rv_of(v: &Value) -> Option<&str> {
    meta(v)["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())
}

pub(super) fn without_server_meta(v: &Value) -> Value {
    let mut v = v.clone();
    let m = meta_mut(&mut v);
    m.shift_remove("managedFields");
    m.shift_remove("resourceVersion");
    v
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let mut store = Self {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            tx,
        };
        let ctx = WriteCtx {
            manager: "kube-apiserver",
            subresource: "",
        };
        for ns in ["default", "kube-system"] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            store
                .create(resources::namespaces(), "", body, &ctx)
                .expect("bootstrap namespaces");
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Drops the whole history: any watch from an older resourceVersion gets 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&(res, ns.to_string(), name.to_string()))
            .map(|s| s.obj.clone())
            .ok_or_else(|| ApiError::not_found(&resources::all()[res], name))
    }

    /// Objects of `res`, in one namespace or all, in key order.
    pub fn list(&self, res: usize, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .range((res, String::new(), String::new())..(res + 1, String::new(), String::new()))
            .filter(|((_, n, _), _)| ns.is_none_or(|want| want == n))
            .map(|(_, s)| s.obj.clone())
            .collect()
    }

    /// The changes after `rv` (410 when they are no longer all known), a receiver for the next
    /// ones, and the current resourceVersion; taken atomically so nothing is missed.
    pub fn watch_from(&self, rv: Option<u64>) -> Result<WatchStart, ApiError> {
        let replay = match rv {
            Some(rv) if rv < self.compacted => {
                return Err(ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                )));
            }
            Some(rv) => self.history.iter().filter(|c| c.rv > rv).cloned().collect(),
            None => Vec::new(),
        };
        Ok((replay, self.tx.subscribe(), self.rv))
    }

    pub(super) fn check_namespace(&self, res: &ResourceDef, ns: &str) -> Result<(), ApiError> {
        if res.namespaced
            && !self
                .objects
                .contains_key(&(resources::namespaces(), String::new(), ns.to_string()))
        {
            return Err(ApiError::not_found(
                &resources::all()[resources::namespaces()],
                ns,
            ));
        }
        Ok(())
    }

    pub(super) fn commit(
        &mut self,
        key: ObjKey,
        mut new: Value,
        mut managed: Vec<ManagedEntry>,
    ) -> Value {
        let old = self.objects.get(&key);
        if let Some(old) = old {
            let same_fields = old.managed.len() == managed.len()
                && old.managed.iter().zip(&managed).all(|(a, b)| {
                    a.manager == b.manager
                        && a.operation == b.operation
                        && a.subresource == b.subresource
                        && a.fields == b.fields
                });
            if same_fields && without_server_meta(&old.obj) == without_server_meta(&new) {
                // A no-op write changes nothing, not even the resourceVersion.
                return old.obj.clone();
            }
        }
        if old.is_none() {
            managed.retain(|e| !e.fields.is_empty());
        }
        let rendered = fields::render(&managed);
        let m = meta_mut(&mut new);
        if rendered.as_array().is_some_and(|a| !a.is_empty()) {
            m.insert("managedFields".into(), rendered);
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let previous = self
            .objects
            .insert(
                key.clone(),
                Stored {
                    obj: new.clone(),
                    managed,
                },
            )
            .map(|s| s.obj);
        let event = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(key, event, new.clone(), previous);
        new
    }

    pub(super) fn remove(&mut self, key: ObjKey, mut last: Value) -> Value {
        self.rv += 1;
        meta_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let previous = self.objects.remove(&key).map(|s| s.obj);
        self.record(key, EventType::Deleted, last.clone(), previous);
        last
    }

    fn record(&mut self, key: ObjKey, event: EventType, object: Value, previous: Option<Value>) {
        let change = Arc::new(Change {
            rv: self.rv,
            res: key.0,
            namespace: key.1,
            event,
            object,
            previous,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.compacted = c.rv;
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.tx.send(change);
    }
}
