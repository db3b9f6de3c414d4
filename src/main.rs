//! The `imagemirror` binary: parses arguments and wires the library together.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use imagemirror::cli::{self, Bars, MirrorOptions, OutputFormat, ProgressMode};

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
    /// Run the Kubernetes controller (not implemented yet: the flags are the chart's contract).
    Controller(ControllerArgs),
}

/// The controller's flags, as the Helm chart passes them.
#[derive(clap::Args)]
struct ControllerArgs {
    /// Watch ImageMirrors in this namespace only (repeatable) [default: all namespaces].
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Blob transfers at once across all registries.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Blob transfers at once against one registry.
    #[arg(long, default_value_t = 4)]
    registry_concurrency: usize,
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
}

#[derive(clap::Args)]
struct MirrorArgs {
    /// YAML file with one or more ImageMirror documents (repeatable).
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Print what would be copied; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Docker config JSON with registry credentials [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long, env = "IMAGEMIRROR_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// Blob transfers at once across all registries.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Blob transfers at once against one registry.
    #[arg(long, default_value_t = 4)]
    registry_concurrency: usize,
    /// Summary format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Blobs larger than this go up in resumable chunks (KiB, MiB, GiB); smaller ones in one PUT.
    #[arg(long, value_parser = cli::parse_size, default_value = "64MiB")]
    chunked_threshold: u64,
    /// Size of each chunk of a chunked upload (at least 64KiB).
    #[arg(long, value_parser = cli::parse_size, default_value = "16MiB")]
    chunk_size: u64,
    /// Requests per second to any one registry [default: no limit; a 429 with Retry-After always pauses the registry].
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Progress display: bars on a terminal and plain lines elsewhere (auto), or as chosen.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
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
    match args.command {
        Command::Controller(_) => {
            eprintln!(
                "error: the controller is not implemented yet; `imagemirror mirror -f FILE` runs the same engine once"
            );
            ExitCode::from(2)
        }
        Command::Crd => {
            print!("{}", imagemirror::api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Mirror(m) => {
            let opts = MirrorOptions {
                files: m.files,
                dry_run: m.dry_run,
                auth_file: m.auth_file,
                concurrency: m.concurrency,
                registry_concurrency: m.registry_concurrency,
                output: m.output,
                chunked_threshold: m.chunked_threshold,
                chunk_size: m.chunk_size,
                rate_limit: m.rate_limit.filter(|r| *r > 0.0),
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
