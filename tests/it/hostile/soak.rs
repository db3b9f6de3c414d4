//! Soak: 300 syncs on one engine against token-auth registries whose credentials rotate every
//! sync (a new Secret content each time, so a new client and new tokens each time). Resident
//! memory after the last sync stays within 2 MiB of what it was after the 10th.
//!
//! Measured in a child process running only the sync loop (this test binary, re-run with a
//! filter), so other tests running in parallel here do not move the numbers.

use std::process::Command;

use imagemirror::mirror::{ClientPool, EndpointAccess};
use imagemirror::registry::Credentials;
use imagemirror::transfer::{Engine, EngineConfig};

use crate::support::token::{TokenConfig, TokenServer};
use crate::support::{Flavor, RegistryConfig, Seeder, TestRegistry, app_v1_doc};

const SYNCS: usize = 300;
const CHILD: &str = "IMAGEMIRROR_SOAK_CHILD";

/// `VmRSS` of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn three_hundred_syncs_with_rotating_credentials_keep_memory_flat() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile::soak::soak_loop",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find_map(|l| l.split_once("soak: syncs=").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no soak line: {text}"));
    println!("soak: syncs={line}");
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (tenth, last) = (field("after_10_kib="), field("after_300_kib="));
    assert!(
        last.abs_diff(tenth) <= 2048,
        "RSS moved from {tenth} KiB after the 10th sync to {last} KiB after the last"
    );
}

/// The sync loop; runs only as the child of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by three_hundred_syncs_with_rotating_credentials_keep_memory_flat"]
async fn soak_loop() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let tokens = TokenServer::start(TokenConfig {
        rotating_passwords: true,
        ..TokenConfig::new("soak", "secret")
    })
    .await;
    let registry = |service: &str| {
        TestRegistry::start_with(RegistryConfig {
            token: Some(tokens.auth_for(service)),
            ..RegistryConfig::default()
        })
    };
    let (src, dst) = (registry("src"), registry("dst"));
    Seeder::new(src.host())
        .with_basic("soak", "secret")
        .push_image("app", Some("v1"), 91, &[30_000], Flavor::Oci)
        .await;
    let doc = app_v1_doc(src.host(), dst.host());
    let engine = Engine::new(EngineConfig::default());
    let pool = ClientPool::new();
    let mut after_10 = 0;
    for i in 1..=SYNCS {
        let access = EndpointAccess {
            credentials: Some(Credentials {
                username: "soak".into(),
                password: format!("secret-{i}"),
            }),
            ca_pem: None,
        };
        let report = super::sync_in_process(&engine, &pool, &doc, access).await;
        assert!(
            report.items[0].result.is_ok(),
            "sync {i}: {:?}",
            report.items[0].result
        );
        if i == 10 {
            after_10 = rss_kib();
        }
    }
    let last = rss_kib();
    let book = engine.book_sizes();
    println!(
        "soak: syncs={SYNCS} after_10_kib={after_10} after_300_kib={last} pooled_clients={} engine_maps={book:?} token_requests={}",
        pool.len(),
        tokens.count()
    );
}
