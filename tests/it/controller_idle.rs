//! The real `imagemirror controller` binary: 100 ImageMirrors all become Ready, idle RSS is
//! reported, and SIGTERM ends it with exit 0; Secrets in its namespace cost it no memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use imagemirror::api::ImageMirror;
use kube::api::{Api, ListParams};

use crate::support::controller::{Fixture, ready};
use crate::support::kube_api::{ApiServer, helpers};
use crate::support::{Flavor, Seeder, TestRegistry};

const MIRRORS: usize = 100;

fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mirrors_become_ready_and_sigterm_exits_cleanly() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let image = Seeder::new(src.host())
        .push_image("base", Some("v1"), 81, &[4_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    helpers::create_namespace(&api.client(), "idle").await;
    for i in 0..MIRRORS {
        Fixture::new(
            "idle",
            &format!("m{i}"),
            &format!("{}/base", src.host()),
            &format!("{}/app-{i}", dst.host()),
        )
        .tags(&["v1"])
        .apply(&api.client())
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // IMAGEMIRROR_TEST_BIN measures another build (e.g. target/release/imagemirror).
    let bin = std::env::var("IMAGEMIRROR_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_imagemirror").into());
    let mut child = Command::new(bin)
        .args([
            "controller",
            "--namespace",
            "idle",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the controller");
    let pid = child.id();
    let mirrors: Api<ImageMirror> = Api::namespaced(api.client(), "idle");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let list = mirrors.list(&ListParams::default()).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == MIRRORS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready}/{MIRRORS} Ready after 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the controller exited early"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = proc_kib(pid, "VmRSS:");
    let hwm = proc_kib(pid, "VmHWM:");
    eprintln!(
        "{MIRRORS} mirrors Ready in {:?}; controller RSS {} MiB (peak {} MiB)",
        started.elapsed(),
        rss / 1024,
        hwm / 1024
    );
    assert!(rss > 0 && rss < 200 * 1024, "RSS {rss} KiB");
    // 100 destinations got the image; the shared layer moved once and was mounted elsewhere.
    let d = Seeder::new(dst.host());
    d.assert_copy_of("app-0", "v1", &image).await;
    d.assert_copy_of(&format!("app-{}", MIRRORS - 1), "v1", &image)
        .await;

    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "SIGTERM must end the controller with exit 0, got {status}"
    );
}

/// Starts the controller binary on the double's kubeconfig, watching `ns`.
fn start_controller(kubeconfig: &Path, ns: &str) -> Child {
    let bin = std::env::var("IMAGEMIRROR_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_imagemirror").into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Command::new(bin)
        .args([
            "controller",
            "--namespace",
            ns,
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the controller")
}

/// Runs the controller on `ns` (one mirror, `m`) until the mirror is Ready and the Secret
/// list was answered and followed by a watch (so the list was read); returns its peak RSS
/// (`VmHWM`, KiB): a list read whole and dropped would show there even if freed since.
async fn settled_rss(api: &ApiServer, kubeconfig: &Path, ns: &str) -> u64 {
    let mut child = start_controller(kubeconfig, ns);
    let mirrors: Api<ImageMirror> = Api::namespaced(api.client(), ns);
    helpers::wait_for(&mirrors, "m", Duration::from_secs(120), ready).await;
    let watched = |api: &ApiServer| {
        api.count(|r| {
            r.resource == "secrets" && r.verb == "watch" && r.namespace.as_deref() == Some(ns)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while watched(api) == 0 {
        assert!(Instant::now() < deadline, "no Secret watch in {ns}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = proc_kib(child.id(), "VmHWM:");
    assert!(child.try_wait().unwrap().is_none(), "the controller exited");
    let _ = child.kill();
    let _ = child.wait();
    rss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_large_secrets_cost_the_controller_no_memory() {
    const SECRETS: usize = 1000;
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(src.host())
        .push_image("app", Some("v1"), 82, &[2_000], Flavor::Oci)
        .await;
    let api = ApiServer::start().await;
    let client = api.client();
    for ns in ["none", "many"] {
        helpers::create_namespace(&client, ns).await;
        Fixture::new(
            ns,
            "m",
            &format!("{}/app", src.host()),
            &format!("{}/{ns}", dst.host()),
        )
        .tags(&["v1"])
        .apply(&client)
        .await;
    }
    // 1000 Secrets of 64 KiB each (about 85 MiB as JSON) in the second namespace.
    let value = "x".repeat(64 * 1024);
    futures_util::stream::iter(0..SECRETS)
        .map(|i| {
            let (client, value) = (client.clone(), value.clone());
            async move {
                helpers::apply_secret(
                    &client,
                    "many",
                    &format!("s{i}"),
                    "Opaque",
                    &[("blob", &value)],
                )
                .await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let none = settled_rss(&api, &kubeconfig, "none").await;
    let many = settled_rss(&api, &kubeconfig, "many").await;
    eprintln!(
        "controller peak RSS with no Secrets: {none} KiB; with {SECRETS} Secrets of 64 KiB: {many} KiB (difference {} KiB)",
        many as i64 - none as i64
    );
    assert!(none > 0 && many > 0);
    assert!(
        many <= none + 5 * 1024,
        "{SECRETS} Secrets cost {} KiB",
        many - none
    );
}
