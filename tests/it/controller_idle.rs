//! The real `imagemirror controller` binary with 100 ImageMirrors: all become Ready, idle RSS
//! is reported, and SIGTERM ends it with exit 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imagemirror::api::ImageMirror;
use kube::api::{Api, ListParams};

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
        let yaml = format!(
            "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: m{i}\n  namespace: idle\nspec:\n  source:\n    repository: {}/base\n    plainHTTP: true\n  destination:\n    repository: {}/app-{i}\n    plainHTTP: true\n  tags:\n    names: [v1]\n",
            src.host(),
            dst.host()
        );
        helpers::apply_imagemirror(&api.client(), &yaml).await;
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
