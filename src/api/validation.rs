//! The spec's rules, once: the limits and CEL rule texts the CRD is generated with, and
//! [`validate_spec`], which checks the same rules in Rust for the CLI and the controller.
//!
//! The API server enforces the CRD; the CLI never meets an API server, and the controller may
//! meet objects admitted by an older CRD, so both run [`validate_spec`]. `tests/it/validation.rs`
//! runs one table of specs through this function and through the generated CRD (its schema and
//! its CEL rules, evaluated by a CEL interpreter) and requires the same verdict.
//!
//! Every number here comes from a user: nothing in this file can panic or overflow.

use std::time::Duration;

use super::{ImageMirrorSpec, RepositorySpec};
use crate::registry::reference::{is_valid_digest, is_valid_tag};

/// Bounds on the spec, used by the CRD's schema attributes and by [`validate_spec`].
pub mod limits {
    /// Longest `repository` (a registry host of up to 253 characters plus a port, and a path
    /// of up to 255).
    pub const REPOSITORY: usize = 512;
    /// Longest Secret name (a DNS subdomain).
    pub const SECRET_NAME: usize = 253;
    /// Longest tag (the OCI distribution spec's limit).
    pub const TAG: usize = 128;
    /// Most entries in `tags.names`.
    pub const TAG_NAMES: usize = 1000;
    /// Longest glob in `tags.include` / `tags.exclude`.
    pub const PATTERN: usize = 256;
    /// Most entries in `tags.include` or `tags.exclude`.
    pub const PATTERNS: usize = 100;
    /// Longest `tags.semver` range.
    pub const SEMVER: usize = 256;
    /// Largest `tags.latest`.
    pub const LATEST: u32 = 10_000;
    /// Most entries in `digests`.
    pub const DIGESTS: usize = 1000;
    /// Most entries in `platforms`.
    pub const PLATFORMS: usize = 64;
    /// Longest platform (`os/arch/variant`).
    pub const PLATFORM: usize = 64;
    /// Longest `interval` text.
    pub const INTERVAL: usize = 32;
    /// Most entries in `referrers.artifactTypes`.
    pub const ARTIFACT_TYPES: usize = 32;
    /// Longest media type in `referrers.artifactTypes`.
    pub const ARTIFACT_TYPE: usize = 255;
}

/// Shortest `interval`: a resync is a HEAD per tag on each side; more often than this loads
/// registries (and Docker Hub's limits) for nothing.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Longest `interval`: one year (8760h).
pub const MAX_INTERVAL: Duration = Duration::from_secs(8760 * 3600);

/// Pattern of `interval`: Go durations with the units `ms`, `s`, `m`, `h`.
pub const INTERVAL_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
/// CEL rule on `interval`. The API server's `duration()` parses Go durations; one too large to
/// parse fails the rule too.
pub const INTERVAL_RULE: &str =
    "duration(self) >= duration('30s') && duration(self) <= duration('8760h')";
/// Message of [`INTERVAL_RULE`].
pub const INTERVAL_MESSAGE: &str = "interval must be between 30s and 8760h";
/// CEL rule on the spec: something must be selected.
pub const SELECTOR_RULE: &str = "(has(self.tags) && ((has(self.tags.names) && size(self.tags.names) > 0) || (has(self.tags.include) && size(self.tags.include) > 0) || has(self.tags.semver))) || (has(self.digests) && size(self.digests) > 0)";
/// Message of [`SELECTOR_RULE`].
pub const SELECTOR_MESSAGE: &str = "at least one of spec.tags.names, spec.tags.include, spec.tags.semver or spec.digests is required";
/// Pattern of a tag (OCI distribution spec).
pub const TAG_PATTERN: &str = r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$";
/// Pattern of a pinned digest.
pub const DIGEST_PATTERN: &str = r"^sha256:[a-f0-9]{64}$";
/// Pattern of a platform: `os/arch` or `os/arch/variant`.
pub const PLATFORM_PATTERN: &str = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9.]+)?$";
/// Pattern of a Secret name (a DNS-1123 subdomain).
pub const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A spec field that breaks a rule of the CRD.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct FieldError {
    /// The field's path, like `spec.tags.names[2]`.
    pub field: String,
    /// What is wrong, quoting the value.
    pub detail: String,
}

fn fail<T>(field: impl Into<String>, detail: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        detail: detail.into(),
    })
}

/// Checks every rule the CRD states (schema and CEL), naming the first field at fault.
pub fn validate_spec(spec: &ImageMirrorSpec) -> Result<(), FieldError> {
    repository("spec.source", &spec.source)?;
    repository("spec.destination", &spec.destination)?;
    let t = &spec.tags;
    list("spec.tags.names", &t.names, limits::TAG_NAMES, |f, s| {
        check(f, s, limits::TAG, is_valid_tag, TAG_PATTERN)
    })?;
    for (field, globs) in [
        ("spec.tags.include", &t.include),
        ("spec.tags.exclude", &t.exclude),
    ] {
        list(field, globs, limits::PATTERNS, |f, s| {
            if s.is_empty() {
                return fail(f, "must not be empty");
            }
            max_len(f, s, limits::PATTERN)
        })?;
    }
    if let Some(range) = &t.semver {
        max_len("spec.tags.semver", range, limits::SEMVER)?;
    }
    if let Some(n) = t.latest
        && !(1..=limits::LATEST).contains(&n)
    {
        return fail(
            "spec.tags.latest",
            format!("{n} is not between 1 and {}", limits::LATEST),
        );
    }
    list("spec.digests", &spec.digests, limits::DIGESTS, |f, s| {
        check(f, s, usize::MAX, is_valid_digest, DIGEST_PATTERN)
    })?;
    list(
        "spec.platforms",
        &spec.platforms,
        limits::PLATFORMS,
        |f, s| check(f, s, limits::PLATFORM, is_platform, PLATFORM_PATTERN),
    )?;
    list(
        "spec.referrers.artifactTypes",
        &spec.referrers.artifact_types,
        limits::ARTIFACT_TYPES,
        |f, s| {
            if s.is_empty() {
                return fail(f, "must not be empty");
            }
            max_len(f, s, limits::ARTIFACT_TYPE)
        },
    )?;
    interval(&spec.interval)?;
    let selected = !t.names.is_empty()
        || !t.include.is_empty()
        || t.semver.is_some()
        || !spec.digests.is_empty();
    if !selected {
        return fail("spec.tags", SELECTOR_MESSAGE);
    }
    Ok(())
}

/// Parses and bounds `interval` as [`INTERVAL_PATTERN`] and [`INTERVAL_RULE`] do.
pub fn interval(text: &str) -> Result<Duration, FieldError> {
    const F: &str = "spec.interval";
    max_len(F, text, limits::INTERVAL)?;
    let d = parse_duration(text).ok_or_else(|| FieldError {
        field: F.into(),
        detail: format!("{text:?} is not a duration like 30m, 1h or 1h30m"),
    })?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return fail(F, format!("{text:?}: {INTERVAL_MESSAGE}"));
    }
    Ok(d)
}

/// Parses Go-style durations as Kubernetes users write them (`30s`, `5m`, `1h30m`, `1.5h`,
/// `500ms`), in whole nanoseconds with checked arithmetic: too large a value is `None`, never a
/// panic. Fractions below a nanosecond are dropped, as Go does. Zero is refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    const NS: [(&str, u128); 4] = [
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, tail) = rest.split_at(int_end);
        let (frac, tail) = match tail.strip_prefix('.') {
            Some(t) => match t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()) {
                0 => return None,
                end => t.split_at(end),
            },
            None => ("", tail),
        };
        if int.is_empty() {
            return None;
        }
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let scale = NS.iter().find(|(u, _)| *u == &tail[..unit_end])?.1;
        total = total.checked_add(whole_times(int, scale)?)?;
        // The fraction, digit by digit: each adds digit × scale / 10^k.
        let mut unit = scale;
        for d in frac.bytes() {
            unit /= 10;
            total = total.checked_add(u128::from(d - b'0') * unit)?;
        }
        rest = &tail[unit_end..];
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    // The remainder is below 10^9, so it fits.
    let nanos = u32::try_from(total % 1_000_000_000).ok()?;
    (total > 0).then(|| Duration::new(secs, nanos))
}

/// `digits × scale`, or `None` when it does not fit in a u128.
fn whole_times(digits: &str, scale: u128) -> Option<u128> {
    let mut n: u128 = 0;
    for d in digits.bytes() {
        n = n.checked_mul(10)?.checked_add(u128::from(d - b'0'))?;
    }
    n.checked_mul(scale)
}

fn repository(side: &str, r: &RepositorySpec) -> Result<(), FieldError> {
    let field = format!("{side}.repository");
    if r.repository.is_empty() {
        return fail(field, "must not be empty");
    }
    max_len(&field, &r.repository, limits::REPOSITORY)?;
    for (name, value) in [
        ("credentialsSecret", &r.credentials_secret),
        ("caSecret", &r.ca_secret),
    ] {
        if let Some(v) = value {
            check(
                &format!("{side}.{name}"),
                v,
                limits::SECRET_NAME,
                is_secret_name,
                SECRET_NAME_PATTERN,
            )?;
        }
    }
    Ok(())
}

fn list(
    field: &str,
    items: &[String],
    max: usize,
    each: impl Fn(&str, &str) -> Result<(), FieldError>,
) -> Result<(), FieldError> {
    if items.len() > max {
        return fail(
            field,
            format!("{} entries, at most {max} allowed", items.len()),
        );
    }
    items
        .iter()
        .enumerate()
        .try_for_each(|(i, s)| each(&format!("{field}[{i}]"), s))
}

fn max_len(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    // The API server counts characters, not bytes.
    let n = s.chars().count();
    if n > max {
        return fail(field, format!("{n} characters, at most {max} allowed"));
    }
    Ok(())
}

fn check(
    field: &str,
    s: &str,
    max: usize,
    matches: fn(&str) -> bool,
    pattern: &str,
) -> Result<(), FieldError> {
    max_len(field, s, max)?;
    if !matches(s) {
        return fail(field, format!("{s:?} does not match {pattern}"));
    }
    Ok(())
}

/// [`PLATFORM_PATTERN`].
pub fn is_platform(s: &str) -> bool {
    // Each part is lowercase letters and digits, plus `_` in the architecture and `.` in the
    // variant.
    let part = |p: &str, extra: Option<u8>| {
        !p.is_empty()
            && p.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || Some(c) == extra)
    };
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] => part(os, None) && part(arch, Some(b'_')),
        [os, arch, variant] => {
            part(os, None) && part(arch, Some(b'_')) && part(variant, Some(b'.'))
        }
        _ => false,
    }
}

/// [`SECRET_NAME_PATTERN`].
pub fn is_secret_name(s: &str) -> bool {
    let label = |l: &str| {
        let b = l.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum)
            && b.iter().all(|c| alnum(c) || *c == b'-')
    };
    !s.is_empty() && s.split('.').all(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(d("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(d("1m0.001s"), Some(Duration::from_millis(60_001)));
        for bad in [
            "", "0s", "1d", "h", "5", "-1h", "1.h", ".5h", "1hh", "1h 2m", "1.2.3s",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn huge_durations_are_refused_not_panics() {
        assert_eq!(parse_duration("99999999999999999999h"), None);
        assert_eq!(parse_duration(&format!("{}h", "9".repeat(60))), None);
        // Fits in a Duration; refused by the bounds, not by overflow.
        let big = parse_duration("5000000000000000h").expect("parses");
        assert!(big > MAX_INTERVAL);
        assert!(interval("5000000000000000h").is_err());
        assert!(interval("99999999999999999999h").is_err());
    }

    #[test]
    fn interval_bounds_are_inclusive() {
        assert_eq!(interval("30s"), Ok(MIN_INTERVAL));
        assert_eq!(interval("8760h"), Ok(MAX_INTERVAL));
        assert_eq!(interval("30000ms"), Ok(MIN_INTERVAL));
        for bad in ["29.999s", "1ms", "8760h1ms", "8761h"] {
            let e = interval(bad).unwrap_err();
            assert_eq!(e.field, "spec.interval", "{bad}");
            assert!(e.detail.contains("between 30s and 8760h"), "{bad}: {e}");
        }
    }

    #[test]
    fn patterns() {
        assert!(is_platform("linux/amd64") && is_platform("linux/arm/v7"));
        assert!(is_platform("windows/amd64/10.0.17763"));
        for bad in [
            "linux",
            "linux/",
            "/amd64",
            "Linux/amd64",
            "a/b/c/d",
            "linux/arm/v7/",
        ] {
            assert!(!is_platform(bad), "{bad}");
        }
        assert!(is_secret_name("hub-creds") && is_secret_name("a.b-c.d"));
        for bad in ["", "-a", "a-", "A", "a..b", "a_b"] {
            assert!(!is_secret_name(bad), "{bad}");
        }
    }
}
