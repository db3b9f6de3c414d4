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

/// What a case expects.
#[derive(Clone, Copy, Debug)]
enum Want {
    Valid,
    /// Refused by both; the field the CLI names, and the path the API server reports.
    Invalid {
        cli: &'static str,
        crd: &'static str,
    },
    /// Admitted by the CRD, refused by code (the controller stalls it with InvalidSpec).
    CodeOnly(&'static str),
}

use Want::*;

const fn bad(field: &'static str) -> Want {
    Invalid {
        cli: field,
        crd: field,
    }
}

struct Case {
    name: &'static str,
    /// Spec-relative paths (`tags.latest`) set to a value; `null` removes the field.
    set: Vec<(&'static str, Value)>,
    want: Want,
}

fn case(name: &'static str, set: Vec<(&'static str, Value)>, want: Want) -> Case {
    Case { name, set, want }
}

fn many(n: usize, f: impl Fn(usize) -> String) -> Value {
    Value::Array((0..n).map(|i| Value::String(f(i))).collect())
}

/// Sets a field to an explicit `null` (as in `caSecret: null`) instead of removing it.
const EXPLICIT_NULL: &str = "\u{0}null";

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn cases() -> Vec<Case> {
    let long = |n: usize| "a".repeat(n);
    vec![
        // Valid.
        case("base", vec![], Valid),
        case(
            "include-only",
            vec![("tags", json!({"include": ["v*"]}))],
            Valid,
        ),
        case(
            "semver-only",
            vec![("tags", json!({"semver": ">=1"}))],
            Valid,
        ),
        case(
            "digests-only",
            vec![("tags", Value::Null), ("digests", json!([DIGEST]))],
            Valid,
        ),
        case("interval-min", vec![("interval", json!("30s"))], Valid),
        case(
            "interval-min-ms",
            vec![("interval", json!("30000ms"))],
            Valid,
        ),
        case("interval-max", vec![("interval", json!("8760h"))], Valid),
        case("interval-mixed", vec![("interval", json!("1h30m"))], Valid),
        case(
            "interval-fraction",
            vec![("interval", json!("1.5h"))],
            Valid,
        ),
        case(
            "platforms",
            vec![(
                "platforms",
                json!(["linux/amd64", "linux/arm/v7", "windows/amd64/10.0.17763"]),
            )],
            Valid,
        ),
        case(
            "latest-max",
            vec![("tags", json!({"include": ["*"], "latest": 10000}))],
            Valid,
        ),
        case(
            "latest-min",
            vec![("tags", json!({"include": ["*"], "latest": 1}))],
            Valid,
        ),
        case(
            "secret-names",
            vec![
                ("source.credentialsSecret", json!("hub-creds.v2")),
                ("destination.caSecret", json!(long(253))),
            ],
            Valid,
        ),
        case(
            "names-max",
            vec![("tags.names", many(1000, |i| format!("t{i}")))],
            Valid,
        ),
        case("tag-max", vec![("tags.names", json!([long(128)]))], Valid),
        case(
            "digests-max",
            vec![("digests", many(1000, |_| DIGEST.into()))],
            Valid,
        ),
        case(
            "platforms-max",
            vec![("platforms", many(64, |i| format!("linux/a{i}")))],
            Valid,
        ),
        case(
            "patterns-max",
            vec![(
                "tags",
                json!({"include": many(100, |i| format!("{i}*")), "exclude": [long(256)]}),
            )],
            Valid,
        ),
        case(
            "null-is-absent",
            vec![
                ("source.caSecret", json!(EXPLICIT_NULL)),
                ("tags.semver", json!(EXPLICIT_NULL)),
            ],
            Valid,
        ),
        case(
            "referrers",
            vec![(
                "referrers",
                json!({"enabled": true, "artifactTypes": many(32, |i| format!("application/x{i}+json"))}),
            )],
            Valid,
        ),
        // The selector.
        case(
            "no-tags",
            vec![("tags", Value::Null)],
            Invalid {
                cli: "spec.tags",
                crd: "spec",
            },
        ),
        case(
            "exclude-only",
            vec![("tags", json!({"exclude": ["x"]}))],
            Invalid {
                cli: "spec.tags",
                crd: "spec",
            },
        ),
        case(
            "empty-lists",
            vec![("tags", json!({"names": []})), ("digests", json!([]))],
            Invalid {
                cli: "spec.tags",
                crd: "spec",
            },
        ),
        // interval.
        case(
            "interval-short",
            vec![("interval", json!("29s"))],
            bad("spec.interval"),
        ),
        case(
            "interval-just-short",
            vec![("interval", json!("29.999s"))],
            bad("spec.interval"),
        ),
        case(
            "interval-1ms",
            vec![("interval", json!("1ms"))],
            bad("spec.interval"),
        ),
        case(
            "interval-long",
            vec![("interval", json!("8760h1ms"))],
            bad("spec.interval"),
        ),
        case(
            "interval-overflow",
            vec![("interval", json!("99999999999999999999h"))],
            bad("spec.interval"),
        ),
        case(
            "interval-huge",
            vec![("interval", json!("5000000000000000h"))],
            bad("spec.interval"),
        ),
        case(
            "interval-days",
            vec![("interval", json!("1d"))],
            bad("spec.interval"),
        ),
        case(
            "interval-empty",
            vec![("interval", json!(""))],
            bad("spec.interval"),
        ),
        case(
            "interval-too-long-text",
            vec![("interval", json!("1h".repeat(17)))],
            bad("spec.interval"),
        ),
        case(
            "interval-number",
            vec![("interval", json!(60))],
            bad("spec.interval"),
        ),
        // latest.
        case(
            "latest-zero",
            vec![("tags", json!({"include": ["*"], "latest": 0}))],
            bad("spec.tags.latest"),
        ),
        case(
            "latest-over",
            vec![("tags", json!({"include": ["*"], "latest": 10001}))],
            bad("spec.tags.latest"),
        ),
        case(
            "latest-u32-overflow",
            vec![("tags", json!({"include": ["*"], "latest": 4294967296u64}))],
            bad("spec.tags.latest"),
        ),
        case(
            "latest-negative",
            vec![("tags", json!({"include": ["*"], "latest": -1}))],
            bad("spec.tags.latest"),
        ),
        case(
            "latest-string",
            vec![("tags", json!({"include": ["*"], "latest": "5"}))],
            bad("spec.tags.latest"),
        ),
        // digests, platforms, tags.
        case(
            "digest-short",
            vec![("digests", json!(["sha256:abc"]))],
            bad("spec.digests[0]"),
        ),
        case(
            "digest-upper",
            vec![("digests", json!([DIGEST.to_uppercase()]))],
            bad("spec.digests[0]"),
        ),
        case(
            "digests-over",
            vec![("digests", many(1001, |_| DIGEST.into()))],
            bad("spec.digests"),
        ),
        case(
            "platform-os-only",
            vec![("platforms", json!(["linux"]))],
            bad("spec.platforms[0]"),
        ),
        case(
            "platform-upper",
            vec![("platforms", json!(["linux/amd64", "Linux/arm64"]))],
            bad("spec.platforms[1]"),
        ),
        case(
            "platform-long",
            vec![("platforms", json!([format!("linux/{}", long(60))]))],
            bad("spec.platforms[0]"),
        ),
        case(
            "platforms-over",
            vec![("platforms", many(65, |i| format!("linux/a{i}")))],
            bad("spec.platforms"),
        ),
        case(
            "tag-space",
            vec![("tags.names", json!(["v1", "bad tag"]))],
            bad("spec.tags.names[1]"),
        ),
        case(
            "tag-long",
            vec![("tags.names", json!([long(129)]))],
            bad("spec.tags.names[0]"),
        ),
        case(
            "tag-dash-first",
            vec![("tags.names", json!(["-v1"]))],
            bad("spec.tags.names[0]"),
        ),
        case(
            "names-over",
            vec![("tags.names", many(1001, |i| format!("t{i}")))],
            bad("spec.tags.names"),
        ),
        case(
            "include-empty",
            vec![("tags", json!({"include": [""]}))],
            bad("spec.tags.include[0]"),
        ),
        case(
            "include-over",
            vec![("tags", json!({"include": many(101, |i| format!("{i}*"))}))],
            bad("spec.tags.include"),
        ),
        case(
            "exclude-long",
            vec![("tags.exclude", json!([long(257)]))],
            bad("spec.tags.exclude[0]"),
        ),
        case(
            "semver-long",
            vec![("tags", json!({"semver": format!(">={}", "1".repeat(300))}))],
            bad("spec.tags.semver"),
        ),
        case(
            "artifact-type-empty",
            vec![("referrers", json!({"enabled": true, "artifactTypes": [""]}))],
            bad("spec.referrers.artifactTypes[0]"),
        ),
        case(
            "artifact-types-over",
            vec![("referrers.artifactTypes", many(33, |i| format!("a/{i}")))],
            bad("spec.referrers.artifactTypes"),
        ),
        case(
            "artifact-type-long",
            vec![(
                "referrers.artifactTypes",
                json!([format!("a/{}", long(254))]),
            )],
            bad("spec.referrers.artifactTypes[0]"),
        ),
        // Repositories and Secrets.
        case(
            "repository-empty",
            vec![("source.repository", json!(""))],
            bad("spec.source.repository"),
        ),
        case(
            "repository-long",
            vec![(
                "destination.repository",
                json!(format!("r.example/{}", long(503))),
            )],
            bad("spec.destination.repository"),
        ),
        case(
            "repository-missing",
            vec![("source.repository", Value::Null)],
            bad("spec.source.repository"),
        ),
        case(
            "secret-underscore",
            vec![("source.credentialsSecret", json!("hub_creds"))],
            bad("spec.source.credentialsSecret"),
        ),
        case(
            "secret-empty",
            vec![("destination.credentialsSecret", json!(""))],
            bad("spec.destination.credentialsSecret"),
        ),
        case(
            "secret-long",
            vec![("destination.caSecret", json!(long(254)))],
            bad("spec.destination.caSecret"),
        ),
        // Unknown fields and wrong types (kubectl's strict field validation refuses them).
        case(
            "typo-overwrite",
            vec![("overwite", json!(false))],
            bad("spec.overwite"),
        ),
        case(
            "typo-nested",
            vec![("tags.lables", json!(["x"]))],
            bad("spec.tags.lables"),
        ),
        case(
            "typo-side",
            vec![("source.plainHttp", json!(true))],
            bad("spec.source.plainHttp"),
        ),
        case(
            "bool-as-string",
            vec![("overwrite", json!("no"))],
            bad("spec.overwrite"),
        ),
        case(
            "list-as-string",
            vec![("platforms", json!("linux/amd64"))],
            bad("spec.platforms"),
        ),
        // What only code can check.
        case(
            "glob-unclosed",
            vec![("tags", json!({"include": ["[a"]}))],
            CodeOnly("spec.tags.include"),
        ),
        case(
            "semver-garbage",
            vec![("tags", json!({"semver": "not a range"}))],
            CodeOnly("spec.tags.semver"),
        ),
        case(
            "repository-upper",
            vec![("source.repository", json!("r.example/UPPER"))],
            CodeOnly("spec.source.repository"),
        ),
    ]
}

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
