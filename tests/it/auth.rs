//! Bearer token auth (`auth: token` registries and a real token server) and TLS with a private
//! CA, through the real binary and the library.

use imagemirror::registry::{Credentials, RegistryClient, RegistryOptions};

use crate::support::tls::TestCa;
use crate::support::token::{TokenConfig, TokenServer};
use crate::support::{
    Flavor, RegistryConfig, Seeder, TestRegistry, app_v1_doc, mirror_cli, mirror_doc,
    mirror_doc_sides, side,
};

const USER: &str = "mirror";
const PASS: &str = "t0ken-Pa55word";

/// A docker config JSON giving `user:pass` for each of `hosts`.
fn auth_file(dir: &std::path::Path, name: &str, hosts: &[(&str, &str, &str)]) -> String {
    use base64::Engine;
    let entries: Vec<String> = hosts
        .iter()
        .map(|(host, user, pass)| {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!(r#""{host}":{{"auth":"{auth}"}}"#)
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, format!(r#"{{"auths":{{{}}}}}"#, entries.join(","))).unwrap();
    path.to_str().unwrap().to_string()
}

fn token_registry(tokens: &TokenServer, service: &str) -> TestRegistry {
    TestRegistry::start_with(RegistryConfig {
        token: Some(tokens.auth_for(service)),
        ..RegistryConfig::default()
    })
}

fn rows(stdout: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{stdout}"))
        .as_array()
        .expect("summary is an array")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_on_both_sides_copy_with_the_right_scopes_and_are_cached() {
    let tokens = TokenServer::start(TokenConfig::new(USER, PASS)).await;
    let src = token_registry(&tokens, "src-registry");
    let dst = token_registry(&tokens, "dst-registry");
    let image = Seeder::new(src.host())
        .with_basic(USER, PASS)
        .push_image(
            "team/app",
            Some("v1"),
            31,
            &[90_000, 60_000, 30_000, 20_000],
            Flavor::Oci,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(
        dir.path(),
        "auth.json",
        &[(src.host(), USER, PASS), (dst.host(), USER, PASS)],
    );
    let doc = mirror_doc(
        "app",
        src.host(),
        "team/app",
        dst.host(),
        "mirror/app",
        "  tags:\n    names: [v1]\n",
    );
    let (tokens_before, src_before, dst_before) =
        (tokens.count(), src.requests().len(), dst.requests().len());

    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--auth-file", &auth]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");

    let asked = tokens.requests()[tokens_before..].to_vec();
    assert_eq!(asked.len(), tokens.count() - tokens_before);
    for r in &asked {
        assert_eq!((r.status, r.account.as_deref()), (200, Some(USER)), "{r:?}");
    }
    let scopes = |service: &str| -> Vec<Vec<String>> {
        asked
            .iter()
            .filter(|r| r.service.as_deref() == Some(service))
            .map(|r| r.scopes.clone())
            .collect()
    };
    let (src_scopes, dst_scopes) = (scopes("src-registry"), scopes("dst-registry"));
    assert_eq!(
        src_scopes.len() + dst_scopes.len(),
        asked.len(),
        "{asked:?}"
    );
    // The source is only ever read.
    assert!(!src_scopes.is_empty(), "{asked:?}");
    for s in &src_scopes {
        assert_eq!(s, &["repository:team/app:pull"], "{asked:?}");
    }
    // The destination is written, so pull,push is asked for (pull alone for the existence checks).
    assert!(
        dst_scopes.contains(&vec!["repository:mirror/app:pull,push".to_string()]),
        "{asked:?}"
    );
    for s in &dst_scopes {
        assert!(
            s == &["repository:mirror/app:pull,push"] || s == &["repository:mirror/app:pull"],
            "{asked:?}"
        );
    }
    // Tokens are cached per scope: a handful for the whole copy, while the registries answered
    // many times as many requests.
    let registry_requests = src.requests().len() - src_before + dst.requests().len() - dst_before;
    assert!(
        asked.len() <= 4,
        "{} token requests: {asked:?}",
        asked.len()
    );
    assert!(
        registry_requests >= 4 * asked.len(),
        "{registry_requests} registry requests for {} tokens",
        asked.len()
    );

    Seeder::new(dst.host())
        .with_basic(USER, PASS)
        .assert_copy_of("mirror/app", "v1", &image)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_credentials_fail_as_auth_failed_naming_the_registry_and_not_the_password() {
    let tokens = TokenServer::start(TokenConfig::new(USER, PASS)).await;
    let src = token_registry(&tokens, "src-registry");
    let dst = token_registry(&tokens, "dst-registry");
    Seeder::new(src.host())
        .with_basic(USER, PASS)
        .push_image("app", Some("v1"), 32, &[10_000], Flavor::Docker)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wr0ng-Secret-42";
    let auth = auth_file(
        dir.path(),
        "auth.json",
        &[(src.host(), USER, PASS), (dst.host(), USER, wrong)],
    );
    let doc = app_v1_doc(src.host(), dst.host());
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &doc,
        &["--output", "json", "--auth-file", &auth],
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows = rows(&stdout);
    assert_eq!(rows.len(), 1, "{stdout}");
    assert_eq!(rows[0]["state"], "Failed", "{stdout}");
    assert_eq!(rows[0]["reason"], "AuthFailed", "{stdout}");
    let message = rows[0]["message"].as_str().unwrap();
    assert!(
        message.contains(dst.host()),
        "names the registry: {message}"
    );
    for secret in [wrong, PASS] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a password leaked:\n{stdout}\n{stderr}"
        );
    }
    // The token server did refuse them, and nothing was written.
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.status == 401 && r.service.as_deref() == Some("dst-registry"))
    );
    assert!(
        Seeder::new(dst.host())
            .with_basic(USER, PASS)
            .get_manifest("app", "v1")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_pull_works_and_anonymous_push_is_refused_as_auth_failed() {
    let tokens = TokenServer::start(TokenConfig {
        anonymous_pull: true,
        ..TokenConfig::new(USER, PASS)
    })
    .await;
    let src = token_registry(&tokens, "public");
    let dst = token_registry(&tokens, "private");
    let image = Seeder::new(src.host())
        .with_basic(USER, PASS)
        .push_image("library/app", Some("v1"), 33, &[15_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "app",
        src.host(),
        "library/app",
        dst.host(),
        "app",
        "  tags:\n    names: [v1]\n",
    );
    // No credentials at all: the source can be read, the destination refuses the push.
    let before = tokens.count();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows = rows(&stdout);
    assert_eq!(rows[0]["reason"], "AuthFailed", "{stdout}");
    let message = rows[0]["message"].as_str().unwrap();
    assert!(
        message.contains(dst.host()) && message.contains("credentials"),
        "{message}"
    );
    let asked = tokens.requests()[before..].to_vec();
    assert!(asked.iter().all(|r| r.account.is_none()), "{asked:?}");
    assert!(
        asked.iter().any(|r| r.service.as_deref() == Some("public")),
        "the source was read anonymously: {asked:?}"
    );

    // Credentials for the destination only: the public source still needs none.
    let auth = auth_file(dir.path(), "auth.json", &[(dst.host(), USER, PASS)]);
    let before = tokens.count();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--auth-file", &auth]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for r in &tokens.requests()[before..] {
        let expected = match r.service.as_deref() {
            Some("public") => None,
            _ => Some(USER),
        };
        assert_eq!(r.account.as_deref(), expected, "{r:?}");
    }
    Seeder::new(dst.host())
        .with_basic(USER, PASS)
        .assert_copy_of("app", "v1", &image)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_repository_mount_gets_one_token_for_both_repositories_and_mounts() {
    let tokens = TokenServer::start(TokenConfig::new(USER, PASS)).await;
    let src = token_registry(&tokens, "src-registry");
    let dst = token_registry(&tokens, "dst-registry");
    let s = Seeder::new(src.host()).with_basic(USER, PASS);
    let base = crate::support::image::random_bytes(36, 120_000);
    let mut images = Vec::new();
    let mut docs = Vec::new();
    let mut base_digest = String::new();
    for name in ["a", "b"] {
        let repo = format!("team/{name}");
        let shared = s.push_blob(&repo, &base).await;
        base_digest = shared.0.clone();
        let own = s.push_blob(&repo, name.repeat(500).as_bytes()).await;
        let config = s
            .push_blob(&repo, format!("{{\"app\":\"{name}\"}}").as_bytes())
            .await;
        images.push(
            s.push_manifest_for(&repo, Some("v1"), config, vec![shared, own], Flavor::Oci)
                .await,
        );
        docs.push(mirror_doc(
            name,
            src.host(),
            &repo,
            dst.host(),
            &format!("mirror/{name}"),
            "  tags:\n    names: [v1]\n",
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(
        dir.path(),
        "auth.json",
        &[(src.host(), USER, PASS), (dst.host(), USER, PASS)],
    );
    let before = tokens.count();
    let (code, stdout, stderr) =
        mirror_cli(dir.path(), &docs.join("---\n"), &["--auth-file", &auth]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");

    let encoded = base_digest.replace(':', "%3A");
    let requests = dst.requests();
    let mounts: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("POST ") && r.contains(&format!("mount={encoded}")))
        .collect();
    assert_eq!(mounts.len(), 1, "{requests:#?}");
    let (to, from) = if mounts[0].starts_with("POST /v2/mirror/a/") {
        ("mirror/a", "mirror/b")
    } else {
        ("mirror/b", "mirror/a")
    };
    // The registry linked the layer: no bytes of it were uploaded into the mounting repository.
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with(&format!("PUT /v2/{to}/"))
                && r.contains(&format!("digest={encoded}"))),
        "the mount fell back to an upload: {requests:#?}"
    );
    let asked = tokens.requests()[before..].to_vec();
    let both = vec![
        format!("repository:{to}:pull,push"),
        format!("repository:{from}:pull"),
    ];
    assert!(
        asked
            .iter()
            .any(|r| r.service.as_deref() == Some("dst-registry") && r.scopes == both),
        "one token for both scopes {both:?}: {asked:#?}"
    );
    let d = Seeder::new(dst.host()).with_basic(USER, PASS);
    d.assert_copy_of("mirror/a", "v1", &images[0]).await;
    d.assert_copy_of("mirror/b", "v1", &images[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_cached_token_is_renewed_once_and_a_second_rejection_is_auth_failed() {
    let tokens = TokenServer::start(TokenConfig::new(USER, PASS)).await;
    let reg = token_registry(&tokens, "registry");
    let image = Seeder::new(reg.host())
        .with_basic(USER, PASS)
        .push_image("app", Some("v1"), 34, &[5_000], Flavor::Oci)
        .await;
    let client = RegistryClient::new(
        reg.host(),
        &RegistryOptions {
            plain_http: true,
            credentials: Some(Credentials {
                username: USER.into(),
                password: PASS.into(),
            }),
            ..RegistryOptions::default()
        },
    )
    .unwrap();
    // The first request learns the challenge (and caches a good token for `other`).
    assert!(client.head_manifest("other", "v1").await.unwrap().is_none());

    // The token for `app` is refused by the registry although the client thinks it fresh:
    // the client must fetch a new one and succeed, once.
    tokens.issue_expired(1);
    let before = tokens.count();
    let head = client.head_manifest("app", "v1").await.unwrap();
    assert_eq!(head.and_then(|h| h.digest), Some(image.digest.clone()));
    assert_eq!(tokens.count() - before, 2, "{:?}", tokens.requests());
    // The renewed token is the cached one now.
    let head = client.head_manifest("app", "v1").await.unwrap();
    assert_eq!(head.and_then(|h| h.digest), Some(image.digest.clone()));
    assert_eq!(tokens.count() - before, 2, "{:?}", tokens.requests());

    // Refused twice: a named failure after exactly one renewal, not a loop.
    tokens.issue_expired(2);
    let before = tokens.count();
    let err = client.head_manifest("third", "v1").await.unwrap_err();
    assert_eq!(err.reason(), "AuthFailed", "{err}");
    assert!(err.to_string().contains(reg.host()), "{err}");
    assert_eq!(tokens.count() - before, 2, "{:?}", tokens.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_needs_the_ca_or_skip_verify_and_fails_clearly_without() {
    let ca = TestCa::new("imagemirror test CA");
    let src = TestRegistry::start_with(RegistryConfig {
        tls: Some(ca.server_cert("127.0.0.1")),
        ..RegistryConfig::default()
    });
    let dst = TestRegistry::start();
    assert!(src.base_url().starts_with("https://"));
    let image = Seeder::new(src.host())
        .with_ca(&ca.cert_pem)
        .push_image("app", Some("v1"), 35, &[25_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, TestCa::new("someone else").cert_pem).unwrap();
    let doc = |drepo: &str, source_settings: &[&str]| {
        mirror_doc_sides(
            drepo,
            &side(src.host(), "app", source_settings),
            &side(dst.host(), drepo, &["plainHTTP: true"]),
            "  tags:\n    names: [v1]\n",
        )
    };
    let https = ["plainHTTP: false"];
    let d = Seeder::new(dst.host());

    // Neither the system roots nor an unrelated CA vouch for the registry.
    for extra in [vec![], vec!["--ca-file", other_ca_file.to_str().unwrap()]] {
        let mut args = vec!["--output", "json"];
        args.extend(extra);
        let (code, stdout, stderr) = mirror_cli(dir.path(), &doc("untrusted", &https), &args);
        assert_eq!(code, 1, "{stdout}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let rows = rows(&stdout);
        // Final at once (not retried), and saying what to do about it.
        assert_eq!(rows[0]["reason"], "TLSError", "{stdout}");
        let message = rows[0]["message"].as_str().unwrap();
        assert!(
            message.contains(src.host())
                && message.contains("certificate is not trusted")
                && message.contains("--ca-file"),
            "{message}"
        );
        assert!(d.get_manifest("untrusted", "v1").await.is_none());
    }

    // HTTPS against a plain-HTTP registry says so too.
    let plain_source = mirror_doc_sides(
        "plain",
        &side(dst.host(), "absent", &https),
        &side(dst.host(), "plain", &["plainHTTP: true"]),
        "  tags:\n    names: [v1]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &plain_source, &["--output", "json"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows = rows(&stdout);
    assert_eq!(rows[0]["reason"], "TLSError", "{stdout}");
    let message = rows[0]["message"].as_str().unwrap();
    assert!(message.contains("plainHTTP: true"), "{message}");

    let skip = ["plainHTTP: false", "insecureSkipTLSVerify: true"];
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc("skip", &skip), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    d.assert_copy_of("skip", "v1", &image).await;

    let args = ["--ca-file", ca_file.to_str().unwrap()];
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc("trusted", &https), &args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    d.assert_copy_of("trusted", "v1", &image).await;
}
