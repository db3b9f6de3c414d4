//! Harness of the controller's e2e tests: the controller running in this process, one typed
//! fixture builder for test ImageMirrors, and readers of conditions, Events and metrics.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::Value;
use tokio::sync::oneshot;

use imagemirror::api::{ImageMirror, ImageMirrorSpec};
use imagemirror::controller::{ControllerConfig, ControllerError};

/// A controller running in this process until stopped (or dropped).
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ControllerError>>,
}

impl Running {
    pub fn start(client: Client, config: ControllerConfig) -> Self {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(imagemirror::controller::run(client, config, async move {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
        }
    }

    /// Whether the controller is still running (it has not returned or panicked).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Asks for shutdown (as SIGTERM does) and asserts a clean exit within the deadline.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        assert!(
            matches!(result, Ok(Ok(Ok(())))),
            "controller did not stop cleanly: {result:?}"
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A controller watching `ns` only.
pub fn config(ns: &str) -> ControllerConfig {
    ControllerConfig {
        namespaces: vec![ns.to_string()],
        ..ControllerConfig::default()
    }
}

/// A test ImageMirror built from the real types (so it follows them), plain HTTP both sides.
#[derive(Clone)]
pub struct Fixture {
    mirror: ImageMirror,
}

impl Fixture {
    /// ImageMirror `ns/name` from `source` to `destination` (`host/repo` each).
    pub fn new(ns: &str, name: &str, source: &str, destination: &str) -> Self {
        // Every field the test does not set takes the types' own default.
        let spec: ImageMirrorSpec = serde_json::from_value(serde_json::json!({
            "source": {"repository": source, "plainHTTP": true},
            "destination": {"repository": destination, "plainHTTP": true},
        }))
        .expect("a minimal ImageMirror spec");
        let mut mirror = ImageMirror::new(name, spec);
        mirror.metadata.namespace = Some(ns.to_string());
        Fixture { mirror }
    }

    /// Selects these tag names.
    pub fn tags(mut self, names: &[&str]) -> Self {
        self.mirror.spec.tags.names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets `spec.interval`.
    pub fn interval(mut self, interval: &str) -> Self {
        self.mirror.spec.interval = interval.into();
        self
    }

    /// Sets `spec.destination.credentialsSecret`.
    pub fn destination_secret(mut self, name: &str) -> Self {
        self.mirror.spec.destination.credentials_secret = Some(name.into());
        self
    }

    /// Sets `spec.source.credentialsSecret`.
    pub fn source_secret(mut self, name: &str) -> Self {
        self.mirror.spec.source.credentials_secret = Some(name.into());
        self
    }

    /// Any other change to the spec, on the typed struct.
    pub fn with(mut self, change: impl FnOnce(&mut ImageMirrorSpec)) -> Self {
        change(&mut self.mirror.spec);
        self
    }

    /// The object as JSON, without status (what a user applies).
    pub fn json(&self) -> Value {
        let mut v = serde_json::to_value(&self.mirror).expect("an ImageMirror serialises");
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        v
    }

    /// Server-side applies it as a user would and returns what the server stored.
    pub async fn apply(&self, client: &Client) -> ImageMirror {
        let yaml = serde_yaml::to_string(&self.json()).expect("YAML");
        super::kube_api::helpers::apply_imagemirror(client, &yaml).await
    }
}

/// A condition's (status, reason).
pub fn cond(m: &ImageMirror, type_: &str) -> Option<(String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// A condition's message ("" when absent).
pub fn message(m: &ImageMirror, type_: &str) -> String {
    m.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Status describes the current generation.
pub fn observed(m: &ImageMirror) -> bool {
    m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
}

/// Ready=True for the current generation.
pub fn ready(m: &ImageMirror) -> bool {
    observed(m) && cond(m, "Ready").is_some_and(|(s, _)| s == "True")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (type, reason, note) of the Events about ImageMirror `name` in `ns`.
pub async fn events(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// Waits (polling, with a deadline) until an Event about `name` with `reason` exists;
/// returns its (type, note).
pub async fn wait_event(
    client: &Client,
    ns: &str,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> (String, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let all = events(client, ns, name).await;
        if let Some((t, _, note)) = all.iter().find(|(_, r, _)| r == reason) {
            return (t.clone(), note.clone());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {reason} Event about {ns}/{name} within {timeout:?}; Events: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The controller's `/metrics` text.
pub async fn metrics(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}
