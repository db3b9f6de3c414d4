//! Reading an ImageMirror's Secrets (its own namespace only) into registry access.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::api::RepositorySpec;
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
    /// The API server failed while reading it.
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
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
            SecretError::Api { .. } => "ApiError",
        }
    }
}

/// Access for one side, plus the resourceVersions of the Secrets it was built from (so a
/// changed Secret can be noticed).
pub struct SideAccess {
    /// Credentials and CA.
    pub access: EndpointAccess,
    /// `name@resourceVersion` of each Secret read.
    pub versions: Vec<String>,
}

async fn get(api: &Api<Secret>, ns: &str, name: &str, field: &str) -> Result<Secret, SecretError> {
    match api.get_opt(name).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(SecretError::NotFound {
            namespace: ns.into(),
            name: name.into(),
            field: field.into(),
        }),
        Err(source) => Err(SecretError::Api {
            namespace: ns.into(),
            name: name.into(),
            source,
        }),
    }
}

fn key<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

/// Reads `credentialsSecret` and `caSecret` of one side (`field` is `source` or
/// `destination`). `extra_ca` (the controller's `--ca-file`) is trusted in addition.
pub async fn read_side(
    api: &Api<Secret>,
    ns: &str,
    field: &str,
    spec: &RepositorySpec,
    repo: &Repository,
    extra_ca: Option<&[u8]>,
) -> Result<SideAccess, SecretError> {
    let mut versions = Vec::new();
    let mut access = EndpointAccess::default();
    if let Some(name) = &spec.credentials_secret {
        let f = format!("{field}.credentialsSecret");
        let secret = get(api, ns, name, &f).await?;
        versions.push(format!(
            "{name}@{}",
            secret.metadata.resource_version.clone().unwrap_or_default()
        ));
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
        versions.push(format!(
            "{name}@{}",
            secret.metadata.resource_version.clone().unwrap_or_default()
        ));
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
    Ok(SideAccess { access, versions })
}
