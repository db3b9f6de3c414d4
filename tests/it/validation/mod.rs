//! One table of specs, judged three ways, with the same verdict required:
//! - the CRD: the generated `openAPIV3Schema` walked here (types, unknown fields as kubectl's
//!   strict field validation refuses them, required, lengths, items, patterns, bounds) and its
//!   CEL rules evaluated by a CEL interpreter (kube-cel, the Kubernetes CEL library) from the
//!   rule text in the generated CRD, so a wrong rule text fails here;
//! - the library: `cli::parse_documents`, which runs `mirror::validate` (the controller's
//!   validate step) on every document;
//! - the binary: `imagemirror mirror` exits 2 naming the document and the field for every
//!   invalid case, and runs (a dry run against a real registry) for every valid one.
//!
//! A few cases are refused by code only (a glob or semver range that does not parse, a
//! repository that is not a docker reference): the API server admits them and the controller
//! reports them as Stalled/InvalidSpec. The table marks them.

use serde_json::{Value, json};

use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli};

mod cases;
use cases::Want::{CodeOnly, Invalid, Valid};
use cases::{Case, EXPLICIT_NULL, cases};

/// A full ImageMirror for `case`, reading `src/app` and writing `dst/app`.
fn document(case: &Case, index: usize, src: &str, dst: &str) -> Value {
    let mut spec = json!({
        "source": {"repository": format!("{src}/app"), "plainHTTP": true},
        "destination": {"repository": format!("{dst}/app"), "plainHTTP": true},
        "tags": {"names": ["v1"]},
    });
    for (path, value) in &case.set {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap();
        let mut at = &mut spec;
        for p in parts {
            at = at
                .as_object_mut()
                .unwrap()
                .entry(p)
                .or_insert_with(|| json!({}));
        }
        let obj = at.as_object_mut().unwrap();
        match value {
            Value::String(m) if m == EXPLICIT_NULL => {
                obj.insert(last.into(), Value::Null);
            }
            Value::Null => {
                obj.shift_remove(last);
            }
            v => {
                obj.insert(last.into(), v.clone());
            }
        }
    }
    json!({
        "apiVersion": "imagemirror.dev/v1alpha1",
        "kind": "ImageMirror",
        "metadata": {"name": format!("c{index}-{}", case.name), "namespace": "test"},
        "spec": spec,
    })
}

fn crd_schema() -> Value {
    let crd: Value = serde_yaml::from_str(&imagemirror::api::crd_yaml()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The API server's structural checks, as far as this CRD uses them: every violation's path.
fn structural(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        return; // pruned, as the API server does with nulls of non-nullable fields
    }
    let ok = match (schema["type"].as_str(), v) {
        (None, _) => true,
        (Some("object"), Value::Object(_)) | (Some("array"), Value::Array(_)) => true,
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    };
    if !ok {
        return out.push(path.into());
    }
    let len_over = |n: usize, key: &str| schema[key].as_u64().is_some_and(|m| n as u64 > m);
    let len_under = |n: usize, key: &str| schema[key].as_u64().is_some_and(|m| (n as u64) < m);
    match v {
        Value::Object(m) => {
            let props = schema["properties"].as_object();
            for k in m.keys() {
                let known = props.is_some_and(|p| p.contains_key(k))
                    || (path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&k.as_str()));
                if !known {
                    out.push(format!("{path}.{k}").trim_start_matches('.').to_string());
                }
            }
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if m.get(r).is_none_or(Value::is_null) {
                    out.push(format!("{path}.{r}").trim_start_matches('.').to_string());
                }
            }
            for (k, sub) in props.into_iter().flatten() {
                if let Some(x) = m.get(k) {
                    let p = format!("{path}.{k}");
                    structural(sub, x, p.trim_start_matches('.'), out);
                }
            }
        }
        Value::Array(items) => {
            if len_over(items.len(), "maxItems") || len_under(items.len(), "minItems") {
                out.push(path.into());
            }
            for (i, x) in items.iter().enumerate() {
                structural(&schema["items"], x, &format!("{path}[{i}]"), out);
            }
        }
        Value::String(s) => {
            let n = s.chars().count();
            let pattern = schema["pattern"]
                .as_str()
                .is_some_and(|p| !regex::Regex::new(p).unwrap().is_match(s));
            if len_over(n, "maxLength") || len_under(n, "minLength") || pattern {
                out.push(path.into());
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|m| x < m)
                || schema["maximum"].as_f64().is_some_and(|m| x > m)
            {
                out.push(path.into());
            }
        }
        _ => {}
    }
}

/// The API server's verdict: the paths of every structural violation, or when there is none,
/// of every CEL rule that fails (it evaluates rules only on a structurally valid object).
fn crd_verdict(schema: &Value, doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    structural(schema, doc, "", &mut out);
    if out.is_empty()
        && let Err(errors) = kube_cel::Validator::new().validate(schema, doc, None)
    {
        out.extend(errors.iter().map(|e| e.field_path.clone()));
    }
    out
}

fn cli_verdict(doc: &Value) -> Result<(), String> {
    let yaml = serde_yaml::to_string(doc).unwrap();
    imagemirror::cli::parse_documents("case.yaml", &yaml)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn the_cli_and_the_crd_agree_on_every_case() {
    let schema = crd_schema();
    let mut wrong = Vec::new();
    for (i, c) in cases().iter().enumerate() {
        let doc = document(c, i, "127.0.0.1:5000", "127.0.0.1:5001");
        let crd = crd_verdict(&schema, &doc);
        let cli = cli_verdict(&doc);
        let ok = match c.want {
            Valid => crd.is_empty() && cli.is_ok(),
            Invalid {
                cli: field,
                crd: path,
            } => {
                crd.iter().any(|p| p == path)
                    && cli
                        .as_ref()
                        .is_err_and(|e| e.contains(&format!("): {field}")))
            }
            CodeOnly(field) => {
                crd.is_empty()
                    && cli
                        .as_ref()
                        .is_err_and(|e| e.contains(&format!("): {field}")))
            }
        };
        if !ok {
            wrong.push(format!(
                "{}: want {:?}; CRD refused {crd:?}; CLI {cli:?}",
                c.name, c.want
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases disagree:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn the_crd_holds_each_cel_rule_once_as_written_in_the_api_module() {
    use imagemirror::api::validation::{INTERVAL_RULE, SELECTOR_RULE};
    let crd = imagemirror::api::crd_yaml();
    for rule in [SELECTOR_RULE, INTERVAL_RULE] {
        assert_eq!(crd.matches(rule).count(), 1, "{rule}");
    }
    assert_eq!(
        crd.matches("rule:").count(),
        2,
        "a CEL rule the table does not know"
    );
    for word in ["uint32", "uint64", "format: uint"] {
        assert!(!crd.contains(word), "Kubernetes warns about format {word}");
    }
}

#[test]
fn every_string_and_list_of_the_spec_is_bounded() {
    fn walk(s: &Value, path: &str, out: &mut Vec<String>) {
        match s["type"].as_str() {
            Some("string") if s["maxLength"].is_null() && s["pattern"].is_null() => {
                out.push(path.into())
            }
            Some("array") if s["maxItems"].is_null() => out.push(path.into()),
            _ => {}
        }
        for (k, sub) in s["properties"].as_object().into_iter().flatten() {
            walk(sub, &format!("{path}.{k}"), out);
        }
        if s.get("items").is_some() {
            walk(&s["items"], &format!("{path}[]"), out);
        }
    }
    let mut unbounded = Vec::new();
    walk(&crd_schema()["properties"]["spec"], "spec", &mut unbounded);
    // A pattern bounds a digest (fixed length); the interval's pattern is not a bound but it
    // has a maxLength too.
    unbounded.retain(|p| p != "spec.digests[]");
    assert!(unbounded.is_empty(), "unbounded: {unbounded:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_2_naming_document_and_field_and_runs_the_valid_ones() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(src.host())
        .push_image("app", Some("v1"), 7, &[1_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut wrong = Vec::new();
    for (i, c) in cases().iter().enumerate() {
        let doc = document(c, i, src.host(), dst.host());
        let yaml = serde_yaml::to_string(&doc).unwrap();
        let (code, out, err) = mirror_cli(dir.path(), &yaml, &["--dry-run"]);
        let named = format!("document 1 (test/c{i}-{}): ", c.name);
        let ok = match c.want {
            Valid => code == 0,
            Invalid { cli: field, .. } | CodeOnly(field) => {
                code == 2 && err.contains(&format!("{named}{field}"))
            }
        };
        if !ok {
            wrong.push(format!(
                "{} ({:?}): exit {code}\n{out}{err}",
                c.name, c.want
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn lenient_lets_unknown_fields_through_but_not_wrong_values() {
    let dir = tempfile::tempdir().unwrap();
    let cs = cases();
    let typo = cs.iter().position(|c| c.name == "typo-overwrite").unwrap();
    let short = cs.iter().position(|c| c.name == "interval-short").unwrap();
    // A dry run of plain names asks no registry, so none is started.
    let yaml = |i: usize| {
        serde_yaml::to_string(&document(&cs[i], i, "127.0.0.1:9", "127.0.0.1:9")).unwrap()
    };
    let (code, out, err) = mirror_cli(dir.path(), &yaml(typo), &["--dry-run", "--lenient"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("spec.overwite"),
        "the ignored field is named: {err}"
    );
    let (code, _, err) = mirror_cli(dir.path(), &yaml(typo), &["--dry-run"]);
    assert_eq!(code, 2);
    assert!(err.contains("--lenient"), "{err}");
    let (code, _, err) = mirror_cli(dir.path(), &yaml(short), &["--dry-run", "--lenient"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn every_invalid_document_of_a_file_is_reported() {
    let cs = cases();
    let pick = |name: &str| {
        let i = cs.iter().position(|c| c.name == name).unwrap();
        serde_yaml::to_string(&document(&cs[i], i, "127.0.0.1:9", "127.0.0.1:9")).unwrap()
    };
    let text = [pick("interval-short"), pick("base"), pick("typo-nested")].join("---\n");
    let err = imagemirror::cli::parse_documents("f.yaml", &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("f.yaml, document 1 (test/") && err.contains("spec.interval"),
        "{err}"
    );
    assert!(
        err.contains("f.yaml, document 3 (test/") && err.contains("spec.tags.lables"),
        "{err}"
    );
    assert!(!err.contains("document 2"), "{err}");
}
