//! The `imagemirror` binary: parses arguments and wires the library together.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use imagemirror::cli::{self, Bars, MirrorOptions, OutputFormat, ProgressMode};
use imagemirror::controller::{ControllerConfig, LeaderElection, Sharding};
use imagemirror::registry::HttpMode;
use imagemirror::transfer::{EngineConfig, RetryPolicy, StallWatchdog};

/// Keeps container images mirrored between registries.
#[derive(Parser)]
#[command(name = "imagemirror", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "IMAGEMIRROR_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,imagemirror=debug`.
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "IMAGEMIRROR_LOG_LEVEL"
    )]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ImageMirror CustomResourceDefinition as YAML.
    Crd,
    /// Copy the tags of one or more ImageMirror documents once, without a cluster.
    Mirror(MirrorArgs),
    /// Run the Kubernetes controller (in-cluster config, or $KUBECONFIG / ~/.kube/config).
    Controller(ControllerArgs),
}

/// The engine's limits and upload settings, the same for `mirror` and `controller`.
#[derive(clap::Args)]
struct EngineArgs {
    /// Blob transfers at once across all registries (blobs up to 1 MiB count a quarter).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Blob transfers at once against one registry (blobs up to 1 MiB count a quarter): the cap of
    /// each registry's adaptive limit, or the fixed limit with --adaptive-concurrency=false.
    #[arg(long, default_value_t = 4)]
    registry_concurrency: usize,
    /// Where each registry's adaptive limit starts (1 to --registry-concurrency); it then
    /// grows while goodput rises and halves on 502/503/504, stalls and broken connections
    /// (429s and 503s with Retry-After pause the registry instead).
    #[arg(long, default_value_t = 4)]
    registry_concurrency_start: usize,
    /// Adapt each registry's transfer limit within [1, --registry-concurrency] (default: on,
    /// starting at the cap, so by default it only backs off from an overloaded registry and
    /// climbs back; raise --registry-concurrency to let it probe higher); false: fixed at
    /// --registry-concurrency.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    adaptive_concurrency: bool,
    /// Blobs larger than this go up in resumable chunks (KiB, MiB, GiB); smaller ones in one PUT.
    #[arg(long, value_parser = cli::parse_size, default_value = "64MiB")]
    chunked_threshold: u64,
    /// Size of each chunk of a chunked upload (at least 64KiB).
    #[arg(long, value_parser = cli::parse_size, default_value = "16MiB")]
    chunk_size: u64,
    /// Requests per second to any one registry [default: no limit; a 429 with Retry-After always pauses the registry].
    #[arg(long, value_parser = cli::parse_rate)]
    rate_limit: Option<f64>,
    /// How long one transfer or request waits out 429/503 answers (which never count as
    /// failed attempts) before it fails (ms, s, m, h).
    #[arg(long, value_parser = cli::parse_flag_duration, default_value = "10m")]
    throttle_timeout: std::time::Duration,
    /// Stall watchdog: a transfer moving fewer than --stall-min-bytes in this window is
    /// abandoned and retried; 0s disables it (ms, s, m, h).
    #[arg(long, value_parser = cli::parse_flag_duration, default_value = "60s")]
    stall_window: std::time::Duration,
    /// Stall watchdog: bytes a transfer must move in every --stall-window (KiB, MiB).
    #[arg(long, value_parser = cli::parse_size, default_value = "1KiB")]
    stall_min_bytes: u64,
    /// HTTP version per kind of request: auto (blob bodies over 1 MiB over HTTP/1.1
    /// connections, other requests and smaller blobs over HTTP/2 where the registry offers it),
    /// http1 (everything HTTP/1.1), http2 (everything HTTP/2 where offered).
    #[arg(long, value_enum, default_value_t = HttpArg::Auto)]
    http: HttpArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum HttpArg {
    Auto,
    Http1,
    Http2,
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            max_concurrent: self.concurrency.max(1),
            max_per_registry: self.registry_concurrency.max(1),
            initial_per_registry: Some(self.registry_concurrency_start.max(1)),
            adaptive: self.adaptive_concurrency,
            chunked_threshold: self.chunked_threshold,
            chunk_size: self.chunk_size,
            rate_limit: cli::rate_limit(self.rate_limit),
            retry: RetryPolicy {
                throttle_deadline: self.throttle_timeout,
                ..RetryPolicy::default()
            },
            stall: (!self.stall_window.is_zero()).then_some(StallWatchdog {
                window: self.stall_window,
                min_bytes: self.stall_min_bytes,
            }),
            http: match self.http {
                HttpArg::Auto => HttpMode::Auto,
                HttpArg::Http1 => HttpMode::Http1,
                HttpArg::Http2 => HttpMode::Http2,
            },
            ..EngineConfig::default()
        }
    }
}

/// The controller's flags, as the Helm chart passes them.
#[derive(clap::Args)]
struct ControllerArgs {
    /// Watch ImageMirrors in this namespace only (repeatable) [default: all namespaces].
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: String,
    /// Only the holder of a coordination.k8s.io Lease reconciles.
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "imagemirror-leader")]
    lease_name: String,
    /// PEM bundle of extra CA certificates trusted for every registry, in addition to the system roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// This replica's identity for leader election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds running syncs get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 20)]
    shutdown_grace_seconds: u64,
    /// Split the ImageMirrors into this many shards (by UID), each owned through a Lease
    /// `imagemirror-shard-<i>` in the leader-election namespace; replicas share the shards.
    /// 1: no sharding (leader election as --leader-elect says); above 1 replaces it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    shards: u32,
    /// Watch only ImageMirrors matching this label selector (static sharding: one
    /// Deployment per label value), e.g. `imagemirror.dev/shard=a`.
    #[arg(long)]
    selector: Option<String>,
    /// ImageMirrors reconciled at once once a sync is due (reading Secrets, syncing, writing
    /// status), over all watched namespaces; the rest wait their turn. Bounds the memory and
    /// connections of a burst (a restart, a rotated Secret many mirrors name).
    #[arg(long, default_value_t = imagemirror::controller::DEFAULT_RECONCILE_CONCURRENCY,
          value_parser = clap::value_parser!(u16).range(1..))]
    reconcile_concurrency: u16,
    /// Lifetime of the leader-election and shard Leases, in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// A holder renews its Leases this many seconds before they expire (less than the duration).
    #[arg(long, default_value_t = 5)]
    lease_grace_seconds: u64,
}

impl ControllerArgs {
    fn into_config(self) -> Result<ControllerConfig, String> {
        let metrics_addr = self
            .metrics_addr
            .parse()
            .map_err(|e| format!("--metrics-addr {:?}: {e}", self.metrics_addr))?;
        let identity = self
            .identity
            .unwrap_or_else(|| format!("imagemirror-{:08x}", rand::random::<u32>()));
        let (duration, grace) = (self.lease_duration_seconds, self.lease_grace_seconds);
        if grace == 0 || grace >= duration {
            return Err(format!(
                "--lease-grace-seconds {grace} must be above 0 and below --lease-duration-seconds {duration}"
            ));
        }
        if let Some(s) = &self.selector {
            imagemirror::controller::shards::check_selector(s)?;
        }
        let sharding = (self.shards > 1).then(|| Sharding {
            shards: self.shards,
            namespace: self.leader_election_namespace.clone(),
            identity: identity.clone(),
            duration_seconds: duration,
            grace_seconds: grace,
        });
        Ok(ControllerConfig {
            namespaces: self.namespaces,
            engine: self.engine.config(),
            item_concurrency: self.engine.concurrency.max(1),
            reconcile_concurrency: usize::from(self.reconcile_concurrency),
            metrics_addr: Some(metrics_addr),
            leader_election: (self.leader_elect && sharding.is_none()).then_some(LeaderElection {
                namespace: self.leader_election_namespace,
                lease_name: self.lease_name,
                identity,
                duration_seconds: duration,
                grace_seconds: grace,
            }),
            ca_file: self.ca_file,
            shutdown_grace: std::time::Duration::from_secs(self.shutdown_grace_seconds),
            sharding,
            selector: self.selector,
            ..ControllerConfig::default()
        })
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

async fn run_controller(args: ControllerArgs) -> ExitCode {
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match imagemirror::controller::run(client, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "controller stopped");
            ExitCode::from(1)
        }
    }
}

#[derive(clap::Args)]
struct MirrorArgs {
    /// YAML file with one or more ImageMirror documents (repeatable).
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Print what would be copied; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Warn about unknown fields in the YAML instead of refusing the document.
    #[arg(long)]
    lenient: bool,
    /// Docker config JSON with registry credentials [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, env = "IMAGEMIRROR_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// PEM bundle of extra CA certificates trusted for every registry, in addition to the system roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Summary format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Progress display: bars on a terminal and plain lines elsewhere (auto), or as chosen.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// After a sync where every item succeeded, delete destination tags this command wrote
    /// earlier that are no longer selected (as `spec.prune: true`, which also turns it on).
    #[arg(long)]
    prune: bool,
    /// The prune state file (what each mirror wrote) [default: beside each YAML file, `<name>.prune-state.json`].
    #[arg(long)]
    state: Option<PathBuf>,
}

/// Sets up logging to stderr; with progress bars, log lines go above the bars.
fn init_logging(format: LogFormat, filter: &str, bars: Option<&Arc<Bars>>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = match bars {
        Some(bars) => {
            let bars = bars.clone();
            BoxMakeWriter::new(move || bars.log_writer())
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    imagemirror::install_crypto_provider();
    let args = Cli::parse();
    let mode = match &args.command {
        Command::Mirror(m) => m.progress.resolve(std::io::stderr().is_terminal()),
        _ => ProgressMode::None,
    };
    let bars = (mode == ProgressMode::Bars).then(Bars::new);
    init_logging(args.log_format, &args.log_level, bars.as_ref());
    if matches!(args.command, Command::Mirror(_) | Command::Controller(_)) {
        // Reading the system's CA certificates overlaps parsing the input and starting up.
        imagemirror::registry::preload_root_certificates();
    }
    match args.command {
        Command::Controller(c) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run_controller(c)),
            Err(e) => {
                eprintln!("error: starting the runtime: {e}");
                ExitCode::from(2)
            }
        },
        Command::Crd => {
            print!("{}", imagemirror::api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Mirror(m) => {
            let opts = MirrorOptions {
                files: m.files,
                dry_run: m.dry_run,
                auth_file: m.auth_file,
                ca_file: m.ca_file,
                engine: m.engine.config(),
                output: m.output,
                lenient: m.lenient,
                prune: m.prune,
                state: m.state,
            };
            let progress = match (&bars, mode) {
                (Some(bars), _) => bars.sink(),
                (None, ProgressMode::Plain) => cli::line_progress(),
                (None, _) => imagemirror::transfer::no_progress(),
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = runtime.block_on(cli::run_mirror(&opts, progress));
            if let Some(bars) = &bars {
                bars.finish();
            }
            match result {
                Ok(outcomes) => {
                    print!("{}", cli::render(&outcomes, opts.output));
                    if outcomes.iter().any(|o| o.failed()) {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
