//! Conformance of the Kubernetes API double (`support::kube_api`) with what the real kube client,
//! kube-runtime (watcher, events Recorder) and kube-lease-manager expect of an API server.

use std::time::Duration;

use futures_util::StreamExt;
use imagemirror::api::ImageMirror;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::DynamicObject;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::{Value, json};

use crate::support::kube_api::{ApiServer, FailRule, TestCluster, cel_rules, imagemirror_schema};

const WAIT: Duration = Duration::from_secs(20);

fn mirror(name: &str, app: &str) -> ImageMirror {
    serde_json::from_value(json!({
        "apiVersion": "imagemirror.dev/v1alpha1", "kind": "ImageMirror",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "source": {"repository": "docker.io/library/nginx"},
            "destination": {"repository": "registry.internal:5000/mirror/nginx"},
            "tags": {"names": ["1.27.2"]},
        },
    }))
    .expect("an ImageMirror")
}

fn condition(type_: &str, status: &str) -> Value {
    json!({"type": type_, "status": status, "reason": "Synced", "message": "ok",
           "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1})
}

/// (code, reason) of an API error.
fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(o: &impl Resource) -> u64 {
    o.meta()
        .resource_version
        .as_deref()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

async fn next<S: futures_util::Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("a stream item in time")
        .expect("the stream goes on")
}

#[tokio::test]
async fn create_get_list_with_selectors_and_pages() {
    let server = ApiServer::start().await;
    let api: Api<ImageMirror> = Api::namespaced(server.client(), "default");
    let pp = PostParams::default();
    let one = api.create(&pp, &mirror("one", "demo")).await.unwrap();
    assert!(one.uid().is_some() && one.creation_timestamp().is_some());
    assert_eq!(one.meta().generation, Some(1));
    assert_eq!(one.namespace().as_deref(), Some("default"));
    assert_eq!(one.spec.interval, "1h", "CRD default applied");
    let got = api.get("one").await.unwrap();
    assert_eq!(
        (got.uid(), rv(&got), &got.spec),
        (one.uid(), rv(&one), &one.spec)
    );
    let two = api.create(&pp, &mirror("two", "other")).await.unwrap();
    assert!(
        rv(&two) > rv(&one),
        "one global, increasing resourceVersion"
    );

    let all = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        all.items.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert_eq!(
        all.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let names = |l: kube::core::ObjectList<ImageMirror>| {
        l.items.iter().map(|m| m.name_any()).collect::<Vec<_>>()
    };
    for (params, want) in [
        (ListParams::default().labels("app=demo"), "one"),
        (ListParams::default().labels("app!=demo"), "two"),
        (ListParams::default().labels("app in (x,other)"), "two"),
        (ListParams::default().fields("metadata.name=two"), "two"),
    ] {
        let listed = names(api.list(&params).await.unwrap());
        assert_eq!(listed, [want], "{params:?}");
    }
    let everywhere = Api::<ImageMirror>::all(server.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 2);

    let page = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(names(page.clone()), ["one"]);
    let token = page.metadata.continue_.expect("a continue token");
    let rest = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest.clone()), ["two"]);
    assert!(rest.metadata.continue_.is_none_or(|c| c.is_empty()));

    assert_eq!(
        api_error(api.create(&pp, &mirror("one", "demo")).await),
        (409, "AlreadyExists".into())
    );
    assert_eq!(api_error(api.get("nope").await), (404, "NotFound".into()));
    let elsewhere: Api<ImageMirror> = Api::namespaced(server.client(), "missing");
    assert_eq!(
        api_error(elsewhere.create(&pp, &mirror("x", "demo")).await),
        (404, "NotFound".into())
    );
    assert!(api.get_opt("nope").await.unwrap().is_none());

    // A write that changes nothing changes nothing, not even the resourceVersion.
    let label = Patch::Merge(json!({"metadata": {"labels": {"app": "demo"}}}));
    let same = api
        .patch("one", &PatchParams::default(), &label)
        .await
        .unwrap();
    assert_eq!(
        rv(&same),
        rv(&one),
        "a patch that changes nothing is a no-op"
    );
}

#[tokio::test]
async fn watch_sees_added_modified_deleted_in_order() {
    let server = ApiServer::start().await;
    let api: Api<ImageMirror> = Api::namespaced(server.client(), "default");
    let list_rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(30), &list_rv)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &mirror("w", "demo"))
        .await
        .unwrap();
    let suspend = json!({"spec": {"suspend": true}});
    api.patch("w", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
        .unwrap();
    api.delete("w", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        match next(&mut stream).await.unwrap() {
            WatchEvent::Added(o) => seen.push(("ADDED", rv(&o))),
            WatchEvent::Modified(o) => {
                assert!(o.spec.suspend);
                seen.push(("MODIFIED", rv(&o)))
            }
            WatchEvent::Deleted(o) => seen.push(("DELETED", rv(&o))),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["ADDED", "MODIFIED", "DELETED"]
    );
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "increasing resourceVersions: {seen:?}"
    );
    assert_eq!(
        seen[2].1,
        server.resource_version(),
        "the DELETED object carries the deletion's resourceVersion"
    );

    // Watching from "0" starts with the current objects; selectors turn relabelling into DELETED/ADDED.
    api.create(&PostParams::default(), &mirror("s", "demo"))
        .await
        .unwrap();
    let mut sel = api
        .watch(&WatchParams::default().labels("app=demo").timeout(30), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(next(&mut sel).await.unwrap(), WatchEvent::Added(o) if o.name_any() == "s"));
    let relabel = |app: &str| json!({"metadata": {"labels": {"app": app}}});
    api.patch(
        "s",
        &PatchParams::default(),
        &Patch::Merge(relabel("other")),
    )
    .await
    .unwrap();
    assert!(
        matches!(next(&mut sel).await.unwrap(), WatchEvent::Deleted(o) if o.labels()["app"] == "other")
    );
    api.patch("s", &PatchParams::default(), &Patch::Merge(relabel("demo")))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut sel).await.unwrap(),
        WatchEvent::Added(_)
    ));

    // Bookmarks carry only a resourceVersion, and the stream ends at timeoutSeconds.
    let quick = ApiServer::builder()
        .bookmark_interval(Duration::from_millis(100))
        .start()
        .await;
    let qapi: Api<ImageMirror> = Api::namespaced(quick.client(), "default");
    let mut b = qapi
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let WatchEvent::Bookmark(bm) = next(&mut b).await.unwrap() else {
        panic!("expected a bookmark")
    };
    assert_eq!(
        bm.metadata.resource_version,
        quick.resource_version().to_string()
    );
    assert_eq!(bm.types.kind, "ImageMirror");
    let ended = tokio::time::timeout(WAIT, async { while b.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the watch ends after timeoutSeconds");
}

#[tokio::test]
async fn stale_resource_version_gives_410_and_the_watcher_relists() {
    let server = ApiServer::start().await;
    let client = server.client();
    let api: Api<ImageMirror> = Api::namespaced(client.clone(), "default");
    let one = api
        .create(&PostParams::default(), &mirror("one", "demo"))
        .await
        .unwrap();
    let mut watch = watcher(api.clone(), watcher::Config::default().timeout(1)).boxed();
    assert!(matches!(next(&mut watch).await, Ok(watcher::Event::Init)));
    assert!(
        matches!(next(&mut watch).await, Ok(watcher::Event::InitApply(o)) if o.name_any() == "one")
    );
    assert!(matches!(
        next(&mut watch).await,
        Ok(watcher::Event::InitDone)
    ));

    // A change the ImageMirror watch does not see, then the history is compacted past it.
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}})).unwrap(),
        )
        .await
        .unwrap();
    server.compact();
    let mut raw = api
        .watch(&WatchParams::default(), &rv(&one).to_string())
        .await
        .unwrap()
        .boxed();
    match next(&mut raw).await.unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // The watcher's 1 s watch ends; resuming from its resourceVersion gets 410; it relists.
    let lists_before = server.count(|r| r.resource == "imagemirrors" && r.verb == "list");
    match next(&mut watch).await {
        Err(watcher::Error::WatchError(e)) => assert_eq!(e.code, 410),
        other => panic!("expected the 410 from the watcher, got {other:?}"),
    }
    assert!(matches!(next(&mut watch).await, Ok(watcher::Event::Init)));
    assert!(
        matches!(next(&mut watch).await, Ok(watcher::Event::InitApply(o)) if o.name_any() == "one")
    );
    assert!(matches!(
        next(&mut watch).await,
        Ok(watcher::Event::InitDone)
    ));
    assert_eq!(
        server.count(|r| r.resource == "imagemirrors" && r.verb == "list"),
        lists_before + 1
    );
    // And it goes on watching.
    api.create(&PostParams::default(), &mirror("two", "demo"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut watch).await, Ok(watcher::Event::Apply(o)) if o.name_any() == "two")
    );
}

#[tokio::test]
async fn status_apply_sets_only_status_and_map_lists_merge_by_key() {
    let server = ApiServer::start().await;
    let api: Api<ImageMirror> = Api::namespaced(server.client(), "default");
    let created = api
        .create(&PostParams::default(), &mirror("m", "demo"))
        .await
        .unwrap();
    let pp = PatchParams::apply("imagemirror").force();
    let status = |conditions: Vec<Value>| {
        json!({"apiVersion": "imagemirror.dev/v1alpha1", "kind": "ImageMirror",
               "status": {"observedGeneration": 1, "conditions": conditions}})
    };
    let both = status(vec![
        condition("Ready", "True"),
        condition("Stalled", "False"),
    ]);
    let after = api
        .patch_status("m", &pp, &Patch::Apply(&both))
        .await
        .unwrap();
    let st = after.status.clone().expect("status set");
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        st.conditions
            .iter()
            .map(|c| c.type_.as_str())
            .collect::<Vec<_>>(),
        ["Ready", "Stalled"]
    );
    assert_eq!(
        (&after.spec, after.meta().generation),
        (&created.spec, Some(1))
    );
    assert!(rv(&after) > rv(&created));
    let mf = after.meta().managed_fields.clone().unwrap_or_default();
    assert!(
        mf.iter()
            .any(|m| m.manager.as_deref() == Some("imagemirror")
                && m.operation.as_deref() == Some("Apply")
                && m.subresource.as_deref() == Some("status"))
    );

    // The same apply again is a no-op: no new resourceVersion, no event.
    let again = api
        .patch_status("m", &pp, &Patch::Apply(&both))
        .await
        .unwrap();
    assert_eq!(rv(&again), rv(&after));

    // Applying fewer items removes the ones this manager applied before (list-type map).
    let ready = api
        .patch_status(
            "m",
            &pp,
            &Patch::Apply(status(vec![condition("Ready", "False")])),
        )
        .await
        .unwrap();
    let conds = ready.status.unwrap().conditions;
    assert_eq!(
        (
            conds.len(),
            conds[0].type_.as_str(),
            conds[0].status.as_str()
        ),
        (1, "Ready", "False")
    );

    // Another manager's item survives this manager's applies (merge by key, not replace).
    let other = PatchParams::apply("someone-else").force();
    api.patch_status(
        "m",
        &other,
        &Patch::Apply(status(vec![condition("Custom", "True")])),
    )
    .await
    .unwrap();
    let merged = api
        .patch_status(
            "m",
            &pp,
            &Patch::Apply(status(vec![condition("Ready", "True")])),
        )
        .await
        .unwrap();
    let types: Vec<_> = merged
        .status
        .unwrap()
        .conditions
        .iter()
        .map(|c| c.type_.clone())
        .collect();
    assert_eq!(types, ["Ready", "Custom"]);

    // Spec in a status write and status in a main write are ignored.
    let sneaky = json!({"spec": {"suspend": true}, "status": {"observedGeneration": 2}});
    let s = api
        .patch_status("m", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert!(!s.spec.suspend);
    assert_eq!(s.status.as_ref().unwrap().observed_generation, Some(2));
    let m = api
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 99}})),
        )
        .await
        .unwrap();
    assert_eq!(m.status.as_ref().unwrap().observed_generation, Some(2));
    assert_eq!(
        rv(&m),
        rv(&s),
        "a main write that only touches status changes nothing"
    );

    // The status is validated against the CRD schema like on a real server.
    let mut bad = condition("Ready", "True");
    bad.as_object_mut().unwrap().remove("lastTransitionTime");
    let (code, reason) = api_error(
        api.patch_status("m", &pp, &Patch::Apply(status(vec![bad])))
            .await,
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    // No status subresource write creates an object.
    assert_eq!(
        api_error(api.patch_status("nope", &pp, &Patch::Apply(&both)).await).0,
        404
    );
}

#[tokio::test]
async fn generation_follows_spec_only_and_updates_need_the_current_resource_version() {
    let server = ApiServer::start().await;
    let api: Api<ImageMirror> = Api::namespaced(server.client(), "default");
    let m = api
        .create(&PostParams::default(), &mirror("g", "demo"))
        .await
        .unwrap();
    let label = json!({"metadata": {"labels": {"team": "a"}}});
    let l = api
        .patch("g", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    assert_eq!((l.meta().generation, rv(&l) > rv(&m)), (Some(1), true));
    let spec = json!({"spec": {"tags": {"names": ["1.27.2", "stable"]}}});
    let s = api
        .patch("g", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(s.meta().generation, Some(2));
    let st = json!({"status": {"observedGeneration": 2}});
    let after_status = api
        .patch_status("g", &PatchParams::default(), &Patch::Merge(&st))
        .await
        .unwrap();
    assert_eq!(after_status.meta().generation, Some(2));

    // PUT with a stale resourceVersion: 409 Conflict; with the current one: accepted.
    let mut stale = s.clone();
    stale.spec.suspend = true;
    assert_eq!(
        api_error(api.replace("g", &PostParams::default(), &stale).await),
        (409, "Conflict".into())
    );
    let mut fresh = after_status.clone();
    fresh.spec.suspend = true;
    let replaced = api
        .replace("g", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(
        (replaced.meta().generation, replaced.spec.suspend),
        (Some(3), true)
    );
    // Custom resources refuse unconditional updates.
    fresh.metadata.resource_version = None;
    assert_eq!(
        api_error(api.replace("g", &PostParams::default(), &fresh).await).0,
        422
    );
    // A merge patch carrying a stale resourceVersion is refused too.
    let pinned =
        json!({"metadata": {"resourceVersion": rv(&m).to_string()}, "spec": {"suspend": false}});
    assert_eq!(
        api_error(
            api.patch("g", &PatchParams::default(), &Patch::Merge(&pinned))
                .await
        )
        .0,
        409
    );
    // Strategic merge patch is not for custom resources (415), as on a real server.
    let strategic = api
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {}})),
        )
        .await;
    assert_eq!(api_error(strategic), (415, "UnsupportedMediaType".into()));
}

#[tokio::test]
async fn invalid_specs_are_refused_and_every_cel_rule_is_known() {
    let mut rules = Vec::new();
    cel_rules(&imagemirror_schema(), &mut rules);
    for r in &rules {
        assert!(
            crate::support::kube_api::CEL_RULES
                .iter()
                .any(|(known, _)| known == r),
            "the CRD has a CEL rule the API double does not evaluate; add it to schema::CEL_RULES: {r}"
        );
    }
    let server = ApiServer::start().await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        server.client(),
        "default",
        &kube::discovery::ApiResource::erase::<ImageMirror>(&()),
    );
    let mut doc = serde_json::to_value(mirror("bad", "demo")).unwrap();
    let obj = |doc: &Value| serde_json::from_value::<DynamicObject>(doc.clone()).unwrap();
    doc["spec"]["tags"] = json!({});
    let e = api.create(&PostParams::default(), &obj(&doc)).await;
    let Err(kube::Error::Api(s)) = e else {
        panic!("expected 422, got {e:?}")
    };
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message.contains("at least one of spec.tags.names"),
        "{}",
        s.message
    );
    doc["spec"]["digests"] = json!(["sha256:nothex"]);
    let Err(kube::Error::Api(s)) = api.create(&PostParams::default(), &obj(&doc)).await else {
        panic!()
    };
    assert!(s.message.contains("spec.digests[0]"), "{}", s.message);
    doc["spec"]["digests"] = json!([format!("sha256:{}", "a".repeat(64))]);
    doc["spec"]["unknownField"] = json!(1);
    let ok = api
        .create(&PostParams::default(), &obj(&doc))
        .await
        .unwrap();
    assert!(
        ok.data["spec"].get("unknownField").is_none(),
        "unknown fields are pruned"
    );
}

#[tokio::test]
async fn leases_update_with_preconditions_and_apply_conflicts_between_managers() {
    let server = ApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}))
            .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut next_holder = created.clone();
    next_holder.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let updated = leases
        .replace("l", &PostParams::default(), &next_holder)
        .await
        .unwrap();
    assert_eq!(updated.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(
        api_error(
            leases
                .replace("l", &PostParams::default(), &next_holder)
                .await
        ),
        (409, "Conflict".into())
    );

    let apply = |holder: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": holder}});
    leases
        .patch("m", &PatchParams::apply("x"), &Patch::Apply(apply("x")))
        .await
        .unwrap();
    let r = leases
        .patch("m", &PatchParams::apply("y"), &Patch::Apply(apply("y")))
        .await;
    let Err(kube::Error::Api(s)) = r else {
        panic!("expected an apply conflict, got {r:?}")
    };
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message.contains("conflict with \"x\"") && s.message.contains(".spec.holderIdentity"),
        "{}",
        s.message
    );
    // Same value: shared ownership, no conflict. Force: taken over.
    leases
        .patch("m", &PatchParams::apply("y"), &Patch::Apply(apply("x")))
        .await
        .unwrap();
    let forced = leases
        .patch(
            "m",
            &PatchParams::apply("z").force(),
            &Patch::Apply(apply("z")),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().holder_identity.as_deref(), Some("z"));
    // x no longer applies the field, but z owns it: it stays.
    let other = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"leaseDurationSeconds": 5}});
    let kept = leases
        .patch("m", &PatchParams::apply("x"), &Patch::Apply(other))
        .await
        .unwrap();
    assert_eq!(kept.spec.unwrap().holder_identity.as_deref(), Some("z"));
    // A strategic merge patch with nulls removes fields (built-in types accept it).
    let release = json!({"spec": {"holderIdentity": null}});
    let released = leases
        .patch("m", &PatchParams::default(), &Patch::Strategic(release))
        .await
        .unwrap();
    assert!(released.spec.unwrap().holder_identity.is_none());
}

#[tokio::test]
async fn two_lease_managers_elect_exactly_one_leader() {
    let server = ApiServer::start().await;
    let client = server.client();
    let manager = |id: &'static str| {
        LeaseManagerBuilder::new(client.clone(), "imagemirror-leader")
            .with_namespace("default")
            .with_identity(id)
            .with_duration(4)
            .with_grace(2)
            .build()
    };
    let (m0, m1) = (
        manager("pod-0").await.unwrap(),
        manager("pod-1").await.unwrap(),
    );
    let (mut rx0, _h0) = m0.watch().await;
    let (mut rx1, _h1) = m1.watch().await;
    tokio::time::timeout(WAIT, async {
        while !*rx0.borrow() && !*rx1.borrow() {
            tokio::select! { _ = rx0.changed() => {}, _ = rx1.changed() => {} }
        }
    })
    .await
    .expect("a leader is elected");
    let first_is_0 = *rx0.borrow();
    // For 1.5 lease durations (the leader renews, the follower looks again) there is exactly
    // one leader, always the same.
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        assert_ne!(*rx0.borrow(), *rx1.borrow(), "exactly one leader");
        assert_eq!(
            *rx0.borrow(),
            first_is_0,
            "leadership does not move while renewed"
        );
        tokio::select! {
            _ = rx0.changed() => {}, _ = rx1.changed() => {},
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = leases
        .get("imagemirror-leader")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(
        holder.as_deref(),
        Some(if first_is_0 { "pod-0" } else { "pod-1" })
    );
    assert!(
        server
            .count(|r| r.resource == "leases" && r.content_type == "application/apply-patch+yaml")
            >= 1
    );

    // The leader steps down (its receiver is dropped: it releases); the other takes over.
    let (leader, mut follower) = if first_is_0 { (rx0, rx1) } else { (rx1, rx0) };
    drop(leader);
    tokio::time::timeout(WAIT, async {
        while !*follower.borrow() {
            follower
                .changed()
                .await
                .expect("the follower's manager runs");
        }
    })
    .await
    .expect("the follower becomes leader");
    let holder = leases
        .get("imagemirror-leader")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(
        holder.as_deref(),
        Some(if first_is_0 { "pod-1" } else { "pod-0" })
    );
}

#[tokio::test]
async fn the_event_recorder_creates_then_patches_series() {
    let server = ApiServer::start().await;
    let client = server.client();
    let api: Api<ImageMirror> = Api::namespaced(client.clone(), "default");
    let m = api
        .create(&PostParams::default(), &mirror("e", "demo"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "imagemirror".into(),
            instance: Some("imagemirror-0".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "SecretNotFound".into(),
        note: Some("Secret hub-creds not found".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder.publish(&event, &m.object_ref(&())).await.unwrap();
    recorder.publish(&event, &m.object_ref(&())).await.unwrap();
    let events: Api<K8sEvent> = Api::namespaced(client, "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        list.items.len(),
        1,
        "the repeat became a series, not a second Event"
    );
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("SecretNotFound"));
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.reporting_controller.as_deref(), Some("imagemirror"));
    let regarding = e.regarding.as_ref().unwrap();
    assert_eq!(
        (regarding.kind.as_deref(), regarding.uid.as_deref()),
        (Some("ImageMirror"), m.uid().as_deref())
    );
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(
        server.count(|r| r.group == "events.k8s.io" && r.verb == "create"),
        1
    );
    assert_eq!(
        server.count(|r| r.group == "events.k8s.io" && r.verb == "patch"),
        1
    );
}

#[tokio::test]
async fn deletion_is_immediate_and_what_the_double_does_not_serve_is_refused() {
    let server = ApiServer::start().await;
    let client = server.client();
    let api: Api<ImageMirror> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &mirror("d", "demo"))
        .await
        .unwrap();
    // A custom resource's delete answers with the object; a built-in type's with a Status.
    let deleted = api.delete("d", &DeleteParams::default()).await.unwrap();
    assert!(deleted.left().is_some_and(|m| m.name_any() == "d"));
    assert!(api.get_opt("d").await.unwrap().is_none());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "l"}})).unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let status = leases.delete("l", &DeleteParams::default()).await.unwrap();
    assert!(status.right().is_some_and(|s| s.is_success()));

    // Finalizers, dry runs, deletecollection, JSON patch, streaming lists, field selectors on
    // other fields: nothing the controller runs uses them, and the double refuses them rather
    // than doing something a real server would not.
    let mut held = mirror("f", "demo");
    held.metadata.finalizers = Some(vec!["imagemirror.dev/cleanup".into()]);
    assert_eq!(
        api_error(api.create(&PostParams::default(), &held).await),
        (422, "Invalid".into())
    );
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    assert_eq!(
        api_error(api.create(&dry, &mirror("dry", "demo")).await).0,
        400
    );
    let collection = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    assert_eq!(api_error(collection).0, 405);
    api.create(&PostParams::default(), &mirror("j", "demo"))
        .await
        .unwrap();
    let req = axum::http::Request::patch(
        "/apis/imagemirror.dev/v1alpha1/namespaces/default/imagemirrors/j",
    )
    .header("Content-Type", "application/json-patch+json")
    .body(br#"[{"op": "remove", "path": "/spec/suspend"}]"#.to_vec())
    .unwrap();
    let r = client.request::<Value>(req).await;
    assert_eq!(api_error(r), (415, "UnsupportedMediaType".into()));
    let mut streaming = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let first = next(&mut streaming).await;
    assert!(
        matches!(&first, Err(e) if format!("{e:?}").contains("sendInitialEvents")),
        "{first:?}"
    );
    let by_reason = Api::<K8sEvent>::namespaced(client, "default")
        .list(&ListParams::default().fields("reason=Synced"))
        .await;
    assert_eq!(api_error(by_reason), (400, "BadRequest".into()));
}

#[tokio::test]
async fn request_log_and_injected_failures() {
    let server = ApiServer::start().await;
    let api: Api<ImageMirror> = Api::namespaced(server.client(), "default");
    api.create(&PostParams::default(), &mirror("r", "demo"))
        .await
        .unwrap();
    // kube's client retries 503 by itself: the status write lands on the second request.
    server.fail(
        FailRule::new(503)
            .resource("imagemirrors")
            .subresource("status")
            .times(1),
    );
    let st = json!({"status": {"observedGeneration": 1}});
    api.patch_status("r", &PatchParams::default(), &Patch::Merge(&st))
        .await
        .unwrap();
    // A 500 reaches the caller.
    server.fail(FailRule::new(500).method("PATCH").resource("imagemirrors"));
    let failed = api
        .patch_status("r", &PatchParams::default(), &Patch::Merge(&st))
        .await;
    assert_eq!(api_error(failed), (500, "InternalError".into()));
    assert_eq!(server.writes("imagemirrors", Some("status")), 3);
    assert_eq!(server.writes("imagemirrors", None), 1);
    let log = server.requests();
    assert_eq!(
        log.iter()
            .map(|r| r.code)
            .filter(|c| *c >= 500)
            .collect::<Vec<_>>(),
        [503, 500]
    );
    assert!(
        log.iter()
            .any(|r| r.verb == "patch" && r.content_type == "application/merge-patch+json")
    );

    // Apply without a field manager is refused by the server (kube refuses it client-side).
    let req = axum::http::Request::patch(
        "/apis/imagemirror.dev/v1alpha1/namespaces/default/imagemirrors/r",
    )
    .header("Content-Type", "application/apply-patch+yaml")
    .body(b"apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\n".to_vec())
    .unwrap();
    let r = server.client().request::<Value>(req).await;
    assert_eq!(api_error(r), (422, "Invalid".into()));
}

#[tokio::test]
async fn test_cluster_real_mode_runs_against_the_double_through_a_kubeconfig() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::connect(&server.kubeconfig(dir.path())).await;
    assert!(cluster.double().is_none());
    assert_eq!(
        server.count(|r| r.resource == "customresourcedefinitions" && r.verb == "patch"),
        1
    );
    let ns = cluster.fresh_namespace("e2e").await;
    let yaml = format!(
        "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: k\n  namespace: {ns}\nspec:\n  source: {{repository: nginx}}\n  destination: {{repository: 127.0.0.1:5000/nginx}}\n  tags: {{names: [stable]}}\n"
    );
    let applied = cluster.apply_imagemirror(&yaml).await;
    assert_eq!(applied.namespace().as_deref(), Some(ns.as_str()));
    let api: Api<ImageMirror> = Api::namespaced(cluster.client(), &ns);
    let waiter = cluster.wait_for(&ns, "k", WAIT, |m| m.spec.suspend);
    let suspend = Patch::Merge(json!({"spec": {"suspend": true}}));
    let pp = PatchParams::default();
    let (seen, _) = tokio::join!(waiter, api.patch("k", &pp, &suspend));
    assert_eq!(seen.meta().generation, Some(2));
    cluster.delete_namespace(&ns).await;
    assert!(
        api.get_opt("k").await.unwrap().is_none(),
        "deleting a namespace deletes its contents"
    );
}
