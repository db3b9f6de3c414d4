//! Repository references by the docker rules (`nginx` is `docker.io/library/nginx`).

use std::fmt;

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
        // Local transports (`oci:`, `oci-archive:`) parse here so that every caller accepts
        // them; crate::layout gives them meaning and the controller refuses them.
        if let Some(local) = crate::layout::parse_repository(trimmed) {
            return local.map(|(registry, path)| Repository { registry, path });
        }
        let tagged = "give the repository without a tag or digest; select tags in spec.tags";
        // The docker reference grammar by hand (no regex: compiling the grammar's regex cost
        // a resync a third of its run time). A tag or digest is refused, so only
        // `[domain[:port]/]component(/component)*` remains.
        if trimmed.contains('@') {
            return Err(invalid(tagged));
        }
        let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
        if let Some((_, tag)) = last.split_once(':') {
            return Err(invalid(if is_valid_tag(tag) {
                tagged
            } else {
                "invalid reference format"
            }));
        }
        let (registry, path) = match trimmed.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !is_domain(first) {
                    return Err(invalid("invalid reference format"));
                }
                (first, rest)
            }
            _ => (DOCKER_HUB, trimmed),
        };
        if !path.split('/').all(is_path_component) {
            return Err(invalid(if path.bytes().any(|b| b.is_ascii_uppercase()) {
                "repository name must be lowercase"
            } else {
                "invalid reference format"
            }));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if path.len() > 255 {
            return Err(invalid(
                "repository name must not be more than 255 characters",
            ));
        }
        Ok(Repository {
            registry: registry.to_string(),
            path,
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
        // Layouts read like skopeo's references: `oci:/dir` or `oci:/dir:prefix`.
        if crate::layout::is_local(&self.registry) {
            return match self.path.as_str() {
                "" => write!(f, "{}", self.registry),
                path => write!(f, "{}:{path}", self.registry),
            };
        }
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

/// `host[.host…][:port]`, each label alphanumeric with inner `-`.
fn is_domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

/// A path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
pub(crate) fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
            return false;
        }
    }
    true
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
            "a//b",
            "a/",
            "/a",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "host..x/a",
            "-host.x/a",
            "host.x:/a",
            "host.x:50a/a",
            "host.x:5000",
            "localhost:5000/A",
            "my_org.x/app",
            &format!("x.io/{}", "a".repeat(256)),
        ] {
            let err = Repository::parse(bad).unwrap_err();
            assert_eq!(err.reason(), "InvalidReference", "{bad:?}");
        }
    }

    #[test]
    fn the_docker_grammar_is_followed() {
        for (input, registry, path) in [
            ("index.docker.io/nginx", "docker.io", "library/nginx"),
            ("docker.io/library/nginx", "docker.io", "library/nginx"),
            ("my_org/app", "docker.io", "my_org/app"),
            ("a__b/c.d/e--f-g", "docker.io", "a__b/c.d/e--f-g"),
            ("localhost/app", "localhost", "app"),
            (
                "Registry.Example.com/team/app",
                "Registry.Example.com",
                "team/app",
            ),
            ("ghcr.io/o/p/q", "ghcr.io", "o/p/q"),
            (" quay.io/a/b ", "quay.io", "a/b"),
        ] {
            let r = Repository::parse(input).unwrap();
            assert_eq!((r.registry(), r.path()), (registry, path), "{input:?}");
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
