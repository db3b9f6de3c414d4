//! Registry clients shared across mirrors: one per (endpoint, settings, credentials), so token
//! caches and connection pools are shared too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Endpoint, SpecError};
use crate::api::RepositorySpec;
use crate::layout::{Layouts, Location};
use crate::registry::digest::sha256_digest;
use crate::registry::{
    Credentials, HttpClients, HttpMode, RegistryClient, RegistryError, RegistryOptions, Repository,
};

/// Credentials and trust for one side of a mirror, as read from Secrets or files.
#[derive(Clone, Debug, Default)]
pub struct EndpointAccess {
    /// Credentials for the registry, if any.
    pub credentials: Option<Credentials>,
    /// Extra PEM CA certificates to trust.
    pub ca_pem: Option<Vec<u8>>,
}

/// Hands out shared clients. Cheap to clone. Clients nobody holds are dropped once the pool
/// is over [`IDLE_KEPT`] entries, least recently used first, so rotating credentials (a new
/// client per Secret content) do not make the pool grow.
#[derive(Clone, Default)]
pub struct ClientPool {
    clients: Arc<Mutex<HashMap<String, Pooled>>>,
    /// HTTP clients by TLS settings: one root-store load and one connection pool per setting.
    http: Arc<HttpClients>,
    /// OCI layouts (`oci:`, `oci-archive:`) by path.
    layouts: Arc<Layouts>,
}

/// A pooled client and the last time it was handed out.
struct Pooled {
    client: Arc<RegistryClient>,
    used: Instant,
}

/// Clients the pool keeps beyond those in use: enough for every registry a controller talks
/// to at once to keep its token cache between syncs.
const IDLE_KEPT: usize = 64;

impl ClientPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty pool whose HTTP clients carry requests as `mode` says.
    pub fn with_http_mode(mode: HttpMode) -> Self {
        ClientPool {
            http: Arc::new(HttpClients::with_mode(mode)),
            ..Self::default()
        }
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
        if let Some(location) = Location::of(&repo) {
            let layout = self
                .layouts
                .get(&location)
                .map_err(|source| SpecError::Repository { field, source })?;
            return Ok(Endpoint {
                registry: layout,
                repo,
            });
        }
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
        if let Some(c) = map.get_mut(&key) {
            c.used = Instant::now();
            return Ok(c.client.clone());
        }
        let client = Arc::new(RegistryClient::with_http(host, options, &self.http)?);
        prune(&mut map);
        map.insert(
            key,
            Pooled {
                client: client.clone(),
                used: Instant::now(),
            },
        );
        Ok(client)
    }

    /// Clients in the pool (in use or idle).
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when the pool holds no client.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops idle clients (held by the pool alone), oldest first, down to [`IDLE_KEPT`] - 1.
fn prune(map: &mut HashMap<String, Pooled>) {
    if map.len() < IDLE_KEPT {
        return;
    }
    let mut idle: Vec<(Instant, String)> = map
        .iter()
        .filter(|(_, p)| Arc::strong_count(&p.client) == 1)
        .map(|(k, p)| (p.used, k.clone()))
        .collect();
    idle.sort();
    let excess = map.len() + 1 - IDLE_KEPT;
    for (_, key) in idle.into_iter().take(excess) {
        map.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RepositorySpec;

    #[test]
    fn rotating_credentials_do_not_grow_the_pool() {
        let pool = ClientPool::new();
        let spec: RepositorySpec =
            serde_json::from_value(serde_json::json!({"repository": "r.example/app"})).unwrap();
        let held = pool
            .endpoint("source", &spec, EndpointAccess::default())
            .unwrap();
        for i in 0..500 {
            let access = EndpointAccess {
                credentials: Some(Credentials {
                    username: "u".into(),
                    password: format!("p{i}"),
                }),
                ca_pem: None,
            };
            drop(pool.endpoint("source", &spec, access).unwrap());
        }
        assert!(pool.len() <= IDLE_KEPT, "{}", pool.len());
        // A client in use is never dropped.
        let again = pool
            .endpoint("source", &spec, EndpointAccess::default())
            .unwrap();
        assert!(std::ptr::addr_eq(
            Arc::as_ptr(&held.registry),
            Arc::as_ptr(&again.registry)
        ));
    }
}
