//! End-to-end: the real controller (the library entry point `main` uses) against the
//! Kubernetes API double over HTTP (or a real cluster when IMAGEMIRROR_E2E_KUBECONFIG is set)
//! and two real registries.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};

use imagemirror::api::ImageMirror;
use imagemirror::controller::LeaderElection;

use crate::support::controller::{
    Fixture, Running, cond, config, free_port, message, observed, ready, wait_event,
};
use crate::support::kube_api::{TestCluster, helpers};
use crate::support::{Flavor, RegistryConfig, Seeder, TestRegistry};

const WAIT: Duration = Duration::from_secs(60);

/// `app` in `ns`: `src/app` to `dst/app`.
fn app(ns: &str, src: &str, dst: &str) -> Fixture {
    Fixture::new(ns, "app", &format!("{src}/app"), &format!("{dst}/app"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_becomes_ready_with_digests_then_follows_spec_changes_and_suspend() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let v1 = s
        .push_image("app", Some("v1"), 31, &[40_000], Flavor::Oci)
        .await;
    let v2 = s
        .push_image("app", Some("v2"), 32, &[30_000], Flavor::Docker)
        .await;
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let port = free_port();
    let mut cfg = config(&ns);
    cfg.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let running = Running::start(cluster.client(), cfg);
    let api: Api<ImageMirror> = Api::namespaced(cluster.client(), &ns);

    let applied = Instant::now();
    let src_repo = format!("{}/app", src.host());
    let dst_repo = format!("{}/mirror/app", dst.host());
    Fixture::new(&ns, "app", &src_repo, &dst_repo)
        .tags(&["v1"])
        .apply(&cluster.client())
        .await;
    let m = cluster.wait_for(&ns, "app", WAIT, ready).await;
    eprintln!("apply → Ready for a one-tag image: {:?}", applied.elapsed());
    let status = m.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.summary.as_ref().unwrap().ratio, "1/1");
    assert_eq!(status.tags.len(), 1);
    assert_eq!(status.tags[0].name, "v1");
    assert_eq!(
        status.tags[0].source_digest.as_deref(),
        Some(v1.digest.as_str())
    );
    assert_eq!(
        status.tags[0].destination_digest.as_deref(),
        Some(v1.digest.as_str())
    );
    assert_eq!(
        cond(&m, "Stalled"),
        Some(("False".into(), "AsExpected".into()))
    );
    assert_eq!(cond(&m, "Reconciling").unwrap().0, "False");
    assert!(status.last_sync_time.is_some() && status.next_sync_time.is_some());
    Seeder::new(dst.host())
        .assert_copy_of("mirror/app", "v1", &v1)
        .await;
    let client = cluster.client();
    let (t, note) = wait_event(&client, &ns, "app", "SyncStarted", WAIT).await;
    assert_eq!(t, "Normal");
    assert!(
        note.contains(&src_repo) && note.contains(&dst_repo),
        "{note}"
    );
    let (t, note) = wait_event(&client, &ns, "app", "Synced", WAIT).await;
    assert_eq!(t, "Normal");
    assert!(note.starts_with("synced 1 of 1 tags"), "{note}");

    // The admin server answers, and the metrics saw the copy.
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://127.0.0.1:{port}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for needle in [
        "imagemirror_reconcile_total{result=\"success\"}",
        "imagemirror_blobs_total{outcome=\"copied\"}",
        "imagemirror_tags{state=\"synced\"} 1",
        "imagemirror_bytes_copied_total",
        "imagemirror_transfers_in_flight",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }

    // Adding a tag to the spec syncs it.
    let patch = serde_json::json!({"spec": {"tags": {"names": ["v1", "v2"]}}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch spec");
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            ready(m) && m.status.as_ref().is_some_and(|s| s.tags.len() == 2)
        })
        .await;
    assert_eq!(m.status.as_ref().unwrap().observed_generation, Some(2));
    Seeder::new(dst.host())
        .assert_copy_of("mirror/app", "v2", &v2)
        .await;

    // suspend: true stops syncing: a tag added while suspended is not copied.
    let patch = serde_json::json!({"spec": {"suspend": true}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    cluster
        .wait_for(&ns, "app", WAIT, |m| {
            observed(m) && cond(m, "Reconciling").is_some_and(|(_, r)| r == "Suspended")
        })
        .await;
    s.push_image("app", Some("v3"), 33, &[1_000], Flavor::Oci)
        .await;
    let patch = serde_json::json!({"spec": {"tags": {"names": ["v1", "v2", "v3"]}}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    cluster.wait_for(&ns, "app", WAIT, observed).await;
    assert!(
        Seeder::new(dst.host())
            .get_manifest("mirror/app", "v3")
            .await
            .is_none(),
        "a suspended mirror must not copy"
    );
    running.stop().await;
    cluster.delete_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_missing_or_invalid_and_refused_passwords_stall_with_their_reason_and_event() {
    let src = TestRegistry::start();
    let dst = TestRegistry::start_with(RegistryConfig {
        htpasswd: Some(("robot".into(), "pa55-word".into())),
        ..Default::default()
    });
    let v1 = Seeder::new(src.host())
        .push_image("app", Some("v1"), 41, &[20_000], Flavor::Oci)
        .await;
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let running = Running::start(cluster.client(), config(&ns));
    app(&ns, src.host(), dst.host())
        .destination_secret("dst-creds")
        .tags(&["v1"])
        .apply(&cluster.client())
        .await;
    let stalled = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            cond(m, "Stalled") == Some(("True".into(), "SecretNotFound".into()))
        })
        .await;
    assert_eq!(
        cond(&stalled, "Ready"),
        Some(("False".into(), "SecretNotFound".into()))
    );
    let msg = message(&stalled, "Ready");
    assert!(
        msg.contains("dst-creds"),
        "the condition must name the Secret: {msg}"
    );
    let generation = stalled.metadata.generation;
    let client = cluster.client();
    let (t, note) = wait_event(&client, &ns, "app", "SecretNotFound", WAIT).await;
    assert_eq!(t, "Warning");
    assert!(note.contains("dst-creds"), "{note}");

    // The Secret appears, but with credentials for another registry only.
    let creds = |registry: &str, password: &str| {
        let (client, ns) = (client.clone(), ns.clone());
        let registry = registry.to_string();
        let password = password.to_string();
        async move {
            helpers::apply_registry_secret(&client, &ns, "dst-creds", &registry, "robot", &password)
                .await
        }
    };
    creds("elsewhere.example:5000", "pa55-word").await;
    let invalid = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            cond(m, "Stalled") == Some(("True".into(), "SecretInvalid".into()))
        })
        .await;
    let want = format!("no credentials for registry {}", dst.host());
    assert!(message(&invalid, "Ready").contains(&want), "{invalid:?}");
    let (t, note) = wait_event(&client, &ns, "app", "SecretInvalid", WAIT).await;
    assert_eq!(t, "Warning");
    assert!(note.contains("dst-creds") && note.contains(&want), "{note}");
    assert!(!note.contains("pa55-word"), "the Event shows the password");

    creds(dst.host(), "pa55-word").await;
    let m = cluster.wait_for(&ns, "app", WAIT, ready).await;
    assert_eq!(
        m.metadata.generation, generation,
        "the ImageMirror itself was not touched"
    );
    assert_eq!(cond(&m, "Stalled").unwrap().0, "False");
    Seeder::new(dst.host())
        .with_basic("robot", "pa55-word")
        .assert_copy_of("app", "v1", &v1)
        .await;
    let shown = serde_json::to_string(&m).unwrap();
    assert!(
        !shown.contains("pa55-word"),
        "the password leaked into the object"
    );

    // A mirror whose source (the htpasswd registry, read with a tag list) refuses its
    // password: Stalled AuthFailed, and a Warning Event with that reason.
    helpers::apply_registry_secret(&client, &ns, "wrong", dst.host(), "robot", "not-the-one").await;
    Fixture::new(
        &ns,
        "refused",
        &format!("{}/app", dst.host()),
        &format!("{}/back", src.host()),
    )
    .source_secret("wrong")
    .with(|s| s.tags.include = vec!["^v1$".into()])
    .apply(&client)
    .await;
    let refused = cluster
        .wait_for(&ns, "refused", WAIT, |m| {
            observed(m) && cond(m, "Stalled") == Some(("True".into(), "AuthFailed".into()))
        })
        .await;
    assert_eq!(
        cond(&refused, "Ready"),
        Some(("False".into(), "AuthFailed".into()))
    );
    let (t, note) = wait_event(&client, &ns, "refused", "AuthFailed", WAIT).await;
    assert_eq!(t, "Warning");
    assert!(note.contains(dst.host()), "{note}");
    assert!(
        !note.contains("not-the-one"),
        "the Event shows the password"
    );
    running.stop().await;
    cluster.delete_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uneventful_resync_writes_status_once_and_copies_nothing() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(src.host())
        .push_image("app", Some("v1"), 51, &[10_000], Flavor::Oci)
        .await;
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let running = Running::start(cluster.client(), config(&ns));
    app(&ns, src.host(), dst.host())
        .tags(&["v1"])
        // The shortest interval the CRD admits.
        .interval("30s")
        .apply(&cluster.client())
        .await;
    let first = cluster.wait_for(&ns, "app", WAIT, ready).await;
    let synced_at = |m: &ImageMirror| m.status.as_ref().and_then(|s| s.last_sync_time.clone());
    let t0 = synced_at(&first);
    let writes_before = cluster.double().map(|d| {
        (
            d.writes("imagemirrors", Some("status")),
            d.writes("imagemirrors", None),
        )
    });
    let dst_before = dst.requests().len();
    // Two resyncs later...
    let after_one = cluster
        .wait_for(&ns, "app", WAIT, |m| synced_at(m) != t0)
        .await;
    let t1 = synced_at(&after_one);
    let after_two = cluster
        .wait_for(&ns, "app", WAIT, |m| synced_at(m) != t1)
        .await;
    assert!(ready(&after_two));
    if let (Some(d), Some((before, object_before))) = (cluster.double(), writes_before) {
        // Read the resync count around the write count so a resync landing in between is
        // noticed rather than miscounted.
        let t2 = synced_at(&after_two);
        let (writes, resyncs) = loop {
            let cur1 = synced_at(&cluster.get_imagemirror(&ns, "app").await);
            let writes = d.writes("imagemirrors", Some("status")) - before;
            let cur2 = synced_at(&cluster.get_imagemirror(&ns, "app").await);
            if cur1 == cur2 {
                break (writes, if cur1 == t2 { 2 } else { 3 });
            }
        };
        eprintln!("status writes for {resyncs} uneventful resyncs: {writes}");
        assert_eq!(
            writes, resyncs,
            "expected exactly one status patch per resync"
        );
        assert_eq!(
            d.writes("imagemirrors", None),
            object_before,
            "the controller never writes the object itself"
        );
    }
    let dst_requests: Vec<String> = dst.requests()[dst_before..].to_vec();
    assert!(
        dst_requests.iter().all(|r| r.starts_with("HEAD ")),
        "an up-to-date resync only HEADs the destination: {dst_requests:#?}"
    );
    running.stop().await;
    cluster.delete_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_with_leader_election_never_both_copy() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("app", Some("v1"), 61, &[10_000], Flavor::Oci)
        .await;
    s.push_image("app", Some("v2"), 62, &[10_000], Flavor::Oci)
        .await;
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let elect = |id: &str| {
        let mut c = config(&ns);
        c.leader_election = Some(LeaderElection {
            namespace: ns.clone(),
            lease_name: "imagemirror-leader".into(),
            identity: id.into(),
            duration_seconds: 3,
            grace_seconds: 1,
        });
        c
    };
    let a = Running::start(cluster.client(), elect("replica-a"));
    let b = Running::start(cluster.client(), elect("replica-b"));
    app(&ns, src.host(), dst.host())
        .tags(&["v1"])
        .apply(&cluster.client())
        .await;
    cluster.wait_for(&ns, "app", WAIT, ready).await;
    let puts = |tag: &str| {
        dst.requests()
            .iter()
            .filter(|r| r.as_str() == format!("PUT /v2/app/manifests/{tag}"))
            .count()
    };
    assert_eq!(puts("v1"), 1, "exactly one replica copied");

    // The leader goes away; the other takes over and syncs a spec change, still once.
    let leases: Api<Lease> = Api::namespaced(cluster.client(), &ns);
    let holder = leases
        .get("imagemirror-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
        .expect("the lease has a holder");
    let (leader, follower) = if holder == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    leader.stop().await;
    let api: Api<ImageMirror> = Api::namespaced(cluster.client(), &ns);
    let patch = serde_json::json!({"spec": {"tags": {"names": ["v1", "v2"]}}});
    api.patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    cluster
        .wait_for(&ns, "app", WAIT, |m| {
            ready(m) && m.status.as_ref().is_some_and(|s| s.tags.len() == 2)
        })
        .await;
    assert_eq!(puts("v2"), 1, "the new leader copied v2 once");
    assert_eq!(puts("v1"), 1, "v1 was not copied again");
    follower.stop().await;
    cluster.delete_namespace(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_written_is_exactly_what_the_sync_found() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let good = s
        .push_image("app", Some("good"), 71, &[5_000, 6_000], Flavor::Oci)
        .await;
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let running = Running::start(cluster.client(), config(&ns));
    app(&ns, src.host(), dst.host())
        .tags(&["good", "gone"])
        .apply(&cluster.client())
        .await;
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            observed(m) && cond(m, "Ready").is_some_and(|(s, _)| s == "False")
        })
        .await;
    let mut status = serde_json::to_value(m.status.as_ref().unwrap()).unwrap();
    // Times are the clock's; everything else is determined by the registries' content.
    for c in status["conditions"].as_array_mut().unwrap() {
        c.as_object_mut().unwrap().remove("lastTransitionTime");
    }
    let obj = status.as_object_mut().unwrap();
    assert!(obj.remove("lastSyncTime").is_some() && obj.remove("nextSyncTime").is_some());
    let gone_msg = format!("{}/app:gone: not found", src.host());
    let expected = serde_json::json!({
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "PartiallySynced", "observedGeneration": 1,
             "message": format!("1/2 tags synced, 1 failed; gone: {gone_msg}")},
            {"type": "Reconciling", "status": "False", "reason": "PartiallySynced", "observedGeneration": 1, "message": ""},
            {"type": "Stalled", "status": "False", "reason": "AsExpected", "observedGeneration": 1, "message": ""},
        ],
        "summary": {"tagsSelected": 2, "tagsSynced": 1, "tagsFailed": 1, "ratio": "1/2"},
        "tags": [
            {"name": "gone", "state": "Failed", "reason": "NotFound", "message": gone_msg},
            {"name": "good", "state": "Synced", "sourceDigest": good.digest, "destinationDigest": good.digest},
        ],
        "progress": {"blobsTotal": 3, "blobsDone": 3, "blobsSkipped": 0, "blobsMounted": 0,
                     "bytesTotal": good.blobs.iter().map(|b| b.1).sum::<u64>(),
                     "bytesDone": good.blobs.iter().map(|b| b.1).sum::<u64>()},
    });
    assert_eq!(status, expected);
    let (t, note) = wait_event(&cluster.client(), &ns, "app", "TagFailed", WAIT).await;
    assert_eq!(t, "Warning");
    assert_eq!(note, format!("gone: {gone_msg} (NotFound)"));
    running.stop().await;
    cluster.delete_namespace(&ns).await;
}
