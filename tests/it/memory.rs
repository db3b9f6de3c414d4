//! Memory does not grow with blob size: the real binary copies a 300 MiB layer between two
//! real registries while its resident set is read from /proc.
//!
//! Two numbers: `VmHWM`, the kernel's exact peak of the whole resident set, and the peak of
//! `RssAnon` (heap and stacks: what the process allocates). `VmHWM` also counts the pages of
//! the executable it touched, about 24 MiB for this ~90 MB debug build, which no blob size
//! changes; the 40 MiB budget is therefore checked on the anonymous part, and the growth of
//! `VmHWM` from a 1 MiB copy to a 300 MiB copy must stay within a few MiB.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Flavor, Seeder, TestRegistry, mirror_doc};

const MIB: u64 = 1 << 20;

/// Peak resident set so far and anonymous resident memory now (KiB) of a live process, or
/// `None` once it has exited.
fn sample_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("RssAnon:")?))
}

/// What one measured run used, in KiB.
#[derive(Clone, Copy, Debug)]
struct Peak {
    /// `VmHWM`: the whole resident set's peak.
    hwm: u64,
    /// The highest `RssAnon` sampled.
    anon: u64,
}

/// Runs the binary with `args` (output to files in `dir`), sampling its memory every 10 ms
/// until it exits or `limit` passes. Returns the exit status, stderr and the peaks seen.
fn run_measured(dir: &Path, args: &[&str], limit: Duration) -> (ExitStatus, String, Peak) {
    let err_path = dir.join("stderr.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagemirror"))
        .args(args)
        .env("DOCKER_CONFIG", dir)
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run imagemirror");
    let deadline = Instant::now() + limit;
    let mut peak = Peak { hwm: 0, anon: 0 };
    let status = loop {
        // VmHWM only grows, so the last sample before exit is the peak up to that moment.
        if let Some((hwm, anon)) = sample_kib(child.id()) {
            peak.hwm = peak.hwm.max(hwm);
            peak.anon = peak.anon.max(anon);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imagemirror did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, std::fs::read_to_string(err_path).unwrap(), peak)
}

/// Seeds a one-layer image of `size` bytes, copies it with the binary and returns its peaks,
/// after checking the copy.
async fn copy_measured(size: u64, seed: u64) -> Peak {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let layer = s.push_blob_stream("big", size, seed).await;
    let config = s
        .push_blob("big", br#"{"architecture":"amd64","os":"linux"}"#)
        .await;
    let image = s
        .push_manifest_for("big", Some("v1"), config, vec![layer], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "big",
        src.host(),
        "big",
        dst.host(),
        "big",
        "  tags:\n    names: [v1]\n",
    );
    let file = dir.path().join("mirror.yaml");
    std::fs::write(&file, doc).unwrap();
    let started = Instant::now();
    let (status, stderr, peak) = run_measured(
        dir.path(),
        &["mirror", "-f", file.to_str().unwrap()],
        Duration::from_secs(300),
    );
    assert!(status.success(), "{status}: {stderr}");
    assert!(peak.hwm > 0, "no sample of the process was taken");
    eprintln!(
        "copied {} MiB in {:?}: VmHWM {} KiB = {:.1} MiB, anonymous peak {} KiB = {:.1} MiB",
        size / MIB,
        started.elapsed(),
        peak.hwm,
        peak.hwm as f64 / 1024.0,
        peak.anon,
        peak.anon as f64 / 1024.0,
    );
    Seeder::new(dst.host())
        .assert_copy_of("big", "v1", &image)
        .await;
    peak
}

// About 10 s in a debug build (sha2 is built with opt-level 3): not ignored. See the numbers
// with `cargo test --test it memory -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_300_mib_allocates_under_40_mib_and_peaks_within_8_mib_of_a_1_mib_copy() {
    let small = copy_measured(MIB, 40).await;
    let large = copy_measured(300 * MIB, 41).await;
    assert!(
        large.anon < 40 * 1024,
        "anonymous memory peaked at {} KiB, over 40 MiB",
        large.anon
    );
    // What the process needs anyway (runtime, TLS, code) is the 1 MiB copy's peak; 300 times
    // the bytes may not cost more than a few MiB on top.
    assert!(
        large.hwm < small.hwm + 8 * 1024,
        "300 MiB peaked at {} KiB, 1 MiB at {} KiB",
        large.hwm,
        small.hwm
    );
}
