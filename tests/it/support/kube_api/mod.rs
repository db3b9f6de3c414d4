//! An in-process Kubernetes API double that speaks real HTTP, so the real controller (kube
//! client, kube-runtime Controller/watcher/events Recorder, kube-lease-manager) runs unmodified
//! against it. It serves what those use, and what the controller's tests use, and no more.
//!
//! Served (see `resources.rs`): `imagemirror.dev/v1alpha1 imagemirrors` (+ `/status`), core
//! `v1 secrets` (also as `PartialObjectMetadata`, for the controller's metadata watch) and
//! `v1 namespaces`, `events.k8s.io/v1 events`, `coordination.k8s.io/v1 leases`,
//! `apiextensions.k8s.io/v1 customresourcedefinitions` (for `TestCluster`'s real-cluster mode).
//! Verbs: get, list (label selectors for `--selector`, `metadata.name`/`metadata.namespace`
//! field selectors, pages), watch, create, update (PUT), patch (merge; strategic for built-in
//! types, which kube-lease-manager sends; server-side apply), delete.
//!
//! Faithful where controllers notice: one global resourceVersion; optimistic concurrency (409
//! Conflict); `generation` bumped by spec changes only; the status subresource; no-op writes do
//! not bump the resourceVersion or emit events; namespaces must exist and deleting one deletes
//! its contents; server-side apply with field ownership, conflicts and `force`
//! (kube-lease-manager's mutual exclusion relies on apply conflicts); the ImageMirror CRD schema
//! (pruning, defaults, validation, its CEL rules); watch semantics in `watch.rs`; errors as
//! `Status` objects.
//!
//! Refused (so a test that starts to rely on them fails instead of passing on wrong behaviour):
//! finalizers (422), `dryRun` (400), deletecollection (405), JSON patch (415), streaming lists
//! (`sendInitialEvents`, 400), field selectors on other fields (400), `generateName` (422).
//!
//! Simplifications (what a real API server does differently):
//! - no authn/authz, admission webhooks, protobuf, CBOR, gzip, HTTP/2, or discovery;
//! - server-side apply is structured-merge-diff reduced to leaf paths: list semantics come from
//!   the CRD (`x-kubernetes-list-type`) for ImageMirror; built-in types' lists are atomic; of
//!   metadata only labels and annotations are owned; conflicts are found on exactly the same
//!   leaf; `managedFields` are rendered but the ones a client sends are ignored; no version
//!   conversion;
//! - strategic merge patch is a JSON merge patch (no `$patch`/`$retainKeys` directives);
//! - CEL rules are evaluated by Rust equivalents listed in `schema::CEL_RULES` (a test fails on
//!   an unknown rule); only ImageMirror objects are validated against a schema; built-in types
//!   are stored as sent (no `stringData` → `data`);
//! - get and list always read the latest state (`resourceVersion`/`resourceVersionMatch` on them
//!   are ignored); list pages (`limit`/`continue`) are cut from the current state, not a snapshot;
//! - PUT never creates;
//! - deletion is immediate (no grace periods, no preconditions), no garbage collection of owned
//!   objects;
//! - the history kept for watches is a count of changes (`history_limit`), not a time window;
//!   bookmarks come every `bookmark_interval` (1 minute on a real server).

mod cluster;
mod error;
mod fields;
mod patch;
mod resources;
mod schema;
mod select;
mod server;
mod store;
mod verbs;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use cluster::TestCluster;
pub use cluster::helpers;
pub use error::ApiError;
pub use resources::imagemirror_schema;
pub use schema::{CEL_RULES, cel_rules};

use store::Store;

/// One request as the double saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// get, list, watch, create, update, patch, delete.
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub content_type: String,
    pub field_manager: Option<String>,
    /// The HTTP status sent.
    pub code: u16,
}

impl RequestRecord {
    /// POST, PUT, PATCH or DELETE.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

/// Makes matching requests fail with `code` (a `Status` with a reason fitting the code), for
/// the next `times` matches.
#[derive(Debug, Clone)]
pub struct FailRule {
    pub method: Option<String>,
    pub resource: Option<String>,
    pub subresource: Option<String>,
    pub verb: Option<String>,
    pub code: u16,
    pub times: usize,
}

impl FailRule {
    /// Fails every request once with `code`; narrow it with the builder methods.
    pub fn new(code: u16) -> Self {
        Self {
            method: None,
            resource: None,
            subresource: None,
            verb: None,
            code,
            times: 1,
        }
    }
    pub fn method(mut self, m: &str) -> Self {
        self.method = Some(m.to_string());
        self
    }
    pub fn resource(mut self, plural: &str) -> Self {
        self.resource = Some(plural.to_string());
        self
    }
    pub fn subresource(mut self, sub: &str) -> Self {
        self.subresource = Some(sub.to_string());
        self
    }
    pub fn verb(mut self, verb: &str) -> Self {
        self.verb = Some(verb.to_string());
        self
    }
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }

    fn matches(&self, r: &RequestRecord) -> bool {
        self.times > 0
            && self.method.as_ref().is_none_or(|m| *m == r.method)
            && self.resource.as_ref().is_none_or(|x| *x == r.resource)
            && self.verb.as_ref().is_none_or(|v| *v == r.verb)
            && self
                .subresource
                .as_ref()
                .is_none_or(|s| Some(s) == r.subresource.as_ref())
    }
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    log: Mutex<Vec<RequestRecord>>,
    faults: Mutex<Vec<FailRule>>,
    bookmark_interval: Duration,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn injected_failure(&self, r: &RequestRecord) -> Option<ApiError> {
        let mut faults = self.faults.lock().expect("faults lock");
        let rule = faults.iter_mut().find(|f| f.matches(r))?;
        rule.times -= 1;
        let reason = match rule.code {
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            409 => "Conflict",
            404 => "NotFound",
            403 => "Forbidden",
            _ => "InternalError",
        };
        Some(ApiError::new(
            rule.code,
            reason,
            format!("injected failure ({} {})", r.method, r.resource),
        ))
    }
}

/// Settings for [`ApiServer`].
#[derive(Debug, Clone)]
pub struct ApiServerBuilder {
    history_limit: usize,
    bookmark_interval: Duration,
}

impl ApiServerBuilder {
    /// How many changes are kept for watches resuming from a resourceVersion (default 1000).
    pub fn history_limit(mut self, n: usize) -> Self {
        self.history_limit = n;
        self
    }
    /// How often watches that allow bookmarks get one (default 5 s).
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    pub async fn start(self) -> ApiServer {
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(self.history_limit)),
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            bookmark_interval: self.bookmark_interval,
            shutdown,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API double");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            // Serving ends with the test: the task is aborted on drop.
            let _ = axum::serve(listener, app).await;
        });
        ApiServer { addr, shared, task }
    }
}

/// The running double. Stops (watches end, the listener closes) when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shared.shutdown.send(true);
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts a double on 127.0.0.1 with an ephemeral port and default settings.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    pub fn builder() -> ApiServerBuilder {
        ApiServerBuilder {
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(5),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for the double (namespace "default", no auth).
    pub fn client(&self) -> kube::Client {
        imagemirror::install_crypto_provider();
        let mut config = kube::Config::new(self.url().parse().expect("a valid URL"));
        config.default_namespace = "default".into();
        kube::Client::try_from(config).expect("a kube client for the double")
    }

    /// Writes a kubeconfig for the double into `dir` (for a controller run as a process).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\ncurrent-context: double\nusers:\n- name: double\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().expect("log lock").clone()
    }

    /// How many requests so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&RequestRecord) -> bool) -> usize {
        self.shared
            .log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// Writes (POST/PUT/PATCH/DELETE) to `resource` (a plural) and `subresource` (None: the
    /// main resource), successful or not.
    pub fn writes(&self, resource: &str, subresource: Option<&str>) -> usize {
        self.count(|r| {
            r.is_write() && r.resource == resource && r.subresource.as_deref() == subresource
        })
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.log.lock().expect("log lock").clear();
    }

    /// Adds a failure rule; rules are tried in order and each fires `times` times.
    pub fn fail(&self, rule: FailRule) {
        self.shared.faults.lock().expect("faults lock").push(rule);
    }

    /// Creates an ImageMirror (JSON, with `metadata.namespace`) without the CRD schema's
    /// validation: an object an older CRD admitted, which the controller must survive.
    pub fn create_unvalidated(&self, obj: serde_json::Value) -> serde_json::Value {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_string();
        let ctx = store::WriteCtx {
            manager: "older-crd",
            subresource: "",
        };
        let res = resources::find("imagemirror.dev", "v1alpha1", "imagemirrors")
            .expect("imagemirrors are served");
        let mut store = self.shared.store.lock().expect("store lock");
        schema::SKIP_SCHEMA.with(|s| s.set(true));
        let created = store.create(res, &ns, obj, &ctx);
        schema::SKIP_SCHEMA.with(|s| s.set(false));
        created.unwrap_or_else(|e| panic!("create past the schema: {e:?}"))
    }

    /// Drops the watch history: watches from any older resourceVersion get 410 Expired.
    pub fn compact(&self) {
        self.shared.store.lock().expect("store lock").compact();
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .resource_version()
    }
}
