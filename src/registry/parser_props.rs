//! Property tests: every parser that reads bytes from a registry or a user survives any input
//! without panicking, and its errors name what they were reading.

use bytes::Bytes;
use proptest::prelude::*;

use super::auth::{Challenge, DockerConfig, TokenResponse};
use super::manifest::{Manifest, parse_next_link};
use super::reference::Repository;
use super::transport::{RegistryOptions, Transport, parse_retry_after};
use super::upload::held_bytes;

/// Strings that look like what the parsers expect, mangled, plus arbitrary ones.
fn remote_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,80}",
        r#"(Bearer|Basic|bearer) (realm|service|scope)="[^"]{0,20}"?,?[a-z=", ]{0,30}"#,
        r#"<[ -~]{0,40}>; rel="(next|prev)",?[ -~]{0,20}"#,
        "(bytes=)?[0-9-]{0,45}",
        r#"\{"(auths|token|expires_in|access_token)":[ -~]{0,60}\}?"#,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn header_parsers_never_panic(s in remote_text()) {
        let _ = Challenge::parse(&s);
        let _ = parse_next_link(&s);
        let _ = held_bytes(&s);
        let _ = parse_retry_after(&s, std::time::SystemTime::now());
    }

    #[test]
    fn held_bytes_is_the_last_byte_plus_one_or_zero(last in any::<u64>()) {
        let held = held_bytes(&format!("0-{last}"));
        prop_assert!(held == 0 || held == last + 1);
    }

    #[test]
    fn locations_resolve_on_the_origin_or_fail_by_name(s in remote_text()) {
        let t = Transport::new("r.example:5000", &RegistryOptions::default(), None).unwrap();
        match t.resolve("upload of x", &s) {
            Ok(url) => prop_assert!(url.starts_with("https://r.example:5000/"), "{}", url),
            Err(e) => prop_assert!(e.to_string().contains("upload of x"), "{}", e),
        }
    }

    #[test]
    fn token_answers_never_panic_or_echo(body in remote_text(), secret in "[a-z]{12}") {
        let doc = body.replace("SECRET", &secret);
        match TokenResponse::parse(doc.as_bytes()) {
            Ok(r) => { let _ = super::auth::Token::from_response(r); }
            Err(e) => prop_assert!(!e.contains(&secret)),
        }
    }

    #[test]
    fn docker_configs_name_the_key_never_the_value(key in "[a-z0-9.:]{1,20}", value in "[A-Za-z0-9+/=]{8,40}", shape in 0..4u8) {
        let doc = match shape {
            0 => format!(r#"{{"auths":{{"{key}":"{value}"}}}}"#),
            1 => format!(r#"{{"auths":{{"{key}":{{"auth":["{value}"]}}}}}}"#),
            2 => format!(r#"{{"auths":{{"{key}":{{"auth":"{value}"}}}}}}"#),
            _ => format!(r#"{{"auths":{{"{key}":{{"username":"u","password":{{"x":"{value}"}}}}}}}}"#),
        };
        if let Err(e) = DockerConfig::parse(doc.as_bytes()) {
            let e = e.to_string();
            prop_assert!(!e.contains(&value), "{}", e);
            prop_assert!(e.contains(&key), "{}", e);
        }
    }

    #[test]
    fn arbitrary_docker_config_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = DockerConfig::parse(&bytes);
    }

    #[test]
    fn manifests_and_indexes_never_panic_and_errors_name_the_reference(
        body in prop_oneof![
            any::<String>(),
            r#"\{"schemaVersion":[0-9],"mediaType":"application/vnd\.oci\.image\.(index|manifest)\.v1\+json","(manifests|layers|config)":[ -~]{0,80}\}?"#,
        ],
        header in proptest::option::of("[ -~]{0,40}"),
    ) {
        match Manifest::from_bytes("repo:tag", header.as_deref(), Bytes::from(body)) {
            Ok(m) => {
                if let Err(e) = m.parse("repo:tag") {
                    prop_assert!(e.to_string().contains("repo:tag"), "{}", e);
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("repo:tag"), "{}", e),
        }
    }

    #[test]
    fn references_never_panic_and_errors_name_the_input(s in "[ -~]{0,80}") {
        if let Err(e) = Repository::parse(&s) {
            prop_assert!(e.to_string().contains(&format!("{s:?}")) || e.to_string().contains(&s), "{}", e);
        }
    }

    #[test]
    fn engine_flags_never_panic_and_name_the_input(s in "[ -~]{0,30}") {
        if let Err(e) = crate::cli::parse_flag_duration(&s) {
            prop_assert!(e.contains(&format!("{s:?}")), "{}", e);
        }
        if let Err(e) = crate::cli::parse_rate(&s) {
            prop_assert!(e.contains(&format!("{s:?}")), "{}", e);
        }
        let _ = crate::cli::parse_size(&s);
    }
}
