//! Progress for people: on a terminal, one bar per blob being copied and a total with speed
//! and ETA; elsewhere, plain lines ([`super::line_progress`]).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::transfer::{BlobOutcome, BlobProgress, BlobState, ProgressSink};

/// How `imagemirror mirror` shows progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    Auto,
    /// Bars.
    Bars,
    /// One line per finished or retried blob.
    Plain,
    /// Nothing.
    None,
}

impl ProgressMode {
    /// `Auto` decided: bars on a terminal, lines elsewhere.
    pub fn resolve(self, stderr_is_terminal: bool) -> ProgressMode {
        match self {
            ProgressMode::Auto if stderr_is_terminal => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Plain,
            other => other,
        }
    }
}

/// One blob's bar and what it has contributed to the total.
struct Blob {
    bar: ProgressBar,
    done: u64,
    size: u64,
    retrying: bool,
}

/// Bars on stderr: one per blob being copied, above one for the total.
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    blobs: Mutex<HashMap<String, Blob>>,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// `sha256:0123456789ab` and the repository: how a blob is named on its bar.
fn label(p: &BlobProgress) -> String {
    let short = p.digest.get(7..19).unwrap_or(&p.digest);
    format!("{short} {}", p.repository)
}

impl Bars {
    /// Bars drawn on stderr.
    pub fn new() -> Arc<Self> {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// Bars drawn on `target` (hidden in tests).
    pub fn with_target(target: ProgressDrawTarget) -> Arc<Self> {
        let multi = MultiProgress::with_draw_target(target);
        let total = multi.add(ProgressBar::new(0).with_style(style(
            "{spinner} total [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )));
        // Speed and ETA keep moving while no byte does (a retry's wait, a slow source).
        total.enable_steady_tick(Duration::from_millis(250));
        Arc::new(Bars {
            multi,
            total,
            blobs: Mutex::new(HashMap::new()),
        })
    }

    /// The sink that feeds these bars.
    pub fn sink(self: &Arc<Self>) -> ProgressSink {
        let bars = self.clone();
        Arc::new(move |p: &BlobProgress| bars.update(p))
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        self.multi.suspend(|| eprintln!("{line}"));
    }

    /// A writer for log lines that prints them above the bars instead of through them.
    pub fn log_writer(&self) -> AboveBars {
        AboveBars {
            multi: self.multi.clone(),
            line: Vec::new(),
        }
    }

    /// Bytes done and bytes to copy, over every blob seen copying.
    pub fn totals(&self) -> (u64, u64) {
        (self.total.position(), self.total.length().unwrap_or(0))
    }

    /// Blobs with a bar.
    pub fn active(&self) -> usize {
        self.lock().len()
    }

    /// Removes every bar.
    pub fn finish(&self) {
        for (_, b) in self.lock().drain() {
            b.bar.finish_and_clear();
        }
        self.total.finish_and_clear();
        let _ = self.multi.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Blob>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, p: &BlobProgress) {
        let key = format!("{} {}", p.repository, p.digest);
        let mut blobs = self.lock();
        match &p.state {
            BlobState::Waiting => {}
            BlobState::Copying { done, total } => {
                let blob = blobs.entry(key).or_insert_with(|| {
                    self.total.inc_length(*total);
                    let bar = self.multi.insert_before(
                        &self.total,
                        ProgressBar::new(*total)
                            .with_style(style(
                                "  {msg:50!} [{bar:30}] {binary_bytes}/{binary_total_bytes}",
                            ))
                            .with_message(label(p)),
                    );
                    Blob {
                        bar,
                        done: 0,
                        size: *total,
                        retrying: false,
                    }
                });
                if blob.retrying {
                    blob.retrying = false;
                    blob.bar.set_message(label(p));
                }
                // A retry may start again below where the last attempt got.
                if *done >= blob.done {
                    self.total.inc(done - blob.done);
                } else {
                    self.total.dec(blob.done - done);
                }
                blob.done = *done;
                blob.bar.set_position(*done);
            }
            BlobState::Retrying { .. } => {
                if let Some(blob) = blobs.get_mut(&key) {
                    blob.retrying = true;
                    blob.bar.set_message(format!("{} {}", label(p), p.state));
                }
            }
            BlobState::Finished(result) => {
                if let Some(blob) = blobs.remove(&key) {
                    blob.bar.finish_and_clear();
                    self.multi.remove(&blob.bar);
                    match result {
                        Ok(BlobOutcome::Copied { .. }) => self.total.inc(blob.size - blob.done),
                        // Not copied after all: its bytes leave the total.
                        _ => {
                            self.total.dec(blob.done);
                            self.total.dec_length(blob.size);
                        }
                    }
                }
                drop(blobs);
                let short = p.digest.get(7..19).unwrap_or(&p.digest);
                self.println(&format!("{} {short}: {}", p.repository, p.state));
            }
        }
    }
}

/// A log writer that holds one event's text and prints it above the bars when dropped (the
/// subscriber drops it after each event).
pub struct AboveBars {
    multi: MultiProgress,
    line: Vec<u8>,
}

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for AboveBars {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.multi.suspend(|| {
                let _ = std::io::stderr().write_all(&line);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::TransferError;

    fn event(digest: &str, size: u64, state: BlobState) -> BlobProgress {
        BlobProgress {
            repository: "reg:5000/app".into(),
            digest: digest.into(),
            size,
            state,
        }
    }

    #[test]
    fn the_total_follows_blobs_through_retries_success_and_failure() {
        let bars = Bars::with_target(ProgressDrawTarget::hidden());
        let sink = bars.sink();
        let copying = |d: &str, done, total| event(d, total, BlobState::Copying { done, total });
        sink(&copying("sha256:aaaaaaaaaaaaaaaa", 100, 1000));
        sink(&copying("sha256:bbbbbbbbbbbbbbbb", 50, 500));
        assert_eq!(bars.active(), 2);
        assert_eq!(bars.totals(), (150, 1500));
        // A retry that starts the first blob over takes its bytes back out of the total.
        sink(&event(
            "sha256:aaaaaaaaaaaaaaaa",
            1000,
            BlobState::Retrying {
                attempt: 1,
                delay: Duration::from_secs(1),
                reason: "NetworkError",
            },
        ));
        sink(&copying("sha256:aaaaaaaaaaaaaaaa", 0, 1000));
        assert_eq!(bars.totals(), (50, 1500));
        sink(&event(
            "sha256:aaaaaaaaaaaaaaaa",
            1000,
            BlobState::Finished(Ok(BlobOutcome::Copied { bytes_sent: 1100 })),
        ));
        assert_eq!(bars.totals(), (1050, 1500));
        sink(&event(
            "sha256:bbbbbbbbbbbbbbbb",
            500,
            BlobState::Finished(Err(TransferError::Cancelled {
                digest: "sha256:bbbbbbbbbbbbbbbb".into(),
            })),
        ));
        assert_eq!(bars.totals(), (1000, 1000));
        assert_eq!(bars.active(), 0);
        // Blobs that were never copied get no bar.
        sink(&event(
            "sha256:cccccccccccccccc",
            7,
            BlobState::Finished(Ok(BlobOutcome::Exists)),
        ));
        assert_eq!(bars.active(), 0);
        assert_eq!(bars.totals(), (1000, 1000));
        bars.finish();
    }

    #[test]
    fn auto_means_bars_only_on_a_terminal() {
        assert_eq!(ProgressMode::Auto.resolve(true), ProgressMode::Bars);
        assert_eq!(ProgressMode::Auto.resolve(false), ProgressMode::Plain);
        assert_eq!(ProgressMode::None.resolve(true), ProgressMode::None);
    }
}
