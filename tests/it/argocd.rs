//! The Argo CD health check shipped in docs/argocd/argocd-cm.yaml, run by Debian's `lua5.1`
//! (Argo CD's Lua version) against ImageMirrors whose status the controller's own status
//! builders made.

use std::process::Command;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use imagemirror::api::{ImageMirror, ImageMirrorStatus};
use imagemirror::controller::status;

use crate::support::controller::Fixture;

const KEY: &str = "resource.customizations.health.imagemirror.dev_ImageMirror";

/// The script, from the ConfigMap snippet users apply.
fn script() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/argocd/argocd-cm.yaml");
    let text = std::fs::read_to_string(path).expect("read the argocd-cm snippet");
    let cm: Value = serde_yaml::from_str(&text).expect("the snippet is YAML");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    cm["data"][KEY]
        .as_str()
        .unwrap_or_else(|| panic!("{KEY} missing"))
        .to_string()
}

/// A JSON value as a Lua table constructor (what Argo CD hands the script as `obj`).
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// (status, message) the script gives `obj`.
fn health(obj: &ImageMirror) -> (String, String) {
    let obj = serde_json::to_value(obj).unwrap();
    let program = format!(
        "obj = {}\nlocal function check()\n{}\nend\nlocal hs = check()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua(&obj),
        script()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("health.lua");
    std::fs::write(&file, program).unwrap();
    let out = Command::new("lua5.1")
        .arg(&file)
        .output()
        .expect("run lua5.1 (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "lua5.1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

fn mirror(generation: i64, status: Option<ImageMirrorStatus>) -> ImageMirror {
    let mut m: ImageMirror = serde_json::from_value(Fixture::new("ns", "app", "a/b", "c/d").json())
        .expect("an ImageMirror");
    m.metadata.generation = Some(generation);
    m.status = status;
    m
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn ready(generation: i64) -> ImageMirrorStatus {
    let g = Some(generation);
    let mut s = status::progressing(&ImageMirrorStatus::default(), g, now());
    status::set_condition(
        &mut s.conditions,
        "Ready",
        "True",
        "Synced",
        "3/3 tags synced",
        g,
        now(),
    );
    status::set_condition(
        &mut s.conditions,
        "Reconciling",
        "False",
        "Synced",
        "",
        g,
        now(),
    );
    s
}

#[test]
fn argocd_health_follows_the_conditions_and_the_generation() {
    let (st, msg) = health(&mirror(1, None));
    assert_eq!(st, "Progressing", "no status yet");
    assert!(!msg.is_empty());

    assert_eq!(
        health(&mirror(2, Some(ready(2)))),
        ("Healthy".into(), "3/3 tags synced".into())
    );

    let first = status::progressing(&ImageMirrorStatus::default(), Some(1), now());
    assert_eq!(health(&mirror(1, Some(first))).0, "Progressing");

    let stalled = status::stalled(
        &ready(3),
        Some(3),
        "SecretNotFound",
        "Secret ns/hub-creds (spec.source.credentialsSecret) not found",
        now(),
    );
    let (st, msg) = health(&mirror(3, Some(stalled)));
    assert_eq!(st, "Degraded");
    assert!(
        msg.starts_with("SecretNotFound: ") && msg.contains("hub-creds"),
        "{msg}"
    );

    // A Ready status for an older generation: the new spec is not synced yet.
    let (st, msg) = health(&mirror(5, Some(ready(4))));
    assert_eq!(st, "Progressing");
    assert!(
        msg.contains("generation 4") && msg.contains("generation 5"),
        "{msg}"
    );

    let retrying = status::retrying(
        &ready(2),
        Some(2),
        "SecretUnavailable",
        "reading Secret ns/x failed, retrying",
        now(),
        now(),
    );
    assert_eq!(health(&mirror(2, Some(retrying))).0, "Progressing");

    let mut partial = ready(2);
    status::set_condition(
        &mut partial.conditions,
        "Ready",
        "False",
        "PartiallySynced",
        "2/3 tags synced, 1 failed",
        Some(2),
        now(),
    );
    let (st, msg) = health(&mirror(2, Some(partial)));
    assert_eq!(st, "Degraded");
    assert_eq!(msg, "PartiallySynced: 2/3 tags synced, 1 failed");

    let mut suspended = ready(2);
    status::set_condition(
        &mut suspended.conditions,
        "Reconciling",
        "False",
        "Suspended",
        "spec.suspend is true",
        Some(2),
        now(),
    );
    assert_eq!(health(&mirror(2, Some(suspended))).0, "Suspended");
}
