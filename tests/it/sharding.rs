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
/// Deadline of conditions that must come true eventually but whose timing the issue does not
/// bound (all Ready, 3/3/3 after a start): generous, so a loaded machine cannot fail them.
/// What the issue does bound is measured on the Leases' own timestamps against [`LEASE`].
const WAIT: Duration = Duration::from_secs(180);

/// One shard Lease as its holders wrote it.
#[derive(Clone, Debug, Default)]
struct ShardLease {
    /// The holder while the Lease is live.
    holder: Option<String>,
    /// When the holder named acquired it (the lease manager writes it on acquisition only).
    acquired: Option<Timestamp>,
    /// When it was last renewed.
    renewed: Option<Timestamp>,
}

fn secs(d: k8s_openapi::jiff::SignedDuration) -> f64 {
    d.as_secs_f64()
}

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

    /// A controller without sharding, with `args` besides `--namespace`.
    fn controller_with(&self, identity: &str, args: &[&str]) -> ControllerProc {
        let mut all = vec!["--namespace", NS];
        all.extend_from_slice(args);
        ControllerProc::start(&self.kubeconfig, self.dir.path(), identity, &all)
    }

    /// The mirror `name`.
    async fn mirror(&self, name: &str) -> ImageMirror {
        let api: Api<ImageMirror> = Api::namespaced(self.api.client(), NS);
        api.get(name).await.unwrap()
    }

    /// Fails the test, with its log, if controller `p` has exited.
    fn assert_running(&self, p: &mut ControllerProc) {
        assert!(
            p.running(),
            "{} exited:\n{}",
            p.identity,
            self.log(&p.identity)
        );
    }

    /// Waits until mirror `name` is Ready with `tags` tags.
    async fn wait_mirror(&self, name: &str, tags: usize, p: &mut ControllerProc) {
        let deadline = Instant::now() + WAIT;
        loop {
            if is_ready(&self.mirror(name).await, tags) {
                return;
            }
            self.assert_running(p);
            assert!(
                Instant::now() < deadline,
                "{name} not Ready with {tags} tags:\n{}",
                self.log(&p.identity)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Merge-patches mirror `name`.
    async fn patch(&self, name: &str, patch: serde_json::Value) {
        let api: Api<ImageMirror> = Api::namespaced(self.api.client(), NS);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    fn log(&self, identity: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join(format!("{identity}.log"))).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Per shard, its Lease as the holders wrote it (a released Lease names nobody).
    async fn leases(&self) -> Vec<ShardLease> {
        let leases: Api<Lease> = Api::namespaced(self.api.client(), NS);
        let now = Timestamp::now();
        let mut out = vec![ShardLease::default(); SHARDS];
        for l in leases.list(&ListParams::default()).await.unwrap().items {
            let Some(i) = l
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("imagemirror-shard-"))
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < SHARDS)
            else {
                continue;
            };
            let spec = l.spec.unwrap_or_default();
            let renewed = spec.renew_time.map(|t| t.0);
            let live = match (renewed, spec.lease_duration_seconds) {
                (Some(r), Some(d)) => r + Duration::from_secs(d as u64) > now,
                _ => false,
            };
            out[i] = ShardLease {
                holder: spec.holder_identity.filter(|_| live),
                acquired: spec.acquire_time.map(|t| t.0),
                renewed,
            };
        }
        out
    }

    /// Per shard, the holder of its Lease while the Lease is live.
    async fn holders(&self) -> Vec<Option<String>> {
        self.leases().await.into_iter().map(|l| l.holder).collect()
    }

    /// When the API server created `identity`'s presence Lease (whole seconds, rounded down).
    async fn appeared(&self, identity: &str) -> Option<Timestamp> {
        let leases: Api<Lease> = Api::namespaced(self.api.client(), NS);
        let lease = leases
            .get_opt(&format!("imagemirror-replica-{identity}"))
            .await
            .unwrap()?;
        lease.metadata.creation_timestamp.map(|t| t.0)
    }

    /// Waits until `p`'s `/metrics` says it holds `want` shards (it flips its gauge just
    /// after the Lease write the caller saw, or just before a release).
    async fn wait_gauge(&self, p: &ControllerProc, want: i64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = p.gauge("imagemirror_shards_held").await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} shows {got:?} shards held, not {want}:\n{}",
                p.identity,
                self.log(&p.identity)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        list.items.iter().filter(|m| is_ready(m, tags)).count()
    }

    async fn wait_ready(&self, tags: usize, procs: &mut [&mut ControllerProc]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = self.ready(tags).await;
            if ready == self.mirrors {
                return;
            }
            for p in procs.iter_mut() {
                self.assert_running(p);
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

/// Ready for its current generation with `tags` tags synced.
fn is_ready(m: &ImageMirror, tags: usize) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.observed_generation == m.metadata.generation
            && s.tags.len() == tags
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn split(counts: &BTreeMap<String, usize>, ids: &[&str], each: usize) -> bool {
    ids.iter().all(|id| counts.get(*id) == Some(&each)) && counts.len() == ids.len()
}

/// Waits (up to [`WAIT`]) until the live shard holders are exactly `ids` with `each` shards.
async fn wait_split(s: &Setup, ids: &[&str], each: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let counts = s.counts().await;
        if split(&counts, ids, each) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not {each} each for {ids:?}: {counts:?}\n{}",
            ids.iter().map(|i| s.log(i)).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_nine_shards_copy_once_and_one_survivor_takes_all() {
    let s = Setup::new(60).await;
    let (mut a, mut b, mut c) = (s.controller("a"), s.controller("b"), s.controller("c"));
    s.wait_ready(1, &mut [&mut a, &mut b, &mut c]).await;

    // Each replica holds its share, as the Leases and its own /metrics say.
    wait_split(&s, &["a", "b", "c"], 3).await;
    for p in [&a, &b, &c] {
        s.wait_gauge(p, 3).await;
    }
    let v1 = s.puts("v1");
    assert!(
        v1.iter().all(|n| *n == 1),
        "v1 PUT counts per mirror: {v1:?}"
    );

    // New work arrives as one replica is stopped and another killed. The Leases just before
    // the kill: b's last renewal can only be later, so its shards expire no earlier than
    // these renewals plus the lease duration.
    s.add_v2().await;
    let before = s.leases().await;
    let killed = Timestamp::now();
    let t0 = Instant::now();
    a.signal("TERM");
    b.signal("KILL");
    wait_split(&s, &["c"], SHARDS).await;
    let after = s.leases().await;
    s.wait_ready(2, &mut [&mut c]).await;
    let all_ready = t0.elapsed();

    // Timing from the Leases' own timestamps (written by the controllers as they acquire), not
    // from when this test happened to look.
    let took_over = after
        .iter()
        .filter_map(|l| l.acquired)
        .max()
        .expect("acquire times");
    let takeover = secs(took_over.duration_since(killed));
    let mut longest_unowned = 0f64;
    for (i, (old, new)) in before.iter().zip(&after).enumerate() {
        assert_eq!(new.holder.as_deref(), Some("c"), "shard {i}");
        if old.holder.as_deref() == Some("b") {
            let expired = old.renewed.expect("renewed") + Duration::from_secs(LEASE);
            let gap = secs(new.acquired.expect("acquired").duration_since(expired));
            longest_unowned = longest_unowned.max(gap);
        }
    }
    eprintln!(
        "failover: survivor held all {SHARDS} shards {takeover:.2} s after the kill (Lease acquire times); \
         a killed holder's shard had no holder for at most {longest_unowned:.2} s after its Lease expired; \
         all {} mirrors Ready with v2 {all_ready:.2?} after the kill (lease {LEASE} s, grace {GRACE} s)",
        s.mirrors
    );
    // The killed replica's Leases (and its presence, which decides the survivor's share) run
    // out at most one lease duration after the kill; from then no shard may stay without a
    // holder for longer than one lease period (the survivor looks every half grace and
    // acquires in a few round trips, well within that even on a loaded machine).
    assert!(
        takeover <= (2 * LEASE) as f64,
        "the survivor held all shards {takeover:.2} s after the kill, over two lease periods"
    );
    s.wait_gauge(&c, SHARDS as i64).await;
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
    wait_split(&s, &["a"], SHARDS).await;
    s.wait_ready(1, &mut [&mut a]).await;

    // Per shard: its holder and acquire time when last looked at, and the time just before
    // that look. The holder had the shard then, so when the shard is next seen acquired (by
    // another replica, or again), it was unowned for at most the new acquire time minus this.
    let looked = Timestamp::now();
    let mut seen: Vec<(Option<String>, Option<Timestamp>, Timestamp)> = s
        .leases()
        .await
        .into_iter()
        .map(|l| (l.holder, l.acquired, looked))
        .collect();
    let (mut b, mut c) = (s.controller("b"), s.controller("c"));
    let t0 = Instant::now();
    let mut longest_unowned = 0f64;
    let deadline = t0 + WAIT;
    let after = loop {
        let looked = Timestamp::now();
        let leases = s.leases().await;
        for (l, (holder, acquired, at)) in leases.iter().zip(seen.iter_mut()) {
            if l.holder.is_none() {
                continue;
            }
            if l.holder != *holder || l.acquired != *acquired {
                let new = l.acquired.expect("acquired");
                longest_unowned = longest_unowned.max(secs(new.duration_since(*at)));
            }
            *holder = l.holder.clone();
            *acquired = l.acquired;
            *at = looked;
        }
        let mut counts = BTreeMap::new();
        for h in leases.iter().filter_map(|l| l.holder.clone()) {
            *counts.entry(h).or_insert(0usize) += 1;
        }
        if split(&counts, &["a", "b", "c"], 3) {
            break leases;
        }
        assert!(
            Instant::now() < deadline,
            "no 3/3/3: {counts:?}\n{}\n{}",
            s.log("b"),
            s.log("c")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // From when both new replicas had appeared (their presence Leases) to the last shard they
    // acquired, by the Leases' own timestamps.
    let appeared = s
        .appeared("b")
        .await
        .expect("b's presence")
        .max(s.appeared("c").await.expect("c's presence"));
    let last = after
        .iter()
        .filter(|l| l.holder.as_deref() != Some("a"))
        .filter_map(|l| l.acquired)
        .max()
        .expect("acquire times");
    let balanced = secs(last.duration_since(appeared));
    eprintln!(
        "rebalance 9/0/0 -> 3/3/3 {balanced:.2} s after both new replicas appeared ({:?} after they were started); \
         longest a shard had no holder: at most {longest_unowned:.2} s (lease {LEASE} s)",
        t0.elapsed()
    );
    assert!(
        balanced <= (2 * LEASE) as f64,
        "rebalance took {balanced:.2} s, over two lease periods"
    );
    assert!(
        longest_unowned <= LEASE as f64,
        "a shard was unowned for up to {longest_unowned:.2} s"
    );
    for p in [&a, &b, &c] {
        s.wait_gauge(p, 3).await;
    }
    // The new owners work: a change is synced everywhere, each tag once.
    s.add_v2().await;
    s.wait_ready(2, &mut [&mut a, &mut b, &mut c]).await;
    let (v1, v2) = (s.puts("v1"), s.puts("v2"));
    assert!(v1.iter().all(|n| *n == 1), "v1 PUT counts: {v1:?}");
    assert!(v2.iter().all(|n| *n == 1), "v2 PUT counts: {v2:?}");
}

/// Static sharding by label: a controller started with `--selector` reconciles only the
/// mirrors that match (one that does not gets no status and causes no registry request), and
/// a mirror relabelled into the selector is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_confines_the_controller_and_relabelling_brings_a_mirror_in() {
    const LABEL: &str = "imagemirror.dev/shard";
    let s = Setup::new(1).await;
    // `odd` has a source and destination repository of its own, so any request for it shows.
    Seeder::new(s.src.host())
        .push_image("other", Some("v1"), 93, &[2_000], Flavor::Oci)
        .await;
    Seeder::new(s.src.host())
        .push_image("other", Some("v2"), 94, &[2_000], Flavor::Oci)
        .await;
    let (from, to) = (
        format!("{}/other", s.src.host()),
        format!("{}/app-odd", s.dst.host()),
    );
    Fixture::new(NS, "odd", &from, &to)
        .tags(&["v1"])
        .apply(&s.api.client())
        .await;
    s.patch(
        "odd",
        serde_json::json!({"metadata": {"labels": {LABEL: "b"}}}),
    )
    .await;
    let (src0, dst0) = (s.src.requests().len(), s.dst.requests().len());
    s.patch(
        "m0",
        serde_json::json!({"metadata": {"labels": {LABEL: "a"}}}),
    )
    .await;
    let selector = format!("{LABEL}=a");
    let mut ctl = s.controller_with("sel", &["--selector", &selector]);
    s.wait_mirror("m0", 1, &mut ctl).await;

    // A barrier: change `odd` first, then `m0`. An unfiltered watch delivers them in that
    // order, so once m0's change is synced, the controller would have seen odd's too.
    let two = serde_json::json!({"spec": {"tags": {"names": ["v1", "v2"]}}});
    s.patch("odd", two.clone()).await;
    s.patch("m0", two.clone()).await;
    s.wait_mirror("m0", 2, &mut ctl).await;
    let odd = s.mirror("odd").await;
    assert!(
        odd.status.is_none(),
        "a mirror outside the selector got status: {:?}",
        odd.status
    );
    let touched = |reqs: Vec<String>, from: usize, repo: &str| {
        reqs.into_iter()
            .skip(from)
            .filter(|r| r.contains(&format!("/v2/{repo}/")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        touched(s.src.requests(), src0, "other"),
        Vec::<String>::new()
    );
    assert_eq!(
        touched(s.dst.requests(), dst0, "app-odd"),
        Vec::<String>::new()
    );
    // Relabelled into the selector, `odd` syncs: both tags, each PUT once.
    s.patch(
        "odd",
        serde_json::json!({"metadata": {"labels": {LABEL: "a"}}}),
    )
    .await;
    s.wait_mirror("odd", 2, &mut ctl).await;
    for tag in ["v1", "v2"] {
        let want = format!("PUT /v2/app-odd/manifests/{tag}");
        let puts = s
            .dst
            .responses()
            .iter()
            .filter(|r| r.request == want && r.status == 201)
            .count();
        assert_eq!(puts, 1, "{want}");
    }
    assert!(is_ready(&s.mirror("m0").await, 2), "m0 stays Ready");
}
