//! Soak of the real controller binary: 300 syncs of one ImageMirror against token-auth
//! registries whose credentials rotate, each sync triggered by new content in the mirror's
//! `credentialsSecret` (the controller watches Secret metadata and syncs a mirror again when a
//! Secret it names changes, see `controller/watches.rs` and `reconcile::decide`). Every
//! rotation means a new pooled client and new tokens in the controller. Its resident memory
//! after the last sync stays within 2 MiB of what it was after the 10th.
//!
//! The controller is a process of its own, so the tests running in parallel in this binary do
//! not move its numbers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use imagemirror::api::ImageMirror;

use crate::support::controller::{Fixture, ready};
use crate::support::controller_proc::ControllerProc;
use crate::support::kube_api::{ApiServer, helpers};
use crate::support::token::{TokenConfig, TokenServer};
use crate::support::{Flavor, RegistryConfig, Seeder, TestRegistry};

const SYNCS: usize = 300;
const NS: &str = "soak";
/// How long one sync may take on a loaded machine.
const SYNC_WAIT: Duration = Duration::from_secs(60);

/// `VmRSS` of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The password of rotation `i`; the token server takes every `secret…`.
fn password(i: usize) -> String {
    format!("secret-{i}")
}

/// `.dockerconfigjson` (base64, as in `data`) with rotation `i` for every host in `hosts`.
fn docker_config(hosts: &[&str], i: usize) -> String {
    let auths: serde_json::Map<_, _> = hosts
        .iter()
        .map(|h| {
            (
                h.to_string(),
                json!({"username": "soak", "password": password(i)}),
            )
        })
        .collect();
    base64::engine::general_purpose::STANDARD.encode(json!({ "auths": auths }).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_controller_syncs_with_rotating_secrets_keep_memory_flat() {
    let tokens = TokenServer::start(TokenConfig {
        rotating_passwords: true,
        ..TokenConfig::new("soak", "secret")
    })
    .await;
    let registry = |service: &str| {
        TestRegistry::start_with(RegistryConfig {
            token: Some(tokens.auth_for(service)),
            ..RegistryConfig::default()
        })
    };
    let (src, dst) = (registry("src"), registry("dst"));
    let image = Seeder::new(src.host())
        .with_basic("soak", "secret")
        .push_image("app", Some("v1"), 91, &[30_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    helpers::create_namespace(&client, NS).await;
    let hosts = [src.host(), dst.host()];
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds", "namespace": NS},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": docker_config(&hosts, 1)},
    }))
    .unwrap();
    secrets.create(&Default::default(), &secret).await.unwrap();
    // A day's interval: every sync after the first is one a Secret change asked for.
    Fixture::new(
        NS,
        "app",
        &format!("{}/app", src.host()),
        &format!("{}/app", dst.host()),
    )
    .interval("24h")
    .source_secret("creds")
    .destination_secret("creds")
    .tags(&["v1"])
    .apply(&client)
    .await;
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(
        &api.kubeconfig(dir.path()),
        dir.path(),
        "soak",
        &["--namespace", NS],
    );
    let log = || std::fs::read_to_string(dir.path().join("soak.log")).unwrap_or_default();
    let started = Instant::now();
    let mut after_10 = 0;
    for i in 1..=SYNCS {
        if i > 1 {
            let patch = json!({"data": {".dockerconfigjson": docker_config(&hosts, i)}});
            secrets
                .patch("creds", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            // Syncs the controller finished; 0 while its admin server does not answer.
            let done = controller
                .gauge("imagemirror_sync_duration_seconds_count")
                .await
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0);
            if done >= i {
                assert_eq!(done, i, "one sync per Secret change");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sync {i} did not happen within {SYNC_WAIT:?} ({done} done); log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if i == 10 {
            after_10 = rss_kib(controller.pid());
        }
    }
    let last = rss_kib(controller.pid());
    let took = started.elapsed();
    // Each sync used its own rotation: both registries' token requests carried it and were
    // granted.
    let granted: HashSet<(String, String)> = tokens
        .requests()
        .into_iter()
        .filter(|r| r.status == 200 && r.account.is_some())
        .filter_map(|r| Some((r.service?, r.password?)))
        .collect();
    for i in 1..=SYNCS {
        for service in ["src", "dst"] {
            assert!(
                granted.contains(&(service.to_string(), password(i))),
                "sync {i}: no {service} token for its credentials"
            );
        }
    }
    let mirrors: Api<ImageMirror> = Api::namespaced(client.clone(), NS);
    let m = helpers::wait_for(&mirrors, "app", SYNC_WAIT, ready).await;
    let summary = m.status.as_ref().and_then(|s| s.summary.clone()).unwrap();
    assert_eq!((summary.tags_synced, summary.tags_failed), (1, 0));
    Seeder::new(dst.host())
        .with_basic("soak", "secret")
        .assert_copy_of("app", "v1", &image)
        .await;
    println!(
        "controller soak: syncs={SYNCS} in {took:?} rss_after_10_kib={after_10} rss_after_{SYNCS}_kib={last} token_requests={}",
        tokens.count()
    );
    assert!(
        last.abs_diff(after_10) <= 2048,
        "RSS moved from {after_10} KiB after the 10th sync to {last} KiB after the last"
    );
}
