//! The typed, validated configuration (`sluice.toml`).
//!
//! Parsing rejects unknown keys and wrong types (the TOML error names the
//! line and key); [`Config::validate`] then checks what types cannot say,
//! again naming the key, so an operator never has to guess which line is bad.

mod engine;
pub mod names;
mod prefix;
mod url;

pub use engine::{EngineKind, EngineMetricsConfig, EngineNamesConfig, MetricNames};
pub use prefix::PrefixCacheConfig;
pub use url::BackendUrl;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Where the admin API listens when `server.admin_listen` is not set.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8081);

/// A configuration problem, with the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub policy_runtime: PolicyRuntimeConfig,
    #[serde(default)]
    pub policy_store: PolicyStoreConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub recording: RecordingConfig,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    #[serde(default)]
    pub ejection: EjectionConfig,
    #[serde(default)]
    pub engine_metrics: EngineMetricsConfig,
    #[serde(default)]
    pub prefix_cache: PrefixCacheConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// vllm-router's `servers.toml` shape (`[servers] servers = [{ url,
    /// max_concurrent_requests }]`), read as backends named after their
    /// address whose models are asked of them: an operator moving from it
    /// keeps the file. Empty once parsed.
    #[serde(default)]
    pub servers: ServersSection,
    /// The policy chain, run in order for every request. Empty means the
    /// default chain: `builtin:model-router` with no configuration.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// HTTP components mounted on routes next to the OpenAI API.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
}

/// An edge worker: a `wasi:http` component (0.2 `incoming-handler` or 0.3
/// `handler`, what spin-sdk builds) answering every request on its route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub name: String,
    /// `/tools/*` (the prefix and everything under it) or an exact path.
    pub route: String,
    /// A `.wasm` component; relative to the config file.
    pub module: String,
    /// Hosts the worker may call (`host` for any port, or `host:port`);
    /// every other outbound request is refused.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Environment variables the worker sees (its only configuration).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Until the response headers, and again for the body after them.
    #[serde(default = "worker_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Linear memory cap per request.
    #[serde(default = "worker_memory", deserialize_with = "de_bytes")]
    pub memory_limit: u64,
    /// Requests the worker runs at once (each in its own instance, with up
    /// to `memory_limit`); more wait up to a second, then get 503.
    #[serde(default = "worker_concurrency")]
    pub max_concurrent_requests: u32,
}

fn worker_concurrency() -> u32 {
    64
}

fn worker_timeout() -> Duration {
    Duration::from_secs(30)
}

fn worker_memory() -> u64 {
    128 << 20
}

/// Paths the gateway answers itself; no worker route may cover them.
pub const RESERVED_PATHS: [&str; 5] = ["/v1", "/health", "/ready", "/metrics", "/load-stats"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the OpenAI-compatible listener.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413 before they are
    /// read. Long-context prompts of several MiB are normal.
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: u64,
    /// Time a client has to send its request head; slower ones get 408 and
    /// are disconnected (slow-header attacks hold connections otherwise).
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// Time a client has to send its whole request body (408 after).
    #[serde(deserialize_with = "de_duration")]
    pub body_timeout: Duration,
    /// Time allowed to open a TCP connection to a backend.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to a backend until its response
    /// headers arrive (prefill of a long prompt happens in this window).
    #[serde(deserialize_with = "de_duration")]
    pub response_timeout: Duration,
    /// On shutdown, how long in-flight requests and streams may take to end.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// On shutdown, how long `/ready` answers 503 while requests are still
    /// served, so a load balancer stops sending before the listener closes.
    #[serde(deserialize_with = "de_duration")]
    pub unready_delay: Duration,
    /// Requests waiting for a slot when every backend the policy chose is at
    /// its `max_concurrent_requests`; beyond this they get 503 at once.
    pub max_queue: usize,
    /// How long a request waits in that queue before 503.
    #[serde(deserialize_with = "de_duration")]
    pub queue_timeout: Duration,
    /// Address of the admin API (deploys, usage), separate from the data
    /// plane. Without an admin token it must be a loopback address. Unset:
    /// [`DEFAULT_ADMIN_LISTEN`], or a free loopback port when another
    /// process holds that one — an admin port never keeps the data plane
    /// from starting unless it was asked for.
    pub admin_listen: Option<SocketAddr>,
    /// File holding the admin bearer token (`SLUICE_ADMIN_TOKEN` wins).
    pub admin_token_file: Option<PathBuf>,
    /// How often the config file is checked for changes to reload its
    /// backends (SIGHUP reloads at once); `0s` turns watching off.
    #[serde(deserialize_with = "de_duration")]
    pub reload_interval: Duration,
    /// What `/health`, `/load-stats` and `/metrics` show on the data-plane
    /// port (the admin listener always serves them in full, under the admin
    /// token).
    pub status_endpoints: StatusEndpoints,
}

/// How much of the gateway's state the data-plane port shows to anyone who
/// can reach it (`server.status_endpoints`, `SLUICE_STATUS_ENDPOINTS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatusEndpoints {
    /// `/health` answers only `{"healthy":…}` (200 or 503, for load
    /// balancers and container health checks); `/load-stats` and
    /// `/metrics` are 404. Backend URLs, their errors and consumer names
    /// stay on the admin listener.
    #[default]
    Summary,
    /// `/health`, `/load-stats` and `/metrics` in full on the data plane
    /// too, for a port only trusted networks reach.
    DataPlane,
}

impl std::str::FromStr for StatusEndpoints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "summary" => Ok(StatusEndpoints::Summary),
            "data-plane" => Ok(StatusEndpoints::DataPlane),
            _ => Err(format!("`{s}`: expected `summary` or `data-plane`")),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 16 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
            unready_delay: Duration::from_secs(1),
            max_queue: 1024,
            queue_timeout: Duration::from_secs(30),
            admin_listen: None,
            admin_token_file: None,
            reload_interval: Duration::from_secs(2),
            status_endpoints: StatusEndpoints::Summary,
        }
    }
}

/// Bounds on every policy call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyRuntimeConfig {
    /// CPU time one policy call may take before it is interrupted.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Linear memory one policy instance may grow to.
    #[serde(deserialize_with = "de_bytes")]
    pub memory_limit: u64,
    /// Policy instances alive at once (one per request being decided).
    pub max_instances: u32,
    /// Largest body a policy may read through `request-data.body`.
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: u64,
}

impl Default for PolicyRuntimeConfig {
    fn default() -> Self {
        PolicyRuntimeConfig {
            // A policy needs tens of µs of CPU. Waits for a saturated
            // executor are not charged to the guest, but ticks land on a busy
            // machine late: keep a wide margin. Loops are throttled anyway.
            timeout: Duration::from_millis(250),
            memory_limit: 64 << 20,
            max_instances: 1000,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Per-request usage records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// SQLite file for usage records. Default: `sluice-usage.db` next to
    /// the config file.
    pub database: Option<PathBuf>,
    /// Keep no records on disk (metrics and the access log still count).
    pub disabled: bool,
    /// One structured log line per request (never the prompt text).
    pub access_log: bool,
    /// Share records with the other replicas through this Redis, so that
    /// each replica's database (and `/admin/usage`) holds the whole fleet's.
    pub redis_url: Option<String>,
    /// The Redis stream the replicas of one fleet share.
    pub redis_key: String,
    /// The stream is trimmed to about this many records: a replica away for
    /// longer than they last misses the trimmed ones (and logs it).
    pub redis_max_records: u64,
    /// How often records are shipped to and copied from Redis.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// This replica's name in the records (`group_by=replica`). Default: the
    /// one saved in the database, first made from `HOSTNAME`.
    pub replica: Option<String>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            database: None,
            disabled: false,
            access_log: true,
            redis_url: None,
            redis_key: "sluice:usage".into(),
            // ~1M records are a few hundred MiB in Redis: days of a busy fleet.
            redis_max_records: 1_000_000,
            sync_interval: Duration::from_secs(1),
            replica: None,
        }
    }
}

/// Sampling live requests to a JSON-lines file that `sluice policy test`
/// replays: metadata and the body (bounded), never credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// The file to append to (relative to the config file); unset: off.
    pub path: Option<PathBuf>,
    /// Share of requests recorded, 0.0 to 1.0.
    pub sample: f64,
    /// Bodies larger than this are recorded as their `model` and `stream`
    /// only (enough to replay routing).
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_bytes: u64,
    /// Recording stops when the file reaches this size.
    #[serde(deserialize_with = "de_bytes")]
    pub max_file_bytes: u64,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            path: None,
            sample: 0.01,
            max_body_bytes: 64 << 10,
            max_file_bytes: 100 << 20,
        }
    }
}

/// Where deployed policies live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyStoreConfig {
    /// Deployed versions and the chain, so deploys survive a restart.
    /// Default: `sluice-state` next to the config file.
    pub state_dir: Option<PathBuf>,
    /// Dropping `NAME.wasm` (and optionally `NAME.json`) here deploys it.
    pub watch_dir: Option<PathBuf>,
    /// How often the watched directory is scanned.
    #[serde(deserialize_with = "de_duration")]
    pub watch_interval: Duration,
    /// How often `state_dir` is checked for a chain another replica sharing
    /// it deployed; `0s` turns following off.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
}

impl Default for PolicyStoreConfig {
    fn default() -> Self {
        PolicyStoreConfig {
            state_dir: None,
            watch_dir: None,
            watch_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(1),
        }
    }
}

/// Active health checks: the host probes every backend on its own, so a
/// dead server is found before a client's request does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Probe backends at all (model discovery probes regardless).
    pub enabled: bool,
    /// Time between two probes of one backend.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// A probe not answered within this counts as failed.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Failed probes in a row that mark a backend down.
    pub unhealthy_after: u32,
    /// Successful probes in a row that mark it up again.
    pub healthy_after: u32,
    /// A probe slower than this counts as failed (an overloaded server).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_response_time: Option<Duration>,
    /// Path probed with GET; a backend's `health_path` wins. It must be one
    /// the server really has: `/v1/models` works on vLLM, Ollama, SGLang,
    /// TGI and llama.cpp; vLLM also has `/health`.
    pub path: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enabled: true,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            unhealthy_after: 2,
            healthy_after: 2,
            max_response_time: None,
            path: "/v1/models".into(),
        }
    }
}

/// Passive ejection: real requests failing in a row take a backend out of
/// rotation for a back-off that doubles while it keeps failing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionConfig {
    /// Failed requests in a row (connect errors, timeouts, 5xx) that eject a
    /// backend; 0 turns passive ejection off.
    pub after_failures: u32,
    /// First ejection's length; each ejection in a row doubles it.
    #[serde(deserialize_with = "de_duration")]
    pub base: Duration,
    /// Longest ejection.
    #[serde(deserialize_with = "de_duration")]
    pub max: Duration,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            after_failures: 3,
            base: Duration::from_secs(5),
            max: Duration::from_secs(120),
        }
    }
}

/// Moving a failed request to the next backend the policy listed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts after the first, whatever the policies ask (at most 10).
    pub max_retries: u32,
    /// Pause before each retry.
    #[serde(deserialize_with = "de_duration")]
    pub retry_delay: Duration,
    /// Backend statuses that move the request on when no failure hook
    /// decides otherwise; other error statuses go to the client.
    pub on_status: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 3,
            retry_delay: Duration::ZERO,
            on_status: vec![502, 503, 504],
        }
    }
}

/// Client authentication with consumers' API keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Every request needs `Authorization: Bearer KEY` of a consumer. Off:
    /// requests without a known key are served as anonymous (single-user
    /// setups), and a known key still identifies its consumer.
    pub required: bool,
}

/// Where consumers' counters live and what happens when that store fails.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Share counters with other replicas through Redis, e.g.
    /// `redis://127.0.0.1:6379/0`. Unset: in this process's memory.
    pub redis_url: Option<String>,
    /// When Redis fails or is slower than `redis_timeout`: `fail-open`
    /// admits the request (counted in metrics), `fail-closed` answers 503.
    pub on_store_error: OnError,
    #[serde(deserialize_with = "de_duration")]
    pub redis_timeout: Duration,
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            redis_url: None,
            on_store_error: OnError::FailOpen,
            redis_timeout: Duration::from_millis(250),
            default_max_tokens: 1024,
        }
    }
}

/// A consumer: a tenant with API keys, allowed models and limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    /// `sha256:HEX` of each API key (`sluice hash-key KEY` prints it); the
    /// plaintext never goes in the file.
    pub key_hashes: Vec<String>,
    /// Models the consumer may use; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt + completion) per minute, reserved at admission.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per UTC day; over it: 429 `insufficient_quota`.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub max_concurrent_requests: Option<u64>,
    #[serde(default)]
    pub disabled: bool,
}

impl ConsumerConfig {
    pub fn limits(&self) -> ConsumerLimits {
        ConsumerLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }
}

/// A consumer's limits; unset means none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
}

impl ConsumerLimits {
    pub fn is_empty(&self) -> bool {
        *self == ConsumerLimits::default()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Base URL of an OpenAI-compatible server, e.g. `http://10.0.0.5:8000`.
    /// The client's path (`/v1/chat/completions`) is appended to it.
    pub url: String,
    /// The model names this backend serves. Empty or absent: asked of the
    /// backend (`GET /v1/models`) at start and at every health check.
    #[serde(default)]
    pub models: Vec<String>,
    /// Hard limit on requests in flight to this backend; 0 means none.
    #[serde(default)]
    pub max_concurrent_requests: u32,
    /// Relative share of traffic among backends serving the same model.
    #[serde(default = "one")]
    pub weight: u32,
    /// Sent to the backend as `Authorization: Bearer …` (the client's own
    /// credential never is).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Path probed by health checks instead of `health_check.path`.
    #[serde(default)]
    pub health_path: Option<String>,
    /// The inference engine behind `url`, whose own metrics (queue, batch,
    /// KV cache) are scraped off the request path; `none`: not scraped.
    #[serde(default)]
    pub engine: EngineKind,
    /// Where the engine's metrics are: a URL, or a path joined to `url`.
    /// Default: the engine's usual path (`/metrics`; `/api/ps` for Ollama).
    #[serde(default)]
    pub metrics_url: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServersSection {
    #[serde(default)]
    servers: Vec<ServerEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerEntry {
    url: String,
    #[serde(default)]
    max_concurrent_requests: u32,
}

impl ServersSection {
    /// The servers as backends, each named after its `host:port`.
    fn into_backends(self) -> Result<Vec<BackendConfig>, ConfigError> {
        let mut backends = Vec::new();
        for (i, server) in self.servers.into_iter().enumerate() {
            let key = format!("servers.servers[{i}].url");
            let url = BackendUrl::parse(&server.url).map_err(|m| invalid(&key, m))?;
            let name = url.authority().to_string();
            if backends.iter().any(|b: &BackendConfig| b.name == name) {
                return Err(invalid(key, format!("`{name}` is listed twice")));
            }
            backends.push(BackendConfig {
                name,
                url: server.url,
                models: Vec::new(),
                max_concurrent_requests: server.max_concurrent_requests,
                weight: 1,
                api_key: None,
                health_path: None,
                engine: EngineKind::None,
                metrics_url: None,
            });
        }
        Ok(backends)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// `builtin:NAME` for a bundled policy, or a path to a `.wasm`
    /// component (relative paths are relative to the config file).
    pub module: String,
    /// Handed to the guest as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// What happens to a request when this policy traps, times out, runs
    /// out of memory or returns an invalid decision.
    #[serde(default)]
    pub on_error: OnError,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Answer 503 naming the policy.
    #[default]
    FailClosed,
    /// Skip the policy and go on with the chain.
    FailOpen,
}

impl Config {
    /// Reads, parses and validates a config file. Relative module paths are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                file: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let store = &mut config.policy_store;
        store.state_dir = Some(
            base.join(
                store
                    .state_dir
                    .take()
                    .unwrap_or_else(|| "sluice-state".into()),
            ),
        );
        store.watch_dir = store.watch_dir.take().map(|d| base.join(d));
        config.recording.path = config.recording.path.take().map(|p| base.join(p));
        let usage = &mut config.usage;
        usage.database = Some(
            base.join(
                usage
                    .database
                    .take()
                    .unwrap_or_else(|| "sluice-usage.db".into()),
            ),
        );
        config.server.admin_token_file =
            config.server.admin_token_file.take().map(|f| base.join(f));
        for worker in &mut config.workers {
            if Path::new(&worker.module).is_relative() {
                worker.module = base.join(&worker.module).to_string_lossy().into_owned();
            }
        }
        for policy in &mut config.policies {
            if !policy.module.starts_with("builtin:") && Path::new(&policy.module).is_relative() {
                policy.module = base.join(&policy.module).to_string_lossy().into_owned();
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        let servers = std::mem::take(&mut config.servers).into_backends()?;
        config.backends.extend(servers);
        Ok(config)
    }

    /// Checks what the types cannot: uniqueness, URLs, ranges, modules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        if !(0.0..=1.0).contains(&self.recording.sample) {
            return Err(invalid("recording.sample", "must be between 0.0 and 1.0"));
        }
        for (key, value) in [
            ("server.header_timeout", self.server.header_timeout),
            ("server.body_timeout", self.server.body_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let rt = &self.policy_runtime;
        if rt.timeout.is_zero() {
            return Err(invalid("policy_runtime.timeout", "must be greater than 0"));
        }
        if rt.memory_limit < (1 << 20) {
            return Err(invalid(
                "policy_runtime.memory_limit",
                "must be at least 1MiB",
            ));
        }
        if rt.max_instances == 0 {
            return Err(invalid(
                "policy_runtime.max_instances",
                "must be at least 1",
            ));
        }
        if self.backends.is_empty() {
            return Err(invalid(
                "backends",
                "at least one [[backends]] entry (or [servers] servers = [...]) is required",
            ));
        }
        let mut names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            if b.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !names.insert(b.name.as_str()) {
                return Err(invalid(key("name"), format!("`{}` is used twice", b.name)));
            }
            BackendUrl::parse(&b.url).map_err(|m| invalid(key("url"), m))?;
            if let Some(path) = &b.health_path {
                check_path(path).map_err(|m| invalid(key("health_path"), m))?;
            }
            if let Some(empty) = b.models.iter().position(String::is_empty) {
                return Err(invalid(
                    format!("backends[{i}].models[{empty}]"),
                    "must not be empty",
                ));
            }
            if b.weight == 0 {
                return Err(invalid(key("weight"), "must be at least 1"));
            }
            engine::validate_backend(i, b.engine, b.metrics_url.as_deref())?;
        }
        self.engine_metrics.validate()?;
        self.prefix_cache.validate()?;
        self.validate_consumers()?;
        self.validate_usage()?;
        self.validate_workers()?;
        let hc = &self.health_check;
        check_path(&hc.path).map_err(|m| invalid("health_check.path", m))?;
        if hc.interval < Duration::from_millis(10) {
            return Err(invalid("health_check.interval", "must be at least 10ms"));
        }
        if hc.timeout.is_zero() {
            return Err(invalid("health_check.timeout", "must be greater than 0"));
        }
        if hc.unhealthy_after == 0 {
            return Err(invalid(
                "health_check.unhealthy_after",
                "must be at least 1",
            ));
        }
        if hc.healthy_after == 0 {
            return Err(invalid("health_check.healthy_after", "must be at least 1"));
        }
        if self.ejection.base > self.ejection.max {
            return Err(invalid(
                "ejection.base",
                "must not be longer than ejection.max",
            ));
        }
        if self.retry.max_retries > 10 {
            return Err(invalid("retry.max_retries", "must be at most 10"));
        }
        if let Some(bad) = self
            .retry
            .on_status
            .iter()
            .position(|s| !(400..=599).contains(s))
        {
            return Err(invalid(
                format!("retry.on_status[{bad}]"),
                "must be an error status (400..=599)",
            ));
        }
        let mut names = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let key = |field: &str| format!("policies[{i}].{field}");
            names::check_policy_name(&p.name).map_err(|m| invalid(key("name"), m))?;
            if !names.insert(p.name.as_str()) {
                return Err(invalid(key("name"), format!("`{}` is used twice", p.name)));
            }
            match p.module.strip_prefix("builtin:") {
                Some(builtin) if crate::bundled::find(builtin).is_none() => {
                    return Err(invalid(
                        key("module"),
                        format!(
                            "no bundled policy `{builtin}` (bundled: {})",
                            crate::bundled::names().join(", ")
                        ),
                    ));
                }
                Some(_) => {}
                None if !Path::new(&p.module).is_file() => {
                    return Err(invalid(key("module"), format!("no file at {}", p.module)));
                }
                None => {}
            }
            if !p.config.is_object() {
                return Err(invalid(key("config"), "must be a table"));
            }
        }
        Ok(())
    }

    fn validate_workers(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut routes = HashSet::new();
        for (i, w) in self.workers.iter().enumerate() {
            let key = |field: &str| format!("workers[{i}].{field}");
            names::check_worker_name(&w.name).map_err(|m| invalid(key("name"), m))?;
            if !names.insert(w.name.as_str()) {
                return Err(invalid(key("name"), format!("`{}` is used twice", w.name)));
            }
            let prefix = names::route_prefix(&w.route).map_err(|m| invalid(key("route"), m))?;
            if let Some(reserved) = RESERVED_PATHS.iter().find(|r| {
                prefix.starts_with(*r) || (w.route.ends_with('*') && r.starts_with(prefix))
            }) {
                return Err(invalid(
                    key("route"),
                    format!(
                        "`{}` covers `{reserved}`, which the gateway answers itself",
                        w.route
                    ),
                ));
            }
            if !routes.insert(w.route.as_str()) {
                return Err(invalid(
                    key("route"),
                    format!("`{}` is used twice", w.route),
                ));
            }
            for (j, host) in w.allowed_hosts.iter().enumerate() {
                names::host_and_port(host)
                    .map(|_| ())
                    .map_err(|m| invalid(format!("workers[{i}].allowed_hosts[{j}]"), m))?;
            }
            if w.timeout.is_zero() {
                return Err(invalid(key("timeout"), "must be greater than 0"));
            }
            if w.memory_limit < (1 << 20) {
                return Err(invalid(key("memory_limit"), "must be at least 1MiB"));
            }
            if w.max_concurrent_requests == 0 {
                return Err(invalid(
                    key("max_concurrent_requests"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn validate_usage(&self) -> Result<(), ConfigError> {
        let usage = &self.usage;
        if let Some(url) = &usage.redis_url {
            if !url.starts_with("redis://") {
                return Err(invalid(
                    "usage.redis_url",
                    format!("`{url}` must start with redis://"),
                ));
            }
            if usage.disabled {
                return Err(invalid(
                    "usage.redis_url",
                    "shares usage records, but usage.disabled keeps none",
                ));
            }
        }
        if usage.redis_key.is_empty() {
            return Err(invalid("usage.redis_key", "must not be empty"));
        }
        if usage.redis_max_records < 1000 {
            return Err(invalid(
                "usage.redis_max_records",
                "must be at least 1000 (replicas copy records in batches of 500)",
            ));
        }
        if usage.sync_interval.is_zero() {
            return Err(invalid("usage.sync_interval", "must be greater than 0"));
        }
        if let Some(name) = &usage.replica {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(invalid(
                    "usage.replica",
                    "must be 1 to 128 printable characters",
                ));
            }
        }
        Ok(())
    }

    fn validate_consumers(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.limits.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "limits.redis_url",
                    format!("`{url}` must start with redis://"),
                ));
            }
        }
        if self.limits.redis_timeout.is_zero() {
            return Err(invalid("limits.redis_timeout", "must be greater than 0"));
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let key = |field: &str| format!("consumers[{i}].{field}");
            names::check_consumer_name(&c.name).map_err(|m| invalid(key("name"), m))?;
            if !names.insert(c.name.as_str()) {
                return Err(invalid(key("name"), format!("`{}` is used twice", c.name)));
            }
            for (j, h) in c.key_hashes.iter().enumerate() {
                let hex = h.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        format!("consumers[{i}].key_hashes[{j}]"),
                        "must be `sha256:` and 64 hex digits (`sluice hash-key KEY` prints it; never put the key itself here)",
                    ));
                }
                if !hashes.insert(h.to_ascii_lowercase()) {
                    return Err(invalid(
                        format!("consumers[{i}].key_hashes[{j}]"),
                        "the same key is listed twice",
                    ));
                }
            }
        }
        if self.auth.required && self.consumers.is_empty() {
            tracing::warn!("auth.required is on and no [[consumers]] are configured: only consumers made through the admin API can call");
        }
        Ok(())
    }

    /// The health and ejection rules for the fleet.
    pub fn health_rules(&self) -> HealthRules {
        HealthRules {
            check: self.health_check.clone(),
            ejection: self.ejection.clone(),
            engine: self.engine_metrics.clone(),
            prefix: self.prefix_cache.clone(),
        }
    }

    /// The chain to run: the configured policies, or the default router.
    pub fn policy_chain(&self) -> Vec<PolicyConfig> {
        if self.policies.is_empty() {
            vec![PolicyConfig {
                name: "router".into(),
                module: "builtin:model-router".into(),
                config: empty_object(),
                on_error: OnError::FailClosed,
            }]
        } else {
            self.policies.clone()
        }
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(format!("`{path}` must be a path starting with /"));
    }
    Ok(())
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Accepts `"500ms"`, `"3s"`, `"2m"`, `"1h"`, or a bare number of seconds.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like \"500ms\", \"3s\" or \"2m\""))?;
    let seconds_per_unit = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        other => return Err(format!("`{other}` is not a duration unit (ms, s, m, h)")),
    };
    n.checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Accepts `"16MiB"`, `"512KiB"`, `"1GiB"`, `"100B"`, or a bare byte count.
fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bytes(b) => Ok(b),
        Raw::Text(t) => parse_bytes(&t).map_err(serde::de::Error::custom),
    }
}

pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like \"16MiB\" or \"512KiB\""))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        other => return Err(format!("`{other}` is not a size unit (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// The health and ejection rules every backend follows, and how engines
/// are scraped; swapped whole by a config reload.
#[derive(Debug, Clone, Default)]
pub struct HealthRules {
    pub check: HealthCheckConfig,
    pub ejection: EjectionConfig,
    pub engine: EngineMetricsConfig,
    pub prefix: PrefixCacheConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[backends]]
        name = "vm01"
        url = "http://127.0.0.1:9001"
        models = ["glm4-9b"]
    "#;

    fn error_of(extra: &str) -> String {
        let text = format!("{MINIMAL}\n{extra}");
        match Config::parse(&text).and_then(|c| c.validate().map(|_| c)) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.max_body_bytes, 16 << 20);
        assert_eq!(c.backends[0].weight, 1);
        assert_eq!(c.policy_chain()[0].module, "builtin:model-router");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error_of("[server]\nlisten = 5").contains("listen"));
        assert!(error_of("[server]\nmax_body_bytes = \"12 parsecs\"").contains("parsecs"));
        assert!(error_of("[server]\nbogus = 1").contains("bogus"));
        let e = error_of("[[backends]]\nname = \"vm01\"\nurl = \"http://x:1\"\nmodels = [\"m\"]");
        assert!(e.contains("backends[1].name"), "{e}");
        let e = error_of("[[backends]]\nname = \"b\"\nurl = \"ftp://x\"\nmodels = [\"m\"]");
        assert!(e.contains("backends[1].url"), "{e}");
        let e = error_of("[[policies]]\nname = \"p\"\nmodule = \"builtin:nope\"");
        assert!(
            e.contains("policies[0].module") && e.contains("model-router"),
            "{e}"
        );
    }

    /// vllm-router's servers.toml (seed 001), unchanged.
    #[test]
    fn a_vllm_router_servers_file_is_read_as_backends() {
        let c = Config::parse(
            r#"
            [servers]
            servers = [
                { url = "http://gpu-server-1:8081", max_concurrent_requests = 8 },
                { url = "http://backup-server-1:8081" },
            ]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let seen: Vec<(&str, u32, bool)> = c
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.as_str(),
                    b.max_concurrent_requests,
                    b.models.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("gpu-server-1:8081", 8, true),
                ("backup-server-1:8081", 0, true)
            ]
        );
        let both = Config::parse(&format!(
            "{MINIMAL}
[servers]
servers = [{{ url = \"http://10.0.0.2:8000\" }}]"
        ))
        .unwrap();
        assert_eq!(both.backends.len(), 2);

        let e = error_of("[servers]\nservers = [{ url = \"http://a:1\" }, { url = \"ftp://b\" }]");
        assert!(e.contains("servers.servers[1].url"), "{e}");
        let e =
            error_of("[servers]\nservers = [{ url = \"http://a:1\" }, { url = \"http://a:1/\" }]");
        assert!(
            e.contains("servers.servers[1].url") && e.contains("twice"),
            "{e}"
        );
        let e = error_of("[servers]\nservers = [{ url = \"http://a:1\", weight = 2 }]");
        assert!(e.contains("weight"), "{e}");
    }

    #[test]
    fn worker_routes_and_hosts_are_checked() {
        let worker =
            |extra: &str| format!("[[workers]]\nname = \"w\"\nmodule = \"w.wasm\"\n{extra}");
        for (extra, key) in [
            ("route = \"tools/*\"", "workers[0].route"),
            ("route = \"/v1/*\"", "workers[0].route"),
            ("route = \"/*\"", "workers[0].route"),
            ("route = \"/health\"", "workers[0].route"),
            ("route = \"/tools*\"", "workers[0].route"),
            ("route = \"/a/*/b\"", "workers[0].route"),
            (
                "route = \"/t/*\"\nallowed_hosts = [\"https://x\"]",
                "workers[0].allowed_hosts[0]",
            ),
            ("route = \"/t/*\"\ntimeout = \"0s\"", "workers[0].timeout"),
            (
                "route = \"/t/*\"\nmemory_limit = \"1KiB\"",
                "workers[0].memory_limit",
            ),
        ] {
            let e = error_of(&worker(extra));
            assert!(e.contains(key), "{extra}: {e}");
        }
        let twice = format!(
            "{}\n{}",
            worker("route = \"/a/*\""),
            worker("route = \"/b/*\"")
        );
        assert!(error_of(&twice).contains("workers[1].name"));
        let c = Config::parse(&format!(
            "{MINIMAL}\n{}",
            worker(
                "route = \"/tools/*\"\nallowed_hosts = [\"127.0.0.1:8080\", \"api.example.com\"]"
            )
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.workers[0].max_concurrent_requests, 64);
    }

    #[test]
    fn usage_sharing_is_checked() {
        for (extra, key) in [
            ("[usage]\nredis_url = \"http://x:6379\"", "usage.redis_url"),
            (
                "[usage]\ndisabled = true\nredis_url = \"redis://x:6379/0\"",
                "usage.redis_url",
            ),
            ("[usage]\nredis_max_records = 10", "usage.redis_max_records"),
            ("[usage]\nsync_interval = \"0s\"", "usage.sync_interval"),
            ("[usage]\nreplica = \"\"", "usage.replica"),
            ("[usage]\nredis_key = \"\"", "usage.redis_key"),
        ] {
            let e = error_of(extra);
            assert!(e.contains(key), "{extra}: {e}");
        }
        let c = Config::parse(&format!(
            "{MINIMAL}\n[usage]\nredis_url = \"redis://127.0.0.1:6379/0\"\nreplica = \"gw-1\""
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.usage.sync_interval, Duration::from_secs(1));
    }

    #[test]
    fn engine_keys_are_checked() {
        let backend = |extra: &str| {
            format!("[[backends]]\nname = \"e\"\nurl = \"http://127.0.0.1:9002\"\nmodels = [\"m\"]\n{extra}")
        };
        for (extra, key) in [
            (
                backend("engine = \"vllm\"\nmetrics_url = \"ftp://x\""),
                "backends[1].metrics_url",
            ),
            (
                backend("metrics_url = \"/metrics\""),
                "backends[1].metrics_url",
            ),
            (backend("engine = \"triton\""), "engine"),
            (
                "[engine_metrics]\ninterval = \"1ms\"".into(),
                "engine_metrics.interval",
            ),
            (
                "[engine_metrics]\ntimeout = \"0s\"".into(),
                "engine_metrics.timeout",
            ),
            (
                "[engine_metrics]\nmax_bytes = 10".into(),
                "engine_metrics.max_bytes",
            ),
            (
                "[engine_metrics]\nstale_after = \"100ms\"".into(),
                "engine_metrics.stale_after",
            ),
            (
                "[engine_metrics.names.vllm]\nwaiting = \"bad name\"".into(),
                "engine_metrics.names.vllm.waiting",
            ),
            (
                "[engine_metrics.names.ollama]\nwaiting = \"x\"".into(),
                "ollama",
            ),
            ("[engine_metrics.names.tgi]\nqueue = \"x\"".into(), "queue"),
        ] {
            let e = error_of(&extra);
            assert!(e.contains(key), "{extra}: {e}");
        }
        let c = Config::parse(&format!(
            "{MINIMAL}\n{}\n[engine_metrics]\ninterval = \"100ms\"\n[engine_metrics.names.sglang]\nkv_usage = \"sglang:kv_used\"",
            backend("engine = \"sglang\"")
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.backends[0].engine, EngineKind::None);
        assert_eq!(c.backends[1].engine, EngineKind::Sglang);
        let rules = c.health_rules();
        assert_eq!(rules.engine.stale_after(), Duration::from_millis(400));
        assert_eq!(rules.engine.timeout, Duration::from_secs(1));
        assert_eq!(
            rules.engine.names.sglang.kv_usage.as_deref(),
            Some("sglang:kv_used")
        );
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
    }
}
