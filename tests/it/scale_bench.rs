//! Scale benchmark, not a timed test (ignored; `scripts/bench-scale.sh` runs it): the real
//! controller binary against the API double and two real registries, N ImageMirrors (default
//! 1000) of small images sharing a base layer, each with its own destination repository.
//!
//! Reports: time from creating all N to all Ready; the controller's API requests by verb and
//! resource; registry requests; status writes; then a forced no-op resync of all N (the
//! destination credentials Secret every mirror names is rotated, which makes each one due at
//! once while nothing changed at the registries): time, requests and status writes per mirror;
//! and the controller's peak and idle RSS. Settings from the environment:
//! `IMAGEMIRROR_SCALE_MIRRORS` (1000), `IMAGEMIRROR_SCALE_SOURCES` (50 source repositories),
//! `IMAGEMIRROR_SCALE_ARGS` (extra controller flags), `IMAGEMIRROR_SCALE_OUT` (report file),
//! `IMAGEMIRROR_TEST_BIN` (the controller binary).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use imagemirror::api::ImageMirror;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};

use crate::support::controller::Fixture;
use crate::support::controller_proc::ControllerProc;
use crate::support::image::random_bytes;
use crate::support::kube_api::{ApiServer, RequestRecord, helpers};
use crate::support::{Flavor, Seeder, TestRegistry};

const NS: &str = "scale";
const LIMIT: Duration = Duration::from_secs(1200);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the RSS is made of: anonymous memory (heap, stacks) and file pages (the binary's code
/// and data as far as it ran), and the thread count.
fn breakdown(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map_or("?", str::trim)
        .to_string();
    format!(
        "anonymous {:.1} MiB, file {:.1} MiB, {threads} threads",
        proc_kib(pid, "RssAnon:") as f64 / 1024.0,
        proc_kib(pid, "RssFile:") as f64 / 1024.0
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Requests by `verb resource[/subresource]`, without the benchmark's own.
fn by_verb(reqs: &[RequestRecord]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in reqs {
        let res = match &r.subresource {
            Some(s) => format!("{}/{s}", r.resource),
            None => r.resource.clone(),
        };
        *m.entry(format!("{} {res}", r.verb)).or_default() += 1;
    }
    m
}

fn methods(reqs: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in reqs {
        let method = r.split(' ').next().unwrap_or("?").to_string();
        *m.entry(method).or_default() += 1;
    }
    m
}

fn fmt_map(m: &BTreeMap<String, usize>, per: usize) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v} ({:.2}/mirror)", *v as f64 / per as f64))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Open file descriptors of `pid` (its sockets to the API server and registries, mostly).
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Peaks of the controller's RSS (KiB) and open file descriptors, sampled every 100 ms.
#[derive(Clone, Default)]
struct Peaks {
    rss: Arc<AtomicU64>,
    fds: Arc<AtomicU64>,
}

impl Peaks {
    /// Starts sampling `pid` until it exits.
    fn sample(pid: u32) -> Self {
        let peaks = Peaks::default();
        let p = peaks.clone();
        tokio::spawn(async move {
            loop {
                let rss = proc_kib(pid, "VmRSS:");
                if rss == 0 {
                    return;
                }
                p.rss.fetch_max(rss, Ordering::Relaxed);
                p.fds.fetch_max(open_fds(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        peaks
    }

    /// The peak RSS so far (also the kernel's high-water mark, which sampling can miss) and
    /// the peak of open descriptors; both are reset for the next phase.
    fn take(&self, pid: u32) -> (u64, u64) {
        let rss = self
            .rss
            .swap(0, Ordering::Relaxed)
            .max(proc_kib(pid, "VmRSS:"));
        (rss, self.fds.swap(0, Ordering::Relaxed))
    }
}

struct Bench {
    api: ApiServer,
    n: usize,
    /// Lists the benchmark itself sent while waiting.
    polls: usize,
}

impl Bench {
    /// Waits until every mirror satisfies `done`, listing once a second.
    async fn wait_all(&mut self, what: &str, done: impl Fn(&ImageMirror) -> bool) {
        let mirrors: Api<ImageMirror> = Api::namespaced(self.api.client(), NS);
        let deadline = Instant::now() + LIMIT;
        loop {
            self.polls += 1;
            let list = mirrors.list(&ListParams::default()).await.unwrap();
            let ok = list.items.iter().filter(|m| done(m)).count();
            if ok == self.n {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: only {ok}/{}", self.n);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The controller's requests: everything but the benchmark's own creates, lists and
    /// Secret update.
    fn controller_requests(&self) -> Vec<RequestRecord> {
        let mut own_lists = self.polls;
        self.api
            .requests()
            .into_iter()
            .filter(|r| {
                if r.field_manager.as_deref() == Some(helpers::TEST_MANAGER)
                    || (r.resource == "secrets" && r.verb == "update")
                {
                    return false;
                }
                if r.verb == "list" && r.resource == "imagemirrors" && own_lists > 0 {
                    // The benchmark's lists come before the controller's next relist.
                    own_lists -= 1;
                    return false;
                }
                true
            })
            .collect()
    }
}

fn ready(m: &ImageMirror) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.observed_generation == m.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-scale.sh"]
async fn scale_benchmark() {
    let n = env_usize("IMAGEMIRROR_SCALE_MIRRORS", 1000).max(1);
    let sources = env_usize("IMAGEMIRROR_SCALE_SOURCES", 50).clamp(1, n);
    let load_start = loadavg();
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    // Every source image: the same 32 KiB base layer, its own 4 KiB layer and config.
    let s = Seeder::new(src.host());
    let base = random_bytes(4242, 32 * 1024);
    for k in 0..sources {
        let repo = format!("app-{k}");
        let base_blob = s.push_blob(&repo, &base).await;
        let own = s
            .push_blob(&repo, &random_bytes(10_000 + k as u64, 4096))
            .await;
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "app": k});
        let config = s.push_blob(&repo, config.to_string().as_bytes()).await;
        s.push_manifest_for(&repo, Some("v1"), config, vec![base_blob, own], Flavor::Oci)
            .await;
    }
    // A real API server keeps minutes of watch history; the double counts changes instead.
    let api = ApiServer::builder().history_limit(1_000_000).start().await;
    let client = api.client();
    helpers::create_namespace(&client, NS).await;
    helpers::apply_registry_secret(&client, NS, "dst-creds", dst.host(), "bench", "one").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let extra = std::env::var("IMAGEMIRROR_SCALE_ARGS").unwrap_or_default();
    let mut args = vec!["--namespace", NS];
    args.extend(extra.split_whitespace());
    let mut ctl = ControllerProc::start(&kubeconfig, dir.path(), "bench", &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl.gauge("imagemirror_transfers_in_flight").await.is_none() {
        assert!(ctl.running(), "the controller exited");
        assert!(Instant::now() < deadline, "no /metrics within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start = proc_kib(ctl.pid(), "VmRSS:");
    let start_parts = breakdown(ctl.pid());
    let mut bench = Bench { api, n, polls: 0 };
    bench.api.clear_requests();
    let (src0, dst0) = (src.requests().len(), dst.requests().len());

    // Phase 1: create N, wait for all Ready.
    let fds_start = open_fds(ctl.pid());
    let peaks = Peaks::sample(ctl.pid());
    let t0 = Instant::now();
    for i in 0..n {
        let from = format!("{}/app-{}", src.host(), i % sources);
        Fixture::new(
            NS,
            &format!("m{i}"),
            &from,
            &format!("{}/mirror-{i}", dst.host()),
        )
        .tags(&["v1"])
        .destination_secret("dst-creds")
        .apply(&client)
        .await;
    }
    let created = t0.elapsed();
    bench.wait_all("Ready", ready).await;
    let all_ready = t0.elapsed();
    let (peak1, fds1) = peaks.take(ctl.pid());
    let hwm1 = proc_kib(ctl.pid(), "VmHWM:");
    let reqs1 = bench.controller_requests();
    let status1 = reqs1
        .iter()
        .filter(|r| r.subresource.as_deref() == Some("status") && r.is_write())
        .count();
    let src1: Vec<String> = src.requests()[src0..].to_vec();
    let dst1: Vec<String> = dst.requests()[dst0..].to_vec();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = proc_kib(ctl.pid(), "VmRSS:");
    let idle_parts = breakdown(ctl.pid());
    let fds_idle = open_fds(ctl.pid());
    peaks.take(ctl.pid());

    // Phase 2: rotate the Secret every mirror names; each resyncs, nothing has changed.
    bench.api.clear_requests();
    bench.polls = 0;
    let (src0, dst0) = (src.requests().len(), dst.requests().len());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let mut secret = secrets.get("dst-creds").await.unwrap();
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "bench:two");
    let config = serde_json::json!({"auths": {dst.host(): {"username": "bench", "password": "two", "auth": auth}}});
    secret.data = Some(
        [(
            ".dockerconfigjson".to_string(),
            k8s_openapi::ByteString(config.to_string().into_bytes()),
        )]
        .into(),
    );
    let rotated = k8s_openapi::jiff::Timestamp::now();
    let rotated_s = rotated.as_second();
    let t1 = Instant::now();
    secrets
        .replace("dst-creds", &Default::default(), &secret)
        .await
        .unwrap();
    bench
        .wait_all("resynced", |m| {
            ready(m)
                && m.status
                    .as_ref()
                    .and_then(|s| s.last_sync_time.as_ref())
                    .is_some_and(|t| t.0.as_second() >= rotated_s)
        })
        .await;
    let resync = t1.elapsed();
    let (peak2, fds2) = peaks.take(ctl.pid());
    let end_parts = breakdown(ctl.pid());
    let hwm2 = proc_kib(ctl.pid(), "VmHWM:");
    let reqs2 = bench.controller_requests();
    let status2 = reqs2
        .iter()
        .filter(|r| r.subresource.as_deref() == Some("status") && r.is_write())
        .count();
    let src2: Vec<String> = src.requests()[src0..].to_vec();
    let dst2: Vec<String> = dst.requests()[dst0..].to_vec();
    let load_end = loadavg();
    ctl.signal("TERM");
    let exit = ctl.wait(Duration::from_secs(30)).await;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let report = format!(
        "## Scale benchmark: {n} ImageMirrors, {sources} source repositories\n\n\
         - controller: `{bin}` {extra}\n\
         - load average (1/5/15 min) at start: {load_start}; at end: {load_end}; {cpus} CPUs\n\
         - create all {n}: {created:.1?}; all Ready {all_ready:.1?} after the first create\n\
         - API requests (controller): {api1} total; {api1_verbs}\n\
         - status writes: {status1} ({:.2}/mirror)\n\
         - source registry: {} requests ({}); destination: {} requests ({})\n\
         - no-op resync of all {n} (Secret rotated): {resync:.1?}; API requests {api2} ({:.2}/mirror): {api2_verbs}\n\
         - resync status writes: {status2} ({:.2}/mirror); source: {} ({}), destination: {} ({})\n\
         - controller RSS: {:.1} MiB before, peak {:.1} MiB while creating, {:.1} MiB idle after Ready, peak {:.1} MiB during the resync (high-water mark {:.1} MiB after Ready, {:.1} MiB at the end)\n\
         - controller RSS parts: before {start_parts}; idle after Ready {idle_parts}; after the resync {end_parts}\n\
         - controller open descriptors: {fds_start} before, peak {fds1} while creating, {fds_idle} idle after Ready, peak {fds2} during the resync\n\
         - SIGTERM exit: {exit:?}\n",
        status1 as f64 / n as f64,
        src1.len(),
        fmt_map(&methods(&src1), n),
        dst1.len(),
        fmt_map(&methods(&dst1), n),
        reqs2.len() as f64 / n as f64,
        status2 as f64 / n as f64,
        src2.len(),
        fmt_map(&methods(&src2), n),
        dst2.len(),
        fmt_map(&methods(&dst2), n),
        mib(rss_start),
        mib(peak1),
        mib(idle),
        mib(peak2),
        mib(hwm1),
        mib(hwm2),
        bin = std::env::var("IMAGEMIRROR_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_imagemirror").into()),
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get()),
        api1 = reqs1.len(),
        api1_verbs = fmt_map(&by_verb(&reqs1), n),
        api2 = reqs2.len(),
        api2_verbs = fmt_map(&by_verb(&reqs2), n),
    );
    println!("{report}");
    if let Ok(out) = std::env::var("IMAGEMIRROR_SCALE_OUT") {
        std::fs::write(&out, &report).unwrap();
    }
    // Sanity, not timing: every destination got its image.
    let d = Seeder::new(dst.host());
    assert!(d.get_manifest("mirror-0", "v1").await.is_some());
    assert!(
        d.get_manifest(&format!("mirror-{}", n - 1), "v1")
            .await
            .is_some()
    );
}
