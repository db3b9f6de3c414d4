//! The one-shot `imagemirror mirror` command: read ImageMirror YAML, run every mirror on one
//! engine, print a summary. `main.rs` only parses arguments and calls in here.

mod output;
mod progress;
mod prune;
pub mod state;
pub mod strict;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::join_all;
use serde::Deserialize;

use crate::api::{ImageMirror, ImageMirrorSpec};
use crate::mirror::{
    self, ClientPool, Counters, EndpointAccess, PruneRecord, PruneReport, SpecError, SyncError,
    SyncReport,
};
use crate::registry::DockerConfig;
use crate::registry::manifest::ALL_TAG_PAGES;
use crate::transfer::{BlobProgress, BlobState, Engine, EngineConfig, ProgressSink, RateLimit};

pub use output::{OutputFormat, render};
pub use progress::{AboveBars, Bars, ProgressMode};

/// Options of `imagemirror mirror`.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Files with one or more ImageMirror documents.
    pub files: Vec<PathBuf>,
    /// Print the plan; write nothing.
    pub dry_run: bool,
    /// A docker config JSON with credentials; `None` uses `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` when present.
    pub auth_file: Option<PathBuf>,
    /// A PEM bundle of CA certificates trusted for every registry, in addition to the system
    /// roots (private CAs).
    pub ca_file: Option<PathBuf>,
    /// The engine's limits and upload settings. Items per mirror run at its global limit.
    pub engine: EngineConfig,
    /// Summary format.
    pub output: OutputFormat,
    /// Unknown fields in the YAML are warnings instead of errors (wrong types and invalid
    /// values are errors either way).
    pub lenient: bool,
    /// Prune every mirror (as if each had `spec.prune: true`); mirrors whose spec says so are
    /// pruned without it. Default false.
    pub prune: bool,
    /// The prune state file; `None`: beside each YAML file (see [`state::default_path`]).
    pub state: Option<PathBuf>,
}

/// Errors that stop the command before any copy starts.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A document is not an ImageMirror, or not a valid one. `name` is ` (namespace/name)`
    /// when the document has one, else empty.
    #[error("{path}, document {index}{name}: {detail}")]
    Document {
        path: String,
        index: usize,
        name: String,
        detail: String,
    },
    /// Several documents are invalid; each is listed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<CliError>),
    /// The auth file is unusable.
    #[error("auth file {path}: {detail}")]
    Auth { path: String, detail: String },
    /// No ImageMirror in any file.
    #[error("no ImageMirror documents in {0}")]
    Empty(String),
    /// The prune state file is unusable.
    #[error("prune state file {path}: {detail}")]
    State { path: String, detail: String },
    /// Two pruned mirrors share a name, so they would share a record.
    #[error("two ImageMirrors are named {0}: pruning keeps one record per namespace/name")]
    DuplicateName(String),
}

/// One mirror's outcome, for the summary.
pub struct MirrorOutcome {
    /// `namespace/name` of the ImageMirror.
    pub name: String,
    /// The report, or why the whole mirror failed.
    pub result: Result<SyncReport, String>,
    /// In a dry run: the planned items.
    pub planned: Vec<String>,
    /// When pruned: what was (in a dry run: would be) deleted or kept.
    pub prune: Option<PruneReport>,
    /// Whether this was a dry run (prune rows then say WouldPrune).
    pub dry_run: bool,
}

impl MirrorOutcome {
    /// Whether anything in this mirror failed.
    pub fn failed(&self) -> bool {
        match &self.result {
            Ok(r) => r.failed() > 0,
            Err(_) => true,
        }
    }
}

/// Reads every ImageMirror from a multi-document YAML text and validates it as the API server
/// would (unknown fields, types, the CRD's rules), so the CLI accepts what `kubectl apply`
/// accepts. Every invalid document is reported, each by its position and name.
pub fn parse_documents(path: &str, text: &str) -> Result<Vec<ImageMirror>, CliError> {
    parse_documents_with(path, text, false)
}

/// [`parse_documents`]; `lenient` turns unknown fields into warnings.
pub fn parse_documents_with(
    path: &str,
    text: &str,
    lenient: bool,
) -> Result<Vec<ImageMirror>, CliError> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match parse_one(path, index + 1, doc, lenient) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(out),
        1 => Err(errors.remove(0)),
        _ => Err(CliError::Invalid(errors)),
    }
}

fn parse_one(
    path: &str,
    index: usize,
    doc: serde_yaml::Deserializer<'_>,
    lenient: bool,
) -> Result<Option<ImageMirror>, CliError> {
    let mut name = String::new();
    let doc_err = |name: &str, detail: String| CliError::Document {
        path: path.to_string(),
        index,
        name: name.to_string(),
        detail,
    };
    let value = serde_yaml::Value::deserialize(doc).map_err(|e| doc_err("", e.to_string()))?;
    if value.is_null() {
        return Ok(None);
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    if kind != "ImageMirror" || api != "imagemirror.dev/v1alpha1" {
        return Err(doc_err(
            "",
            format!(
                "expected apiVersion imagemirror.dev/v1alpha1 and kind ImageMirror, found {api:?} {kind:?}"
            ),
        ));
    }
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
    };
    if let Some(n) = meta("name") {
        name = format!(" ({}/{n})", meta("namespace").unwrap_or("default"));
    }
    for problem in strict::check(&value) {
        if problem.unknown && lenient {
            tracing::warn!(file = path, document = index, field = %problem.field, "ignoring unknown field (--lenient)");
            continue;
        }
        let hint = if problem.unknown {
            "; --lenient ignores unknown fields"
        } else {
            ""
        };
        return Err(doc_err(&name, format!("{problem}{hint}")));
    }
    let mirror: ImageMirror =
        serde_yaml::from_value(value).map_err(|e| doc_err(&name, e.to_string()))?;
    mirror::validate(&mirror.spec).map_err(|e| doc_err(&name, e.to_string()))?;
    Ok(Some(mirror))
}

fn default_auth_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

fn load_auth(explicit: Option<&Path>) -> Result<DockerConfig, CliError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_auth_file() {
            Some(p) => (p, false),
            None => return Ok(DockerConfig::default()),
        },
    };
    match std::fs::read(&path) {
        Ok(bytes) => DockerConfig::parse(&bytes).map_err(|e| CliError::Auth {
            path: path.display().to_string(),
            detail: e.to_string(),
        }),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(DockerConfig::default())
        }
        Err(e) => Err(CliError::Auth {
            path: path.display().to_string(),
            detail: e.to_string(),
        }),
    }
}

/// The engine's rate limit for `--rate-limit` (requests per second; none or ≤ 0: no limit).
pub fn rate_limit(per_second: Option<f64>) -> Option<RateLimit> {
    per_second.filter(|r| *r > 0.0).map(|per_second| RateLimit {
        per_second,
        // A second's worth at once, so pacing does not serialise concurrent transfers.
        burst: per_second.ceil().clamp(1.0, 1000.0) as u32,
    })
}

/// Runs `imagemirror mirror`. Returns every mirror's outcome; the caller turns failures into
/// the exit code.
pub async fn run_mirror(
    opts: &MirrorOptions,
    progress: ProgressSink,
) -> Result<Vec<MirrorOutcome>, CliError> {
    let mut mirrors = Vec::new();
    for f in &opts.files {
        let path = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|source| CliError::Read {
            path: path.clone(),
            source,
        })?;
        mirrors.extend(
            parse_documents_with(&path, &text, opts.lenient)?
                .into_iter()
                .map(|m| (m, f)),
        );
    }
    if mirrors.is_empty() {
        let names: Vec<String> = opts.files.iter().map(|f| f.display().to_string()).collect();
        return Err(CliError::Empty(names.join(", ")));
    }
    let mut states = prune::States::load(opts, &mirrors)?;
    let auth = load_auth(opts.auth_file.as_deref())?;
    // Read once, before any copy starts; whether it parses is checked when clients are built,
    // and that error names the file's use ("CA certificates do not parse").
    let ca_pem = match &opts.ca_file {
        Some(f) => Some(std::fs::read(f).map_err(|source| CliError::Read {
            path: f.display().to_string(),
            source,
        })?),
        None => None,
    };
    let engine = Engine::new(opts.engine.clone());
    let pool = ClientPool::with_http_mode(opts.engine.http);
    let runs = mirrors.iter().map(|(m, _)| {
        let name = prune::key(m);
        let trust = Trust {
            auth: &auth,
            ca_pem: ca_pem.as_deref(),
        };
        let record = states.record(&name);
        let (engine, pool, progress) = (&engine, &pool, progress.clone());
        async move {
            let mut planned = Vec::new();
            let mut pruning = record.map(|r| (r, None));
            let result = one_mirror(
                engine,
                pool,
                trust,
                &m.spec,
                opts,
                progress,
                &mut planned,
                pruning.as_mut(),
            )
            .await;
            let (record, prune) = match pruning {
                Some((r, p)) => (Some(r), p),
                None => (None, None),
            };
            (
                MirrorOutcome {
                    name,
                    result,
                    planned,
                    prune,
                    dry_run: opts.dry_run,
                },
                record,
            )
        }
    });
    let done = join_all(runs).await;
    for (host, limit, cap) in engine.registry_concurrency() {
        tracing::info!(target: "imagemirror::concurrency", "transfer concurrency settled at {limit} of {cap} for registry {host}");
    }
    let mut outcomes = Vec::new();
    for (outcome, record) in done {
        if let Some(r) = record
            && !opts.dry_run
        {
            states.set(&outcome.name, r);
        }
        outcomes.push(outcome);
    }
    if !opts.dry_run {
        states.save()?;
    }
    Ok(outcomes)
}

/// What the command was given to authenticate with and to trust, for every mirror.
#[derive(Clone, Copy)]
struct Trust<'a> {
    auth: &'a DockerConfig,
    ca_pem: Option<&'a [u8]>,
}

/// One mirror's run. `pruning`: when this mirror is pruned, its record (updated in place) and
/// where the prune report goes.
#[allow(clippy::too_many_arguments)]
async fn one_mirror(
    engine: &Engine,
    pool: &ClientPool,
    trust: Trust<'_>,
    spec: &ImageMirrorSpec,
    opts: &MirrorOptions,
    progress: ProgressSink,
    planned: &mut Vec<String>,
    pruning: Option<&mut (PruneRecord, Option<PruneReport>)>,
) -> Result<SyncReport, String> {
    let valid = mirror::validate(spec).map_err(|e| e.to_string())?;
    for (side, s) in [("source", &spec.source), ("destination", &spec.destination)] {
        if s.ca_secret.is_some() {
            tracing::warn!(
                side,
                "caSecret is read by the controller only; the CLI trusts the system roots and --ca-file"
            );
        }
    }
    let access = |registry: &str| EndpointAccess {
        credentials: trust.auth.get(registry).cloned(),
        ca_pem: trust.ca_pem.map(<[u8]>::to_vec),
    };
    let endpoint = |field, s, registry: &str| {
        pool.endpoint(field, s, access(registry))
            .map_err(|e: SpecError| e.to_string())
    };
    let source = endpoint("source", &spec.source, valid.source.registry())?;
    let destination = endpoint(
        "destination",
        &spec.destination,
        valid.destination.registry(),
    )?;
    if opts.dry_run {
        let tags = if mirror::plan::needs_tag_list(&spec.tags) {
            source
                .registry
                .list_tags(source.repo.path(), ALL_TAG_PAGES)
                .await
                .map_err(|e| e.to_string())?
                .tags
        } else {
            Vec::new()
        };
        let plan = mirror::plan::plan(spec, &tags).map_err(|e| e.to_string())?;
        planned.extend(plan.items.iter().map(|i| i.name().to_string()));
        if let Some((record, report)) = pruning {
            // What the run would find at the source decides what it would prune.
            let resolved = prune::resolve(engine, &source, &plan.items).await;
            let mut scratch = record.clone();
            *report = Some(
                mirror::prune_after_sync(
                    engine,
                    spec,
                    &source,
                    &destination,
                    &mut scratch,
                    &resolved,
                    true,
                )
                .await,
            );
        }
        return Ok(SyncReport {
            items: Vec::new(),
            progress: Default::default(),
        });
    }
    let report = mirror::sync(
        engine,
        spec,
        source.clone(),
        destination.clone(),
        opts.engine.max_concurrent.max(1),
        progress,
        Arc::new(Counters::default()),
    )
    .await
    .map_err(|e: SyncError| e.to_string())?;
    if let Some((record, prune)) = pruning {
        *prune = Some(
            mirror::prune_after_sync(engine, spec, &source, &destination, record, &report, false)
                .await,
        );
    }
    Ok(report)
}

/// Progress as plain log lines (for non-TTY output): one line per finished or retried blob.
pub fn line_progress() -> ProgressSink {
    Arc::new(|p: &BlobProgress| match &p.state {
        BlobState::Finished(_) | BlobState::Retrying { .. } => {
            let short = p.digest.get(7..19).unwrap_or(&p.digest);
            eprintln!("{} {short}: {}", p.repository, p.state);
        }
        _ => {}
    })
}

/// Parses a byte size: `1048576`, `512KiB`, `16MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, ...:
/// every unit is binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 16MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{text:?}: unknown unit (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `--rate-limit`: requests per second, 0 for no limit, else between 0.001 (one
/// request per ~17 minutes) and 1 000 000.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let r: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of requests per second"))?;
    if r == 0.0 || (r.is_finite() && (0.001..=1_000_000.0).contains(&r)) {
        Ok(r)
    } else {
        Err(format!(
            "{text:?}: the rate must be 0 (no limit) or between 0.001 and 1000000 requests per second"
        ))
    }
}

/// Parses an engine duration flag: a number with unit `ms`, `s`, `m` or `h` (`90s`, `10m`),
/// at most 7 days.
pub fn parse_flag_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s or 10m"))?;
    let millis_per = match unit.trim() {
        "ms" => 1,
        "s" | "" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{text:?}: unknown unit (use ms, s, m or h)")),
    };
    let millis = number
        .checked_mul(millis_per)
        .filter(|m| *m <= 7 * 24 * 3_600_000)
        .ok_or_else(|| format!("{text:?} is longer than 7 days"))?;
    Ok(std::time::Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::{parse_flag_duration, parse_rate, parse_size};
    use std::time::Duration;

    #[test]
    fn rates_and_durations() {
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert_eq!(parse_rate("0"), Ok(0.0));
        for bad in ["1e-20", "-1", "NaN", "inf", "1e300", "x"] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        assert_eq!(parse_flag_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_flag_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_flag_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "1.5s", "18446744073709551615h", "8d", "999h"] {
            let err = parse_flag_duration(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512kib"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        for bad in ["", "MiB", "1.5MiB", "12 parsecs", "99999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
