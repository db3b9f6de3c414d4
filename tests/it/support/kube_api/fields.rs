//! Field ownership (`metadata.managedFields`) and server-side apply, simplified.
//!
//! A field set is a set of paths in the FieldsV1 vocabulary: `f:name` for an object field,
//! `k:{"type":"Ready"}` for an item of a map list, `v:"x"` for an item of a set list. Leaves are
//! scalars, atomic lists and empty objects; map-list items are members too (their identity).
//!
//! What the double does, like structured-merge-diff:
//! - an Update (create, PUT, merge/JSON/strategic patch) gives its manager the leaves it changed
//!   and takes them from every other manager;
//! - an Apply conflicts (409) when it sets a leaf owned by another manager to a different value,
//!   unless `force`; it then owns exactly the applied set; leaves it applied last time and not now
//!   are removed from the object unless another manager owns them;
//! - fields that disappear from the object disappear from every set.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::patch::merge_apply;
use super::resources::{ListType, ResourceDef};

pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields that belong to users (and so to field managers). `finalizers` are refused
/// and `ownerReferences` are written by nothing the controller runs.
const OWNED_METADATA: &[&str] = &["labels", "annotations"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Update,
}

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    All,
    StatusOnly,
    NoStatus,
}

#[derive(Clone, Debug)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: Operation,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn is(&self, manager: &str, op: Operation, sub: &str) -> bool {
        self.manager == manager && self.operation == op && self.subresource == sub
    }
}

/// A field that another manager owns, reported in an apply conflict.
pub struct ApplyConflict {
    pub manager: String,
    pub field: String,
}

fn schema_path(path: &[String]) -> String {
    path.iter()
        .filter_map(|s| s.strip_prefix("f:"))
        .collect::<Vec<_>>()
        .join(".")
}

/// `.spec.holderIdentity` / `.status.conditions[type="Ready"].status`: as in conflict messages.
pub fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if let Some(f) = seg.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let inner: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", inner.join(",")));
        } else if let Some(v) = seg.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// The leaves (and map-list items) of `obj` within `domain`.
pub fn field_set(res: &ResourceDef, obj: &Value, domain: Domain) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                if domain == Domain::StatusOnly {
                    continue;
                }
                for m in OWNED_METADATA {
                    if let Some(v) = v.get(*m) {
                        walk(
                            res,
                            v,
                            &mut vec!["f:metadata".into(), format!("f:{m}")],
                            &mut out,
                        );
                    }
                }
            }
            "status" if domain == Domain::NoStatus => {}
            _ if domain == Domain::StatusOnly && k != "status" => {}
            _ => walk(res, v, &mut vec![format!("f:{k}")], &mut out),
        }
    }
    out
}

fn item_key(keys: &[String], item: &Value) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    format!("k:{}", Value::Object(m))
}

fn walk(res: &ResourceDef, v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                walk(res, child, path, out);
                path.pop();
            }
        }
        Value::Array(items) => match res.list_type(&schema_path(path)) {
            ListType::Map(keys) => {
                for item in items {
                    path.push(item_key(&keys, item));
                    out.insert(path.clone());
                    if let Some(m) = item.as_object() {
                        for (k, child) in m {
                            path.push(format!("f:{k}"));
                            walk(res, child, path, out);
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
            ListType::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Atomic => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

fn is_item(path: &[String]) -> bool {
    path.last()
        .is_some_and(|s| s.starts_with("k:") || s.starts_with("v:"))
}

fn find_item(items: &[Value], seg: &str) -> Option<usize> {
    if let Some(k) = seg.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(k).ok()?;
        items.iter().position(|it| {
            keys.iter()
                .all(|(k, v)| it.get(k).unwrap_or(&Value::Null) == v)
        })
    } else if let Some(v) = seg.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        items.iter().position(|it| *it == want)
    } else {
        None
    }
}

/// The value at a field path, if present.
pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = if let Some(f) = seg.strip_prefix("f:") {
            cur.get(f)?
        } else {
            let items = cur.as_array()?;
            &items[find_item(items, seg)?]
        };
    }
    Some(cur)
}

/// Removes the node at `path`, then parents (below the top level) that became empty.
pub fn remove_path(v: &mut Value, path: &[String]) {
    fn rec(v: &mut Value, path: &[String], depth: usize) {
        let Some((seg, rest)) = path.split_first() else {
            return;
        };
        if let Some(f) = seg.strip_prefix("f:") {
            let Some(m) = v.as_object_mut() else { return };
            if rest.is_empty() {
                m.shift_remove(f);
            } else if let Some(child) = m.get_mut(f) {
                rec(child, rest, depth + 1);
                if depth >= 1 && is_empty_container(child) {
                    m.shift_remove(f);
                }
            }
        } else if let Some(items) = v.as_array_mut()
            && let Some(i) = find_item(items, seg)
        {
            if rest.is_empty() {
                items.remove(i);
            } else {
                rec(&mut items[i], rest, depth + 1);
            }
        }
    }
    rec(v, path, 0);
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Records an Update by `manager`: it now owns what it changed (within `domain`), nobody else does.
#[allow(clippy::too_many_arguments)]
pub fn record_update(
    entries: &mut Vec<ManagedEntry>,
    res: &ResourceDef,
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    subresource: &str,
    domain: Domain,
    now: &str,
) {
    let changed: FieldSet = field_set(res, new, domain)
        .into_iter()
        .filter(|p| match old {
            None => true,
            Some(o) => match value_at(o, p) {
                None => true,
                // An item's identity does not change when its fields do.
                Some(_) if is_item(p) => false,
                Some(ov) => Some(ov) != value_at(new, p),
            },
        })
        .collect();
    if !changed.is_empty() {
        for e in entries.iter_mut() {
            if !e.is(manager, Operation::Update, subresource) {
                e.fields.retain(|p| !changed.contains(p));
            }
        }
        let entry = entry_mut(entries, res, manager, Operation::Update, subresource, now);
        entry.fields.extend(changed);
        entry.time = now.to_string();
    }
    retain_existing(entries, new);
}

fn entry_mut<'a>(
    entries: &'a mut Vec<ManagedEntry>,
    res: &ResourceDef,
    manager: &str,
    op: Operation,
    sub: &str,
    now: &str,
) -> &'a mut ManagedEntry {
    match entries.iter().position(|e| e.is(manager, op, sub)) {
        Some(i) => &mut entries[i],
        None => {
            entries.push(ManagedEntry {
                manager: manager.to_string(),
                operation: op,
                subresource: sub.to_string(),
                api_version: res.api_version(),
                time: now.to_string(),
                fields: FieldSet::new(),
            });
            entries.last_mut().expect("just pushed")
        }
    }
}

/// Drops paths that are no longer in the object, and entries left empty.
pub fn retain_existing(entries: &mut Vec<ManagedEntry>, obj: &Value) {
    for e in entries.iter_mut() {
        e.fields.retain(|p| value_at(obj, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Server-side apply of `applied` by `manager` onto `current` (an empty object when creating).
/// Returns the merged object, or the conflicts when `force` is false.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    entries: &mut Vec<ManagedEntry>,
    res: &ResourceDef,
    current: &Value,
    applied: &Value,
    manager: &str,
    subresource: &str,
    domain: Domain,
    force: bool,
    now: &str,
) -> Result<Value, Vec<ApplyConflict>> {
    let applied_set = field_set(res, applied, domain);
    let mut conflicts = Vec::new();
    let mut forced: Vec<(usize, FieldPath)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.is(manager, Operation::Apply, subresource) {
            continue;
        }
        for q in e.fields.iter().filter(|q| !is_item(q)) {
            if applied_set.contains(q) && value_at(current, q) != value_at(applied, q) {
                conflicts.push(ApplyConflict {
                    manager: e.manager.clone(),
                    field: display_path(q),
                });
                forced.push((i, q.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, q) in forced {
        entries[i].fields.remove(&q);
    }
    let previous = entries
        .iter()
        .find(|e| e.is(manager, Operation::Apply, subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut obj = current.clone();
    for r in previous.difference(&applied_set) {
        let owned_elsewhere = entries.iter().any(|e| {
            !e.is(manager, Operation::Apply, subresource)
                && e.fields.iter().any(|q| q.starts_with(r))
        });
        if !owned_elsewhere {
            remove_path(&mut obj, r);
        }
    }
    merge_apply(res, &mut obj, applied, &mut Vec::new());
    let entry = entry_mut(entries, res, manager, Operation::Apply, subresource, now);
    entry.fields = applied_set;
    entry.time = now.to_string();
    Ok(obj)
}

/// The FieldsV1 tree of a set.
fn fields_v1(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let mut node = &mut root;
        for (i, seg) in path.iter().enumerate() {
            let m = node.as_object_mut().expect("tree nodes are objects");
            // A member that gets children is marked with ".".
            if i > 0 && m.is_empty() && set.contains(&path[..i].to_vec()) {
                m.insert(".".into(), json!({}));
            }
            node = m.entry(seg.clone()).or_insert_with(|| json!({}));
        }
        if let Some(m) = node.as_object_mut()
            && !m.is_empty()
        {
            m.insert(".".into(), json!({}));
        }
    }
    root
}

/// `metadata.managedFields` as the API server renders it.
pub fn render(entries: &[ManagedEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut v = json!({
                    "manager": e.manager,
                    "operation": match e.operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&e.fields),
                });
                if !e.subresource.is_empty() {
                    v["subresource"] = json!(e.subresource);
                }
                v
            })
            .collect(),
    )
}
