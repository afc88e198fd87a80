//! The `sluice` command: serve, check a config, run the demo, or run a
//! simulated GPU backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use sluice::config::Config;
use sluice::control::admin::Admin;
use sluice::dataplane::server;
use sluice::tools::admin_client::AdminClient;
use sluice::tools::demo;
use sluice::tools::mock::{Flavor, MockBackend, MockConfig};
use sluice::tools::mock_engine::{EngineModel, MetricsFlavor};

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
enum PolicyAction {
    /// Create a policy crate NAME/ that builds and passes its test as is
    /// (no admin API involved).
    New {
        name: String,
        /// The directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The guest SDK (`guest/` of the Sluice sources) to depend on.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a policy offline on recorded requests (JSON lines) against a
    /// described fleet and print each decision; with --expect, fail on any
    /// difference from a file of expected decisions (e.g. a previous run's
    /// output). No admin API involved.
    Test {
        /// FILE.wasm, or builtin:NAME.
        module: String,
        /// Recorded requests, one JSON object per line (see `[recording]`).
        #[arg(long)]
        requests: PathBuf,
        /// A TOML file with `[[backends]]` (and `[state.NAME] healthy,
        /// in_flight`); default: one backend serving every requested model.
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// The policy's config as a JSON file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Expected decisions, one JSON object per line.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// Deploy FILE.wasm as a new version of NAME (a new policy if NAME is new).
    Deploy {
        #[arg(value_parser = policy_name)]
        name: String,
        module: PathBuf,
        /// The policy's config as a JSON file (default: the active version's).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where a new policy goes in the chain (0 = first; default last).
        #[arg(long)]
        position: Option<usize>,
        /// fail-closed or fail-open.
        #[arg(long)]
        on_error: Option<String>,
        /// Run beside the active version without affecting requests.
        #[arg(long)]
        shadow: bool,
    },
    /// List the chain: versions, hashes, sources, which is active, and
    /// the activation history (which version served when, and how).
    List,
    /// Undo NAME's last change: the version that served before the active
    /// one serves again (again: further back).
    Rollback {
        #[arg(value_parser = policy_name)]
        name: String,
    },
    /// Make version VERSION of NAME active (a rollback then returns to the
    /// version active before).
    Activate {
        #[arg(value_parser = policy_name)]
        name: String,
        version: u32,
    },
    /// Take NAME out of the chain.
    Remove {
        #[arg(value_parser = policy_name)]
        name: String,
    },
    /// How often NAME's shadow decided differently, with examples.
    Shadow {
        #[arg(value_parser = policy_name)]
        name: String,
    },
    /// Make NAME's shadow its active version.
    Promote {
        #[arg(value_parser = policy_name)]
        name: String,
    },
    /// Drop NAME's shadow.
    Discard {
        #[arg(value_parser = policy_name)]
        name: String,
    },
}

/// A policy NAME argument: the pattern the admin API enforces, checked
/// before the name is put in a URL.
fn policy_name(name: &str) -> Result<String, String> {
    sluice::config::names::check_policy_name(name).map(|()| name.to_string())
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
        /// Overrides `server.admin_listen`.
        #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// The admin API's bearer token (else `server.admin_token_file`).
        #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Overrides `server.status_endpoints` (`summary` or `data-plane`).
        #[arg(long, env = "SLUICE_STATUS_ENDPOINTS")]
        status_endpoints: Option<sluice::config::StatusEndpoints>,
    },
    /// Deploy, list, roll back and shadow policies on a running gateway.
    Policy {
        /// The admin API's address.
        #[arg(
            long,
            env = "SLUICE_ADMIN_URL",
            default_value = "http://127.0.0.1:8081",
            global = true
        )]
        admin_url: String,
        #[arg(
            long,
            env = "SLUICE_ADMIN_TOKEN",
            hide_env_values = true,
            global = true
        )]
        admin_token: Option<String>,
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Validate a config file and compile and trial its policies, then exit.
    CheckConfig {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = "sluice.toml")]
        config: PathBuf,
    },
    /// Make a new consumer API key and print it with the hash that goes in
    /// `[[consumers]] key_hashes` (the file never holds the key itself).
    NewKey,
    /// Print the `sha256:` hash of an existing API key (read from stdin
    /// when not given, so it stays out of the shell history).
    HashKey { key: Option<String> },
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
        /// Tokens in an answer `max_tokens` does not cut short (1 to 100000).
        #[arg(
            long,
            env = "SLUICE_MOCK_ANSWER_TOKENS",
            default_value_t = 16,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(sluice::tools::mock::MAX_ANSWER_TOKENS))
        )]
        answer_tokens: u32,
        /// Simulate an engine: a bounded batch with a queue, a prefix
        /// cache, and `/metrics` with these engine's names.
        #[arg(long, env = "SLUICE_MOCK_ENGINE")]
        engine: Option<MetricsFlavor>,
        /// The engine's KV cache, in blocks.
        #[arg(long, env = "SLUICE_MOCK_KV_BLOCKS", default_value_t = 1024)]
        kv_blocks: u32,
        /// Tokens per KV block.
        #[arg(long, env = "SLUICE_MOCK_BLOCK_TOKENS", default_value_t = 16)]
        block_tokens: u32,
        /// Prefill time per prompt token not in the cache, in microseconds;
        /// one prompt is prefilled at a time (the others wait, as queued).
        #[arg(long, env = "SLUICE_MOCK_PREFILL_US_PER_TOKEN", default_value_t = 0)]
        prefill_us_per_token: u64,
        /// Requests decoded at once; more wait in the engine's queue.
        #[arg(long, env = "SLUICE_MOCK_MAX_BATCH", default_value_t = 64)]
        max_batch: u32,
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
        Command::Serve {
            config,
            listen,
            admin_listen,
            admin_token,
            status_endpoints,
        } => {
            let path = config;
            let mut config = Config::load(&path)?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(admin_listen) = admin_listen {
                config.server.admin_listen = Some(admin_listen);
            }
            if let Some(status_endpoints) = status_endpoints {
                config.server.status_endpoints = status_endpoints;
            }
            serve(config, path, admin_token).await
        }
        Command::Policy {
            admin_url,
            admin_token,
            action,
        } => {
            if let PolicyAction::New { name, dir, sdk } = &action {
                let sdk = sdk
                    .clone()
                    .unwrap_or_else(sluice::tools::scaffold::default_sdk);
                let root = sluice::tools::scaffold::create(name, dir, &sdk)?;
                println!(
                    "created {root}\n  cd {root}\n  cargo test\n  cargo build --target wasm32-wasip2 --release\n  sluice policy deploy {name} target/wasm32-wasip2/release/{file}.wasm",
                    root = root.display(),
                    file = name.replace('-', "_"),
                );
                return Ok(());
            }
            if let PolicyAction::Test {
                module,
                requests,
                fleet,
                config,
                expect,
            } = &action
            {
                let config = match config {
                    Some(path) => serde_json::from_str(
                        &std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("{}: not JSON", path.display()))?,
                    None => serde_json::json!({}),
                };
                let (decisions, differences) = sluice::tools::replay::run(
                    &Default::default(),
                    module,
                    config,
                    requests,
                    fleet.as_deref(),
                    expect.as_deref(),
                )
                .await?;
                for decision in &decisions {
                    println!("{decision}");
                }
                if !differences.is_empty() {
                    for difference in &differences {
                        eprintln!("{difference}");
                    }
                    anyhow::bail!("{} decisions differ from the expected", differences.len());
                }
                return Ok(());
            }
            let client = AdminClient::new(&admin_url, admin_token);
            let output = match action {
                PolicyAction::New { .. } | PolicyAction::Test { .. } => {
                    unreachable!("handled above")
                }
                PolicyAction::Deploy {
                    name,
                    module,
                    config,
                    position,
                    on_error,
                    shadow,
                } => {
                    client
                        .deploy(
                            &name,
                            &module,
                            config.as_deref(),
                            position,
                            on_error.as_deref(),
                            shadow,
                        )
                        .await?
                }
                PolicyAction::List => {
                    client
                        .call(Method::GET, "/admin/policies", Default::default())
                        .await?
                }
                PolicyAction::Rollback { name } => {
                    let path = format!("/admin/policies/{name}/rollback");
                    client.call(Method::POST, &path, Default::default()).await?
                }
                PolicyAction::Activate { name, version } => {
                    let path = format!("/admin/policies/{name}/activate/{version}");
                    client.call(Method::POST, &path, Default::default()).await?
                }
                PolicyAction::Remove { name } => {
                    let path = format!("/admin/policies/{name}");
                    client
                        .call(Method::DELETE, &path, Default::default())
                        .await?
                }
                PolicyAction::Shadow { name } => {
                    let path = format!("/admin/policies/{name}/shadow");
                    client.call(Method::GET, &path, Default::default()).await?
                }
                PolicyAction::Promote { name } => {
                    let path = format!("/admin/policies/{name}/shadow/promote");
                    client.call(Method::POST, &path, Default::default()).await?
                }
                PolicyAction::Discard { name } => {
                    let path = format!("/admin/policies/{name}/shadow");
                    client
                        .call(Method::DELETE, &path, Default::default())
                        .await?
                }
            };
            println!("{output}");
            Ok(())
        }
        Command::CheckConfig { config: path } => {
            let mut config = Config::load(&path)?;
            // Check the file's own policies, and write nothing next to it.
            config.policy_store.state_dir = None;
            config.usage.disabled = true;
            let node = sluice::control::Node::start(&config).await?;
            let gateway = &node.gateway;
            println!(
                "{}: ok ({} backends, {} models, policies: {})",
                path.display(),
                gateway.fleet.load().backends().len(),
                gateway.fleet.load().models().len(),
                node.deployer
                    .chain()
                    .load()
                    .policies()
                    .map(|p| p.name.to_string())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            );
            Ok(())
        }
        Command::NewKey => {
            let key = sluice::accounts::consumers::new_key().context("reading /dev/urandom")?;
            println!("key: {key}");
            println!(
                "key_hashes = [{:?}]",
                sluice::accounts::consumers::hash_key(&key)
            );
            Ok(())
        }
        Command::HashKey { key } => {
            let key = match key {
                Some(key) => key,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim().to_string()
                }
            };
            anyhow::ensure!(!key.is_empty(), "no key given");
            println!("{}", sluice::accounts::consumers::hash_key(&key));
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
            engine,
            kv_blocks,
            block_tokens,
            prefill_us_per_token,
            max_batch,
        } => {
            let models: Vec<&str> = models.iter().map(String::as_str).collect();
            let mut config = MockConfig::new(&name, &models);
            config.flavor = flavor;
            config.first_token_delay = Duration::from_millis(first_token_ms);
            config.token_interval = Duration::from_millis(token_interval_ms);
            config.answer_tokens = answer_tokens;
            config.engine = engine.map(|metrics| EngineModel {
                kv_blocks,
                block_tokens,
                prefill_per_token: Duration::from_micros(prefill_us_per_token),
                max_batch,
                metrics,
            });
            let backend = MockBackend::start(listen, config)
                .await
                .context("starting the mock backend")?;
            announce("sluice listening", backend.addr);
            shutdown_signal().await;
            Ok(())
        }
    }
}

/// Runs the data plane and the admin API until a shutdown signal.
async fn serve(
    config: Config,
    path: std::path::PathBuf,
    admin_token: Option<String>,
) -> anyhow::Result<()> {
    let given = match (admin_token, &config.server.admin_token_file) {
        (Some(token), _) => Some(("SLUICE_ADMIN_TOKEN", token)),
        (None, Some(file)) => Some((
            "server.admin_token_file",
            std::fs::read_to_string(file)
                .with_context(|| format!("server.admin_token_file: reading {}", file.display()))?,
        )),
        (None, None) => None,
    };
    let admin_addr = config
        .server
        .admin_listen
        .unwrap_or(sluice::config::DEFAULT_ADMIN_LISTEN);
    let token = match given {
        Some((source, token)) => Some(sluice::control::admin::check_token(
            source,
            &token,
            admin_addr.ip().is_loopback(),
        )?),
        None => None,
    };
    if token.is_none() && !admin_addr.ip().is_loopback() {
        anyhow::bail!(
            "server.admin_listen: {admin_addr} is not a loopback address, and no admin token is set \
             (SLUICE_ADMIN_TOKEN or server.admin_token_file)"
        );
    }
    if token.is_none() {
        tracing::warn!(%admin_addr, "no admin token configured: the admin API is open to local processes only");
    }

    let node = sluice::control::Node::start(&config).await?;
    let gateway = node.gateway.clone();
    gateway.checker.start().await;
    tokio::spawn(sluice::control::reload::watch(
        path,
        gateway.clone(),
        config.clone(),
    ));
    let listener = server::bind(config.server.listen).await?;
    let admin_listener = match server::bind(admin_addr).await {
        Ok(listener) => listener,
        // Not asked for: a second gateway on this host still starts, with
        // its admin API on a free port (printed below).
        Err(e) if config.server.admin_listen.is_none() => {
            tracing::warn!(error = %e, "the default admin address is taken; the admin API listens on a free loopback port instead");
            server::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?
        }
        Err(e) => return Err(e),
    };
    let usage = gateway.ledger.store.clone();
    let admin = Arc::new(Admin {
        deployer: node.deployer.clone(),
        token,
        usage: usage.clone(),
        gateway: gateway.clone(),
        feed: sluice::control::console::start_feed(gateway.fleet.clone()),
    });
    if let Some(dir) = config.policy_store.watch_dir.clone() {
        tokio::spawn(
            node.deployer
                .clone()
                .watch(dir, config.policy_store.watch_interval),
        );
    }
    if config.policy_store.state_dir.is_some() && !config.policy_store.sync_interval.is_zero() {
        let interval = config.policy_store.sync_interval;
        tokio::spawn(node.deployer.clone().follow(interval));
        tokio::spawn(gateway.consumers.clone().follow(interval));
        tokio::spawn(gateway.workers.clone().follow(interval));
    }
    announce("admin listening", admin_listener.local_addr()?);
    announce("sluice listening", listener.local_addr()?);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let options = server::ServeOptions {
        drain: config.server.shutdown_timeout,
        header_timeout: config.server.header_timeout,
    };
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        move |r| admin.clone().handle(r),
        wait(stopped.clone()),
        options,
    ));
    let data = server::serve(
        listener,
        {
            let gateway = gateway.clone();
            move |r| gateway.clone().handle(r)
        },
        wait(stopped),
        options,
    );
    // First signal: /ready turns 503 while requests are still served, then
    // the listeners close and open requests and streams drain. A second
    // signal ends the drain at once.
    let unready_delay = config.server.unready_delay;
    let signals = {
        let usage = usage.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            gateway.set_unready();
            tracing::info!(
                "shutting down: /ready answers 503; closing the listeners in {unready_delay:?}"
            );
            tokio::select! {
                () = tokio::time::sleep(unready_delay) => {}
                () = shutdown_signal() => force_exit(usage).await,
            }
            let _ = stop.send(true);
            shutdown_signal().await;
            force_exit(usage).await;
        })
    };
    let served = data.await;
    admin_task.await??;
    signals.abort();
    if let Some(usage) = usage {
        // Nothing recorded before the stop is lost on a clean shutdown.
        if !usage.shutdown_async(Duration::from_secs(10)).await {
            tracing::error!("usage records could not all be written before shutdown");
        }
    }
    served
}

/// A second shutdown signal: stop waiting for open requests, write what
/// usage records can be written in a moment, and exit 1.
async fn force_exit(usage: Option<sluice::usage::UsageStore>) -> ! {
    tracing::warn!("second shutdown signal: exiting without waiting for open requests");
    if let Some(usage) = usage {
        usage.shutdown_async(Duration::from_secs(2)).await;
    }
    std::process::exit(1)
}

/// The lines on stdout that scripts and tests read to find the ports.
fn announce(what: &str, addr: SocketAddr) {
    use std::io::Write;
    println!("{what} on http://{addr}");
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
