//! `[server]`: the listeners, their timeouts and bounds, the admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{de_bytes, de_duration};
use super::{invalid, ConfigError};

/// Where the admin API listens when `server.admin_listen` is not set.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8081);

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
    /// Once a backend's answer has begun, the longest it may send nothing
    /// (a hung engine, or one dripping bytes to hold the connection); past
    /// it a stream ends with an error event and a plain answer breaks off.
    /// Engines send a chunk per token, so silences are normally
    /// milliseconds; a long prefill happens before the first byte, under
    /// `response_timeout`.
    #[serde(deserialize_with = "de_duration")]
    pub backend_idle_timeout: Duration,
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
            backend_idle_timeout: Duration::from_secs(60),
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

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        for (key, value) in [
            ("server.header_timeout", self.header_timeout),
            ("server.body_timeout", self.body_timeout),
            ("server.backend_idle_timeout", self.backend_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        Ok(())
    }
}
