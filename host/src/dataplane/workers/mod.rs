//! Edge workers: `wasi:http` components mounted on routes next to the
//! OpenAI API, the way Cloudflare Workers or Spin apps are — for the small
//! HTTP services that live beside a model fleet (tool endpoints, webhooks,
//! a status page).
//!
//! A worker is declared in `[[workers]]` (name, route, module, outbound
//! allow-list); the admin API replaces its module under load
//! (`PUT /admin/workers/NAME`), rolls it back or activates a kept version
//! by number, with the same undo rule as policies
//! ([`crate::deploy_history`]). A request in flight keeps the version it
//! started with; the next one gets the new version. Deployed modules are
//! kept in the state directory, so a restart serves them.

mod book;
pub mod outbound;
mod sandbox;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::{header, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use wasmtime_wasi_http::handler::{ExpirationError, ProxyHandler};

use crate::config::WorkerConfig;
use crate::dataplane::body::Body;
use crate::dataplane::errors::GatewayError;
use crate::deploy_history::How;
use crate::problem::Problem;
use book::Book;
pub use sandbox::Kind;
use sandbox::{Bounds, Sandbox, Version};

/// One version of one worker, mounted on its route.
pub struct Mounted {
    pub name: String,
    pub route: String,
    /// What a path must start with (or equal, for an exact route).
    prefix: String,
    exact: bool,
    pub kind: Kind,
    pub version: u64,
    pub sha256: String,
    config: WorkerConfig,
    bytes: Arc<[u8]>,
    handler: ProxyHandler<Version>,
}

impl Mounted {
    fn matches(&self, path: &str) -> bool {
        if self.exact {
            path == self.prefix
        } else {
            path.starts_with(&self.prefix) || path == self.prefix.trim_end_matches('/')
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "route": self.route,
            "kind": self.kind.name(),
            "version": self.version,
            "sha256": self.sha256,
            "allowed_hosts": self.config.allowed_hosts,
            "timeout_ms": self.config.timeout.as_millis() as u64,
            "memory_limit": self.config.memory_limit,
        })
    }
}

/// Every mounted worker; empty (and no engine) when none is configured.
pub struct Workers {
    sandbox: Option<Sandbox>,
    /// Per worker name, across its versions: bounds the instances alive.
    permits: std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>,
    mounted: ArcSwap<Vec<Arc<Mounted>>>,
    /// One deploy or rollback at a time.
    deploys: tokio::sync::Mutex<()>,
    /// Per worker name: its kept versions and activation history.
    books: std::sync::Mutex<std::collections::HashMap<String, Book>>,
    dir: Option<PathBuf>,
    max_body_bytes: u64,
}

impl Workers {
    /// Compiles every configured worker (or the version deployed to the
    /// state directory since). Fails naming the worker at fault.
    pub fn new(
        configs: &[WorkerConfig],
        state_dir: Option<&Path>,
        max_body_bytes: u64,
    ) -> anyhow::Result<Workers> {
        let dir = state_dir.map(|d| d.join("workers"));
        if configs.is_empty() {
            return Ok(Workers {
                sandbox: None,
                permits: Default::default(),
                mounted: ArcSwap::from_pointee(Vec::new()),
                deploys: tokio::sync::Mutex::new(()),
                books: Default::default(),
                dir,
                max_body_bytes,
            });
        }
        let sandbox = Sandbox::new()?;
        let mut mounted = Vec::new();
        let mut books = std::collections::HashMap::new();
        for config in configs {
            let saved = dir.as_ref().and_then(|d| saved(d, &config.name));
            let restored = saved.is_some();
            let (bytes, version) = match saved {
                Some(saved) => saved,
                None => {
                    let bytes = std::fs::read(&config.module).with_context(|| {
                        format!("workers `{}`: reading {}", config.name, config.module)
                    })?;
                    (bytes, 1)
                }
            };
            let bytes: Arc<[u8]> = bytes.into();
            let worker = mount(&sandbox, config, bytes.clone(), version)
                .with_context(|| format!("workers `{}`", config.name))?;
            let book = Book::at_start(
                dir.as_deref(),
                &config.name,
                version,
                &worker.sha256,
                &bytes,
                restored,
            )
            .with_context(|| format!("workers `{}`: saving its history", config.name))?;
            books.insert(config.name.clone(), book);
            tracing::info!(
                worker = config.name,
                route = config.route,
                kind = worker.kind.name(),
                version,
                "worker mounted"
            );
            mounted.push(Arc::new(worker));
        }
        // Longest prefix first, so /tools/admin/* wins over /tools/*.
        mounted.sort_by_key(|w| std::cmp::Reverse(w.prefix.len()));
        let permits = configs
            .iter()
            .map(|c| {
                let permits = usize::try_from(c.max_concurrent_requests).unwrap_or(usize::MAX);
                (
                    c.name.clone(),
                    Arc::new(tokio::sync::Semaphore::new(permits)),
                )
            })
            .collect();
        Ok(Workers {
            sandbox: Some(sandbox),
            permits,
            mounted: ArcSwap::from_pointee(mounted),
            deploys: tokio::sync::Mutex::new(()),
            books: std::sync::Mutex::new(books),
            dir,
            max_body_bytes,
        })
    }

    /// The worker whose route covers `path`, if any.
    pub fn route(&self, path: &str) -> Option<Arc<Mounted>> {
        let mounted = self.mounted.load();
        if mounted.is_empty() {
            return None;
        }
        mounted.iter().find(|w| w.matches(path)).cloned()
    }

    pub fn list(&self) -> serde_json::Value {
        let mounted = self.mounted.load();
        serde_json::Value::Array(mounted.iter().map(|w| self.describe(w)).collect())
    }

    /// A worker as listed: the mounted version and its book.
    fn describe(&self, worker: &Mounted) -> serde_json::Value {
        let mut value = worker.describe();
        if let Ok(books) = self.books.lock() {
            if let Some(book) = books.get(&worker.name) {
                book.describe(&mut value);
            }
        }
        value
    }

    /// Passes one request to a fresh instance of `worker` and streams its
    /// answer back. A worker that traps, runs out of memory or time gets an
    /// OpenAI-shaped error; whatever it answers itself is passed on.
    pub async fn serve(
        &self,
        worker: Arc<Mounted>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let permit = match self.permits.get(&worker.name) {
            Some(permits) => Some(
                tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .ok_or_else(|| GatewayError::Worker {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        code: "worker_busy",
                        message: format!(
                            "Worker `{}` is running its max_concurrent_requests ({}); retry later.",
                            worker.name, worker.config.max_concurrent_requests
                        ),
                    })?,
            ),
            None => None,
        };
        let (mut parts, body) = request.into_parts();
        // wasi:http wants an absolute URI; the Host header names us.
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
            .map_err(|e| {
                GatewayError::bad_request(format!("Bad request target: {e}."), "invalid_request")
            })?;
        let limit = self.max_body_bytes;
        let body = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
            .map_err(move |e| match e.downcast::<hyper::Error>() {
                Ok(e) => wasmtime_wasi_http::Error::Hyper(*e),
                Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(limit)),
            })
            .boxed_unsync();
        let request = Request::from_parts(parts, body);
        let timeout = worker.config.timeout;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            worker.handler.handle((), request),
        )
        .await;
        let metrics = crate::metrics::metrics();
        let failed = |status: StatusCode, code: &'static str, message: String| {
            metrics.worker_request(&worker.name, status.as_u16());
            tracing::warn!(worker = worker.name, code, "{message}");
            Err(GatewayError::Worker {
                status,
                code,
                message,
            })
        };
        match outcome {
            Ok(Ok(response)) => {
                metrics.worker_request(&worker.name, response.status().as_u16());
                let worker_name = worker.name.clone();
                Ok(response.map(|body| Body::worker(body, worker_name, permit)))
            }
            // Expired inside the guest's event loop, or its instance ended
            // from outside for running past the timeout.
            Ok(Err(e)) if e.is::<ExpirationError>() || started.elapsed() >= timeout => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "worker_timeout",
                format!(
                    "Worker `{}` did not answer within {timeout:?}.",
                    worker.name
                ),
            ),
            Err(_) => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "worker_timeout",
                format!(
                    "Worker `{}` did not answer within {timeout:?}.",
                    worker.name
                ),
            ),
            Ok(Err(e)) => failed(
                StatusCode::BAD_GATEWAY,
                "worker_failed",
                format!(
                    "Worker `{}` failed (trapped, ran out of memory, or answered nothing): {e:#}",
                    worker.name
                ),
            ),
        }
    }

    /// Replaces `name`'s module; requests already running finish on the old
    /// version. Refuses a module that does not compile or link, naming why.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<serde_json::Value, WorkerDeployError> {
        let _one = self.deploys.lock().await;
        let current = self.find(name)?;
        let sandbox = self.sandbox.as_ref().ok_or_else(|| unknown(name))?;
        let mut book = self.book(name)?;
        let version = book.next_version;
        let bytes: Arc<[u8]> = bytes.into();
        let next = mount(sandbox, &current.config, bytes.clone(), version).map_err(|e| {
            WorkerDeployError {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_module",
                message: format!("Worker `{name}` was not replaced: {e:#}"),
            }
        })?;
        book.add(self.dir.as_deref(), name, version, &next.sha256, &bytes)
            .map_err(|e| self.write_failed(name, e))?;
        book.history.activate(version, How::Deploy);
        book.prune(self.dir.as_deref(), name);
        self.install(next, book, "worker deployed")
    }

    /// Undoes the last change to `name`: the version that served before
    /// the current one serves again (a second rollback walks further
    /// back). Its module is compiled again from the kept copy.
    pub async fn rollback(&self, name: &str) -> Result<serde_json::Value, WorkerDeployError> {
        let _one = self.deploys.lock().await;
        let current = self.find(name)?;
        let mut book = self.book(name)?;
        let Some(target) = book.history.rollback_target() else {
            return Err(WorkerDeployError {
                status: StatusCode::CONFLICT,
                code: "nothing_to_roll_back",
                message: format!(
                    "Worker `{name}` has no earlier version to roll back to: nothing served before version {}.",
                    current.version
                ),
            });
        };
        let next = self.remount(&current, &book, target)?;
        book.history.roll_back();
        self.install(next, book, "worker rolled back")
    }

    /// Makes kept version `version` of `name` serve; a rollback then
    /// returns to the version serving before.
    pub async fn activate(
        &self,
        name: &str,
        version: u64,
    ) -> Result<serde_json::Value, WorkerDeployError> {
        let _one = self.deploys.lock().await;
        let current = self.find(name)?;
        let mut book = self.book(name)?;
        if current.version == version {
            return Err(WorkerDeployError {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: format!("Version {version} of worker `{name}` is already active."),
            });
        }
        let next = self.remount(&current, &book, version)?;
        book.history.activate(version, How::Activate);
        book.prune(self.dir.as_deref(), name);
        self.install(next, book, "worker version activated")
    }

    /// Kept `version` of `current`'s worker, compiled and mounted again.
    fn remount(
        &self,
        current: &Mounted,
        book: &Book,
        version: u64,
    ) -> Result<Mounted, WorkerDeployError> {
        let name = &current.name;
        let sandbox = self.sandbox.as_ref().ok_or_else(|| unknown(name))?;
        let Some(bytes) = book.module(self.dir.as_deref(), name, version) else {
            let kept: Vec<String> = book
                .versions
                .iter()
                .map(|k| k.version.to_string())
                .collect();
            return Err(WorkerDeployError {
                status: StatusCode::NOT_FOUND,
                code: "version_not_found",
                message: format!(
                    "Worker `{name}` has no version {version} (kept: {}).",
                    kept.join(", ")
                ),
            });
        };
        mount(sandbox, &current.config, bytes, version).map_err(|e| WorkerDeployError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal_error",
            message: format!("Worker `{name}` version {version} no longer mounts: {e:#}"),
        })
    }

    /// A copy of `name`'s book to change; [`Workers::install`] puts it back.
    fn book(&self, name: &str) -> Result<Book, WorkerDeployError> {
        self.books
            .lock()
            .ok()
            .and_then(|books| books.get(name).cloned())
            .ok_or_else(|| unknown(name))
    }

    /// Saves `next` and its book for restarts, then serves it from the
    /// next request on.
    fn install(
        &self,
        next: Mounted,
        book: Book,
        what: &str,
    ) -> Result<serde_json::Value, WorkerDeployError> {
        self.save(&next)?;
        book.save(self.dir.as_deref(), &next.name)
            .map_err(|e| self.write_failed(&next.name, e))?;
        let mut described = next.describe();
        book.describe(&mut described);
        if let Ok(mut books) = self.books.lock() {
            books.insert(next.name.clone(), book);
        }
        tracing::info!(worker = next.name, version = next.version, "{what}");
        self.swap(Arc::new(next));
        Ok(described)
    }

    fn write_failed(&self, name: &str, e: std::io::Error) -> WorkerDeployError {
        let dir = self.dir.as_deref().unwrap_or(Path::new("."));
        WorkerDeployError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "state_write_failed",
            message: format!("Saving worker `{name}` in {}: {e}", dir.display()),
        }
    }

    fn find(&self, name: &str) -> Result<Arc<Mounted>, WorkerDeployError> {
        self.mounted
            .load()
            .iter()
            .find(|w| w.name == name)
            .cloned()
            .ok_or_else(|| unknown(name))
    }

    fn swap(&self, next: Arc<Mounted>) {
        self.mounted.rcu(|mounted| {
            mounted
                .iter()
                .map(|w| {
                    if w.name == next.name {
                        next.clone()
                    } else {
                        w.clone()
                    }
                })
                .collect::<Vec<_>>()
        });
    }

    /// Writes the module where the next start finds it (atomically).
    fn save(&self, worker: &Mounted) -> Result<(), WorkerDeployError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let wasm = dir.join(format!("{}.wasm", worker.name));
            let temp = dir.join(format!(".{}.wasm.tmp", worker.name));
            std::fs::write(&temp, &worker.bytes)?;
            std::fs::rename(&temp, &wasm)?;
            let version = dir.join(format!("{}.version", worker.name));
            let temp = dir.join(format!(".{}.version.tmp", worker.name));
            std::fs::write(&temp, worker.version.to_string())?;
            std::fs::rename(&temp, version)
        };
        write().map_err(|e| WorkerDeployError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "state_write_failed",
            message: format!("Saving worker `{}` in {}: {e}", worker.name, dir.display()),
        })
    }
}

fn unknown(name: &str) -> WorkerDeployError {
    WorkerDeployError {
        status: StatusCode::NOT_FOUND,
        code: "unknown_worker",
        message: format!("No worker named `{name}` is configured ([[workers]] in sluice.toml)."),
    }
}

/// A worker deploy, rollback or activation refused (bad module, unknown
/// worker or version, nothing to roll back, state not saved); the admin
/// API answers with it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WorkerDeployError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Problem for WorkerDeployError {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn code(&self) -> &str {
        self.code
    }
}

/// A module deployed earlier, and its version.
fn saved(dir: &Path, name: &str) -> Option<(Vec<u8>, u64)> {
    let bytes = std::fs::read(dir.join(format!("{name}.wasm"))).ok()?;
    let version = std::fs::read_to_string(dir.join(format!("{name}.version")))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    Some((bytes, version))
}

fn mount(
    sandbox: &Sandbox,
    config: &WorkerConfig,
    bytes: Arc<[u8]>,
    version: u64,
) -> anyhow::Result<Mounted> {
    let (pre, kind) = sandbox.compile(&bytes)?;
    let allowed = config
        .allowed_hosts
        .iter()
        .map(|h| outbound::parse_allowed_host(h).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Arc<[_]>>>()?;
    let bounds = Bounds {
        worker: config.name.as_str().into(),
        allowed,
        env: config
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        timeout: config.timeout,
        memory_limit: usize::try_from(config.memory_limit).unwrap_or(usize::MAX),
    };
    let prefix = crate::config::names::route_prefix(&config.route).map_err(anyhow::Error::msg)?;
    let sha256 = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Mounted {
        name: config.name.clone(),
        route: config.route.clone(),
        prefix: prefix.to_string(),
        exact: !config.route.ends_with('*'),
        kind,
        version,
        sha256,
        config: config.clone(),
        bytes,
        handler: ProxyHandler::new(Version {
            engine: sandbox.engine().clone(),
            pre,
            bounds,
        }),
    })
}
