//! End-to-end pruning by the real controller (API double or a real cluster) and two real
//! registries: the record survives a controller restart, prune: false keeps tags, status and
//! the `Pruned` / `PruneWarning` Events name what went and what stayed.

use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;

use imagemirror::api::{ImageMirror, TagState};

use crate::support::controller::{Fixture, Running, config, events, wait_event};
use crate::support::kube_api::TestCluster;
use crate::support::{Flavor, Seeder, TestRegistry, set, tag_set};

const WAIT: Duration = Duration::from_secs(90);
const RECORD: &str = "imagemirror.dev/prune-record";

/// `app`: `src/app` to `dst/mirror/app`, selecting `names`, with `prune`.
fn app(ns: &str, src: &str, dst: &str, prune: bool, names: &[&str]) -> Fixture {
    Fixture::new(
        ns,
        "app",
        &format!("{src}/app"),
        &format!("{dst}/mirror/app"),
    )
    .tags(names)
    .with(|s| s.prune = prune)
}

/// This generation's sync has finished (Reconciling=False) and `extra` holds.
fn synced(m: &ImageMirror, extra: impl Fn(&ImageMirror) -> bool) -> bool {
    let Some(s) = &m.status else { return false };
    s.observed_generation == m.metadata.generation
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Reconciling" && c.status == "False")
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        && extra(m)
}

fn pruned(m: &ImageMirror) -> Option<u32> {
    m.status.as_ref()?.prune.as_ref().map(|p| p.pruned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_prunes_what_it_wrote_across_a_restart() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
        s.push_image("app", Some(t), 60 + i as u64, &[1000], Flavor::Oci)
            .await;
    }
    let cluster = TestCluster::start().await;
    let client = cluster.client();
    let ns = cluster.fresh_namespace("prune").await;
    let (sh, dh) = (src.host(), dst.host());

    let running = Running::start(client.clone(), config(&ns));
    app(&ns, sh, dh, true, &["a", "b", "c", "d"])
        .apply(&client)
        .await;
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m) == Some(0)))
        .await;
    assert_eq!(m.status.unwrap().prune.unwrap().recorded, 4);
    assert_eq!(tag_set(dh, "mirror/app").await, set(&["a", "b", "c", "d"]));
    // The record is in the object itself, so a new controller process knows it.
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            m.annotations()
                .get(RECORD)
                .is_some_and(|r| r.contains("\"d\""))
        })
        .await;
    assert!(m.annotations()[RECORD].contains(&format!("{dh}/mirror/app")));
    running.stop().await;

    // Someone else overwrites `d` in the destination: it is no longer what the mirror wrote.
    Seeder::new(dh)
        .push_image("mirror/app", Some("d"), 99, &[1000], Flavor::Oci)
        .await;
    let running = Running::start(client.clone(), config(&ns));
    app(&ns, sh, dh, true, &["a", "b"]).apply(&client).await;
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m) == Some(1)))
        .await;
    assert_eq!(tag_set(dh, "mirror/app").await, set(&["a", "b", "d"]));
    let status = m.status.unwrap();
    let c = status.tags.iter().find(|t| t.name == "c").unwrap();
    assert_eq!(c.state, TagState::Pruned);
    let d = status.tags.iter().find(|t| t.name == "d").unwrap();
    assert_eq!(
        (d.state, d.reason.as_deref()),
        (TagState::Retained, Some("ChangedElsewhere"))
    );
    assert_eq!(status.summary.unwrap().ratio, "2/2");
    let notes: Vec<String> = events(&client, &ns, "app")
        .await
        .into_iter()
        .filter(|(_, reason, _)| reason == "Pruned")
        .map(|(_, _, note)| note)
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("c") && notes[0].contains("1 tag"),
        "{notes:?}"
    );
    let (t, note) = wait_event(&client, &ns, "app", "PruneWarning", WAIT).await;
    assert_eq!(t, "Warning");
    assert!(
        note.contains("d:") && note.contains("ChangedElsewhere"),
        "{note}"
    );

    // prune: false keeps a deselected tag, and says nothing about pruning.
    app(&ns, sh, dh, false, &["a"]).apply(&client).await;
    cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m).is_none()))
        .await;
    assert_eq!(tag_set(dh, "mirror/app").await, set(&["a", "b", "d"]));

    // Deleting the ImageMirror deletes no image.
    Api::<ImageMirror>::namespaced(client.clone(), &ns)
        .delete("app", &Default::default())
        .await
        .unwrap();
    running.stop().await;
    assert_eq!(tag_set(dh, "mirror/app").await, set(&["a", "b", "d"]));
}
