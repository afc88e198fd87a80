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
//! started with; the next one gets the new version. Deployed modules and
//! each worker's history are kept in the state directory ([`shelf`]), so
//! a restart serves them, and every replica sharing the directory follows
//! a deploy or rollback made on any of them ([`Workers::follow`]).

//! The workers themselves run on the wasm layer ([`crate::wasm::worker`]).

mod book;
mod shelf;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http::{header, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::config::WorkerConfig;
use crate::dataplane::body::Body;
use crate::dataplane::errors::GatewayError;
use crate::deploy_history::How;
use crate::problem::Problem;
use crate::store::{sha256_hex, StoreError, StoreLock};
pub use crate::wasm::worker::Kind;
use crate::wasm::worker::{parse_allowed_host, Bounds, HandleError, Handler, Sandbox};
use book::Book;
use shelf::{Books, Shelf};

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
    handler: Handler,
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
    books: std::sync::Mutex<Books>,
    shelf: Shelf,
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
        let shelf = Shelf::new(state_dir);
        if configs.is_empty() {
            return Ok(Workers {
                sandbox: None,
                permits: Default::default(),
                mounted: ArcSwap::from_pointee(Vec::new()),
                deploys: tokio::sync::Mutex::new(()),
                books: Default::default(),
                shelf,
                max_body_bytes,
            });
        }
        let sandbox = Sandbox::new()?;
        let mut mounted = Vec::new();
        // Replicas starting together take turns, so each resumes what the
        // other saved.
        let _lock = shelf.lock_blocking()?;
        let mut books = shelf.read()?;
        for config in configs {
            let saved = books
                .get(&config.name)
                .cloned()
                .or_else(|| shelf.migrate(&config.name));
            let (book, version, bytes) = match resume(&shelf, saved) {
                Some(resumed) => resumed,
                None => {
                    let bytes: Arc<[u8]> = std::fs::read(&config.module)
                        .with_context(|| {
                            format!("workers `{}`: reading {}", config.name, config.module)
                        })?
                        .into();
                    let sha256 = sha256_hex(&bytes);
                    shelf.put(&sha256, &bytes)?;
                    (Book::begin(1, &sha256), 1, bytes)
                }
            };
            let worker = mount(&sandbox, config, bytes, version)
                .with_context(|| format!("workers `{}`", config.name))?;
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
        shelf
            .save(&books)
            .context("workers: saving their history")?;
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
            shelf,
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
        let request = Request::from_parts(parts, body);
        let timeout = worker.config.timeout;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            worker.handler.handle(request, self.max_body_bytes),
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
            Ok(Err(e))
                if !matches!(e, HandleError::Expired) && started.elapsed() < timeout =>
            {
                failed(
                    StatusCode::BAD_GATEWAY,
                    "worker_failed",
                    format!(
                        "Worker `{}` failed (trapped, ran out of memory, or answered nothing): {e:#}",
                        worker.name
                    ),
                )
            }
            // Expired inside the guest's event loop, ended from outside for
            // running past the timeout, or never answered at all.
            Ok(Err(_)) | Err(_) => failed(
                StatusCode::GATEWAY_TIMEOUT,
                "worker_timeout",
                format!(
                    "Worker `{}` did not answer within {timeout:?}.",
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
        let _store = self.begin_change(name).await?;
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
        self.shelf
            .put(&next.sha256, &bytes)
            .map_err(|e| self.write_failed(name, e))?;
        book.add(version, &next.sha256);
        book.history.activate(version, How::Deploy);
        book.prune();
        self.install(next, book, "worker deployed")
    }

    /// Undoes the last change to `name`: the version that served before
    /// the current one serves again (a second rollback walks further
    /// back). Its module is compiled again from the kept copy.
    pub async fn rollback(&self, name: &str) -> Result<serde_json::Value, WorkerDeployError> {
        let _one = self.deploys.lock().await;
        let _store = self.begin_change(name).await?;
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
        let _store = self.begin_change(name).await?;
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
        book.prune();
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
        let bytes = book
            .kept(version)
            .and_then(|kept| self.shelf.module(&kept.sha256));
        let Some(bytes) = bytes else {
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
        let mut books = self.books()?;
        let mut described = next.describe();
        book.describe(&mut described);
        books.insert(next.name.clone(), book);
        self.shelf
            .save(&books)
            .map_err(|e| self.write_failed(&next.name, e))?;
        if let Ok(mut kept) = self.books.lock() {
            *kept = books;
        }
        tracing::info!(worker = next.name, version = next.version, "{what}");
        self.swap(Arc::new(next));
        Ok(described)
    }

    /// Every worker's book, to change and put back.
    fn books(&self) -> Result<Books, WorkerDeployError> {
        self.books
            .lock()
            .map(|books| books.clone())
            .map_err(|_| WorkerDeployError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "internal_error",
                message: "The workers' books are poisoned.".into(),
            })
    }

    fn write_failed(&self, name: &str, e: StoreError) -> WorkerDeployError {
        if let StoreError::Locked(_) = e {
            return WorkerDeployError {
                status: StatusCode::CONFLICT,
                code: "conflict",
                message: format!("Worker `{name}` was not changed: {e}"),
            };
        }
        let dir = self.shelf.dir().unwrap_or(Path::new("."));
        WorkerDeployError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "state_write_failed",
            message: format!("Saving worker `{name}` in {}: {e}", dir.display()),
        }
    }

    /// Takes the state directory's lock for a change (other replicas
    /// sharing it wait), then catches up with what they saved, so the
    /// change applies to the latest versions. Released when dropped.
    async fn begin_change(&self, name: &str) -> Result<Option<StoreLock>, WorkerDeployError> {
        let lock = self
            .shelf
            .lock()
            .await
            .map_err(|e| self.write_failed(name, e))?;
        self.catch_up().map_err(|e| WorkerDeployError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal_error",
            message: format!("Reading the workers another replica saved: {e:#}"),
        })?;
        Ok(lock)
    }

    /// Polls the state directory every `interval` and serves the versions
    /// another replica sharing it deployed, rolled back or activated (each
    /// converges within about one interval).
    pub async fn follow(self: Arc<Self>, interval: Duration) {
        if self.sandbox.is_none() {
            return;
        }
        loop {
            tokio::time::sleep(interval).await;
            let _one = self.deploys.lock().await;
            match self.catch_up() {
                Ok(true) => tracing::info!("workers updated from the shared state directory"),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    "reading the shared state directory failed, keeping the workers: {e:#}"
                ),
            }
        }
    }

    /// Takes in the books another replica saved since this one last did:
    /// a worker whose active version there differs from the one mounted is
    /// mounted again from the kept module. All or nothing: on an error the
    /// mounted workers stay and the next poll tries again. Called holding
    /// `deploys`.
    fn catch_up(&self) -> anyhow::Result<bool> {
        let Some((bytes, saved)) = self.shelf.changed()? else {
            return Ok(false);
        };
        let mut next = Vec::new();
        for worker in self.mounted.load().iter() {
            let Some(kept) = saved.get(&worker.name).and_then(Book::active) else {
                continue;
            };
            if kept.version == worker.version && kept.sha256 == worker.sha256 {
                continue;
            }
            let sandbox = self.sandbox.as_ref().context("no worker sandbox")?;
            let module = self.shelf.module(&kept.sha256).with_context(|| {
                format!(
                    "worker `{}` version {}: its module is not kept",
                    worker.name, kept.version
                )
            })?;
            let mounted = mount(sandbox, &worker.config, module, kept.version)
                .with_context(|| format!("worker `{}` version {}", worker.name, kept.version))?;
            next.push(mounted);
        }
        if let Ok(mut books) = self.books.lock() {
            *books = saved;
        }
        for worker in next {
            tracing::info!(
                worker = worker.name,
                version = worker.version,
                "worker version followed"
            );
            self.swap(Arc::new(worker));
        }
        self.shelf.mark_seen(bytes);
        Ok(true)
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
}

fn unknown(name: &str) -> WorkerDeployError {
    WorkerDeployError {
        status: StatusCode::NOT_FOUND,
        code: "unknown_worker",
        message: format!("No worker named `{name}` is configured ([[workers]] in sluice.toml)."),
    }
}

/// The book of a worker saved earlier, with the version it serves and
/// that version's module, when the module is still kept.
fn resume(shelf: &Shelf, saved: Option<Book>) -> Option<(Book, u64, Arc<[u8]>)> {
    let mut book = saved?;
    let kept = book.active()?;
    let (version, bytes) = (kept.version, shelf.module(&kept.sha256)?);
    book.history.restarted(version);
    Some((book, version, bytes))
}

fn mount(
    sandbox: &Sandbox,
    config: &WorkerConfig,
    bytes: Arc<[u8]>,
    version: u64,
) -> anyhow::Result<Mounted> {
    let allowed = config
        .allowed_hosts
        .iter()
        .map(|h| parse_allowed_host(h).map_err(anyhow::Error::msg))
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
    let (handler, kind) = sandbox.compile(&bytes, bounds)?;
    let prefix = crate::config::names::route_prefix(&config.route).map_err(anyhow::Error::msg)?;
    let sha256 = sha256_hex(&bytes);
    Ok(Mounted {
        name: config.name.clone(),
        route: config.route.clone(),
        prefix: prefix.to_string(),
        exact: !config.route.ends_with('*'),
        kind,
        version,
        sha256,
        config: config.clone(),
        handler,
    })
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
