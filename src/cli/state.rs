//! The CLI's prune state: per ImageMirror (`namespace/name`), the record of the tags it wrote,
//! kept in a JSON file beside the YAML (`mirrors.yaml` → `mirrors.prune-state.json`) or at
//! `--state FILE`. Written atomically (temporary file, then rename) after the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CliError;
use crate::mirror::PruneRecord;
use crate::mirror::prune::RECORD_MAX_BYTES;

/// Version of the file format.
const VERSION: u32 = 1;
/// A state file larger than this is refused rather than read: 64 KiB records for 1000 mirrors.
const MAX_FILE_BYTES: u64 = 1000 * RECORD_MAX_BYTES as u64;

/// The state file next to `yaml`: its name with the extension replaced by `.prune-state.json`.
pub fn default_path(yaml: &Path) -> PathBuf {
    let stem = yaml
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "imagemirror".into());
    yaml.with_file_name(format!("{stem}.prune-state.json"))
}

#[derive(Serialize, Deserialize, Default)]
struct FileFormat {
    version: u32,
    #[serde(default)]
    mirrors: BTreeMap<String, PruneRecord>,
}

/// One state file, loaded.
pub struct StateFile {
    path: PathBuf,
    mirrors: BTreeMap<String, PruneRecord>,
}

impl StateFile {
    /// Reads `path`; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let err = |detail: String| CliError::State {
            path: path.display().to_string(),
            detail,
        };
        let mirrors = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(e.to_string())),
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                return Err(err(format!(
                    "{} bytes, over the {MAX_FILE_BYTES} byte limit",
                    m.len()
                )));
            }
            Ok(_) => {
                let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
                let f: FileFormat = serde_json::from_str(&text)
                    .map_err(|e| err(format!("not a prune state file: {e}")))?;
                if f.version != VERSION {
                    return Err(err(format!(
                        "version {} is not the supported {VERSION}",
                        f.version
                    )));
                }
                // Re-check each record as the controller does its annotation.
                let mut mirrors = BTreeMap::new();
                for (k, r) in f.mirrors {
                    let r = PruneRecord::from_json(&serde_json::to_string(&r).unwrap_or_default())
                        .map_err(|e| err(format!("mirror {k}: {e}")))?;
                    mirrors.insert(k, r);
                }
                mirrors
            }
        };
        Ok(StateFile {
            path: path.to_path_buf(),
            mirrors,
        })
    }

    /// The record of mirror `key`, empty when there is none.
    pub fn record(&self, key: &str) -> PruneRecord {
        self.mirrors.get(key).cloned().unwrap_or_default()
    }

    /// Replaces the record of mirror `key`.
    pub fn set(&mut self, key: &str, record: PruneRecord) {
        self.mirrors.insert(key.to_string(), record);
    }

    /// Writes the file: a temporary file beside it, then a rename, so a crash leaves the old
    /// state or the new one, never half of one.
    pub fn save(&self) -> Result<(), CliError> {
        let err = |detail: String| CliError::State {
            path: self.path.display().to_string(),
            detail,
        };
        let body = FileFormat {
            version: VERSION,
            mirrors: self.mirrors.clone(),
        };
        let text = serde_json::to_string_pretty(&body).map_err(|e| err(e.to_string()))? + "\n";
        let tmp = self
            .path
            .with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beside_the_yaml() {
        assert_eq!(
            default_path(Path::new("/x/mirrors.yaml")),
            Path::new("/x/mirrors.prune-state.json")
        );
        assert_eq!(
            default_path(Path::new("m")),
            Path::new("m.prune-state.json")
        );
    }

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut s = StateFile::load(&path).unwrap();
        assert_eq!(s.record("ns/a"), PruneRecord::default());
        let mut r = PruneRecord::new("reg/app");
        r.tags
            .insert("1.0".into(), format!("sha256:{}", "ab".repeat(32)));
        s.set("ns/a", r.clone());
        s.save().unwrap();
        assert_eq!(StateFile::load(&path).unwrap().record("ns/a"), r);
        std::fs::write(&path, "{").unwrap();
        let e = StateFile::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("s.json") && e.contains("not a prune state file"),
            "{e}"
        );
        std::fs::write(&path, r#"{"version":7}"#).unwrap();
        let e = StateFile::load(&path).err().unwrap().to_string();
        assert!(e.contains("version 7"), "{e}");
    }
}
