//! The table of specs every judge in this module sees, with the verdict each must give.

use serde_json::{Value, json};

/// What a case expects.
#[derive(Clone, Copy, Debug)]
pub(super) enum Want {
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

pub(super) struct Case {
    pub(super) name: &'static str,
    /// Spec-relative paths (`tags.latest`) set to a value; `null` removes the field.
    pub(super) set: Vec<(&'static str, Value)>,
    pub(super) want: Want,
}

fn case(name: &'static str, set: Vec<(&'static str, Value)>, want: Want) -> Case {
    Case { name, set, want }
}

fn many(n: usize, f: impl Fn(usize) -> String) -> Value {
    Value::Array((0..n).map(|i| Value::String(f(i))).collect())
}

/// Sets a field to an explicit `null` (as in `caSecret: null`) instead of removing it.
pub(super) const EXPLICIT_NULL: &str = "\u{0}null";

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub(super) fn cases() -> Vec<Case> {
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
