//! The `sluice` command: serve, check a config, run the demo, or run a
//! simulated GPU backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sluice::config::Config;
use sluice::mock::{Flavor, MockBackend, MockConfig};
use sluice::{demo, server};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "An AI gateway whose routing decisions are WebAssembly components"
)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API with the configured fleet and policies.
    Serve {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = "sluice.toml")]
        config: PathBuf,
        /// Overrides `server.listen`.
        #[arg(long, env = "SLUICE_LISTEN")]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and compile and trial its policies, then exit.
    CheckConfig {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = "sluice.toml")]
        config: PathBuf,
    },
    /// Run the gateway with two simulated GPU backends; nothing external needed.
    Demo {
        #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run one simulated GPU backend (OpenAI-compatible, streams at a set pace).
    MockBackend {
        #[arg(long, env = "SLUICE_MOCK_LISTEN", default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        #[arg(long, env = "SLUICE_MOCK_NAME", default_value = "mock")]
        name: String,
        /// Comma-separated model names.
        #[arg(
            long,
            env = "SLUICE_MOCK_MODELS",
            value_delimiter = ',',
            default_value = "mock-model"
        )]
        models: Vec<String>,
        #[arg(long, env = "SLUICE_MOCK_FLAVOR", default_value = "vllm")]
        flavor: Flavor,
        #[arg(long, env = "SLUICE_MOCK_FIRST_TOKEN_MS", default_value_t = 0)]
        first_token_ms: u64,
        #[arg(long, env = "SLUICE_MOCK_TOKEN_INTERVAL_MS", default_value_t = 0)]
        token_interval_ms: u64,
        #[arg(long, env = "SLUICE_MOCK_ANSWER_TOKENS", default_value_t = 16)]
        answer_tokens: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, listen } => {
            let mut config = Config::load(&config)?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            let gateway = server::Gateway::new(&config).await?;
            let listener = server::bind(config.server.listen).await?;
            announce(listener.local_addr()?);
            server::serve(
                listener,
                gateway,
                shutdown_signal(),
                config.server.shutdown_timeout,
            )
            .await
        }
        Command::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            let gateway = server::Gateway::new(&config).await?;
            println!(
                "{}: ok ({} backends, {} models, policies: {})",
                path.display(),
                gateway.fleet.backends().len(),
                gateway.fleet.models().len(),
                gateway
                    .chain
                    .policies()
                    .iter()
                    .map(|p| p.name.to_string())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            );
            Ok(())
        }
        Command::Demo { listen } => demo::run(listen, shutdown_signal()).await,
        Command::MockBackend {
            listen,
            name,
            models,
            flavor,
            first_token_ms,
            token_interval_ms,
            answer_tokens,
        } => {
            let models: Vec<&str> = models.iter().map(String::as_str).collect();
            let mut config = MockConfig::new(&name, &models);
            config.flavor = flavor;
            config.first_token_delay = Duration::from_millis(first_token_ms);
            config.token_interval = Duration::from_millis(token_interval_ms);
            config.answer_tokens = answer_tokens;
            let backend = MockBackend::start(listen, config)
                .await
                .context("starting the mock backend")?;
            announce(backend.addr);
            shutdown_signal().await;
            Ok(())
        }
    }
}

/// The one line on stdout that scripts and tests read to find the port.
fn announce(addr: SocketAddr) {
    use std::io::Write;
    println!("sluice listening on http://{addr}");
    let _ = std::io::stdout().flush();
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
