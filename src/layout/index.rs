//! `index.json` of a layout: the tags (`org.opencontainers.image.ref.name` annotations) and
//! what they point at. Entries and fields this crate does not know are kept as they are.

use serde_json::{Map, Value, json};

use super::REF_NAME;
use crate::registry::RegistryError;
use crate::registry::manifest::OCI_INDEX;
use crate::registry::reference::is_valid_tag;

/// `index.json` files larger than this are refused (it lists tags, not content).
pub const MAX_INDEX_SIZE: u64 = 64 * 1024 * 1024;

/// The `oci-layout` file's content.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// What a tag points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The manifest's digest.
    pub digest: String,
    /// Its media type, from the descriptor.
    pub media_type: Option<String>,
}

/// A parsed `index.json`.
#[derive(Clone, Debug)]
pub struct Index {
    doc: Map<String, Value>,
}

impl Default for Index {
    fn default() -> Self {
        let doc = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []});
        match doc {
            Value::Object(doc) => Index { doc },
            _ => unreachable!("a JSON object literal"),
        }
    }
}

/// The ref name of a tag under `prefix` (`""`: the tag itself, as skopeo writes it).
pub fn ref_name(prefix: &str, tag: &str) -> String {
    if prefix.is_empty() {
        tag.to_string()
    } else {
        format!("{prefix}:{tag}")
    }
}

impl Index {
    /// Parses `index.json` bytes; `what` names the file for errors.
    pub fn parse(what: &str, bytes: &[u8]) -> Result<Self, RegistryError> {
        let invalid = |detail: String| RegistryError::ManifestInvalid {
            what: what.to_string(),
            detail,
        };
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let Value::Object(doc) = doc else {
            return Err(invalid("not a JSON object".into()));
        };
        if !doc.get("manifests").is_none_or(Value::is_array) {
            return Err(invalid("manifests is not a list".into()));
        }
        Ok(Index { doc })
    }

    /// The document, pretty enough for humans to read.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.doc).unwrap_or_default()
    }

    fn entries(&self) -> impl Iterator<Item = &Value> {
        self.doc
            .get("manifests")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    }

    fn name_of(entry: &Value) -> Option<&str> {
        entry.get("annotations")?.get(REF_NAME)?.as_str()
    }

    /// What `name` (a full ref name) points at; the last entry wins, as in skopeo.
    pub fn find(&self, name: &str) -> Option<Target> {
        let entry = self
            .entries()
            .filter(|e| Self::name_of(e) == Some(name))
            .last()?;
        Some(Target {
            digest: entry.get("digest")?.as_str()?.to_string(),
            media_type: entry
                .get("mediaType")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The tags under `prefix`: ref names `<prefix>:<tag>` (or plain tags for `""`).
    pub fn tags(&self, prefix: &str) -> Vec<String> {
        let mut tags: Vec<String> = self
            .entries()
            .filter_map(Self::name_of)
            .filter_map(|name| {
                if prefix.is_empty() {
                    Some(name)
                } else {
                    name.strip_prefix(prefix)?.strip_prefix(':')
                }
            })
            .filter(|t| is_valid_tag(t))
            .map(str::to_string)
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }

    /// Points `name` at a manifest, replacing entries of the same name (skopeo does the same).
    pub fn set(&mut self, name: &str, media_type: &str, digest: &str, size: u64) {
        let entry = json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {REF_NAME: name},
        });
        let list = self
            .doc
            .entry("manifests")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = list {
            list.retain(|e| Self::name_of(e) != Some(name));
            list.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_ref_names_under_a_prefix() {
        let mut i = Index::default();
        i.set("v1", OCI_INDEX, "sha256:a", 1);
        i.set("app:v2", OCI_INDEX, "sha256:b", 2);
        i.set("app/x:v3", OCI_INDEX, "sha256:c", 3);
        assert_eq!(i.tags(""), ["v1"]);
        assert_eq!(i.tags("app"), ["v2"]);
        assert_eq!(i.tags("app/x"), ["v3"]);
        assert_eq!(i.find("app:v2").unwrap().digest, "sha256:b");
        i.set("app:v2", OCI_INDEX, "sha256:d", 4);
        assert_eq!(i.find("app:v2").unwrap().digest, "sha256:d");
        assert_eq!(i.tags("app"), ["v2"]);
        let again = Index::parse("index.json", &i.to_bytes()).unwrap();
        assert_eq!(again.find("v1").unwrap().digest, "sha256:a");
        assert_eq!(ref_name("", "v1"), "v1");
        assert_eq!(ref_name("a/b", "v1"), "a/b:v1");
    }

    #[test]
    fn unknown_fields_and_untagged_entries_survive() {
        let text = br#"{"schemaVersion":2,"x":1,"manifests":[{"mediaType":"m","digest":"sha256:z","size":1}]}"#;
        let mut i = Index::parse("index.json", text).unwrap();
        i.set("v1", OCI_INDEX, "sha256:a", 1);
        let v: Value = serde_json::from_slice(&i.to_bytes()).unwrap();
        assert_eq!(v["x"], 1);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
        for bad in [&b"[]"[..], b"{\"manifests\":3}", b"nope"] {
            assert_eq!(
                Index::parse("index.json", bad).unwrap_err().reason(),
                "ManifestInvalid"
            );
        }
    }
}
