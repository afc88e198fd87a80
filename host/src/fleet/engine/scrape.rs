//! Reading engines' metrics in the background: one task per backend with
//! an engine, every `engine_metrics.interval`, each scrape bounded in time
//! (`timeout`, for connect, headers and body together) and size
//! (`max_bytes`, counted as the body arrives). A request never waits on a
//! scrape: it reads the last stored outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::names::{self, NameSet};
use super::{EngineKind, EngineProbe, EngineSignals, ScrapeError};
use crate::config::EngineMetricsConfig;
use crate::fleet::backends::Backend;
use crate::fleet::LiveFleet;
use crate::text::error_chain;

/// Shortest pause between two scrapes of one backend.
const MIN_PAUSE: Duration = Duration::from_millis(5);

/// The HTTP client every scrape task shares.
#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Scraper {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Scraper { client }
    }
}

impl Scraper {
    /// Starts scraping `backend` until a reload retires it; nothing for a
    /// backend without an engine.
    pub fn watch(&self, backend: Arc<Backend>, fleet: Arc<LiveFleet>) {
        let Some(probe) = backend.engine.probe().cloned() else {
            return;
        };
        let scraper = self.clone();
        tokio::spawn(async move {
            loop {
                if backend.is_retired() {
                    return;
                }
                let rules = fleet.rules();
                let config = &rules.engine;
                let started = Instant::now();
                let result = scraper
                    .scrape(&probe, backend.authorization.as_ref(), config)
                    .await;
                if let Err(e) = &result {
                    crate::metrics::metrics().engine_scrape_error(&backend.name, e.reason());
                    tracing::debug!(backend = %backend.name, error = %e, "engine metrics scrape failed");
                }
                backend.engine.record(result, Instant::now());
                let pause = config.interval.saturating_sub(started.elapsed());
                tokio::time::sleep(pause.max(MIN_PAUSE)).await;
            }
        });
    }

    /// One bounded scrape of one engine.
    pub async fn scrape(
        &self,
        probe: &EngineProbe,
        authorization: Option<&HeaderValue>,
        config: &EngineMetricsConfig,
    ) -> Result<EngineSignals, ScrapeError> {
        let body = tokio::time::timeout(
            config.timeout,
            self.fetch(probe, authorization, config.max_bytes),
        )
        .await
        .map_err(|_| ScrapeError::Timeout(config.timeout))??;
        match probe.kind {
            EngineKind::Ollama => names::from_ollama_ps(&body),
            kind => {
                let text = std::str::from_utf8(&body)
                    .map_err(|_| ScrapeError::Parse("the answer is not UTF-8".to_string()))?;
                let names = NameSet::of(kind, config.names.of(kind))
                    .ok_or_else(|| ScrapeError::Missing(format!("names for {}", kind.as_str())))?;
                names::from_prometheus(text, &names)
            }
        }
    }

    /// GETs the metrics, reading the body frame by frame and giving up as
    /// soon as it passes `max_bytes`.
    async fn fetch(
        &self,
        probe: &EngineProbe,
        authorization: Option<&HeaderValue>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, ScrapeError> {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(probe.uri.clone())
            .header(header::ACCEPT, "text/plain, application/json");
        if let Some(auth) = authorization {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| ScrapeError::Connect(format!("bad request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| ScrapeError::Connect(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_bytes) {
            return Err(ScrapeError::TooLarge(max_bytes));
        }
        let mut body = response.into_body();
        let mut out = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ScrapeError::Read(error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                if out.len() as u64 + data.len() as u64 > max_bytes {
                    return Err(ScrapeError::TooLarge(max_bytes));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }
}
