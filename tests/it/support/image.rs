//! Seeds registries with synthetic images through the registry HTTP API, and reads them back.
//! Speaks basic auth and the bearer token dance like `docker push` does, over HTTP or HTTPS.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use rand::{RngCore, SeedableRng};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use serde_json::json;

use imagemirror::registry::digest::{Hasher, sha256_digest};
use imagemirror::registry::manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};

use super::token::bearer_params;

/// A blob, a manifest or an index as pushed.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// Every blob the manifest (or its children) refers to: (digest, size).
    pub blobs: Vec<(String, u64)>,
}

/// Which family of media types to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Oci,
    Docker,
}

/// Access to one registry, optionally with credentials (sent as Basic, or traded for a bearer
/// token when the registry's challenge asks for one).
#[derive(Clone)]
pub struct Seeder {
    http: reqwest::Client,
    /// `http://host:port` or `https://host:port`.
    base: String,
    basic: Option<(String, String)>,
}

/// Deterministic pseudo-random bytes (incompressible, reproducible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

impl Seeder {
    pub fn new(host: &str) -> Self {
        imagemirror::install_crypto_provider();
        Seeder {
            http: reqwest::Client::new(),
            base: format!("http://{host}"),
            basic: None,
        }
    }

    /// Credentials: sent as Basic, or traded for bearer tokens when the registry wants those.
    pub fn with_basic(mut self, user: &str, pass: &str) -> Self {
        self.basic = Some((user.into(), pass.into()));
        self
    }

    /// HTTPS, trusting only the test CA `ca_pem`.
    pub fn with_ca(mut self, ca_pem: &str) -> Self {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
        self.http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .build()
            .expect("HTTPS client");
        self.base = self.base.replacen("http://", "https://", 1);
        self
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url)
    }

    /// Sends `req` (which carries no credentials yet) as a client would: Basic credentials if
    /// any; after a `Bearer` challenge, a token for the challenged scope and one retry.
    async fn send(&self, req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
        let retry = req.try_clone().expect("seeder bodies are buffered");
        let first = match &self.basic {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        };
        let resp = first.send().await?;
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_params);
        let (401, Some(challenge)) = (resp.status().as_u16(), challenge) else {
            return Ok(resp);
        };
        let mut token_req = self.http.get(&challenge["realm"]);
        for key in ["service", "scope"] {
            if let Some(v) = challenge.get(key) {
                token_req = token_req.query(&[(key, v)]);
            }
        }
        if let Some((u, p)) = &self.basic {
            token_req = token_req.basic_auth(u, Some(p));
        }
        let answer: serde_json::Value = token_req.send().await?.error_for_status()?.json().await?;
        let token = answer["token"].as_str().expect("token in the answer");
        retry.bearer_auth(token).send().await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> (String, u64) {
        let digest = sha256_digest(bytes);
        let loc = self.start_upload(repo).await;
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = self
            .send(
                self.req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.to_vec()),
            )
            .await
            .expect("PUT blob");
        assert_eq!(resp.status(), 201, "finish upload of {digest}");
        (digest, bytes.len() as u64)
    }

    /// Pushes `size` reproducible pseudo-random bytes without holding them: 1 MiB blocks of
    /// one random block, each stamped with its index, streamed into one PATCH and hashed on
    /// the way, then committed by digest.
    pub async fn push_blob_stream(&self, repo: &str, size: u64, seed: u64) -> (String, u64) {
        const BLOCK: u64 = 1 << 20;
        let loc = self.start_upload(repo).await;
        let base = Bytes::from(random_bytes(seed, BLOCK as usize));
        let hasher = Arc::new(Mutex::new(Hasher::new()));
        let h = hasher.clone();
        let blocks = futures_util::stream::iter(0..size.div_ceil(BLOCK)).map(move |i| {
            let len = BLOCK.min(size - i * BLOCK) as usize;
            let mut block = base[..len].to_vec();
            let stamp = i.to_le_bytes();
            let n = stamp.len().min(len);
            block[..n].copy_from_slice(&stamp[..n]);
            h.lock().unwrap().update(&block);
            Ok::<_, std::io::Error>(Bytes::from(block))
        });
        // A streamed body cannot be replayed after a token challenge: Basic or anonymous only.
        let patch = self
            .req(reqwest::Method::PATCH, &loc)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(blocks));
        let patch = match &self.basic {
            Some((u, p)) => patch.basic_auth(u, Some(p)),
            None => patch,
        };
        let resp = patch.send().await.expect("PATCH blob");
        assert_eq!(resp.status(), 202, "stream {size} bytes into {repo}");
        let loc = self.absolute(resp.headers()[LOCATION].to_str().unwrap());
        let digest = std::mem::take(&mut *hasher.lock().unwrap()).finish();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = self
            .send(self.req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}")))
            .await
            .expect("PUT blob");
        assert_eq!(resp.status(), 201, "finish upload of {digest}");
        (digest, size)
    }

    /// Opens an upload session in `repo`; its absolute location.
    async fn start_upload(&self, repo: &str) -> String {
        let resp = self
            .send(self.req(
                reqwest::Method::POST,
                &self.url(&format!("/v2/{repo}/blobs/uploads/")),
            ))
            .await
            .expect("POST upload");
        assert_eq!(resp.status(), 202, "start upload in {repo}");
        self.absolute(resp.headers()[LOCATION].to_str().unwrap())
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http") {
            location.to_string()
        } else {
            self.url(location)
        }
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let resp = self
            .send(
                self.req(
                    reqwest::Method::PUT,
                    &self.url(&format!("/v2/{repo}/manifests/{reference}")),
                )
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec()),
            )
            .await
            .expect("PUT manifest");
        let status = resp.status();
        assert_eq!(
            status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            resp.text().await.unwrap_or_default()
        );
        sha256_digest(bytes)
    }

    /// Pushes an image with random layers of the given sizes; tags it when `tag` is given.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: Option<&str>,
        seed: u64,
        layer_sizes: &[usize],
        flavor: Flavor,
    ) -> Pushed {
        let config = json!({"architecture": "amd64", "os": "linux", "seed": seed}).to_string();
        let (config_digest, config_size) = self.push_blob(repo, config.as_bytes()).await;
        let mut layers = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let bytes = random_bytes(seed * 1000 + i as u64, *size);
            layers.push(self.push_blob(repo, &bytes).await);
        }
        self.push_manifest_for(repo, tag, (config_digest, config_size), layers, flavor)
            .await
    }

    /// Pushes a manifest for blobs already in `repo`.
    pub async fn push_manifest_for(
        &self,
        repo: &str,
        tag: Option<&str>,
        config: (String, u64),
        layers: Vec<(String, u64)>,
        flavor: Flavor,
    ) -> Pushed {
        let (mt, config_mt, layer_mt) = match flavor {
            Flavor::Oci => (
                OCI_MANIFEST,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            Flavor::Docker => (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": config_mt, "digest": config.0, "size": config.1},
            "layers": layers.iter().map(|(d, s)| json!({"mediaType": layer_mt, "digest": d, "size": s})).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
        let digest = sha256_digest(&bytes);
        self.put_manifest(repo, tag.unwrap_or(&digest), mt, &bytes)
            .await;
        let mut blobs = vec![config];
        blobs.extend(layers);
        Pushed {
            digest,
            media_type: mt.into(),
            bytes,
            blobs,
        }
    }

    /// Pushes a multi-platform index over images (pushed by digest) and tags it.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        seed: u64,
        platforms: &[&str],
        flavor: Flavor,
    ) -> (Pushed, Vec<Pushed>) {
        let mut children = Vec::new();
        let mut entries = Vec::new();
        for (i, p) in platforms.iter().enumerate() {
            let child = self
                .push_image(repo, None, seed * 10 + i as u64, &[2048 + i * 100], flavor)
                .await;
            let parts: Vec<&str> = p.split('/').collect();
            let mut platform = json!({"os": parts[0], "architecture": parts[1]});
            if let Some(v) = parts.get(2) {
                platform["variant"] = json!(v);
            }
            entries.push(json!({"mediaType": child.media_type, "digest": child.digest, "size": child.bytes.len(), "platform": platform}));
            children.push(child);
        }
        let mt = match flavor {
            Flavor::Oci => OCI_INDEX,
            Flavor::Docker => DOCKER_LIST,
        };
        let index = json!({"schemaVersion": 2, "mediaType": mt, "manifests": entries});
        let bytes = serde_json::to_vec_pretty(&index).unwrap();
        let digest = self.put_manifest(repo, tag, mt, &bytes).await;
        let blobs = children.iter().flat_map(|c| c.blobs.clone()).collect();
        (
            Pushed {
                digest,
                media_type: mt.into(),
                bytes,
                blobs,
            },
            children,
        )
    }

    /// GET a manifest: (content type, bytes), or `None` when absent.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Option<(String, Vec<u8>)> {
        let resp = self
            .send(
                self.req(
                    reqwest::Method::GET,
                    &self.url(&format!("/v2/{repo}/manifests/{reference}")),
                )
                .header(
                    ACCEPT,
                    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
                ),
            )
            .await
            .expect("GET manifest");
        if resp.status() == 404 {
            return None;
        }
        assert!(
            resp.status().is_success(),
            "GET manifest {repo}:{reference}: {}",
            resp.status()
        );
        let ct = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        Some((ct, resp.bytes().await.unwrap().to_vec()))
    }

    /// Asserts a blob exists with this size (HEAD) and that its bytes hash to its digest (GET).
    pub async fn assert_blob(&self, repo: &str, digest: &str, size: u64) {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let head = self
            .send(self.req(reqwest::Method::HEAD, &url))
            .await
            .expect("HEAD blob");
        assert_eq!(head.status(), 200, "blob {digest} missing in {repo}");
        // reqwest's content_length() is the body's (empty) size on a HEAD: read the header.
        let len = head
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        assert_eq!(len, Some(size), "size of {digest} in {repo}");
        // Hashed as it streams: blobs in these tests go up to hundreds of MiB.
        let mut body = self
            .send(self.req(reqwest::Method::GET, &url))
            .await
            .expect("GET blob")
            .bytes_stream();
        let mut hasher = Hasher::new();
        while let Some(chunk) = body.next().await {
            hasher.update(&chunk.expect("read blob"));
        }
        assert_eq!(hasher.len(), size, "bytes of {digest} in {repo}");
        assert_eq!(hasher.finish(), digest, "content of {digest} in {repo}");
    }

    /// Asserts the destination holds `pushed` byte-identical under `reference`, with every blob.
    pub async fn assert_copy_of(&self, repo: &str, reference: &str, pushed: &Pushed) {
        let (ct, bytes) = self
            .get_manifest(repo, reference)
            .await
            .unwrap_or_else(|| panic!("{repo}:{reference} missing at the destination"));
        assert_eq!(ct, pushed.media_type, "media type of {repo}:{reference}");
        assert_eq!(bytes, pushed.bytes, "manifest bytes of {repo}:{reference}");
        for (d, s) in &pushed.blobs {
            self.assert_blob(repo, d, *s).await;
        }
    }
}
