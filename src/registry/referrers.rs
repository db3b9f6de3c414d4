//! OCI 1.1 referrers: the referrers API (`GET /v2/<name>/referrers/<digest>`), the referrers
//! tag schema's tag name, and manifest PUTs that report `OCI-Subject`.

use reqwest::header::{ACCEPT, HeaderMap};
use serde::Deserialize;

use super::RegistryClient;
use super::error::{RegistryError, Result};
use super::manifest::{MAX_MANIFEST_SIZE, Manifest, OCI_INDEX, parse_next_link};
use super::reference::is_valid_digest;
use super::transport::{Access, Capped, check, read_capped};

/// The header a registry answers a manifest PUT with when it indexed the manifest's `subject`.
pub const OCI_SUBJECT: &str = "oci-subject";
/// The header naming the filters a registry applied to a referrers answer.
pub const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";
/// Pages of a referrers answer read at most: a registry whose `Link` never ends must not keep
/// us forever.
const MAX_PAGES: usize = 16;
/// Entries of one subject's referrers list accepted at most, over all pages.
pub const MAX_REFERRERS: usize = 4096;

/// One referrer, as a registry listed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Referrer {
    /// Media type of the referrer's manifest.
    pub media_type: String,
    /// `sha256:<hex>` of the referrer's manifest.
    pub digest: String,
    /// Size of the referrer's manifest.
    pub size: u64,
    /// Its artifact type, when listed.
    pub artifact_type: Option<String>,
    /// The descriptor exactly as listed (annotations and all), for fallback indexes.
    pub raw: serde_json::Value,
}

/// The referrers of one subject.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReferrerList {
    /// The referrers.
    pub referrers: Vec<Referrer>,
    /// True when the registry applied the `artifactType` filter (`OCI-Filters-Applied`).
    pub filtered: bool,
}

/// The referrers tag schema's tag for `digest`: `sha256:<hex>` → `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> Option<String> {
    is_valid_digest(digest).then(|| digest.replacen(':', "-", 1))
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    manifests: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    artifact_type: Option<String>,
}

/// The entries of an index listing referrers (a referrers API answer or a fallback tag's
/// index). An entry that is not a descriptor with a sha256 digest makes the whole list invalid:
/// it is a registry's answer, and half-reading it would hide referrers.
pub fn parse_referrers_index(what: &str, bytes: &[u8]) -> Result<Vec<Referrer>> {
    let invalid = |detail: String| RegistryError::ManifestInvalid {
        what: what.to_string(),
        detail,
    };
    let raw: RawIndex =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a JSON index: {e}")))?;
    let entries = raw.manifests.unwrap_or_default();
    if entries.len() > MAX_REFERRERS {
        return Err(invalid(format!(
            "lists {} referrers, more than {MAX_REFERRERS}",
            entries.len()
        )));
    }
    entries
        .into_iter()
        .map(|value| {
            let d: RawDescriptor = serde_json::from_value(value.clone())
                .map_err(|e| invalid(format!("referrer entry is not a descriptor: {e}")))?;
            if !is_valid_digest(&d.digest) {
                return Err(invalid(format!(
                    "referrer digest {:?} is not a sha256 digest",
                    d.digest
                )));
            }
            Ok(Referrer {
                media_type: d.media_type,
                digest: d.digest,
                size: d.size,
                artifact_type: d.artifact_type.filter(|t| !t.is_empty()),
                raw: value,
            })
        })
        .collect()
}

fn header_has(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl RegistryClient {
    /// The referrers of `digest` in `repo` by the OCI 1.1 referrers API, asking the registry to
    /// filter by `artifact_type` when given. `None` when the registry does not serve the API
    /// (it answers 404 there, as the distribution spec says).
    pub async fn referrers(
        &self,
        repo: &str,
        digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Option<ReferrerList>> {
        let what = format!("{}/{repo} (referrers of {digest})", self.t.host);
        if !is_valid_digest(digest) {
            return Err(RegistryError::ManifestInvalid {
                what,
                detail: "the subject is not a sha256 digest".into(),
            });
        }
        let mut next = Some(self.t.url(&format!("/v2/{repo}/referrers/{digest}")));
        let mut out = ReferrerList {
            referrers: Vec::new(),
            filtered: true,
        };
        for page in 0..MAX_PAGES {
            let Some(url) = next.take() else { break };
            let resp = self
                .t
                .send(&what, &Access::Pull(repo.into()), || {
                    let req = self.t.http.get(&url).header(ACCEPT, OCI_INDEX);
                    match (page, artifact_type) {
                        (0, Some(t)) => req.query(&[("artifactType", t)]),
                        _ => req,
                    }
                })
                .await?;
            let resp = match check(&what, resp).await {
                Ok(r) => r,
                Err(RegistryError::NotFound { .. }) if page == 0 => return Ok(None),
                Err(e) => return Err(e),
            };
            out.filtered &= header_has(resp.headers(), OCI_FILTERS_APPLIED, "artifactType");
            // A `Link` to another origin is refused by `resolve`: credentials stay home.
            next = match resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_next_link)
            {
                Some(link) => Some(self.t.resolve(&what, &link)?),
                None => None,
            };
            let body = match read_capped(resp, MAX_MANIFEST_SIZE as usize).await {
                Ok(Capped::Whole(b)) => b,
                Ok(Capped::Cut(b)) => {
                    return Err(RegistryError::ManifestTooLarge {
                        what,
                        size: b.len() as u64,
                        limit: MAX_MANIFEST_SIZE,
                    });
                }
                Err(e) => return Err(RegistryError::transport(&what, &e)),
            };
            out.referrers.extend(parse_referrers_index(&what, &body)?);
            if out.referrers.len() > MAX_REFERRERS {
                return Err(RegistryError::ManifestInvalid {
                    what,
                    detail: format!("lists more than {MAX_REFERRERS} referrers"),
                });
            }
        }
        out.filtered &= artifact_type.is_some();
        Ok(Some(out))
    }

    /// PUT a manifest that names a `subject`; true when the registry answered `OCI-Subject`,
    /// i.e. it indexed the subject and serves the referrers API (no fallback tag needed).
    pub async fn put_manifest_with_subject(
        &self,
        repo: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<bool> {
        let headers = self.send_manifest(repo, reference, manifest).await?;
        Ok(headers.contains_key(OCI_SUBJECT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn fallback_tags() {
        assert_eq!(
            fallback_tag(&d('a')).as_deref(),
            Some(format!("sha256-{}", "a".repeat(64)).as_str())
        );
        assert_eq!(fallback_tag("sha256:abc"), None);
        assert_eq!(fallback_tag("latest"), None);
    }

    #[test]
    fn referrers_index_entries_keep_their_annotations() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":10,"artifactType":"application/spdx+json","annotations":{{"x":"y"}}}},{{"mediaType":"m","digest":"{}","size":2}}]}}"#,
            d('a'),
            d('b')
        );
        let list = parse_referrers_index("r", doc.as_bytes()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0].artifact_type.as_deref(),
            Some("application/spdx+json")
        );
        assert_eq!(list[0].raw["annotations"]["x"], "y");
        assert_eq!(list[1].artifact_type, None);
        // No manifests at all is an empty list, not an error.
        assert!(parse_referrers_index("r", b"{}").unwrap().is_empty());
    }

    #[test]
    fn bad_referrers_lists_are_refused() {
        let bad_digest = r#"{"manifests":[{"mediaType":"m","digest":"sha256:zz","size":1}]}"#;
        let no_size = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d('a'));
        for doc in [bad_digest, no_size.as_str(), "[", "{\"manifests\":3}"] {
            let e = parse_referrers_index("reg/repo (referrers)", doc.as_bytes()).unwrap_err();
            assert_eq!(e.reason(), "ManifestInvalid", "{doc}");
            assert!(e.to_string().contains("reg/repo"), "{e}");
        }
    }

    #[test]
    fn filters_applied_header() {
        let mut h = HeaderMap::new();
        h.insert(OCI_FILTERS_APPLIED, "foo, artifactType".parse().unwrap());
        assert!(header_has(&h, OCI_FILTERS_APPLIED, "artifactType"));
        assert!(!header_has(
            &HeaderMap::new(),
            OCI_FILTERS_APPLIED,
            "artifactType"
        ));
    }
}
