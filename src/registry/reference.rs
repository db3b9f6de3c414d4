//! Repository references by the docker rules (`nginx` is `docker.io/library/nginx`).

use std::fmt;

use oci_spec::distribution::Reference;

use super::error::{RegistryError, Result};

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A repository in a registry, without tag or digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    registry: String,
    path: String,
}

impl Repository {
    /// Parses `[host[:port]/]path` by the docker reference rules. A tag or digest is refused:
    /// which tags to copy is the spec's job, not the repository's.
    pub fn parse(input: &str) -> Result<Self> {
        let invalid = |detail: &str| RegistryError::InvalidReference {
            what: input.to_string(),
            detail: detail.to_string(),
        };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(invalid("the repository is empty"));
        }
        let reference = Reference::try_from(trimmed).map_err(|e| invalid(&e.to_string()))?;
        if reference.digest().is_some() || trimmed.ends_with(":latest") {
            return Err(invalid(
                "give the repository without a tag or digest; select tags in spec.tags",
            ));
        }
        if reference.tag().is_some_and(|t| t != "latest") {
            return Err(invalid(
                "give the repository without a tag or digest; select tags in spec.tags",
            ));
        }
        Ok(Repository {
            registry: reference.registry().to_string(),
            path: reference.repository().to_string(),
        })
    }

    /// The registry as named in references (`docker.io`, `registry.internal:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host:port that serves the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn endpoint(&self) -> &str {
        endpoint_for(&self.registry)
    }

    /// The repository path inside the registry (`library/nginx`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// The API endpoint host for a registry name.
pub fn endpoint_for(registry: &str) -> &str {
    match registry {
        DOCKER_HUB | "index.docker.io" => DOCKER_HUB_ENDPOINT,
        other => other,
    }
}

/// True when `s` is a tag by the distribution spec (`[\w][\w.-]{0,127}`).
pub fn is_valid_tag(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// True when `s` is a `sha256:` digest with 64 lowercase hex digits.
pub fn is_valid_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names_normalise() {
        let r = Repository::parse("nginx").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.path(), "library/nginx");
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/nginx");
        let r = Repository::parse("bitnami/redis").unwrap();
        assert_eq!(r.path(), "bitnami/redis");
        assert_eq!(r.registry(), "docker.io");
    }

    #[test]
    fn hosts_with_ports_are_kept() {
        let r = Repository::parse("127.0.0.1:5000/mirror/nginx").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.endpoint(), "127.0.0.1:5000");
        assert_eq!(r.path(), "mirror/nginx");
        let r = Repository::parse("localhost:5000/a").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
    }

    #[test]
    fn tags_digests_and_garbage_are_refused() {
        for bad in [
            "",
            "nginx:1.27",
            "nginx:latest",
            "Nginx",
            "nginx@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "a b",
        ] {
            let err = Repository::parse(bad).unwrap_err();
            assert_eq!(err.reason(), "InvalidReference", "{bad:?}");
        }
    }

    #[test]
    fn tag_and_digest_syntax() {
        assert!(is_valid_tag("1.27.2-alpine"));
        assert!(is_valid_tag("_x"));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag(""));
        assert!(!is_valid_tag(&"a".repeat(129)));
        assert!(is_valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_valid_digest("sha256:abc"));
    }
}
