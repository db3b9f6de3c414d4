//! Registry clients shared across mirrors: one per (endpoint, settings, credentials), so token
//! caches and connection pools are shared too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Endpoint, SpecError};
use crate::api::RepositorySpec;
use crate::registry::digest::sha256_digest;
use crate::registry::{
    Credentials, HttpClients, RegistryClient, RegistryError, RegistryOptions, Repository,
};

/// Credentials and trust for one side of a mirror, as read from Secrets or files.
#[derive(Clone, Debug, Default)]
pub struct EndpointAccess {
    /// Credentials for the registry, if any.
    pub credentials: Option<Credentials>,
    /// Extra PEM CA certificates to trust.
    pub ca_pem: Option<Vec<u8>>,
}

/// Hands out shared clients. Cheap to clone.
#[derive(Clone, Default)]
pub struct ClientPool {
    clients: Arc<Mutex<HashMap<String, Arc<RegistryClient>>>>,
    /// HTTP clients by TLS settings: one root-store load and one connection pool per setting.
    http: Arc<HttpClients>,
}

impl ClientPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint for one side of a spec (`field` is `source` or `destination`, for errors).
    pub fn endpoint(
        &self,
        field: &'static str,
        spec: &RepositorySpec,
        access: EndpointAccess,
    ) -> Result<Endpoint, SpecError> {
        let repo = Repository::parse(&spec.repository)
            .map_err(|source| SpecError::Repository { field, source })?;
        let options = RegistryOptions {
            plain_http: spec.plain_http,
            insecure_skip_tls_verify: spec.insecure_skip_tls_verify,
            ca_pem: access.ca_pem,
            credentials: access.credentials,
        };
        let client = self
            .client(repo.endpoint(), &options)
            .map_err(|source| SpecError::Repository { field, source })?;
        Ok(Endpoint {
            registry: client,
            repo,
        })
    }

    fn client(
        &self,
        host: &str,
        options: &RegistryOptions,
    ) -> Result<Arc<RegistryClient>, RegistryError> {
        // The key holds a hash of the secret parts, never the secrets themselves.
        let secret = options
            .credentials
            .as_ref()
            .map(|c| sha256_digest(format!("{}\0{}", c.username, c.password).as_bytes()))
            .unwrap_or_default();
        let ca = options
            .ca_pem
            .as_deref()
            .map(sha256_digest)
            .unwrap_or_default();
        let key = format!(
            "{host}|{}|{}|{ca}|{secret}",
            options.plain_http, options.insecure_skip_tls_verify
        );
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let client = Arc::new(RegistryClient::with_http(host, options, &self.http)?);
        map.insert(key, client.clone());
        Ok(client)
    }
}
