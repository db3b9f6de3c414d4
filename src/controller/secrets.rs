//! Reading an ImageMirror's Secrets (its own namespace only) into registry access.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::api::{ImageMirrorSpec, RepositorySpec};
use crate::mirror::EndpointAccess;
use crate::registry::{DockerConfig, Repository};

/// Why a referenced Secret cannot be used. Names the Secret and key, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The Secret does not exist in the ImageMirror's namespace.
    #[error("Secret {namespace}/{name} (spec.{field}) not found")]
    NotFound {
        namespace: String,
        name: String,
        field: String,
    },
    /// The Secret exists but lacks the key, or the key's content does not parse.
    #[error("Secret {namespace}/{name} (spec.{field}): {detail}")]
    Invalid {
        namespace: String,
        name: String,
        field: String,
        detail: String,
    },
    /// The API server refused to let the controller read it (RBAC narrowed in that namespace).
    #[error(
        "reading Secret {namespace}/{name} (spec.{field}) is forbidden: the controller's service account needs `get` on secrets in namespace {namespace} (a Role or ClusterRole rule apiGroups: [\"\"], resources: [secrets], verbs: [get, list, watch])"
    )]
    Forbidden {
        namespace: String,
        name: String,
        field: String,
    },
    /// Reading it failed in a way that may pass (5xx, timeout, connection): retried.
    #[error("reading Secret {namespace}/{name} (spec.{field}) failed, retrying: {source}")]
    Unavailable {
        namespace: String,
        name: String,
        field: String,
        #[source]
        source: kube::Error,
    },
}

impl SecretError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretError::NotFound { .. } => crate::api::condition_reasons::SECRET_NOT_FOUND,
            SecretError::Invalid { .. } => crate::api::condition_reasons::SECRET_INVALID,
            SecretError::Forbidden { .. } => crate::api::condition_reasons::SECRET_FORBIDDEN,
            SecretError::Unavailable { .. } => crate::api::condition_reasons::SECRET_UNAVAILABLE,
        }
    }

    /// Whether it may pass without a change to the spec, a Secret or RBAC.
    pub fn transient(&self) -> bool {
        matches!(self, SecretError::Unavailable { .. })
    }
}

async fn get(api: &Api<Secret>, ns: &str, name: &str, field: &str) -> Result<Secret, SecretError> {
    match api.get_opt(name).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(SecretError::NotFound {
            namespace: ns.into(),
            name: name.into(),
            field: field.into(),
        }),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(SecretError::Forbidden {
            namespace: ns.into(),
            name: name.into(),
            field: field.into(),
        }),
        Err(source) => Err(SecretError::Unavailable {
            namespace: ns.into(),
            name: name.into(),
            field: field.into(),
            source,
        }),
    }
}

fn key<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

/// `name@resourceVersion`, the form [`versions`] compares.
fn version(name: &str, secret: &Secret) -> String {
    format!(
        "{name}@{}",
        secret
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default()
    )
}

/// Reads `credentialsSecret` and `caSecret` of one side (`field` is `source` or
/// `destination`). `extra_ca` (the controller's `--ca-file`) is trusted in addition. The
/// version of each Secret read goes into `read` (by name).
pub async fn read_side(
    api: &Api<Secret>,
    ns: &str,
    field: &str,
    spec: &RepositorySpec,
    repo: &Repository,
    extra_ca: Option<&[u8]>,
    read: &mut BTreeMap<String, String>,
) -> Result<EndpointAccess, SecretError> {
    let mut access = EndpointAccess::default();
    if let Some(name) = &spec.credentials_secret {
        let f = format!("{field}.credentialsSecret");
        let secret = get(api, ns, name, &f).await?;
        read.insert(name.clone(), version(name, &secret));
        let invalid = |detail: String| SecretError::Invalid {
            namespace: ns.into(),
            name: name.clone(),
            field: f.clone(),
            detail,
        };
        let json = key(&secret, ".dockerconfigjson").ok_or_else(|| {
            invalid(
                "no .dockerconfigjson key (create it with `kubectl create secret docker-registry`)"
                    .into(),
            )
        })?;
        let config = DockerConfig::parse(json).map_err(|e| invalid(e.to_string()))?;
        let creds = config
            .get(repo.registry())
            .or_else(|| config.get(repo.endpoint()))
            .ok_or_else(|| invalid(format!("no credentials for registry {}", repo.registry())))?;
        access.credentials = Some(creds.clone());
    }
    let mut ca = Vec::new();
    if let Some(name) = &spec.ca_secret {
        let f = format!("{field}.caSecret");
        let secret = get(api, ns, name, &f).await?;
        read.insert(name.clone(), version(name, &secret));
        let pem = key(&secret, "ca.crt").ok_or_else(|| SecretError::Invalid {
            namespace: ns.into(),
            name: name.clone(),
            field: f.clone(),
            detail: "no ca.crt key".into(),
        })?;
        ca.extend_from_slice(pem);
        ca.push(b'\n');
    }
    if let Some(extra) = extra_ca {
        ca.extend_from_slice(extra);
    }
    if !ca.is_empty() {
        access.ca_pem = Some(ca);
    }
    Ok(access)
}

/// The names of the Secrets `spec` references (credentials and CA of both sides), sorted,
/// without duplicates.
pub fn referenced(spec: &ImageMirrorSpec) -> Vec<&str> {
    let mut names: Vec<&str> = [&spec.source, &spec.destination]
        .iter()
        .flat_map(|side| [&side.credentials_secret, &side.ca_secret])
        .filter_map(|n| n.as_deref())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// `name@resourceVersion` of each referenced Secret as the metadata cache sees it (`name@`
/// when absent), to notice a changed Secret without reading its data.
pub fn versions(
    cache: &Store<PartialObjectMeta<Secret>>,
    ns: &str,
    spec: &ImageMirrorSpec,
) -> Vec<String> {
    referenced(spec)
        .into_iter()
        .map(|name| {
            let rv = cache
                .get(&ObjectRef::new(name).within(ns))
                .and_then(|s| s.metadata.resource_version.clone())
                .unwrap_or_default();
            format!("{name}@{rv}")
        })
        .collect()
}
