//! The controller over objects' lives and its own: unreadable Secrets and undecodable objects
//! end up on status, state dies with the object, a restart is quiet, a delete stops transfers.
//! Real controller, the API double (these tests need its fault injection and request log),
//! real registries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};

use imagemirror::api::ImageMirror;

use crate::support::controller::{
    Fixture, Running, cond, config, free_port, message, metrics, ready, wait_event,
};
use crate::support::kube_api::{ApiServer, FailRule, helpers};
use crate::support::{Flavor, RegistryConfig, Seeder, TestRegistry};

const WAIT: Duration = Duration::from_secs(60);

async fn wait_for(
    api: &ApiServer,
    ns: &str,
    name: &str,
    cond: impl Fn(&ImageMirror) -> bool,
) -> ImageMirror {
    let mirrors: Api<ImageMirror> = Api::namespaced(api.client(), ns);
    helpers::wait_for(&mirrors, name, WAIT, cond).await
}

fn reason_is(type_: &str, status: &str, reason: &str) -> impl Fn(&ImageMirror) -> bool {
    let want = Some((status.to_string(), reason.to_string()));
    let type_ = type_.to_string();
    move |m| cond(m, &type_) == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_secret_is_on_status_and_an_event_until_the_api_answers() {
    let src = TestRegistry::start();
    let dst = TestRegistry::start_with(RegistryConfig {
        htpasswd: Some(("robot".into(), "pa55-word".into())),
        ..Default::default()
    });
    let s = Seeder::new(src.host());
    s.push_image("app", Some("v1"), 91, &[5_000], Flavor::Oci)
        .await;
    s.push_image("app", Some("v2"), 92, &[5_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "secrets";
    helpers::create_namespace(&client, ns).await;
    helpers::apply_registry_secret(&client, ns, "dst-creds", dst.host(), "robot", "pa55-word")
        .await;
    // An administrator narrowed the controller's Secret RBAC: GET answers 403 (twice).
    api.fail(FailRule::new(403).resource("secrets").verb("get").times(2));
    let running = Running::start(client.clone(), config(ns));
    let fixture = Fixture::new(
        ns,
        "app",
        &format!("{}/app", src.host()),
        &format!("{}/app", dst.host()),
    )
    .destination_secret("dst-creds")
    .tags(&["v1"]);
    fixture.apply(&client).await;

    let m = wait_for(
        &api,
        ns,
        "app",
        reason_is("Ready", "False", "SecretForbidden"),
    )
    .await;
    assert_eq!(
        cond(&m, "Stalled"),
        Some(("True".into(), "SecretForbidden".into()))
    );
    let msg = message(&m, "Ready");
    for needle in [
        "secrets/dst-creds",
        "destination.credentialsSecret",
        "`get` on secrets",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    let (t, note) = wait_event(&client, ns, "app", "SecretForbidden", WAIT).await;
    assert_eq!(t, "Warning");
    assert!(note.contains("secrets/dst-creds"), "{note}");

    // The API answers again: the retry (with backoff) makes it Ready.
    let m = wait_for(&api, ns, "app", ready).await;
    assert_eq!(cond(&m, "Stalled").unwrap().0, "False");
    let get_403 = api.count(|r| r.resource == "secrets" && r.verb == "get" && r.code == 403);
    assert_eq!(get_403, 2, "both refusals were seen");
    // One Event per change of reason: the second 403 did not publish another.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let forbidden: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SecretForbidden"))
        .collect();
    assert_eq!(forbidden.len(), 1, "{forbidden:#?}");
    assert!(forbidden[0].series.is_none(), "repeated: {forbidden:#?}");

    // A transient failure (a 500: the kube client itself retries 503, 504 and 429 before
    // answering): Reconciling stays True while the controller retries.
    api.fail(FailRule::new(500).resource("secrets").verb("get").times(2));
    fixture.clone().tags(&["v1", "v2"]).apply(&client).await;
    let m = wait_for(
        &api,
        ns,
        "app",
        reason_is("Ready", "False", "SecretUnavailable"),
    )
    .await;
    assert_eq!(
        cond(&m, "Reconciling"),
        Some(("True".into(), "SecretUnavailable".into()))
    );
    assert_eq!(cond(&m, "Stalled").unwrap().0, "False");
    assert!(message(&m, "Ready").contains("secrets/dst-creds"));
    wait_event(&client, ns, "app", "SecretUnavailable", WAIT).await;
    let m = wait_for(&api, ns, "app", |m| {
        ready(m) && m.status.as_ref().is_some_and(|s| s.tags.len() == 2)
    })
    .await;
    assert_eq!(m.status.unwrap().observed_generation, Some(2));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_the_controller_cannot_read_are_stalled_and_the_others_sync() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(src.host())
        .push_image("app", Some("v1"), 93, &[5_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "nonsense";
    helpers::create_namespace(&client, ns).await;
    let (s, d) = (format!("{}/app", src.host()), format!("{}/app", dst.host()));
    // Inserted past the schema, as older CRDs admitted them: an interval no duration holds,
    // and a `latest` the types cannot hold (the object cannot even be decoded).
    let huge = Fixture::new(ns, "huge", &s, &format!("{}/huge", dst.host()))
        .tags(&["v1"])
        .interval("99999999999999999999h");
    api.create_unvalidated(huge.json());
    let mut overflow = Fixture::new(ns, "overflow", &s, &format!("{}/overflow", dst.host()))
        .tags(&["v1"])
        .json();
    overflow["spec"]["tags"]["latest"] = serde_json::json!(4_294_967_296u64);
    api.create_unvalidated(overflow);

    let running = Running::start(client.clone(), config(ns));
    Fixture::new(ns, "good", &s, &d)
        .tags(&["v1"])
        .apply(&client)
        .await;
    let m = wait_for(
        &api,
        ns,
        "huge",
        reason_is("Stalled", "True", "InvalidSpec"),
    )
    .await;
    assert_eq!(
        cond(&m, "Ready"),
        Some(("False".into(), "InvalidSpec".into()))
    );
    assert_eq!(m.status.as_ref().unwrap().observed_generation, Some(1));
    assert!(message(&m, "Ready").contains("spec.interval"), "{m:?}");
    // The other cannot be read as an ImageMirror by anyone: look at it as JSON.
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<ImageMirror>(&()));
    let stalled = |o: &DynamicObject| {
        o.data["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["type"] == "Stalled" && c["status"] == "True" && c["reason"] == "InvalidSpec"
            })
        })
    };
    let o = helpers::wait_for(&raw, "overflow", WAIT, stalled).await;
    assert_eq!(o.data["status"]["observedGeneration"], 1);
    let text = o.data["status"]["conditions"].to_string();
    assert!(
        text.contains("4294967296"),
        "the message names the value: {text}"
    );
    for name in ["huge", "overflow"] {
        let (t, _) = wait_event(&client, ns, name, "InvalidSpec", WAIT).await;
        assert_eq!(t, "Warning");
    }
    let overflow = api
        .requests()
        .into_iter()
        .filter(|r| r.name.as_deref() == Some("overflow") && r.is_write())
        .count();
    assert_eq!(overflow, 1, "the undecodable object is reported once");
    wait_for(&api, ns, "good", ready).await;
    assert!(running.is_running(), "the controller survived");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_and_recreated_mirror_syncs_at_once_and_leaves_no_metrics() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("app", Some("v1"), 94, &[5_000], Flavor::Oci)
        .await;
    let v2 = s
        .push_image("app", Some("v2"), 95, &[6_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "lives";
    helpers::create_namespace(&client, ns).await;
    let port = free_port();
    let mut cfg = config(ns);
    cfg.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let running = Running::start(client.clone(), cfg);
    let app = Fixture::new(
        ns,
        "app",
        &format!("{}/app", src.host()),
        &format!("{}/app", dst.host()),
    );
    app.clone().tags(&["v1"]).apply(&client).await;
    let first = wait_for(&api, ns, "app", ready).await;
    let series =
        format!(r#"imagemirror_mirror_tags{{namespace="{ns}",name="app",state="synced"}} 1"#);
    assert!(metrics(port).await.contains(&series));

    let mirrors: Api<ImageMirror> = Api::namespaced(client.clone(), ns);
    mirrors
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics(port).await.contains(r#"name="app""#) {
        assert!(
            Instant::now() < deadline,
            "the deleted mirror's series stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics(port)
            .await
            .contains(r#"imagemirror_tags{state="synced"} 0"#)
    );

    // Same name, a new object (generation 1 again), another tag: synced at once, although
    // the deleted one's next sync was an hour away.
    let recreated = Instant::now();
    app.tags(&["v2"]).apply(&client).await;
    let m = wait_for(&api, ns, "app", |m| {
        ready(m)
            && m.status
                .as_ref()
                .is_some_and(|s| s.tags.first().is_some_and(|t| t.name == "v2"))
    })
    .await;
    let took = recreated.elapsed();
    eprintln!("re-created mirror Ready in {took:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_ne!(m.metadata.uid, first.metadata.uid);
    Seeder::new(dst.host())
        .assert_copy_of("app", "v2", &v2)
        .await;
    let text = metrics(port).await;
    assert!(text.contains(&series), "{text}");
    assert!(
        text.contains(r#"imagemirror_tags{state="synced"} 1"#),
        "{text}"
    );
    running.stop().await;
}

fn next_sync_times(list: &[ImageMirror]) -> BTreeMap<String, String> {
    list.iter()
        .map(|m| {
            let next = m.status.as_ref().and_then(|s| s.next_sync_time.clone());
            (m.metadata.name.clone().unwrap(), format!("{next:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_schedule_of_ready_mirrors() {
    const N: usize = 50;
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("base", Some("v1"), 96, &[2_000], Flavor::Oci)
        .await;
    let fresh = s
        .push_image("fresh", Some("v1"), 97, &[2_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "restart";
    helpers::create_namespace(&client, ns).await;
    let running = Running::start(client.clone(), config(ns));
    for i in 0..N {
        Fixture::new(
            ns,
            &format!("m{i}"),
            &format!("{}/base", src.host()),
            &format!("{}/app-{i}", dst.host()),
        )
        .tags(&["v1"])
        .interval("1h")
        .apply(&client)
        .await;
    }
    let mirrors: Api<ImageMirror> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    let before = loop {
        let list = mirrors.list(&ListParams::default()).await.unwrap().items;
        if list.iter().filter(|m| ready(m)).count() == N {
            break list;
        }
        assert!(Instant::now() < deadline, "not all {N} Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    running.stop().await;

    // While it is down, a new mirror appears: the restarted controller must sync that one.
    Fixture::new(
        ns,
        "fresh",
        &format!("{}/fresh", src.host()),
        &format!("{}/fresh", dst.host()),
    )
    .tags(&["v1"])
    .apply(&client)
    .await;
    let (src_before, dst_before) = (src.requests().len(), dst.requests().len());
    let restarted = Instant::now();
    let running = Running::start(client.clone(), config(ns));
    wait_for(&api, ns, "fresh", ready).await;
    Seeder::new(dst.host())
        .assert_copy_of("fresh", "v1", &fresh)
        .await;
    let quiet_until = restarted + Duration::from_secs(10);
    tokio::time::sleep_until(quiet_until.into()).await;
    let src_new: Vec<String> = src.requests()[src_before..].to_vec();
    let dst_new: Vec<String> = dst.requests()[dst_before..].to_vec();
    let for_the_50 = src_new.iter().filter(|r| r.contains("/v2/base/")).count()
        + dst_new.iter().filter(|r| r.contains("/v2/app-")).count();
    eprintln!(
        "registry requests for the {N} Ready mirrors in the 10 s after a restart: {for_the_50} (fresh mirror: {} source, {} destination)",
        src_new.len(),
        dst_new.len()
    );
    assert_eq!(
        for_the_50, 0,
        "source: {src_new:#?}\ndestination: {dst_new:#?}"
    );
    let after = mirrors.list(&ListParams::default()).await.unwrap().items;
    let after: Vec<ImageMirror> = after
        .into_iter()
        .filter(|m| m.metadata.name.as_deref() != Some("fresh"))
        .collect();
    assert_eq!(next_sync_times(&before), next_sync_times(&after));
    assert!(running.is_running());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_mirror_stops_its_transfer_and_spares_the_others() {
    const MIB: u64 = 1 << 20;
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let layer = s.push_blob_stream("big", 300 * MIB, 98).await;
    let config_blob = s
        .push_blob("big", br#"{"architecture":"amd64","os":"linux"}"#)
        .await;
    s.push_manifest_for("big", Some("v1"), config_blob, vec![layer], Flavor::Oci)
        .await;
    let small = s
        .push_image("small", Some("v1"), 99, &[3_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "cancel";
    helpers::create_namespace(&client, ns).await;
    let port = free_port();
    let mut cfg = config(ns);
    cfg.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let running = Running::start(client.clone(), cfg);
    Fixture::new(
        ns,
        "big",
        &format!("{}/big", src.host()),
        &format!("{}/big", dst.host()),
    )
    .tags(&["v1"])
    .apply(&client)
    .await;
    // Wait until the big blob is on its way (bytes reach the destination).
    let deadline = Instant::now() + WAIT;
    let patches = |d: &TestRegistry| {
        d.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH /v2/big/blobs/uploads/"))
            .count()
    };
    while patches(&dst) == 0 {
        assert!(Instant::now() < deadline, "the big blob never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_flight = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("imagemirror_transfers_in_flight "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    };
    assert!(in_flight(&metrics(port).await) >= 1);
    Fixture::new(
        ns,
        "small",
        &format!("{}/small", src.host()),
        &format!("{}/small", dst.host()),
    )
    .tags(&["v1"])
    .apply(&client)
    .await;

    let mirrors: Api<ImageMirror> = Api::namespaced(client.clone(), ns);
    let deleted = Instant::now();
    mirrors
        .delete("big", &DeleteParams::default())
        .await
        .unwrap();
    loop {
        if in_flight(&metrics(port).await) == 0 {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(2),
            "the transfer still runs 2 s after the delete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped_after = deleted.elapsed();
    let patches_then = patches(&dst);
    wait_for(&api, ns, "small", ready).await;
    Seeder::new(dst.host())
        .assert_copy_of("small", "v1", &small)
        .await;
    // The registry logs a request when it ends: the chunk cut off by the stop may appear
    // late, once; nothing may follow it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = patches(&dst);
    assert!(
        settled <= patches_then + 1,
        "{settled} chunks after {patches_then}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("transfer stopped {stopped_after:?} after the delete");
    assert_eq!(patches(&dst), settled, "no more chunks after the stop");
    assert!(
        Seeder::new(dst.host())
            .get_manifest("big", "v1")
            .await
            .is_none(),
        "no tag is written for a deleted mirror"
    );
    assert!(running.is_running());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_cancels_the_old_sync() {
    // Patching the spec while a sync runs: the old generation's sync is cancelled and the new
    // one is synced; the tag only the old spec selected is not written.
    const MIB: u64 = 1 << 20;
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let layer = s.push_blob_stream("app", 200 * MIB, 100).await;
    let config_blob = s
        .push_blob("app", br#"{"architecture":"amd64","os":"linux"}"#)
        .await;
    s.push_manifest_for("app", Some("big"), config_blob, vec![layer], Flavor::Oci)
        .await;
    let small = s
        .push_image("app", Some("small"), 101, &[3_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    let ns = "respec";
    helpers::create_namespace(&client, ns).await;
    let running = Running::start(client.clone(), config(ns));
    let app = Fixture::new(
        ns,
        "app",
        &format!("{}/app", src.host()),
        &format!("{}/app", dst.host()),
    );
    app.clone().tags(&["big"]).apply(&client).await;
    let deadline = Instant::now() + WAIT;
    while !dst
        .requests()
        .iter()
        .any(|r| r.starts_with("PATCH /v2/app/blobs/uploads/"))
    {
        assert!(Instant::now() < deadline, "the big blob never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mirrors: Api<ImageMirror> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({"spec": {"tags": {"names": ["small"]}}});
    mirrors
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let changed = Instant::now();
    let m = wait_for(&api, ns, "app", |m| {
        ready(m) && m.status.as_ref().is_some_and(|s| s.tags.len() == 1)
    })
    .await;
    eprintln!("new spec Ready {:?} after the change", changed.elapsed());
    assert_eq!(m.status.unwrap().tags[0].name, "small");
    Seeder::new(dst.host())
        .assert_copy_of("app", "small", &small)
        .await;
    assert!(
        Seeder::new(dst.host())
            .get_manifest("app", "big")
            .await
            .is_none()
    );
    running.stop().await;
}
