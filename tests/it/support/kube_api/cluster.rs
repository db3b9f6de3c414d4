//! The cluster e2e tests run against: the double, or a real cluster when
//! `IMAGEMIRROR_E2E_KUBECONFIG` names a kubeconfig. Helpers go through the kube client only, so
//! they behave the same on both.

use std::path::Path;
use std::time::Duration;

use imagemirror::api::ImageMirror;

use super::ApiServer;

/// Test helpers over any kube client (double or real cluster).
pub mod helpers {
    use std::fmt::Debug;
    use std::time::Duration;

    use base64::Engine;
    use imagemirror::api::ImageMirror;
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::{Client, CustomResourceExt, Resource};
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    /// The field manager the helpers apply with (a user, like `kubectl apply --server-side`).
    pub const TEST_MANAGER: &str = "imagemirror-e2e";

    /// Creates a namespace (labelled `imagemirror.dev/e2e=true`); an existing one is fine.
    pub async fn create_namespace(client: &Client, name: &str) {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"imagemirror.dev/e2e": "true"}}
        }))
        .expect("a Namespace");
        match Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create namespace {name}: {e}"),
        }
    }

    /// Creates a Secret of `type_` with the given string data (stored base64 in `data`), or
    /// replaces the data of an existing one: server-side apply with [`TEST_MANAGER`], as
    /// `kubectl apply --server-side` would.
    pub async fn apply_secret(
        client: &Client,
        ns: &str,
        name: &str,
        type_: &str,
        string_data: &[(&str, &str)],
    ) -> Secret {
        let data: serde_json::Map<String, Value> = string_data
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns}, "type": type_, "data": data,
        });
        Api::<Secret>::namespaced(client.clone(), ns)
            .patch(
                name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .unwrap_or_else(|e| panic!("apply secret {ns}/{name}: {e}"))
    }

    /// Applies a `kubernetes.io/dockerconfigjson` Secret with credentials for `registry`.
    pub async fn apply_registry_secret(
        client: &Client,
        ns: &str,
        name: &str,
        registry: &str,
        user: &str,
        password: &str,
    ) -> Secret {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let config =
            json!({"auths": {registry: {"username": user, "password": password, "auth": auth}}});
        apply_secret(
            client,
            ns,
            name,
            "kubernetes.io/dockerconfigjson",
            &[(".dockerconfigjson", &config.to_string())],
        )
        .await
    }

    /// Server-side applies one ImageMirror YAML document (namespace from the document, else
    /// "default") with [`TEST_MANAGER`] and `force`, and returns what the server stored.
    pub async fn apply_imagemirror(client: &Client, yaml: &str) -> ImageMirror {
        let doc: Value = serde_yaml::from_str(yaml).expect("ImageMirror YAML");
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        Api::<ImageMirror>::namespaced(client.clone(), &ns)
            .patch(
                &name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap_or_else(|e| panic!("apply ImageMirror {ns}/{name}: {e}"))
    }

    pub async fn get_imagemirror(client: &Client, ns: &str, name: &str) -> ImageMirror {
        Api::<ImageMirror>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get ImageMirror {ns}/{name}: {e}"))
    }

    /// Waits (by watch, no polling sleeps) until object `name` exists and satisfies `cond`;
    /// panics after `timeout` showing the object as it last was.
    pub async fn wait_for<K>(
        api: &Api<K>,
        name: &str,
        timeout: Duration,
        cond: impl Fn(&K) -> bool,
    ) -> K
    where
        K: Resource + Clone + Debug + Send + DeserializeOwned + serde::Serialize + 'static,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let wait = kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| {
                o.is_some_and(&cond)
            });
            match tokio::time::timeout_at(deadline, wait).await {
                Ok(Ok(Some(obj))) => return obj,
                // A watch error (the API failed or was failed on purpose): watch again.
                Ok(Ok(None)) | Ok(Err(_)) => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_elapsed) => break,
            }
        }
        let last = match api.get_opt(name).await {
            Ok(Some(o)) => serde_yaml::to_string(&o).unwrap_or_default(),
            Ok(None) => "<absent>".into(),
            Err(e) => format!("<get failed: {e}>"),
        };
        panic!("timed out after {timeout:?} waiting for {name}; it is now:\n{last}");
    }

    /// Installs the ImageMirror CRD by server-side apply and waits until it is Established.
    pub async fn install_crd(client: &Client) {
        let api = Api::<CustomResourceDefinition>::all(client.clone());
        let crd = ImageMirror::crd();
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(
            &name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        let established = kube::runtime::wait::conditions::is_crd_established();
        let wait = kube::runtime::wait::await_condition(api, &name, established);
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("CRD established within 60s")
            .expect("watch the CRD");
    }
}

/// Where e2e tests run: the in-process double, or a real cluster (with the CRD installed).
pub enum TestCluster {
    Double(ApiServer),
    Real(kube::Client),
}

impl TestCluster {
    /// The real cluster named by `IMAGEMIRROR_E2E_KUBECONFIG` if set, else a fresh double.
    pub async fn start() -> Self {
        match std::env::var_os("IMAGEMIRROR_E2E_KUBECONFIG") {
            Some(path) if !path.is_empty() => Self::connect(Path::new(&path)).await,
            _ => Self::Double(ApiServer::start().await),
        }
    }

    /// A cluster from a kubeconfig file (its current context), with the CRD installed.
    pub async fn connect(kubeconfig: &Path) -> Self {
        imagemirror::install_crypto_provider();
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", kubeconfig.display()));
        let client = kube::Client::try_from(config).expect("a kube client");
        helpers::install_crd(&client).await;
        Self::Real(client)
    }

    pub fn client(&self) -> kube::Client {
        match self {
            Self::Double(d) => d.client(),
            Self::Real(c) => c.clone(),
        }
    }

    /// The double, for assertions only it can answer (request counts, injected failures).
    pub fn double(&self) -> Option<&ApiServer> {
        match self {
            Self::Double(d) => Some(d),
            Self::Real(_) => None,
        }
    }

    /// Creates a namespace with a random suffix: tests on a shared real cluster stay apart.
    pub async fn fresh_namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        helpers::create_namespace(&self.client(), &name).await;
        name
    }

    /// Deletes a namespace and everything in it (on a real cluster, asynchronously).
    pub async fn delete_namespace(&self, name: &str) {
        let api = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client());
        let _ = api.delete(name, &Default::default()).await;
    }

    pub async fn apply_imagemirror(&self, yaml: &str) -> ImageMirror {
        helpers::apply_imagemirror(&self.client(), yaml).await
    }

    pub async fn get_imagemirror(&self, ns: &str, name: &str) -> ImageMirror {
        helpers::get_imagemirror(&self.client(), ns, name).await
    }

    pub async fn wait_for(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        cond: impl Fn(&ImageMirror) -> bool,
    ) -> ImageMirror {
        let api = kube::Api::<ImageMirror>::namespaced(self.client(), ns);
        helpers::wait_for(&api, name, timeout, cond).await
    }
}
