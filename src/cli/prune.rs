//! `mirror --prune`: which mirrors are pruned, their records in state files, and what a dry
//! run resolves at the source to say exactly what the next run deletes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use futures_util::StreamExt;

use super::state::{StateFile, default_path};
use super::{CliError, MirrorOptions};
use crate::api::ImageMirror;
use crate::mirror::{
    Endpoint, Item, ItemOutcome, ItemResult, MirrorError, PruneRecord, SyncReport,
};
use crate::registry::RegistryError;
use crate::transfer::Engine;

/// HEADs at once while a dry run resolves the selection.
const RESOLVE_CONCURRENCY: usize = 8;

/// `namespace/name` of a mirror: the key of its record.
pub fn key(m: &ImageMirror) -> String {
    format!(
        "{}/{}",
        m.metadata.namespace.as_deref().unwrap_or("default"),
        m.metadata.name.as_deref().unwrap_or("(unnamed)")
    )
}

/// The state files of one run, and which mirror's record lives in which.
pub struct States {
    files: Vec<StateFile>,
    /// Mirror key → index into `files`, for pruned mirrors only.
    of: HashMap<String, usize>,
}

impl States {
    /// Loads the state file of every pruned mirror (`--prune`, or its `spec.prune`).
    pub fn load(
        opts: &MirrorOptions,
        mirrors: &[(ImageMirror, &PathBuf)],
    ) -> Result<Self, CliError> {
        let mut by_path: BTreeMap<PathBuf, usize> = BTreeMap::new();
        let mut states = States {
            files: Vec::new(),
            of: HashMap::new(),
        };
        for (m, file) in mirrors {
            if !(opts.prune || m.spec.prune) {
                continue;
            }
            let path = opts.state.clone().unwrap_or_else(|| default_path(file));
            let index = match by_path.get(&path) {
                Some(i) => *i,
                None => {
                    states.files.push(StateFile::load(&path)?);
                    by_path.insert(path, states.files.len() - 1);
                    states.files.len() - 1
                }
            };
            let k = key(m);
            if states.of.insert(k.clone(), index).is_some() {
                return Err(CliError::DuplicateName(k));
            }
        }
        Ok(states)
    }

    /// The record of mirror `key`, or `None` when it is not pruned.
    pub fn record(&self, key: &str) -> Option<PruneRecord> {
        self.of.get(key).map(|i| self.files[*i].record(key))
    }

    /// Replaces the record of a pruned mirror.
    pub fn set(&mut self, key: &str, record: PruneRecord) {
        if let Some(i) = self.of.get(key) {
            self.files[*i].set(key, record);
        }
    }

    /// Writes every state file in use.
    pub fn save(&self) -> Result<(), CliError> {
        self.files.iter().try_for_each(StateFile::save)
    }
}

/// What a run would find at the source for `items`, as a report: a tag the source lacks (or
/// that cannot be asked for) fails, as it would in the run, and a failed item prunes nothing.
pub async fn resolve(engine: &Engine, source: &Endpoint, items: &[Item]) -> SyncReport {
    let registry = engine.rate_limited(source.registry.clone());
    let retry = &engine.config().retry;
    let repo = source.repo.path();
    let resolved: Vec<(usize, ItemResult)> = futures_util::stream::iter(items.iter().enumerate())
        .map(|(i, item)| {
            let registry = registry.clone();
            async move {
                let head = retry
                    .run(|_| registry.head_manifest(repo, item.name()), |_, _, _| {})
                    .await;
                let mut r = ItemResult {
                    item: item.clone(),
                    source_digest: None,
                    destination_digest: None,
                    result: Ok(ItemOutcome::UpToDate),
                    referrers: None,
                };
                match head {
                    Ok(Some(h)) => r.source_digest = h.digest,
                    Ok(None) => {
                        r.result = Err(MirrorError::Registry(RegistryError::NotFound {
                            what: format!("{}:{}", source.repo, item.name()),
                        }))
                    }
                    Err(e) => r.result = Err(MirrorError::Registry(e)),
                }
                (i, r)
            }
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    let mut resolved = resolved;
    resolved.sort_by_key(|(i, _)| *i);
    SyncReport {
        items: resolved.into_iter().map(|(_, r)| r).collect(),
        progress: Default::default(),
    }
}
