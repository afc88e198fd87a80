//! The data plane: accepts connections (HTTP/1.1 and h2c), reads and checks
//! each request, runs the policy chain and hands the result to the proxy.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::accounts::consumers::Consumers;
use crate::accounts::limits::Limiter;
use crate::api::openai::{self, Endpoint};
use crate::config::{Config, StatusEndpoints};
use crate::dataplane::accounting::Ledger;
use crate::dataplane::body::Body;
use crate::dataplane::errors::GatewayError;
use crate::dataplane::forward::Upstream;
use crate::dataplane::recording::Recorder;
use crate::dataplane::request_body::BodyLimits;
use crate::fleet::health::Checker;
use crate::fleet::LiveFleet;
use crate::policy::{Chain, Runtime, Scope};
use crate::usage::{UsageStore, WriterOptions};

/// Marks a request the console's playground sent through the admin
/// listener: it is served under the admin token, not a consumer's key.
#[derive(Clone, Copy)]
pub struct Playground;

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    pub fleet: Arc<LiveFleet>,
    pub checker: Checker,
    pub runtime: Arc<Runtime>,
    /// The live chain, swapped whole by deploys; a request loads it once.
    chain: Arc<ArcSwap<Chain>>,
    pub upstream: Upstream,
    pub(super) body_limits: BodyLimits,
    pub ledger: Arc<Ledger>,
    pub consumers: Arc<Consumers>,
    pub limiter: Arc<Limiter>,
    /// Edge workers mounted on routes (`[[workers]]`).
    pub workers: Arc<crate::dataplane::workers::Workers>,
    /// Samples requests for `sluice policy test` (`[recording]`).
    pub(super) recorder: Option<Recorder>,
    pub(super) next_id: AtomicU64,
    started_at: u64,
    /// False once shutdown began: `/ready` answers 503.
    ready: std::sync::atomic::AtomicBool,
    /// What the status pages show on this port (`server.status_endpoints`).
    status_endpoints: StatusEndpoints,
}

impl Gateway {
    /// The data plane over a fleet and a live policy chain; the control
    /// plane's `Node::start` builds both and keeps the deployer.
    pub async fn new(
        config: &Config,
        fleet: Arc<LiveFleet>,
        runtime: Arc<Runtime>,
        chain: Arc<ArcSwap<Chain>>,
    ) -> anyhow::Result<Arc<Gateway>> {
        let store = match (&config.usage.database, config.usage.disabled) {
            (Some(path), false) => Some(open_usage(path, &config.usage)?),
            _ => None,
        };
        tokio::task::spawn_blocking(crate::api::tokens::warm_up);
        let ledger = Arc::new(Ledger {
            store,
            access_log: config.usage.access_log,
        });
        let consumers = Arc::new(
            Consumers::new(
                config.auth.required,
                &config.consumers,
                config.policy_store.state_dir.as_deref(),
            )
            .context("consumers")?,
        );
        let limiter = Arc::new(Limiter::new(&config.limits)?);
        let server = &config.server;
        let workers = Arc::new(crate::dataplane::workers::Workers::new(
            &config.workers,
            config.policy_store.state_dir.as_deref(),
            server.max_body_bytes,
        )?);
        Ok(Arc::new(Gateway {
            workers,
            consumers,
            limiter,
            checker: Checker::new(fleet.clone()),
            fleet,
            runtime,
            chain,
            upstream: Upstream::new(server, config.retry.clone()),
            body_limits: BodyLimits {
                max_bytes: server.max_body_bytes,
                timeout: server.body_timeout,
            },
            ledger,
            recorder: Recorder::start(&config.recording),
            next_id: AtomicU64::new(1),
            ready: std::sync::atomic::AtomicBool::new(true),
            status_endpoints: server.status_endpoints,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }))
    }

    /// Shutdown began: `/ready` turns 503 while requests are still served.
    pub fn set_unready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Answers one request; never fails (errors become OpenAI-shaped bodies).
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if let Some(worker) = self.workers.route(path) {
            return self
                .workers
                .serve(worker, request)
                .await
                .unwrap_or_else(GatewayError::into_response);
        }
        if request.method() == Method::GET && path == "/v1/models" {
            let (parts, _) = request.into_parts();
            return self
                .models(&parts)
                .unwrap_or_else(GatewayError::into_response);
        }
        let method = request.method();
        let result = match Endpoint::from_path(path) {
            Some(endpoint) if method == Method::POST => {
                super::pipeline::run(&self, endpoint, request).await
            }
            Some(_) => Err(GatewayError::MethodNotAllowed {
                method: method.clone(),
                path: path.to_string(),
            }),
            None => match (method, path) {
                (&Method::GET, "/ready") => {
                    let ready = self.ready.load(Ordering::Relaxed);
                    let mut response = json_response(&serde_json::json!({"ready": ready}));
                    if !ready {
                        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok(response)
                }
                (&Method::GET, "/health") if self.status_endpoints == StatusEndpoints::Summary => {
                    let (status, _) = crate::fleet::health::report(&self.fleet.load());
                    let mut response =
                        json_response(&serde_json::json!({"healthy": status.is_success()}));
                    *response.status_mut() = status;
                    Ok(response)
                }
                (&Method::GET, _) if self.status_endpoints == StatusEndpoints::DataPlane => self
                    .status_page(path)
                    .ok_or_else(|| GatewayError::NotFound(path.to_string())),
                _ => Err(GatewayError::NotFound(path.to_string())),
            },
        };
        result.unwrap_or_else(GatewayError::into_response)
    }

    /// `GET /v1/models`: the models a healthy backend serves; with
    /// `auth.required`, only for a valid key, and only those its consumer
    /// may use.
    fn models(&self, parts: &http::request::Parts) -> Result<Response<Body>, GatewayError> {
        let consumer = super::authenticate::caller(&self.consumers, parts)?;
        let mut models = self.fleet.load().healthy_models();
        if let Some(consumer) = consumer {
            models.retain(|m| consumer.allows(m));
        }
        Ok(json_response(&openai::model_list(&models, self.started_at)))
    }

    /// `/health`, `/load-stats` or `/metrics` in full: on the admin
    /// listener always, on the data plane with `server.status_endpoints =
    /// "data-plane"`. `None` for another path.
    pub fn status_page(&self, path: &str) -> Option<Response<Body>> {
        match path {
            "/health" => {
                let (status, report) = crate::fleet::health::report(&self.fleet.load());
                let mut response = json_response(&report);
                *response.status_mut() = status;
                Some(response)
            }
            "/load-stats" => Some(json_response(&crate::fleet::stats::load_stats(
                &self.fleet.load(),
            ))),
            "/metrics" => {
                let metrics = crate::metrics::metrics();
                for b in self.fleet.load().backends() {
                    metrics.backend(&b.name, b.in_flight(), b.is_healthy());
                    if let Some(view) = b.engine_view() {
                        metrics.engine(&b.name, &view.gauges());
                    }
                    metrics.prefix_index(
                        &b.name,
                        b.prefix.memory_bytes(),
                        b.prefix.len(),
                        b.prefix.served(),
                    );
                }
                let mut response = Response::new(Body::full(metrics.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Some(response)
            }
            _ => None,
        }
    }

    /// What this request's policy phases run against: the live chain and
    /// fleet as they are now.
    pub fn scope(&self) -> Scope {
        Scope {
            runtime: self.runtime.clone(),
            fleet: self.fleet.load(),
            chain: self.chain.load_full(),
        }
    }
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::json(value));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, Body::JSON);
    *response.status_mut() = StatusCode::OK;
    response
}

/// Binds the listener, so the caller learns the real address (port 0 picks
/// a free one) before serving starts.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// On shutdown, how long open requests and streams may take to end.
    pub drain: Duration,
    /// Time a client has to send a request head (HTTP/1).
    pub header_timeout: Duration,
}

/// Serves `handler` until `shutdown` resolves, then stops accepting and
/// lets open requests and streams finish for up to `options.drain`.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: impl Future<Output = ()>,
    options: ServeOptions,
) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let drain = options.drain;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let response = handler(request);
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open requests for up to {drain:?}");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    Ok(())
}

/// The usage database, shared with the other replicas when
/// `usage.redis_url` is set.
fn open_usage(
    path: &std::path::Path,
    config: &crate::config::UsageConfig,
) -> anyhow::Result<UsageStore> {
    let options = WriterOptions {
        replica: config.replica.clone(),
        ..WriterOptions::default()
    };
    let store = UsageStore::open(path, options)
        .with_context(|| format!("usage.database: opening {}", path.display()))?;
    if let Some(url) = &config.redis_url {
        store.share(crate::usage::sync::SyncOptions {
            redis_url: url.clone(),
            key: config.redis_key.clone(),
            interval: config.sync_interval,
            max_records: config.redis_max_records,
            timeout: Duration::from_secs(2),
        })?;
        tracing::info!(
            replica = store.replica(),
            "usage records shared through Redis"
        );
    }
    Ok(store)
}
