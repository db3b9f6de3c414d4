//! Patch formats: JSON merge patch (RFC 7386) and the merge step of server-side apply (map
//! lists merged by key, set lists by value, everything else replaced).

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
