//! Active health checks and model discovery: one small task per backend
//! probes it on an interval (and right when an ejection ends), so a dead
//! server is taken out before clients find it and a recovered one comes
//! back by itself; backends configured without models are asked for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::fleet::backends::{Backend, HealthRules};
use crate::fleet::engine::scrape::Scraper;
use crate::fleet::{Fleet, LiveFleet};
use crate::text::error_chain;

/// The path model discovery asks, whatever the health path is.
const MODELS_PATH: &str = "/v1/models";
/// A probe's answer is read up to this size (a model list is small).
const MAX_PROBE_BODY: usize = 1 << 20;
/// Shortest pause between two probes of one backend.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// Probes backends; shared by every backend's task.
#[derive(Clone)]
pub struct Checker {
    client: Client<HttpConnector, Empty<Bytes>>,
    fleet: Arc<LiveFleet>,
    scraper: Scraper,
}

impl Checker {
    pub fn new(fleet: Arc<LiveFleet>) -> Checker {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Checker {
            client,
            fleet,
            scraper: Scraper::default(),
        }
    }

    /// Checks every backend once (so discovered models exist before the
    /// first request), then leaves a task watching each.
    pub async fn start(&self) {
        let backends = self.fleet.load().backends().to_vec();
        let first = backends.iter().map(|b| self.check(b));
        futures_util::future::join_all(first).await;
        for backend in backends {
            self.watch(backend);
        }
    }

    /// Starts the task that probes `backend` until a reload retires it,
    /// and the one scraping its engine's metrics if it has an engine.
    pub fn watch(&self, backend: Arc<Backend>) {
        self.scraper.watch(backend.clone(), self.fleet.clone());
        let checker = self.clone();
        tokio::spawn(async move {
            loop {
                let rules = checker.fleet.rules();
                let mut pause = rules.check.interval;
                if rules.check.enabled {
                    if let Some(reprobe) = backend.reprobe_in() {
                        pause = pause.min(reprobe);
                    }
                }
                tokio::time::sleep(pause.max(MIN_PAUSE)).await;
                if backend.is_retired() {
                    return;
                }
                checker.check(&backend).await;
            }
        });
    }

    /// One round for one backend: the health probe when checks are on, the
    /// model list when the backend's models are discovered.
    async fn check(&self, backend: &Arc<Backend>) {
        let rules = self.fleet.rules();
        if backend.busy() && backend.reprobe_in().is_none() {
            // The requests in flight are the better probe; sending one could
            // cut a stream on servers that serve one request at a time.
            if rules.check.enabled {
                backend.record_probe(Ok(()));
            }
            return;
        }
        let probe = if rules.check.enabled || backend.discovers_models {
            Some(self.probe(backend, &backend.health_path, &rules).await)
        } else {
            None
        };
        if backend.discovers_models {
            let listing = match &probe {
                Some(Ok(body)) if backend.health_path == MODELS_PATH => Ok(body.clone()),
                _ => self.probe(backend, MODELS_PATH, &rules).await,
            };
            match listing.and_then(|body| parse_models(&body)) {
                Ok(models) => {
                    let names = models.join(", ");
                    if backend.set_discovered_models(models) {
                        tracing::info!(backend = %backend.name, models = %names, "discovered models");
                        self.fleet.refresh();
                    }
                }
                Err(e) => {
                    tracing::debug!(backend = %backend.name, error = %e, "model discovery failed")
                }
            }
        }
        if rules.check.enabled {
            if let Some(result) = probe {
                backend.record_probe(result.map(|_| ()));
            }
        }
    }

    /// GETs `path` on the backend: a 2xx within the timeout (and within
    /// `max_response_time`, when set) is a success; the body is returned.
    async fn probe(
        &self,
        backend: &Backend,
        path: &str,
        rules: &HealthRules,
    ) -> Result<Bytes, String> {
        let uri = backend
            .url
            .join(path)
            .map_err(|e| format!("bad probe URL: {e}"))?;
        let mut request = Request::builder().method(Method::GET).uri(uri);
        if let Some(auth) = &backend.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| format!("bad probe request: {e}"))?;
        let started = Instant::now();
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_PROBE_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the probe's answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let timeout = rules.check.timeout;
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("health probe GET {path} timed out after {timeout:?}"))??;
        if !status.is_success() {
            return Err(format!("health probe GET {path} answered {status}"));
        }
        let took = started.elapsed();
        if let Some(max) = rules.check.max_response_time {
            if took > max {
                return Err(format!(
                    "health probe GET {path} took {took:?} (max_response_time {max:?})"
                ));
            }
        }
        Ok(body)
    }
}

/// The model ids of an OpenAI model list (`{"data":[{"id":...}]}`).
fn parse_models(body: &[u8]) -> Result<Vec<String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("model list is not JSON: {e}"))?;
    let data = value["data"]
        .as_array()
        .ok_or("model list has no `data` array")?;
    let mut models: Vec<String> = data
        .iter()
        .filter_map(|m| m["id"].as_str())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect();
    models.dedup();
    Ok(models)
}

/// `GET /health`: every backend's state; 200 while at least one backend is
/// healthy, 503 when none is.
pub fn report(fleet: &Fleet) -> (StatusCode, Value) {
    let backends: Vec<Value> = fleet
        .backends()
        .iter()
        .map(|b| {
            json!({
                "name": &*b.name,
                "url": b.url.to_string(),
                "healthy": b.is_healthy(),
                "in_flight": b.in_flight(),
                "max_concurrent": b.max_concurrent(),
                "queued": b.stats.queued(),
                "models": &*b.models(),
                "last_error": b.last_error(),
                "recent_errors": b.recent_errors(),
                "last_check": b.last_check_unix_ms(),
                "engine": b.engine_view().map(|e| e.to_json()),
                "prefix_index": b.prefix.to_json(),
            })
        })
        .collect();
    let up = fleet.backends().iter().any(|b| b.is_healthy());
    let (status, word) = if up {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (status, json!({"status": word, "backends": backends}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists_parse() {
        let body = br#"{"object":"list","data":[{"id":"a"},{"id":"b"},{"x":1}]}"#;
        assert_eq!(parse_models(body).unwrap(), ["a", "b"]);
        assert!(parse_models(b"<html>").is_err());
        assert!(parse_models(b"{}").is_err());
    }
}
