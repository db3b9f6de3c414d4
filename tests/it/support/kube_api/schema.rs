//! Admission, as far as the double goes: per-type server behaviour (CRD status, which
//! `TestCluster` waits on) and, for `ImageMirror`, the CRD's structural schema: unknown
//! fields are pruned, defaults applied, types/required/enum/pattern/minimum/minLength checked,
//! and the CRD's CEL rules evaluated by hand-written Rust equivalents (see [`CEL_RULES`]).

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::resources::{self, ResourceDef};
use super::store::now;

type CelFn = fn(&Value) -> bool;

/// The CEL rules of the ImageMirror CRD, each with the Rust the double evaluates instead. A
/// conformance test fails when the CRD gains a rule that is not listed here.
pub const CEL_RULES: &[(&str, CelFn)] = &[
    (
        "(has(self.tags) && ((has(self.tags.names) && size(self.tags.names) > 0) || (has(self.tags.include) && size(self.tags.include) > 0) || has(self.tags.semver))) || (has(self.digests) && size(self.digests) > 0)",
        |spec| {
            let non_empty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
            let tags = &spec["tags"];
            (tags.is_object()
                && (non_empty(&tags["names"])
                    || non_empty(&tags["include"])
                    || !tags["semver"].is_null()))
                || non_empty(&spec["digests"])
        },
    ),
    (
        "duration(self) >= duration('30s') && duration(self) <= duration('8760h')",
        |interval| {
            use imagemirror::api::validation::{MAX_INTERVAL, MIN_INTERVAL};
            interval
                .as_str()
                .and_then(imagemirror::mirror::parse_duration)
                .is_some_and(|d| (MIN_INTERVAL..=MAX_INTERVAL).contains(&d))
        },
    ),
];

/// Every `x-kubernetes-validations` rule in a schema.
pub fn cel_rules(schema: &Value, out: &mut Vec<String>) {
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        out.extend(
            rules
                .iter()
                .filter_map(|r| r["rule"].as_str().map(String::from)),
        );
    }
    if let Some(p) = schema["properties"].as_object() {
        p.values().for_each(|s| cel_rules(s, out));
    }
    if schema.get("items").is_some() {
        cel_rules(&schema["items"], out);
    }
}

fn imagemirror_schema() -> &'static Value {
    static S: OnceLock<Value> = OnceLock::new();
    S.get_or_init(resources::imagemirror_schema)
}

thread_local! {
    /// Set while [`super::ApiServer::create_unvalidated`] writes (on the caller's thread, under
    /// the store lock): the object skips the CRD schema, as one admitted by an older CRD would.
    pub(super) static SKIP_SCHEMA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Applies the per-type rules to an object about to be stored.
///
/// A status write cannot change the spec, so errors in it are not held against the write
/// (the API server's validation ratcheting): the controller can report on an object that an
/// older CRD admitted.
pub fn admit(
    res: &ResourceDef,
    name: &str,
    obj: &mut Value,
    status_write: bool,
) -> Result<(), ApiError> {
    if res.custom && SKIP_SCHEMA.with(|s| s.get()) {
        return Ok(());
    }
    match (res.group, res.plural) {
        ("apiextensions.k8s.io", _) => {
            let t = now();
            let stored: Vec<Value> = obj["spec"]["versions"]
                .as_array()
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v["storage"] == json!(true))
                        .map(|v| v["name"].clone())
                        .collect()
                })
                .unwrap_or_default();
            obj["status"] = json!({
                "acceptedNames": obj["spec"]["names"].clone(),
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
                ],
            });
        }
        ("imagemirror.dev", _) => {
            let mut errors = Vec::new();
            let schema = imagemirror_schema();
            let root = obj.as_object_mut().expect("objects are JSON objects");
            for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
                if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match root.get_mut(k) {
                    Some(v) => check(sub, v, k, &mut errors),
                    None if is_required(schema, k) => {
                        errors.push((k.clone(), "Required value".into()))
                    }
                    None => {}
                }
            }
            let known = schema["properties"].as_object();
            root.retain(|k, _| {
                matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    || known.is_some_and(|p| p.contains_key(k))
            });
            let ratcheted = |field: &str| status_write && field.starts_with("spec");
            if let Some((field, message)) = errors.into_iter().find(|(f, _)| !ratcheted(f)) {
                return Err(ApiError::invalid(res, name, &field, &message));
            }
        }
        _ => {}
    }
    Ok(())
}

fn is_required(schema: &Value, field: &str) -> bool {
    schema["required"]
        .as_array()
        .is_some_and(|r| r.iter().any(|x| x == field))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn regex(pattern: &str) -> Option<regex::Regex> {
    regex::Regex::new(pattern).ok()
}

/// Validates `v` against `schema` at `path`, pruning unknown fields and applying defaults.
fn check(schema: &Value, v: &mut Value, path: &str, errors: &mut Vec<(String, String)>) {
    if v.is_null() {
        if schema["nullable"] != json!(true) {
            errors.push((
                path.into(),
                "Invalid value: \"null\": must not be null".into(),
            ));
        }
        return;
    }
    let want = schema["type"].as_str().unwrap_or("");
    let got = type_name(v);
    if !want.is_empty() && want != got && !(want == "number" && got == "integer") {
        errors.push((
            path.into(),
            format!("Invalid value: \"{got}\": {path} in body must be of type {want}: \"{got}\""),
        ));
        return;
    }
    match v {
        Value::Object(m) => check_object(schema, m, path, errors),
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                errors.push((
                    path.into(),
                    format!(
                        "Invalid value: {}: {path} in body should have at least {min} items",
                        items.len()
                    ),
                ));
            }
            for (i, item) in items.iter_mut().enumerate() {
                check(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
        Value::String(s) => {
            if let Some(min) = schema["minLength"].as_u64()
                && (s.chars().count() as u64) < min
            {
                errors.push((
                    path.into(),
                    format!(
                        "Invalid value: \"{s}\": {path} in body should be at least {min} chars long"
                    ),
                ));
            }
            if let Some(p) = schema["pattern"].as_str()
                && regex(p).is_some_and(|re| !re.is_match(s))
            {
                errors.push((
                    path.into(),
                    format!("Invalid value: \"{s}\": {path} in body should match '{p}'"),
                ));
            }
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.iter().any(|a| a == &Value::String(s.clone()))
            {
                let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                errors.push((
                    path.into(),
                    format!(
                        "Unsupported value: \"{s}\": supported values: {}",
                        list.join(", ")
                    ),
                ));
            }
        }
        Value::Number(n) => {
            if let (Some(min), Some(x)) = (schema["minimum"].as_f64(), n.as_f64())
                && x < min
            {
                errors.push((path.into(), format!("Invalid value: {n}: {path} in body should be greater than or equal to {min}")));
            }
            if let (Some(max), Some(x)) = (schema["maximum"].as_f64(), n.as_f64())
                && x > max
            {
                errors.push((
                    path.into(),
                    format!(
                        "Invalid value: {n}: {path} in body should be less than or equal to {max}"
                    ),
                ));
            }
        }
        _ => {}
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let text = rule["rule"].as_str().unwrap_or("");
        if let Some((_, eval)) = CEL_RULES.iter().find(|(r, _)| *r == text)
            && !eval(v)
        {
            let msg = rule["message"].as_str().unwrap_or("failed rule");
            errors.push((path.into(), format!("Invalid value: \"object\": {msg}")));
        }
    }
}

fn check_object(
    schema: &Value,
    m: &mut Map<String, Value>,
    path: &str,
    errors: &mut Vec<(String, String)>,
) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    if schema["x-kubernetes-preserve-unknown-fields"] != json!(true) {
        m.retain(|k, _| props.contains_key(k));
    }
    for (k, sub) in props {
        let p = format!("{path}.{k}");
        if m.get(k).is_some_and(|v| v.is_null()) && sub["nullable"] != json!(true) {
            // Nulls of non-nullable fields are pruned (then defaulted), as by a real server.
            m.shift_remove(k);
        }
        match m.get_mut(k) {
            Some(v) => check(sub, v, &p, errors),
            None => {
                if let Some(d) = sub.get("default") {
                    m.insert(k.clone(), d.clone());
                } else if is_required(schema, k) {
                    errors.push((p, "Required value".into()));
                }
            }
        }
    }
}
