//! Manifests: media types, size limit, parsing children, platform filtering, GET/HEAD/PUT.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use serde::{Deserialize, Serialize};

use super::RegistryClient;
use super::digest::sha256_digest;
use super::error::{RegistryError, Result};
use super::transport::{Access, Capped, check, read_capped};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema1 (refused).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker schema1, signed (refused).
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Manifests larger than this are refused, as the registries themselves do.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor, as in manifests and indexes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size of the content in bytes.
    pub size: u64,
    /// Platform, for entries of an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v7`, `v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Whether this platform matches `os/arch[/variant]` (a filter without variant matches all
    /// variants).
    pub fn matches(&self, filter: &str) -> bool {
        let mut parts = filter.split('/');
        let (Some(os), Some(arch)) = (parts.next(), parts.next()) else {
            return false;
        };
        let variant = parts.next();
        os == self.os
            && arch == self.architecture
            && variant.is_none_or(|v| self.variant.as_deref() == Some(v))
    }
}

/// The raw bytes of a manifest with their media type and digest. Bytes are kept as they came:
/// a manifest's digest is its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Media type (from Content-Type, or the document's `mediaType`).
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The document, byte for byte.
    pub bytes: Bytes,
}

/// What a manifest refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An image: one config and its layers.
    Image {
        /// The config blob.
        config: Descriptor,
        /// The layer blobs, in order.
        layers: Vec<Descriptor>,
    },
    /// An index or manifest list: child manifests.
    Index {
        /// Child manifests.
        manifests: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// True for index and manifest-list media types.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

impl Manifest {
    /// Wraps bytes that came from `what`, working out the media type. Schema1, unknown types
    /// and bad JSON are refused with a message naming `what`.
    pub fn from_bytes(what: &str, header_type: Option<&str>, bytes: Bytes) -> Result<Self> {
        let raw: RawManifest =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::ManifestInvalid {
                what: what.to_string(),
                detail: format!("not JSON: {e}"),
            })?;
        // Content-Type wins; distribution serves the type the manifest was pushed with.
        let header_type = header_type
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_string())
            .filter(|t| !t.is_empty() && t != "application/json" && t != "text/plain");
        let media_type = header_type
            .or(raw.media_type.clone())
            .or_else(|| {
                // OCI manifests may omit mediaType; their shape tells.
                if raw.manifests.is_some() {
                    Some(OCI_INDEX.to_string())
                } else if raw.config.is_some() {
                    Some(OCI_MANIFEST.to_string())
                } else {
                    None
                }
            })
            .unwrap_or_default();
        if media_type == DOCKER_SCHEMA1
            || media_type == DOCKER_SCHEMA1_SIGNED
            || raw.schema_version == Some(1)
        {
            return Err(RegistryError::Schema1 {
                what: what.to_string(),
                media_type: if media_type.is_empty() {
                    DOCKER_SCHEMA1.into()
                } else {
                    media_type
                },
            });
        }
        if ![OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&media_type.as_str()) {
            return Err(RegistryError::ManifestInvalid {
                what: what.to_string(),
                detail: format!("unsupported media type {media_type:?}"),
            });
        }
        Ok(Manifest {
            digest: sha256_digest(&bytes),
            media_type,
            bytes,
        })
    }

    /// The children: config and layers of an image, or the manifests of an index.
    pub fn parse(&self, what: &str) -> Result<Parsed> {
        let invalid = |detail: &str| RegistryError::ManifestInvalid {
            what: what.to_string(),
            detail: detail.to_string(),
        };
        let raw: RawManifest =
            serde_json::from_slice(&self.bytes).map_err(|e| invalid(&e.to_string()))?;
        let check_digest = |d: &Descriptor| {
            if super::reference::is_valid_digest(&d.digest) {
                Ok(())
            } else {
                Err(invalid(&format!(
                    "descriptor digest {:?} is not a sha256 digest",
                    d.digest
                )))
            }
        };
        if is_index(&self.media_type) {
            let manifests = raw
                .manifests
                .ok_or_else(|| invalid("index without manifests"))?;
            if manifests.len() > MAX_CHILDREN {
                return Err(invalid(&format!(
                    "index with {} entries, over the limit of {MAX_CHILDREN}",
                    manifests.len()
                )));
            }
            manifests.iter().try_for_each(check_digest)?;
            Ok(Parsed::Index { manifests })
        } else {
            let config = raw
                .config
                .ok_or_else(|| invalid("image manifest without config"))?;
            let layers = raw.layers.unwrap_or_default();
            if layers.len() > MAX_CHILDREN {
                return Err(invalid(&format!(
                    "image with {} layers, over the limit of {MAX_CHILDREN}",
                    layers.len()
                )));
            }
            check_digest(&config)?;
            layers.iter().try_for_each(check_digest)?;
            Ok(Parsed::Image { config, layers })
        }
    }

    /// A new index holding only the entries whose platform matches one of `platforms`. Entries
    /// without a platform (attestations, artifacts) are dropped too. Fails when none match.
    pub fn filter_platforms(&self, what: &str, platforms: &[String]) -> Result<Manifest> {
        let invalid = |detail: String| RegistryError::ManifestInvalid {
            what: what.to_string(),
            detail,
        };
        let mut doc: serde_json::Value =
            serde_json::from_slice(&self.bytes).map_err(|e| invalid(e.to_string()))?;
        let entries = doc
            .get_mut("manifests")
            .and_then(|m| m.as_array_mut())
            .ok_or_else(|| invalid("index without manifests".into()))?;
        entries.retain(|entry| {
            serde_json::from_value::<Descriptor>(entry.clone())
                .ok()
                .and_then(|d| d.platform)
                .is_some_and(|p| platforms.iter().any(|f| p.matches(f)))
        });
        if entries.is_empty() {
            return Err(RegistryError::NotFound {
                what: format!("{what} for platforms {}", platforms.join(", ")),
            });
        }
        let bytes =
            Bytes::from(serde_json::to_vec_pretty(&doc).map_err(|e| invalid(e.to_string()))?);
        Ok(Manifest {
            media_type: self.media_type.clone(),
            digest: sha256_digest(&bytes),
            bytes,
        })
    }
}

/// What a manifest HEAD tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when the registry sent it.
    pub digest: Option<String>,
    /// Content-Type.
    pub media_type: Option<String>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl RegistryClient {
    /// HEAD a manifest by tag or digest; `None` when it does not exist.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Option<ManifestHead>> {
        let what = self.what(repo, reference);
        let url = self.t.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .t
            .send(&what, &Access::Pull(repo.into()), || {
                self.t.http.head(&url).header(ACCEPT, ACCEPT_MANIFESTS)
            })
            .await?;
        match check(&what, resp).await {
            Ok(resp) => Ok(Some(ManifestHead {
                digest: header_str(resp.headers(), "docker-content-digest").map(str::to_string),
                media_type: header_str(resp.headers(), CONTENT_TYPE.as_str()).map(str::to_string),
            })),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET a manifest by tag or digest, refusing more than [`MAX_MANIFEST_SIZE`] bytes and
    /// verifying the digest when the reference is one.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<Manifest> {
        let what = self.what(repo, reference);
        let url = self.t.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .t
            .send(&what, &Access::Pull(repo.into()), || {
                self.t.http.get(&url).header(ACCEPT, ACCEPT_MANIFESTS)
            })
            .await?;
        let resp = check(&what, resp).await?;
        if let Some(len) = resp.content_length()
            && len > MAX_MANIFEST_SIZE
        {
            return Err(RegistryError::ManifestTooLarge {
                what,
                size: len,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str()).map(str::to_string);
        // Read with a cap: a registry that lies about (or omits) the length cannot make us buffer
        // more than the limit.
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| RegistryError::transport(&what, &e))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_MANIFEST_SIZE {
                return Err(RegistryError::ManifestTooLarge {
                    what,
                    size: body.len() as u64,
                    limit: MAX_MANIFEST_SIZE,
                });
            }
        }
        let manifest = Manifest::from_bytes(&what, content_type.as_deref(), body.freeze())?;
        if reference.starts_with("sha256:") && manifest.digest != reference {
            return Err(RegistryError::DigestMismatch {
                digest: reference.to_string(),
                actual: manifest.digest,
                expected_size: 0,
                actual_size: manifest.bytes.len() as u64,
            });
        }
        Ok(manifest)
    }

    /// PUT a manifest under a tag or its digest, with its own media type.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<()> {
        self.send_manifest(repo, reference, manifest)
            .await
            .map(drop)
    }

    /// PUTs a manifest and checks the digest the registry says it stored; returns the answer's
    /// headers (for `OCI-Subject`).
    pub(super) async fn send_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<HeaderMap> {
        let what = self.what(repo, reference);
        let url = self.t.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                self.t
                    .http
                    .put(&url)
                    .header(CONTENT_TYPE, manifest.media_type.as_str())
                    .body(manifest.bytes.clone())
            })
            .await?;
        let resp = check(&what, resp).await?;
        if let Some(d) = header_str(resp.headers(), "docker-content-digest")
            && d != manifest.digest
        {
            return Err(RegistryError::DigestMismatch {
                digest: manifest.digest.clone(),
                actual: d.to_string(),
                expected_size: manifest.bytes.len() as u64,
                actual_size: manifest.bytes.len() as u64,
            });
        }
        Ok(resp.headers().clone())
    }

    /// The tags of a repository, following `Link` pagination for at most `max_pages` pages.
    pub async fn list_tags(&self, repo: &str, max_pages: usize) -> Result<TagList> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let what = format!("{}/{repo} (tag list)", self.t.host);
        let mut next = Some(self.t.url(&format!("/v2/{repo}/tags/list?n=1000")));
        let mut tags = Vec::new();
        for _ in 0..max_pages {
            let Some(url) = next.take() else { break };
            let resp = self
                .t
                .send(&what, &Access::Pull(repo.into()), || self.t.http.get(&url))
                .await?;
            let resp = check(&what, resp).await?;
            next = match header_str(resp.headers(), "link").and_then(parse_next_link) {
                Some(link) => Some(self.t.resolve(&what, &link)?),
                None => None,
            };
            let body = match read_capped(resp, MAX_TAG_PAGE).await {
                Ok(Capped::Whole(b)) => b,
                Ok(Capped::Cut(_)) => {
                    return Err(RegistryError::TooLarge {
                        what,
                        limit: format!("{MAX_TAG_PAGE} bytes per tag-list page"),
                    });
                }
                Err(e) => return Err(RegistryError::transport(&what, &e)),
            };
            let page: Page =
                serde_json::from_slice(&body).map_err(|e| RegistryError::Transport {
                    what: what.clone(),
                    detail: format!(
                        "tag list is not JSON of the expected shape: {}",
                        super::auth::syntax_only(&e)
                    ),
                })?;
            tags.extend(page.tags.unwrap_or_default());
            if tags.len() >= MAX_TAGS {
                // An endless (or enormous) list: what was read is reported as incomplete.
                tags.truncate(MAX_TAGS);
                next = next.or(Some(String::new()));
                break;
            }
        }
        Ok(TagList {
            tags,
            complete: next.is_none(),
        })
    }
}

/// The tags of a repository as the registry listed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagList {
    /// The tags read.
    pub tags: Vec<String>,
    /// False when the registry had more pages than were read.
    pub complete: bool,
}

/// Most entries of an index, or layers of an image, that are followed. Real images have tens
/// (overlay filesystems stop at 128 layers); a 4 MiB manifest could name ~40 000.
pub const MAX_CHILDREN: usize = 4096;

/// Largest tag-list page read (1000 tags of 128 characters fit eight times over).
pub const MAX_TAG_PAGE: usize = 1024 * 1024;
/// Most tags read from one repository, over all pages.
pub const MAX_TAGS: usize = 100_000;

/// Pages read when every tag is wanted: a registry whose `Link` never ends must not keep us
/// forever.
pub const ALL_TAG_PAGES: usize = 10_000;

/// The target of `Link: <...>; rel="next"`.
pub(super) fn parse_next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(config: &str) -> Bytes {
        Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{config}","size":3}},"layers":[]}}"#
        ))
    }

    #[test]
    fn media_type_from_header_or_body() {
        let d = format!("sha256:{}", "a".repeat(64));
        let m = Manifest::from_bytes("r:t", None, image(&d)).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert!(matches!(m.parse("r:t").unwrap(), Parsed::Image { .. }));
        let m = Manifest::from_bytes(
            "r:t",
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
            image(&d),
        )
        .unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
    }

    #[test]
    fn schema1_and_junk_are_refused_by_name() {
        let s1 = Bytes::from_static(br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#);
        let err = Manifest::from_bytes("repo:old", None, s1).unwrap_err();
        assert_eq!(err.reason(), "UnsupportedSchema1");
        assert!(err.to_string().contains("repo:old"));
        let err =
            Manifest::from_bytes("repo:bad", None, Bytes::from_static(b"<html>")).unwrap_err();
        assert_eq!(err.reason(), "ManifestInvalid");
        let bad_digest = image("md5:abc");
        let m = Manifest::from_bytes("repo:t", None, bad_digest).unwrap();
        assert_eq!(m.parse("repo:t").unwrap_err().reason(), "ManifestInvalid");
    }

    #[test]
    fn platform_filter_keeps_matching_entries() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let m = Manifest::from_bytes("r:t", None, Bytes::from(index)).unwrap();
        let f = m.filter_platforms("r:t", &["linux/arm/v7".into()]).unwrap();
        assert_ne!(f.digest, m.digest);
        let Parsed::Index { manifests } = f.parse("r:t").unwrap() else {
            panic!("not an index")
        };
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0].digest, d('b'));
        let f = m
            .filter_platforms("r:t", &["linux/amd64".into(), "linux/arm".into()])
            .unwrap();
        let Parsed::Index { manifests } = f.parse("r:t").unwrap() else {
            panic!("not an index")
        };
        assert_eq!(manifests.len(), 2);
        assert_eq!(
            m.filter_platforms("r:t", &["windows/amd64".into()])
                .unwrap_err()
                .reason(),
            "NotFound"
        );
    }

    #[test]
    fn next_link() {
        assert_eq!(
            parse_next_link(r#"</v2/a/tags/list?last=x&n=2>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=x&n=2")
        );
        assert_eq!(parse_next_link(r#"</x>; rel="prev""#), None);
    }
}
