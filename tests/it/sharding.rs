//! Sharding across replicas with shard Leases: real controller binaries against the API double
//! and two real registries. Who holds which shard is read from the Leases themselves (and
//! cross-checked on `/metrics`); "copied once" is counted in the destination's access log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};

use imagemirror::api::ImageMirror;

use crate::support::controller::Fixture;
use crate::support::controller_proc::ControllerProc;
use crate::support::kube_api::{ApiServer, helpers};
use crate::support::{Flavor, Seeder, TestRegistry};

const NS: &str = "shard";
const SHARDS: usize = 9;
/// Lease duration and renew grace the controllers run with (seconds).
const LEASE: u64 = 4;
const GRACE: u64 = 2;
const WAIT: Duration = Duration::from_secs(180);

struct Setup {
    src: TestRegistry,
    dst: TestRegistry,
    api: ApiServer,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    mirrors: usize,
}

impl Setup {
    /// Registries with `base:v1` and `base:v2`, and `mirrors` ImageMirrors `m<i>` copying
    /// `base:v1` to `app-<i>`.
    async fn new(mirrors: usize) -> Self {
        let (src, dst) = (TestRegistry::start(), TestRegistry::start());
        let s = Seeder::new(src.host());
        s.push_image("base", Some("v1"), 91, &[3_000], Flavor::Oci)
            .await;
        s.push_image("base", Some("v2"), 92, &[3_000], Flavor::Oci)
            .await;
        let api = ApiServer::start().await;
        helpers::create_namespace(&api.client(), NS).await;
        for i in 0..mirrors {
            let (from, to) = (
                format!("{}/base", src.host()),
                format!("{}/app-{i}", dst.host()),
            );
            Fixture::new(NS, &format!("m{i}"), &from, &to)
                .tags(&["v1"])
                .apply(&api.client())
                .await;
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.kubeconfig(dir.path());
        Setup {
            src,
            dst,
            api,
            dir,
            kubeconfig,
            mirrors,
        }
    }

    fn controller(&self, identity: &str) -> ControllerProc {
        let (lease, grace) = (LEASE.to_string(), GRACE.to_string());
        let shards = SHARDS.to_string();
        ControllerProc::start(
            &self.kubeconfig,
            self.dir.path(),
            identity,
            &[
                "--namespace",
                NS,
                "--leader-election-namespace",
                NS,
                "--shards",
                &shards,
                "--lease-duration-seconds",
                &lease,
                "--lease-grace-seconds",
                &grace,
                "--shutdown-grace-seconds",
                "5",
            ],
        )
    }

    fn log(&self, identity: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join(format!("{identity}.log"))).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Per shard, the holder of its Lease while the Lease is live.
    async fn holders(&self) -> Vec<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.api.client(), NS);
        let now = Timestamp::now();
        let mut out = vec![None; SHARDS];
        for l in leases.list(&ListParams::default()).await.unwrap().items {
            let Some(i) = l
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("imagemirror-shard-"))
                .and_then(|i| i.parse::<usize>().ok())
            else {
                continue;
            };
            let spec = l.spec.unwrap_or_default();
            let live = match (spec.renew_time, spec.lease_duration_seconds) {
                (Some(r), Some(d)) => r.0 + Duration::from_secs(d as u64) > now,
                _ => false,
            };
            if live && i < SHARDS {
                out[i] = spec.holder_identity;
            }
        }
        out
    }

    /// Shards held per identity.
    async fn counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for h in self.holders().await.into_iter().flatten() {
            *m.entry(h).or_default() += 1;
        }
        m
    }

    /// Mirrors Ready for their current generation with `tags` tags synced.
    async fn ready(&self, tags: usize) -> usize {
        let api: Api<ImageMirror> = Api::namespaced(self.api.client(), NS);
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.observed_generation == m.metadata.generation
                        && s.tags.len() == tags
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count()
    }

    async fn wait_ready(&self, tags: usize, procs: &mut [&mut ControllerProc]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = self.ready(tags).await;
            if ready == self.mirrors {
                return;
            }
            for p in procs.iter_mut() {
                assert!(
                    p.running(),
                    "{} exited:\n{}",
                    p.identity,
                    self.log(&p.identity)
                );
            }
            assert!(
                Instant::now() < deadline,
                "only {ready}/{} Ready with {tags} tags",
                self.mirrors
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Per mirror, how many PUTs of `tag`'s manifest the destination accepted.
    fn puts(&self, tag: &str) -> Vec<usize> {
        let answered = self.dst.responses();
        (0..self.mirrors)
            .map(|i| {
                let want = format!("PUT /v2/app-{i}/manifests/{tag}");
                answered
                    .iter()
                    .filter(|r| r.request == want && r.status == 201)
                    .count()
            })
            .collect()
    }

    /// Adds tag `v2` to every mirror.
    async fn add_v2(&self) {
        let api: Api<ImageMirror> = Api::namespaced(self.api.client(), NS);
        let patch = serde_json::json!({"spec": {"tags": {"names": ["v1", "v2"]}}});
        for i in 0..self.mirrors {
            api.patch(
                &format!("m{i}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
        }
    }
}

fn split(counts: &BTreeMap<String, usize>, ids: &[&str], each: usize) -> bool {
    ids.iter().all(|id| counts.get(*id) == Some(&each)) && counts.len() == ids.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_nine_shards_copy_once_and_one_survivor_takes_all() {
    let s = Setup::new(60).await;
    let (mut a, mut b, mut c) = (s.controller("a"), s.controller("b"), s.controller("c"));
    s.wait_ready(1, &mut [&mut a, &mut b, &mut c]).await;

    // Each replica holds its share, as the Leases and its own /metrics say.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = s.counts().await;
        if split(&counts, &["a", "b", "c"], 3) {
            break;
        }
        assert!(Instant::now() < deadline, "not 3/3/3: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in [&a, &b, &c] {
        assert_eq!(
            p.gauge("imagemirror_shards_held").await,
            Some(3),
            "{}",
            p.identity
        );
    }
    let v1 = s.puts("v1");
    assert!(
        v1.iter().all(|n| *n == 1),
        "v1 PUT counts per mirror: {v1:?}"
    );

    // New work arrives as one replica is stopped and another killed.
    s.add_v2().await;
    let t0 = Instant::now();
    a.signal("TERM");
    b.signal("KILL");
    let deadline = t0 + Duration::from_secs(LEASE + 20);
    let held_all = loop {
        let counts = s.counts().await;
        if split(&counts, &["c"], SHARDS) {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "survivor does not hold all shards: {counts:?}\n{}",
            s.log("c")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    s.wait_ready(2, &mut [&mut c]).await;
    let all_ready = t0.elapsed();
    eprintln!(
        "failover: survivor held all {SHARDS} shards after {held_all:?}, all {} mirrors Ready with v2 after {all_ready:?} (lease {LEASE} s)",
        s.mirrors
    );
    // The killed replica's Leases run out after at most one lease duration; the survivor
    // notices within one tick (half the grace). Slack covers a loaded machine.
    assert!(
        held_all <= Duration::from_secs(LEASE + 6),
        "took {held_all:?} to take over"
    );
    assert_eq!(
        c.gauge("imagemirror_shards_held").await,
        Some(SHARDS as i64)
    );
    let status = a.wait(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );
    let (v1, v2) = (s.puts("v1"), s.puts("v2"));
    assert!(v1.iter().all(|n| *n == 1), "v1 PUT again: {v1:?}");
    assert!(
        v2.iter().all(|n| *n == 1),
        "v2 PUT counts per mirror (2 = two holders at once): {v2:?}"
    );
    drop(s.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_rebalance_when_replicas_join_and_no_shard_stays_unowned() {
    let s = Setup::new(18).await;
    let mut a = s.controller("a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !split(&s.counts().await, &["a"], SHARDS) {
        assert!(
            Instant::now() < deadline,
            "a never held all:\n{}",
            s.log("a")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.wait_ready(1, &mut [&mut a]).await;

    let (mut b, mut c) = (s.controller("b"), s.controller("c"));
    let t0 = Instant::now();
    let mut unowned_since: Vec<Option<Instant>> = vec![None; SHARDS];
    let mut longest = Duration::ZERO;
    let deadline = t0 + Duration::from_secs(60);
    let balanced = loop {
        let holders = s.holders().await;
        let now = Instant::now();
        for (i, h) in holders.iter().enumerate() {
            match (h, unowned_since[i]) {
                (None, None) => unowned_since[i] = Some(now),
                (Some(_), Some(t)) => {
                    longest = longest.max(now - t);
                    unowned_since[i] = None;
                }
                _ => {}
            }
        }
        let counts = s.counts().await;
        if split(&counts, &["a", "b", "c"], 3) {
            break t0.elapsed();
        }
        assert!(
            now < deadline,
            "no 3/3/3: {counts:?}\n{}\n{}",
            s.log("b"),
            s.log("c")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "rebalance 9/0/0 -> 3/3/3 in {balanced:?}; longest a shard had no holder: {longest:?} (lease {LEASE} s)"
    );
    assert!(
        balanced <= Duration::from_secs(2 * LEASE),
        "rebalance took {balanced:?}, over two lease periods"
    );
    assert!(
        longest <= Duration::from_secs(LEASE),
        "a shard was unowned for {longest:?}"
    );
    for p in [&a, &b, &c] {
        assert_eq!(
            p.gauge("imagemirror_shards_held").await,
            Some(3),
            "{}",
            p.identity
        );
    }
    // The new owners work: a change is synced everywhere, each tag once.
    s.add_v2().await;
    s.wait_ready(2, &mut [&mut a, &mut b, &mut c]).await;
    let (v1, v2) = (s.puts("v1"), s.puts("v2"));
    assert!(v1.iter().all(|n| *n == 1), "v1 PUT counts: {v1:?}");
    assert!(v2.iter().all(|n| *n == 1), "v2 PUT counts: {v2:?}");
}
