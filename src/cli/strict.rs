//! Strict field validation for the CLI's YAML, as `kubectl apply` does it: every field must be
//! one the CRD knows, of the type it says, so a typo (`overwite: false`) or a field from a newer
//! version is an error naming the field instead of being silently ignored. The known fields and
//! types come from the generated CRD schema, so this follows the Rust types.

use std::sync::OnceLock;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::api::ImageMirror;

/// `metadata` is `type: object` in a CRD; these are `ObjectMeta`'s fields.
const OBJECT_META: &[&str] = &[
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

/// One field the schema does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// The field's path, like `spec.tags.overwite`.
    pub field: String,
    /// What is wrong.
    pub detail: String,
    /// An unknown field (which `--lenient` lets through), rather than a wrong type.
    pub unknown: bool,
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

fn schema() -> &'static Json {
    static SCHEMA: OnceLock<Json> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = ImageMirror::crd();
        crd.spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Json::Null)
    })
}

/// Every unknown field and wrong type in one ImageMirror document, in document order.
pub fn check(doc: &Yaml) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    walk(schema(), doc, "", &mut out);
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk(schema: &Json, v: &Yaml, path: &str, out: &mut Vec<FieldProblem>) {
    // An explicit null is the field left out (the API server prunes it too).
    if v.is_null() {
        return;
    }
    let want = schema["type"].as_str().unwrap_or("");
    let ok = match (want, v) {
        ("", _) => true,
        ("object", Yaml::Mapping(_)) | ("array", Yaml::Sequence(_)) => true,
        ("string", Yaml::String(_)) | ("boolean", Yaml::Bool(_)) => true,
        ("integer", Yaml::Number(n)) => n.is_i64() || n.is_u64(),
        ("number", Yaml::Number(_)) => true,
        _ => false,
    };
    if !ok {
        out.push(FieldProblem {
            field: path.to_string(),
            detail: format!("must be of type {want}"),
            unknown: false,
        });
        return;
    }
    match v {
        Yaml::Mapping(m) => {
            let props = schema["properties"].as_object();
            let open = schema["x-kubernetes-preserve-unknown-fields"] == Json::Bool(true)
                || schema["additionalProperties"].is_object()
                || (path != "metadata" && props.is_none());
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if m.get(r).is_none_or(Yaml::is_null) {
                    out.push(FieldProblem {
                        field: join(path, r),
                        detail: "required field is missing".into(),
                        unknown: false,
                    });
                }
            }
            for (k, item) in m {
                let Some(key) = k.as_str() else {
                    out.push(FieldProblem {
                        field: path.to_string(),
                        detail: format!("field names must be strings, found {k:?}"),
                        unknown: false,
                    });
                    continue;
                };
                let field = join(path, key);
                match props.and_then(|p| p.get(key)) {
                    Some(sub) => walk(sub, item, &field, out),
                    // The CRD's schema leaves these to the API server.
                    None if path.is_empty() && key == "metadata" => {
                        walk(&serde_json::json!({"type": "object"}), item, &field, out)
                    }
                    None if path.is_empty() && matches!(key, "apiVersion" | "kind") => {}
                    None if path == "metadata" && OBJECT_META.contains(&key) => {}
                    None if open => {}
                    None => {
                        let mut known: Vec<&str> = match props {
                            Some(p) => p.keys().map(String::as_str).collect(),
                            None => OBJECT_META.to_vec(),
                        };
                        known.sort_unstable();
                        out.push(FieldProblem {
                            field,
                            detail: format!("unknown field (known: {})", known.join(", ")),
                            unknown: true,
                        });
                    }
                }
            }
        }
        Yaml::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        Yaml::Number(n) => {
            // Out-of-range integers would otherwise fail deserialisation without a field name.
            let x = n.as_f64().unwrap_or(f64::NAN);
            let min = schema["minimum"].as_f64();
            let max = schema["maximum"].as_f64();
            if min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m) {
                let bound = |b: Option<f64>| b.map_or("-".to_string(), |b| b.to_string());
                out.push(FieldProblem {
                    field: path.to_string(),
                    detail: format!("{n} is not between {} and {}", bound(min), bound(max)),
                    unknown: false,
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let doc: Yaml = serde_yaml::from_str(yaml).unwrap();
        check(&doc).iter().map(|p| p.to_string()).collect()
    }

    const HEAD: &str = "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata: {name: a, labels: {x: y}}\n";

    #[test]
    fn known_fields_pass() {
        let doc = format!(
            "{HEAD}spec:\n  source: {{repository: a, plainHTTP: true}}\n  destination: {{repository: b}}\n  tags: {{names: [v1], latest: 3}}\n  overwrite: false\n"
        );
        assert_eq!(problems(&doc), Vec::<String>::new());
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_named() {
        let head = "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: a\n  lables: {}\n";
        let doc = format!(
            "{head}spec:\n  source: {{repository: a, plainHttp: true}}\n  destination: {{repository: 5}}\n  tags: {{names: [v1], latest: 4294967296}}\n  overwite: false\n"
        );
        let p = problems(&doc);
        assert!(p[0].starts_with("metadata.lables: unknown field"), "{p:?}");
        assert!(p[1].starts_with("spec.source.plainHttp: unknown field (known: caSecret, credentialsSecret, insecureSkipTLSVerify, plainHTTP, repository)"), "{p:?}");
        assert_eq!(p[2], "spec.destination.repository: must be of type string");
        assert_eq!(
            p[3],
            "spec.tags.latest: 4294967296 is not between 1 and 10000"
        );
        assert!(p[4].starts_with("spec.overwite: unknown field"), "{p:?}");
        assert_eq!(p.len(), 5, "{p:?}");
    }
}
