//! Memory does not grow with blob size: the real binary copies a 300 MiB layer between two
//! real registries while its peak resident set is read from /proc.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Flavor, Seeder, TestRegistry, mirror_doc};

const MIB: u64 = 1 << 20;

/// The peak resident set (`VmHWM`, KiB) of a live process, or `None` once it has exited.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs the binary with `args` (output to files in `dir`), sampling its peak RSS every 10 ms
/// until it exits or `limit` passes. Returns the exit status, stderr and the highest peak seen.
fn run_measured(dir: &Path, args: &[&str], limit: Duration) -> (ExitStatus, String, u64) {
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
    let mut peak = 0;
    let status = loop {
        // VmHWM only grows, so the last sample before exit is the peak up to that moment.
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak = peak.max(kib);
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

/// Seeds a one-layer image of `size` bytes, copies it with the binary and returns its peak
/// RSS in KiB, after checking the copy.
async fn copy_measured(size: u64, seed: u64) -> u64 {
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
    let (status, stderr, peak_kib) = run_measured(
        dir.path(),
        &["mirror", "-f", file.to_str().unwrap()],
        Duration::from_secs(300),
    );
    assert!(status.success(), "{status}: {stderr}");
    assert!(peak_kib > 0, "no sample of the process was taken");
    eprintln!(
        "copied {} MiB in {:?}: peak RSS (VmHWM) {peak_kib} KiB = {:.1} MiB",
        size / MIB,
        started.elapsed(),
        peak_kib as f64 / 1024.0
    );
    Seeder::new(dst.host())
        .assert_copy_of("big", "v1", &image)
        .await;
    peak_kib
}

// About 10 s in a debug build (sha2 is built with opt-level 3): not ignored. See the numbers
// with `cargo test --test it memory -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_a_300_mib_blob_peaks_under_40_mib_of_rss() {
    let small = copy_measured(MIB, 40).await;
    let large = copy_measured(300 * MIB, 41).await;
    assert!(large < 40 * 1024, "peak RSS {large} KiB is over 40 MiB");
    // What the process needs anyway (runtime, TLS, code) is the 1 MiB copy's peak; 300 times
    // the bytes may not cost more than a few MiB on top.
    assert!(
        large < small + 8 * 1024,
        "300 MiB peaked at {large} KiB, 1 MiB at {small} KiB"
    );
}
