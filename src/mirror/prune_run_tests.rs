//! `prune` against an in-memory registry that can delete tags (distribution 2.x, tested for
//! real in tests/it/prune.rs, cannot), deletes only by digest, or refuses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::*;
use crate::registry::manifest::OCI_MANIFEST;
use crate::registry::{
    BlobStream, Manifest, ManifestHead, Mount, MountOutcome, Registry, Result, TagList,
};
use crate::transfer::EngineConfig;

/// Tags → digests of one repository, and how it deletes.
struct Fake {
    tags: Mutex<BTreeMap<String, String>>,
    /// `DELETE .../manifests/<tag>` untags (distribution-spec 1.1).
    tag_deletes: bool,
    /// Any deletes at all.
    deletes: bool,
}

fn d(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn refused(detail: &str) -> RegistryError {
    RegistryError::Status {
        what: "fake".into(),
        status: if detail.starts_with("UNSUPPORTED") {
            405
        } else {
            400
        },
        detail: detail.into(),
        retry_after: None,
    }
}

fn unused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T>> {
    async {
        Err(RegistryError::Config {
            what: "fake".into(),
            detail: "not used by pruning".into(),
        })
    }
    .boxed()
}

impl Fake {
    fn new(tags: &[(&str, String)], tag_deletes: bool, deletes: bool) -> Arc<Self> {
        Arc::new(Fake {
            tags: Mutex::new(
                tags.iter()
                    .map(|(t, d)| (t.to_string(), d.clone()))
                    .collect(),
            ),
            tag_deletes,
            deletes,
        })
    }

    fn tags(&self) -> Vec<String> {
        self.tags.lock().unwrap().keys().cloned().collect()
    }

    fn delete(&self, reference: &str) -> Result<()> {
        if !self.deletes {
            return Err(refused("UNSUPPORTED The operation is unsupported."));
        }
        let mut tags = self.tags.lock().unwrap();
        if reference.starts_with("sha256:") {
            let before = tags.len();
            tags.retain(|_, d| d != reference);
            return if tags.len() < before {
                Ok(())
            } else {
                Err(RegistryError::NotFound {
                    what: reference.into(),
                })
            };
        }
        if !self.tag_deletes {
            return Err(refused("DIGEST_INVALID provided digest did not match"));
        }
        tags.remove(reference)
            .map(|_| ())
            .ok_or(RegistryError::NotFound {
                what: reference.into(),
            })
    }
}

impl Registry for Fake {
    fn host(&self) -> &str {
        "fake.example:5000"
    }
    fn head_manifest<'a>(
        &'a self,
        _: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        let digest = self.tags.lock().unwrap().get(reference).cloned();
        async move {
            Ok(digest.map(|d| ManifestHead {
                digest: Some(d),
                media_type: Some(OCI_MANIFEST.into()),
            }))
        }
        .boxed()
    }
    fn get_manifest<'a>(&'a self, _: &'a str, r: &'a str) -> BoxFuture<'a, Result<Manifest>> {
        // Only fallback indexes are asked for; none exist here.
        async move { Err(RegistryError::NotFound { what: r.into() }) }.boxed()
    }
    fn put_manifest<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        unused()
    }
    fn list_tags<'a>(&'a self, _: &'a str, _: usize) -> BoxFuture<'a, Result<TagList>> {
        let tags = self.tags();
        async move {
            Ok(TagList {
                tags,
                complete: true,
            })
        }
        .boxed()
    }
    fn blob_size<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Option<u64>>> {
        unused()
    }
    fn get_blob<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: u64,
        _: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        unused()
    }
    fn begin_upload<'a>(
        self: Arc<Self>,
        _: &'a str,
        _: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        unused()
    }
    fn delete_manifest<'a>(&'a self, _: &'a str, reference: &'a str) -> BoxFuture<'a, Result<()>> {
        let r = self.delete(reference);
        async move { r }.boxed()
    }
}

fn endpoint(fake: &Arc<Fake>) -> Endpoint {
    Endpoint {
        registry: fake.clone(),
        repo: crate::registry::Repository::parse("fake.example:5000/app").unwrap(),
    }
}

fn candidate(tag: &str, digest: String) -> Candidate {
    Candidate {
        tag: tag.into(),
        digest,
    }
}

async fn run(fake: &Arc<Fake>, candidates: &[Candidate], dry_run: bool) -> PruneOutcome {
    let engine = Engine::new(EngineConfig::default());
    prune(
        &engine,
        &endpoint(fake),
        candidates,
        &BTreeSet::new(),
        None,
        dry_run,
    )
    .await
}

#[tokio::test]
async fn a_registry_that_deletes_tags_untags_even_a_shared_digest() {
    let fake = Fake::new(&[("a", d(1)), ("b", d(1)), ("old", d(2))], true, true);
    let out = run(
        &fake,
        &[candidate("b", d(1)), candidate("old", d(2))],
        false,
    )
    .await;
    assert_eq!(out.pruned, ["b", "old"]);
    assert!(out.retained.is_empty() && out.warning.is_none(), "{out:?}");
    assert_eq!(fake.tags(), ["a"]);
}

#[tokio::test]
async fn a_digest_only_registry_keeps_a_shared_digest() {
    let fake = Fake::new(&[("a", d(1)), ("b", d(1)), ("old", d(2))], false, true);
    let out = run(
        &fake,
        &[candidate("b", d(1)), candidate("old", d(2))],
        false,
    )
    .await;
    assert_eq!(out.pruned, ["old"]);
    assert_eq!(out.retained.len(), 1);
    assert_eq!(out.retained[0].tag, "b");
    assert_eq!(out.retained[0].reason, RetainReason::DigestShared);
    assert!(out.retained[0].message.contains("tag a"), "{out:?}");
    assert_eq!(fake.tags(), ["a", "b"]);
}

#[tokio::test]
async fn a_registry_refusing_deletes_is_a_warning() {
    let fake = Fake::new(&[("a", d(1)), ("old", d(2))], false, false);
    let out = run(&fake, &[candidate("old", d(2))], false).await;
    assert!(out.pruned.is_empty());
    assert_eq!(out.retained[0].reason, RetainReason::DeleteRefused);
    assert!(
        out.warning.as_deref().unwrap().contains("refuses deletes"),
        "{out:?}"
    );
    assert_eq!(
        out.forgotten().count(),
        0,
        "kept in the record for the next try"
    );
    assert_eq!(fake.tags(), ["a", "old"]);
}

#[tokio::test]
async fn moved_and_gone_tags_are_forgotten_and_never_deleted() {
    let fake = Fake::new(&[("moved", d(3))], true, true);
    let out = run(
        &fake,
        &[candidate("moved", d(1)), candidate("gone", d(2))],
        false,
    )
    .await;
    assert!(out.pruned.is_empty());
    assert_eq!(out.gone, ["gone"]);
    assert_eq!(out.retained[0].reason, RetainReason::ChangedElsewhere);
    let forgotten: Vec<&String> = out.forgotten().collect();
    assert_eq!(forgotten, ["gone", "moved"]);
    assert_eq!(fake.tags(), ["moved"]);
}

#[tokio::test]
async fn a_dry_run_decides_the_same_and_deletes_nothing() {
    for tag_deletes in [true, false] {
        let fake = Fake::new(
            &[("a", d(1)), ("b", d(1)), ("old", d(2))],
            tag_deletes,
            true,
        );
        let candidates = [candidate("b", d(1)), candidate("old", d(2))];
        let dry = run(&fake, &candidates, true).await;
        assert_eq!(fake.tags(), ["a", "b", "old"]);
        let real = run(&fake, &candidates, false).await;
        assert_eq!(dry, real, "tag deletes: {tag_deletes}");
    }
}

#[tokio::test]
async fn referrers_go_only_with_an_unused_digest_and_only_when_copied() {
    let tag = |digest: &str, suffix: &str| format!("sha256-{}{suffix}", &digest[7..]);
    let (sig1, sig2, att2) = (tag(&d(1), ".sig"), tag(&d(2), ".sig"), tag(&d(2), ".att"));
    let source = Fake::new(&[(&sig1, d(5)), (&sig2, d(6)), (&att2, d(8))], true, true);
    // `a` keeps d(1) and so its signature; the attestation of d(2) is not the source's.
    let fake = Fake::new(
        &[
            ("a", d(1)),
            ("b", d(1)),
            ("old", d(2)),
            (&sig1, d(5)),
            (&sig2, d(6)),
            (&att2, d(7)),
        ],
        true,
        true,
    );
    let engine = Engine::new(EngineConfig::default());
    let options = crate::mirror::ReferrersOptions::default();
    let src = endpoint(&source);
    let scope = ReferrerScope {
        source: &src,
        options: &options,
    };
    let candidates = [candidate("b", d(1)), candidate("old", d(2))];
    let (dst, none) = (endpoint(&fake), BTreeSet::new());
    let prune = |dry_run| prune(&engine, &dst, &candidates, &none, Some(&scope), dry_run);
    let dry = prune(true).await;
    assert_eq!(fake.tags().len(), 6, "a dry run deletes nothing");
    let out = prune(false).await;
    assert_eq!(dry, out);
    assert_eq!(out.pruned, ["b", "old"]);
    assert_eq!(out.referrers_pruned, [format!("old: cosign tag {sig2}")]);
    assert!(
        out.referrers_kept
            .iter()
            .any(|k| k.contains("tag a still uses")),
        "{out:?}"
    );
    assert!(
        out.referrers_kept
            .iter()
            .any(|k| k.contains(&att2) && k.contains("not copied")),
        "{out:?}"
    );
    let mut left = vec!["a".to_string(), att2, sig1];
    left.sort();
    assert_eq!(fake.tags(), left);
}
