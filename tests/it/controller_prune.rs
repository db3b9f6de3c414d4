//! End-to-end pruning by the real controller (API double or a real cluster) and two real
//! registries: the record survives a controller restart, prune: false keeps tags, status and
//! the `Pruned` Event name what went.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tokio::sync::oneshot;

use imagemirror::api::{ImageMirror, TagState};
use imagemirror::controller::{ControllerConfig, ControllerError};

use crate::support::kube_api::TestCluster;
use crate::support::{Flavor, Seeder, TestRegistry};

const WAIT: Duration = Duration::from_secs(90);
const RECORD: &str = "imagemirror.dev/prune-record";

/// The controller, running in this process until stopped.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
}

impl Running {
    fn start(cluster: &TestCluster, ns: &str) -> Self {
        let (tx, rx) = oneshot::channel();
        let config = ControllerConfig {
            namespaces: vec![ns.to_string()],
            ..ControllerConfig::default()
        };
        let task = tokio::spawn(imagemirror::controller::run(
            cluster.client(),
            config,
            async move {
                let _ = rx.await;
            },
        ));
        Running {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "stop: {result:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn yaml(ns: &str, src: &str, dst: &str, prune: bool, names: &[&str]) -> String {
    format!(
        "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: app\n  namespace: {ns}\nspec:\n  source:\n    repository: {src}/app\n    plainHTTP: true\n  destination:\n    repository: {dst}/mirror/app\n    plainHTTP: true\n  prune: {prune}\n  tags:\n    names: [{}]\n",
        names.join(", ")
    )
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

async fn tags(host: &str) -> BTreeSet<String> {
    let v: serde_json::Value = reqwest::get(format!("http://{host}/v2/mirror/app/tags/list"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_prunes_what_it_wrote_across_a_restart() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        s.push_image("app", Some(t), 60 + i as u64, &[1000], Flavor::Oci)
            .await;
    }
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("prune").await;
    let (sh, dh) = (src.host(), dst.host());

    let running = Running::start(&cluster, &ns);
    cluster
        .apply_imagemirror(&yaml(&ns, sh, dh, true, &["a", "b", "c"]))
        .await;
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m) == Some(0)))
        .await;
    assert_eq!(m.status.unwrap().prune.unwrap().recorded, 3);
    assert_eq!(tags(dh).await, set(&["a", "b", "c"]));
    // The record is in the object itself, so a new controller process knows it.
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| {
            m.annotations()
                .get(RECORD)
                .is_some_and(|r| r.contains("\"c\""))
        })
        .await;
    assert!(m.annotations()[RECORD].contains(&format!("{dh}/mirror/app")));
    running.stop().await;

    let running = Running::start(&cluster, &ns);
    cluster
        .apply_imagemirror(&yaml(&ns, sh, dh, true, &["a", "b"]))
        .await;
    let m = cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m) == Some(1)))
        .await;
    assert_eq!(tags(dh).await, set(&["a", "b"]));
    let status = m.status.unwrap();
    let c = status.tags.iter().find(|t| t.name == "c").unwrap();
    assert_eq!(c.state, TagState::Pruned);
    assert_eq!(status.summary.unwrap().ratio, "2/2");
    let events: Api<K8sEvent> = Api::namespaced(cluster.client(), &ns);
    let list = events
        .list(&ListParams::default().fields("regarding.name=app"))
        .await
        .unwrap();
    let notes: Vec<String> = list
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Pruned"))
        .filter_map(|e| e.note.clone())
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("c") && notes[0].contains("1 tag"),
        "{notes:?}"
    );

    // prune: false keeps a deselected tag, and says nothing about pruning.
    cluster
        .apply_imagemirror(&yaml(&ns, sh, dh, false, &["a"]))
        .await;
    cluster
        .wait_for(&ns, "app", WAIT, |m| synced(m, |m| pruned(m).is_none()))
        .await;
    assert_eq!(tags(dh).await, set(&["a", "b"]));

    // Deleting the ImageMirror deletes no image.
    Api::<ImageMirror>::namespaced(cluster.client(), &ns)
        .delete("app", &Default::default())
        .await
        .unwrap();
    running.stop().await;
    assert_eq!(tags(dh).await, set(&["a", "b"]));
}
