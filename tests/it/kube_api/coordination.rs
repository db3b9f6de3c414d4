//! Conformance of the double for what kube-lease-manager, the events Recorder and the test
//! harness need: Leases with preconditions and apply conflicts, leader election, Event series,
//! deletion and refusals, the request log, and the real-cluster mode.

use super::*;

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
