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

mod coordination;
