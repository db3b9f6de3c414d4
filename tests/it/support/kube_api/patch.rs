//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the merge step of
//! server-side apply (map lists merged by key, set lists by value, everything else replaced).

use serde_json::Value;

use super::fields::FieldPath;
use super::resources::{ListType, ResourceDef};

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.shift_remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(ptr: &str) -> Result<(Vec<String>, String), String> {
    if ptr.is_empty() {
        return Err("the root of a document cannot be patched".into());
    }
    let Some(rest) = ptr.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {ptr:?}"));
    };
    let mut tokens: Vec<String> = rest.split('/').map(unescape).collect();
    let last = tokens.pop().expect("split yields at least one token");
    Ok((tokens, last))
}

fn resolve_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or_else(|| format!("missing path: {t}"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("invalid index: {t}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("index out of range: {i}"))?
            }
            _ => return Err(format!("cannot traverse into a scalar at {t}")),
        };
    }
    Ok(cur)
}

fn pointer_remove(doc: &mut Value, ptr: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(ptr)?;
    match resolve_mut(doc, &parent)? {
        Value::Object(m) => m
            .shift_remove(&last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("invalid index: {last}"))?;
            if i >= a.len() {
                return Err(format!("index out of range: {i}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("cannot remove from a scalar: {ptr}")),
    }
}

fn pointer_add(doc: &mut Value, ptr: &str, value: Value) -> Result<(), String> {
    let (parent, last) = split_pointer(ptr)?;
    match resolve_mut(doc, &parent)? {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last.parse().map_err(|_| format!("invalid index: {last}"))?;
            if i > a.len() {
                return Err(format!("index out of range: {i}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("cannot add to a scalar: {ptr}")),
    }
}

/// RFC 6902. The error says which operation failed.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let kind = op["op"].as_str().ok_or("operation without \"op\"")?;
        let path = op["path"].as_str().ok_or("operation without \"path\"")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("{kind} operation on {path} needs a value"))
        };
        match kind {
            "add" => pointer_add(doc, path, value()?)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                pointer_remove(doc, path)?;
                pointer_add(doc, path, value()?)?;
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or("move/copy without \"from\"")?;
                let v = if kind == "move" {
                    pointer_remove(doc, from)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or_else(|| format!("missing path: {from}"))?
                };
                pointer_add(doc, path, v)?;
            }
            "test" => {
                let want = value()?;
                if doc.pointer(path) != Some(&want) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

fn schema_path(path: &[String]) -> String {
    path.iter()
        .filter_map(|s| s.strip_prefix("f:"))
        .collect::<Vec<_>>()
        .join(".")
}

/// The merge step of server-side apply: objects merge, map lists merge items by key, set lists
/// take the union, atomic lists and scalars are replaced, `null` removes.
pub fn merge_apply(res: &ResourceDef, target: &mut Value, applied: &Value, path: &mut FieldPath) {
    match applied {
        Value::Object(a) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in a {
                if v.is_null() {
                    t.shift_remove(k);
                    continue;
                }
                path.push(format!("f:{k}"));
                match t.get_mut(k) {
                    Some(existing) => merge_apply(res, existing, v, path),
                    None => {
                        t.insert(k.clone(), v.clone());
                    }
                }
                path.pop();
            }
        }
        Value::Array(items) => match res.list_type(&schema_path(path)) {
            ListType::Map(keys) => {
                if !target.is_array() {
                    *target = Value::Array(Vec::new());
                }
                let t = target.as_array_mut().expect("made an array above");
                for item in items {
                    let same = |it: &Value| {
                        keys.iter().all(|k| {
                            it.get(k).unwrap_or(&Value::Null) == item.get(k).unwrap_or(&Value::Null)
                        })
                    };
                    match t.iter().position(same) {
                        Some(i) => merge_apply(res, &mut t[i], item, path),
                        None => t.push(item.clone()),
                    }
                }
            }
            ListType::Set => {
                if !target.is_array() {
                    *target = Value::Array(Vec::new());
                }
                let t = target.as_array_mut().expect("made an array above");
                for item in items {
                    if !t.contains(item) {
                        t.push(item.clone());
                    }
                }
            }
            ListType::Atomic => *target = applied.clone(),
        },
        _ => *target = applied.clone(),
    }
}
