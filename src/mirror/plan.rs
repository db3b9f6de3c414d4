//! The plan: which tags and digests one `ImageMirror` copies. Pure: no IO, unit-tested.
//!
//! Selection: `names` are always taken (unless excluded); `include` globs and the `semver`
//! range select from the source's tags (a tag must match both when both are set); `exclude`
//! removes; `latest` keeps the newest N of the pattern/range-selected tags in semver order.
//! `digests` are added as pinned items.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::api::{ImageMirrorSpec, TagSelector};
use crate::registry::reference::{is_valid_digest, is_valid_tag};

/// Why a spec's selection cannot be planned. Names the field and the value at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A glob in `tags.include` or `tags.exclude` does not parse.
    #[error("spec.tags.{field}: pattern {pattern:?} is invalid: {detail}")]
    InvalidPattern {
        field: &'static str,
        pattern: String,
        detail: String,
    },
    /// `tags.semver` is not a semver range.
    #[error("spec.tags.semver: {range:?} is not a semver range: {detail}")]
    InvalidSemver { range: String, detail: String },
    /// A name in `tags.names` is not a valid tag.
    #[error("spec.tags.names: {0:?} is not a valid tag")]
    InvalidTag(String),
    /// An entry of `digests` is not `sha256:<64 hex>`.
    #[error("spec.digests: {0:?} is not a sha256 digest")]
    InvalidDigest(String),
    /// `tags.latest` is 0.
    #[error("spec.tags.latest must be at least 1")]
    InvalidLatest,
}

/// What one plan item refers to in the source.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// A tag, copied to the same tag.
    Tag(String),
    /// A pinned manifest digest, copied by digest.
    Digest(String),
}

impl Item {
    /// The tag or digest, as status names it.
    pub fn name(&self) -> &str {
        match self {
            Item::Tag(t) | Item::Digest(t) => t,
        }
    }
}

/// The items of one mirror run, in a stable order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Tags first (sorted), then digests (in spec order).
    pub items: Vec<Item>,
}

/// Whether planning needs the source's tag list (only `include` and `semver` do; a spec of
/// plain names costs no list call).
pub fn needs_tag_list(tags: &TagSelector) -> bool {
    !tags.include.is_empty() || tags.semver.is_some()
}

/// Checks the selection rules without a tag list, so a bad spec fails before any IO.
pub fn validate(spec: &ImageMirrorSpec) -> Result<(), PlanError> {
    Matcher::new(&spec.tags)?;
    for name in &spec.tags.names {
        if !is_valid_tag(name) {
            return Err(PlanError::InvalidTag(name.clone()));
        }
    }
    for d in &spec.digests {
        if !is_valid_digest(d) {
            return Err(PlanError::InvalidDigest(d.clone()));
        }
    }
    Ok(())
}

/// Builds the plan from the spec and, when [`needs_tag_list`], the source's tags.
pub fn plan(spec: &ImageMirrorSpec, source_tags: &[String]) -> Result<Plan, PlanError> {
    validate(spec)?;
    let sel = &spec.tags;
    let m = Matcher::new(sel)?;
    let mut chosen: BTreeSet<String> = sel
        .names
        .iter()
        .filter(|n| !m.excluded(n))
        .cloned()
        .collect();
    if needs_tag_list(sel) {
        let mut picked: Vec<&String> = source_tags
            .iter()
            .filter(|t| is_valid_tag(t) && !m.excluded(t))
            .filter(|t| m.include.as_ref().is_none_or(|g| g.is_match(t.as_str())))
            .filter(|t| {
                m.range
                    .as_ref()
                    .is_none_or(|r| lenient_version(t).is_some_and(|v| r.matches(&v)))
            })
            .collect();
        if let Some(n) = sel.latest {
            picked.sort_by(|a, b| version_order(a, b).reverse());
            picked.truncate(n as usize);
        }
        chosen.extend(picked.into_iter().cloned());
    }
    let mut items: Vec<Item> = chosen.into_iter().map(Item::Tag).collect();
    let mut seen = BTreeSet::new();
    for d in &spec.digests {
        if seen.insert(d) {
            items.push(Item::Digest(d.clone()));
        }
    }
    Ok(Plan { items })
}

struct Matcher {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    range: Option<semver::VersionReq>,
}

impl Matcher {
    fn new(sel: &TagSelector) -> Result<Self, PlanError> {
        if sel.latest == Some(0) {
            return Err(PlanError::InvalidLatest);
        }
        let range = match &sel.semver {
            Some(r) => {
                Some(
                    semver::VersionReq::parse(r).map_err(|e| PlanError::InvalidSemver {
                        range: r.clone(),
                        detail: e.to_string(),
                    })?,
                )
            }
            None => None,
        };
        Ok(Matcher {
            include: globs("include", &sel.include)?,
            exclude: globs("exclude", &sel.exclude)?,
            range,
        })
    }

    fn excluded(&self, tag: &str) -> bool {
        self.exclude.as_ref().is_some_and(|g| g.is_match(tag))
    }
}

fn globs(field: &'static str, patterns: &[String]) -> Result<Option<GlobSet>, PlanError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = Glob::new(p).map_err(|e| PlanError::InvalidPattern {
            field,
            pattern: p.clone(),
            detail: e.kind().to_string(),
        })?;
        b.add(glob);
    }
    b.build().map(Some).map_err(|e| PlanError::InvalidPattern {
        field,
        pattern: patterns.join(", "),
        detail: e.to_string(),
    })
}

/// Parses tags like `v1.2`, `1.2`, `1`, `1.27.2-alpine` as versions, padding missing parts.
pub fn lenient_version(tag: &str) -> Option<semver::Version> {
    let t = tag
        .strip_prefix('v')
        .or_else(|| tag.strip_prefix('V'))
        .unwrap_or(tag);
    let split = t.find(['-', '+']).unwrap_or(t.len());
    let (core, rest) = t.split_at(split);
    let parts: Vec<&str> = core.split('.').collect();
    if parts.is_empty()
        || parts.len() > 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let mut padded = parts.join(".");
    for _ in parts.len()..3 {
        padded.push_str(".0");
    }
    semver::Version::parse(&format!("{padded}{rest}")).ok()
}

/// Semver order; tags that are not versions sort before all versions, by name.
fn version_order(a: &str, b: &str) -> Ordering {
    match (lenient_version(a), lenient_version(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RepositorySpec;

    fn spec(tags: TagSelector, digests: &[&str]) -> ImageMirrorSpec {
        ImageMirrorSpec {
            source: RepositorySpec {
                repository: "a".into(),
                ..Default::default()
            },
            destination: RepositorySpec {
                repository: "b".into(),
                ..Default::default()
            },
            tags,
            digests: digests.iter().map(|s| s.to_string()).collect(),
            platforms: vec![],
            interval: "1h".into(),
            overwrite: true,
            referrers: Default::default(),
            prune: false,
            suspend: false,
        }
    }

    fn tags(items: &[Item]) -> Vec<&str> {
        items.iter().map(Item::name).collect()
    }

    fn source() -> Vec<String> {
        [
            "1.25.0",
            "1.26.1",
            "1.27.0",
            "1.27.2",
            "1.27.2-alpine",
            "1.27.3-rc1",
            "v1.28",
            "2.0.0",
            "latest",
            "stable",
            "1.27-alpine-perl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn names_need_no_tag_list_and_are_kept_even_if_absent() {
        let sel = TagSelector {
            names: vec!["stable".into(), "nope".into()],
            ..Default::default()
        };
        assert!(!needs_tag_list(&sel));
        let p = plan(&spec(sel, &[]), &[]).unwrap();
        assert_eq!(tags(&p.items), ["nope", "stable"]);
    }

    #[test]
    fn include_and_exclude_globs() {
        let sel = TagSelector {
            include: vec!["1.27.*".into()],
            exclude: vec!["*-rc*".into(), "*-alpine-perl".into()],
            ..Default::default()
        };
        let p = plan(&spec(sel, &[]), &source()).unwrap();
        assert_eq!(tags(&p.items), ["1.27.0", "1.27.2", "1.27.2-alpine"]);
    }

    #[test]
    fn semver_range_is_lenient_and_skips_non_versions() {
        let sel = TagSelector {
            semver: Some(">=1.26.0, <2".into()),
            ..Default::default()
        };
        let p = plan(&spec(sel, &[]), &source()).unwrap();
        // Pre-releases are outside a range without pre-release bounds, as in semver.
        assert_eq!(tags(&p.items), ["1.26.1", "1.27.0", "1.27.2", "v1.28"]);
    }

    #[test]
    fn latest_keeps_the_newest_after_filters_and_names_stay() {
        let sel = TagSelector {
            names: vec!["stable".into()],
            semver: Some(">=1.0.0".into()),
            latest: Some(2),
            ..Default::default()
        };
        let p = plan(&spec(sel, &[]), &source()).unwrap();
        assert_eq!(tags(&p.items), ["2.0.0", "stable", "v1.28"]);
    }

    #[test]
    fn include_and_semver_must_both_match() {
        let sel = TagSelector {
            include: vec!["1.*".into()],
            semver: Some("<1.27".into()),
            ..Default::default()
        };
        let p = plan(&spec(sel, &[]), &source()).unwrap();
        assert_eq!(tags(&p.items), ["1.25.0", "1.26.1"]);
    }

    #[test]
    fn digests_are_pinned_after_tags_once_each() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let sel = TagSelector {
            names: vec!["a".into()],
            ..Default::default()
        };
        let p = plan(&spec(sel, &[&d, &d]), &[]).unwrap();
        assert_eq!(p.items, vec![Item::Tag("a".into()), Item::Digest(d)]);
    }

    #[test]
    fn bad_rules_name_the_field_and_value() {
        let bad = |sel: TagSelector, digests: &[&str]| {
            plan(&spec(sel, digests), &[]).unwrap_err().to_string()
        };
        let e = bad(
            TagSelector {
                include: vec!["[".into()],
                ..Default::default()
            },
            &[],
        );
        assert!(
            e.contains("spec.tags.include") && e.contains("\"[\""),
            "{e}"
        );
        let e = bad(
            TagSelector {
                semver: Some(">>1".into()),
                ..Default::default()
            },
            &[],
        );
        assert!(e.contains("spec.tags.semver"), "{e}");
        let e = bad(
            TagSelector {
                names: vec!["-bad".into()],
                ..Default::default()
            },
            &[],
        );
        assert!(e.contains("-bad"), "{e}");
        let e = bad(TagSelector::default(), &["sha256:xyz"]);
        assert!(e.contains("spec.digests"), "{e}");
        let e = bad(
            TagSelector {
                latest: Some(0),
                include: vec!["*".into()],
                ..Default::default()
            },
            &[],
        );
        assert!(e.contains("latest"), "{e}");
    }

    #[test]
    fn lenient_versions() {
        assert_eq!(lenient_version("v1.2").unwrap().to_string(), "1.2.0");
        assert_eq!(lenient_version("1").unwrap().to_string(), "1.0.0");
        assert_eq!(
            lenient_version("1.27.2-alpine").unwrap().to_string(),
            "1.27.2-alpine"
        );
        assert!(lenient_version("latest").is_none());
        assert!(lenient_version("1.2.3.4").is_none());
        assert_eq!(version_order("1.10", "1.9"), Ordering::Greater);
        assert_eq!(version_order("latest", "0.0.1"), Ordering::Less);
    }
}
