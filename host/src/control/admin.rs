//! The admin API, on its own listener: deploy, list, roll back, activate,
//! remove and shadow policies. Every call needs the admin bearer token when one is
//! configured (compared in constant time); without one the listener only
//! binds to loopback.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::accounts::consumers::ConsumerError;
use crate::api::openai::BadRequest;
use crate::api::render::{self, ApiShape};
use crate::config::{ConsumerLimits, OnError};
use crate::control::deploy::{DeployError, DeployRequest, Deployer};
use crate::dataplane::body::Body;
use crate::dataplane::errors::GatewayError;
use crate::dataplane::server::{Gateway, Playground};
use crate::dataplane::workers::WorkerDeployError;
use crate::problem::Problem;
use tokio::sync::watch;

/// The shortest admin token accepted when the admin listener is not on a
/// loopback address: 16 bytes, about 96 bits if random (`sluice new-key`
/// makes 51 bytes).
pub const MIN_TOKEN_BYTES_OFF_LOOPBACK: usize = 16;

/// An admin token the gateway refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{setting}: the admin token is empty or only whitespace; set a real token or leave it unset")]
    Blank { setting: &'static str },
    #[error(
        "{setting}: the admin token is {len} bytes; with server.admin_listen off loopback it must be \
         at least {MIN_TOKEN_BYTES_OFF_LOOPBACK} (e.g. from `sluice new-key`)"
    )]
    TooShort { setting: &'static str, len: usize },
    #[error("{setting}: the admin token is over {max} bytes", max = crate::api::bearer::MAX_TOKEN_BYTES)]
    TooLong { setting: &'static str },
}

/// The admin token from `setting` (`SLUICE_ADMIN_TOKEN` or
/// `server.admin_token_file`), surrounding whitespace trimmed: refused when
/// nothing is left, when it is too short to be secret on a listener off
/// loopback, or longer than a client's header may carry.
pub fn check_token(
    setting: &'static str,
    token: &str,
    loopback: bool,
) -> Result<String, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Blank { setting });
    }
    if token.len() > crate::api::bearer::MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong { setting });
    }
    if !loopback && token.len() < MIN_TOKEN_BYTES_OFF_LOOPBACK {
        return Err(TokenError::TooShort {
            setting,
            len: token.len(),
        });
    }
    Ok(token.to_string())
}

/// Largest component accepted by a deploy.
const MAX_MODULE_BYTES: u64 = 64 << 20;

pub struct Admin {
    pub deployer: Arc<Deployer>,
    pub token: Option<String>,
    pub usage: Option<crate::usage::UsageStore>,
    pub gateway: Arc<Gateway>,
    /// The console's once-a-second snapshots.
    pub feed: watch::Receiver<Arc<serde_json::Value>>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if request.method() == Method::GET {
            // The console's files hold no data; every call they make
            // needs the token.
            let path = request.uri().path();
            let name = match path {
                "/" => Some("index.html"),
                _ => path.strip_prefix("/console/"),
            };
            if let Some((bytes, kind)) = name.and_then(crate::control::console::asset) {
                let mut response = Response::new(Body::full(Bytes::from_static(bytes)));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
                headers.insert(
                    header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-cache"),
                );
                return response;
            }
        }
        if request.uri().path().starts_with("/admin/playground/") && self.authorized(&request) {
            return self.playground(request).await;
        }
        if !self.authorized(&request) {
            // Answering mid-upload would reset the connection under the
            // client, which then never sees the 401.
            let (parts, body) = request.into_parts();
            crate::dataplane::request_body::linger(&parts.headers, body, MAX_MODULE_BYTES);
            return AdminError::Unauthorized.into_response();
        }
        match self.route(request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let header = request.headers().get(header::AUTHORIZATION);
        match crate::api::bearer::presented(header.map(http::HeaderValue::as_bytes)) {
            crate::api::bearer::Presented::Token(presented) => {
                constant_time_eq(presented.as_bytes(), token.as_bytes())
            }
            _ => false,
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, AdminError> {
        let path = request.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let method = request.method().clone();
        if method == Method::GET {
            if let Some(page) = self.gateway.status_page(&path) {
                return Ok(page);
            }
        }
        let deployer = &self.deployer;
        match (&method, segments.as_slice()) {
            (&Method::GET, ["admin", "policies"]) => json(StatusCode::OK, &deployer.list().await),
            (&Method::GET, ["admin", "usage"]) => {
                let query = usage_query(request.uri().query().unwrap_or(""))?;
                let Some(store) = self.usage.clone() else {
                    return Err(AdminError::UsageDisabled);
                };
                let replica = store.replica().to_string();
                let rows = tokio::task::spawn_blocking(move || store.query(&query))
                    .await
                    .map_err(|e| AdminError::Internal(e.to_string()))?
                    .map_err(|e| AdminError::Internal(format!("{e:#}")))?;
                json(
                    StatusCode::OK,
                    &serde_json::json!({"rows": rows, "replica": replica}),
                )
            }
            (&Method::GET, ["admin", "fleet"]) => json(
                StatusCode::OK,
                &crate::control::console::fleet_json(&self.gateway.fleet),
            ),
            (&Method::GET, ["admin", "events"]) => Ok(self.events()),
            (&Method::GET, ["admin", "consumers"]) => {
                let mut list = Vec::new();
                for c in self.gateway.consumers.list() {
                    let mut v = c.public();
                    v["usage"] = self
                        .gateway
                        .limiter
                        .usage(&c.name)
                        .await
                        .unwrap_or(serde_json::Value::Null);
                    list.push(v);
                }
                json(StatusCode::OK, &list)
            }
            (&Method::POST, ["admin", "consumers"]) => {
                let (parts, body) = request.into_parts();
                let body =
                    crate::dataplane::request_body::read(&parts.headers, body, admin_body(1 << 20))
                        .await?;
                let new: NewConsumer = serde_json::from_slice(&body).map_err(|e| {
                    BadRequest::new(
                        format!("The consumer is not valid JSON: {e}."),
                        "invalid_json",
                    )
                })?;
                let (consumer, key) = self
                    .gateway
                    .consumers
                    .create(&new.name, new.models, new.limits)?;
                let mut v = consumer.public();
                v["key"] = key.into();
                json(StatusCode::CREATED, &v)
            }
            (&Method::POST, ["admin", "consumers", name, "rotate"]) => {
                let key = self.gateway.consumers.rotate(name)?;
                json(
                    StatusCode::OK,
                    &serde_json::json!({"name": name, "key": key}),
                )
            }
            (&Method::POST, ["admin", "consumers", name, action @ ("disable" | "enable")]) => {
                self.gateway
                    .consumers
                    .set_disabled(name, *action == "disable")?;
                json(
                    StatusCode::OK,
                    &serde_json::json!({"name": name, "disabled": *action == "disable"}),
                )
            }
            (&Method::DELETE, ["admin", "consumers", name]) => {
                self.gateway.consumers.remove(name)?;
                json(StatusCode::OK, &serde_json::json!({"removed": name}))
            }
            (&Method::PUT | &Method::POST, ["admin", "policies", name]) => {
                let name = name.to_string();
                let query = request.uri().query().unwrap_or("").to_string();
                let mut deploy = deploy_request(&query)?;
                let (parts, body) = request.into_parts();
                let bytes = crate::dataplane::request_body::read(
                    &parts.headers,
                    body,
                    admin_body(MAX_MODULE_BYTES),
                )
                .await?;
                deploy.source = "api".into();
                let version = deployer.deploy(&name, bytes.to_vec(), deploy).await?;
                json(StatusCode::OK, &version)
            }
            (&Method::GET, ["admin", "workers"]) => {
                json(StatusCode::OK, &self.gateway.workers.list())
            }
            (&Method::PUT | &Method::POST, ["admin", "workers", name]) => {
                let name = name.to_string();
                let (parts, body) = request.into_parts();
                let bytes = crate::dataplane::request_body::read(
                    &parts.headers,
                    body,
                    admin_body(MAX_MODULE_BYTES),
                )
                .await?;
                json(
                    StatusCode::OK,
                    &self.gateway.workers.deploy(&name, bytes.to_vec()).await?,
                )
            }
            (&Method::POST, ["admin", "workers", name, "rollback"]) => {
                json(StatusCode::OK, &self.gateway.workers.rollback(name).await?)
            }
            (&Method::POST, ["admin", "workers", name, "activate", version]) => {
                let version = version_number(version)?;
                json(
                    StatusCode::OK,
                    &self
                        .gateway
                        .workers
                        .activate(name, u64::from(version))
                        .await?,
                )
            }
            (&Method::DELETE, ["admin", "policies", name]) => {
                deployer.remove(name).await?;
                json(StatusCode::OK, &serde_json::json!({"removed": name}))
            }
            (&Method::POST, ["admin", "policies", name, "rollback"]) => {
                json(StatusCode::OK, &deployer.rollback(name).await?)
            }
            (&Method::POST, ["admin", "policies", name, "activate", version]) => {
                let version = version_number(version)?;
                json(StatusCode::OK, &deployer.activate(name, version).await?)
            }
            (&Method::GET, ["admin", "policies", name, "shadow"]) => {
                json(StatusCode::OK, &deployer.shadow_report(name).await?)
            }
            (&Method::POST, ["admin", "policies", name, "shadow", "promote"]) => {
                deployer.end_shadow(name, true).await?;
                json(StatusCode::OK, &serde_json::json!({"promoted": name}))
            }
            (&Method::DELETE, ["admin", "policies", name, "shadow"]) => {
                deployer.end_shadow(name, false).await?;
                json(StatusCode::OK, &serde_json::json!({"discarded": name}))
            }
            _ => Err(AdminError::NotFound(path)),
        }
    }
}

/// Why the admin API refused a call. The control plane's own errors;
/// each module's error says its status and code ([`Problem`]).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("The admin API needs a valid `Authorization: Bearer` token.")]
    Unauthorized,
    #[error("Unknown path `{0}`.")]
    NotFound(String),
    #[error("Usage records are not kept (usage.disabled).")]
    UsageDisabled,
    #[error("{0}")]
    Internal(String),
    /// A query parameter or body that does not parse.
    #[error("{0}")]
    BadRequest(#[from] BadRequest),
    /// The request body: too large, too slow, broken off.
    #[error("{0}")]
    Body(#[from] GatewayError),
    #[error("{0}")]
    Deploy(#[from] DeployError),
    #[error("{0}")]
    Consumer(#[from] ConsumerError),
    #[error("{0}")]
    Worker(#[from] WorkerDeployError),
}

impl AdminError {
    /// The error an admin tool reads: the same JSON shape as the API's.
    fn into_response(self) -> Response<Body> {
        render::response(ApiShape::OpenAi, &self).map(Body::full)
    }

    /// The error another module owns, when this one wraps one.
    fn owned(&self) -> Option<&dyn Problem> {
        match self {
            AdminError::BadRequest(e) => Some(e),
            AdminError::Body(e) => Some(e),
            AdminError::Deploy(e) => Some(e),
            AdminError::Consumer(e) => Some(e),
            AdminError::Worker(e) => Some(e),
            _ => None,
        }
    }
}

impl Problem for AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) | AdminError::UsageDisabled => StatusCode::NOT_FOUND,
            other => other
                .owned()
                .map_or(StatusCode::INTERNAL_SERVER_ERROR, Problem::status),
        }
    }
    fn code(&self) -> &str {
        match self {
            AdminError::Unauthorized => "invalid_admin_token",
            AdminError::NotFound(_) => "not_found",
            AdminError::UsageDisabled => "usage_disabled",
            other => other.owned().map_or("internal_error", Problem::code),
        }
    }
    fn retry_after(&self) -> Option<u64> {
        self.owned().and_then(Problem::retry_after)
    }
    fn param(&self) -> Option<&'static str> {
        self.owned().and_then(Problem::param)
    }
}

/// The body of `POST /admin/consumers`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConsumer {
    name: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    limits: ConsumerLimits,
}

impl Admin {
    /// `text/event-stream` of the console's snapshots, one a second, until
    /// the console goes away.
    fn events(&self) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut feed = self.feed.clone();
        tokio::spawn(async move {
            loop {
                let event = feed.borrow_and_update().clone();
                if !event.is_null() {
                    let line = format!("data: {event}\n\n");
                    if tx.send(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                if feed.changed().await.is_err() {
                    return;
                }
            }
        });
        let mut response = Response::new(Body::Channel(rx));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        response
    }

    /// `/admin/playground/v1/...`: the request goes through the gateway
    /// exactly as a client's would, under the admin's authority.
    async fn playground(&self, mut request: Request<Incoming>) -> Response<Body> {
        let path = request
            .uri()
            .path()
            .strip_prefix("/admin/playground")
            .unwrap_or("/")
            .to_string();
        match path.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => return AdminError::NotFound(path).into_response(),
        }
        request.headers_mut().remove(header::AUTHORIZATION);
        request.extensions_mut().insert(Playground);
        self.gateway.clone().handle(request).await
    }
}

/// Admin bodies (configs, modules) come from operators' tools on a fast
/// link; a minute bounds even a large module on a slow one.
fn admin_body(max_bytes: u64) -> crate::dataplane::request_body::BodyLimits {
    crate::dataplane::request_body::BodyLimits {
        max_bytes,
        timeout: std::time::Duration::from_secs(60),
    }
}

/// Reads `config` (JSON), `position`, `on_error` and `shadow` from the
/// query string.
fn deploy_request(query: &str) -> Result<DeployRequest, BadRequest> {
    let mut request = DeployRequest::default();
    let bad = |key: &str, message: String| {
        BadRequest::new(
            format!("Query parameter `{key}`: {message}."),
            "invalid_parameter",
        )
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "config" => {
                let config = serde_json::from_str(&value)
                    .map_err(|e| bad("config", format!("not JSON: {e}")))?;
                request.config = Some(config);
            }
            "position" => {
                request.position = Some(
                    value
                        .parse()
                        .map_err(|_| bad("position", "not a number".into()))?,
                )
            }
            "on_error" => {
                request.on_error = Some(match value.as_ref() {
                    "fail-closed" => OnError::FailClosed,
                    "fail-open" => OnError::FailOpen,
                    other => {
                        return Err(bad(
                            "on_error",
                            format!("`{other}` is not fail-closed or fail-open"),
                        ))
                    }
                })
            }
            "shadow" => request.shadow = matches!(value.as_ref(), "true" | "1" | "yes"),
            other => return Err(bad(other, "unknown parameter".into())),
        }
    }
    Ok(request)
}

/// `group_by=consumer,model,backend,day`, `from` and `to` in Unix
/// milliseconds (`to` exclusive).
fn usage_query(query: &str) -> Result<crate::usage::UsageQuery, BadRequest> {
    let mut usage = crate::usage::UsageQuery::default();
    let bad = |key: &str, message: String| {
        BadRequest::new(
            format!("Query parameter `{key}`: {message}."),
            "invalid_parameter",
        )
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "group_by" => {
                usage.group_by =
                    crate::usage::parse_group_by(&value).map_err(|e| bad("group_by", e))?
            }
            "from" => {
                usage.from_ms = Some(
                    value
                        .parse()
                        .map_err(|_| bad("from", "not Unix milliseconds".into()))?,
                )
            }
            "to" => {
                usage.to_ms = Some(
                    value
                        .parse()
                        .map_err(|_| bad("to", "not Unix milliseconds".into()))?,
                )
            }
            other => return Err(bad(other, "unknown parameter".into())),
        }
    }
    Ok(usage)
}

/// The `{version}` of `…/activate/{version}`.
fn version_number(text: &str) -> Result<u32, BadRequest> {
    text.parse().map_err(|_| {
        BadRequest::new(
            format!("`{text}` is not a version number."),
            "invalid_parameter",
        )
    })
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>, AdminError> {
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| AdminError::Internal(e.to_string()))?;
    let mut response = Response::new(Body::full(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, Body::JSON);
    Ok(response)
}

/// Equal in time that depends only on the lengths, never on where the
/// first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_tokens_must_be_real() {
        assert!(matches!(
            check_token("SLUICE_ADMIN_TOKEN", " \t\n", true),
            Err(TokenError::Blank { .. })
        ));
        assert!(matches!(
            check_token("SLUICE_ADMIN_TOKEN", "x", false),
            Err(TokenError::TooShort { len: 1, .. })
        ));
        assert_eq!(check_token("f", " x\n", true).unwrap(), "x");
        assert_eq!(
            check_token("f", "0123456789abcdef\n", false).unwrap(),
            "0123456789abcdef"
        );
        let message = check_token("server.admin_token_file", "short", false)
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("server.admin_token_file:"), "{message}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn deploy_parameters_parse() {
        let r = deploy_request(
            "config=%7B%22default%22%3A%22vm02%22%7D&position=0&on_error=fail-open&shadow=true",
        )
        .unwrap();
        assert_eq!(r.config.unwrap()["default"], "vm02");
        assert_eq!(r.position, Some(0));
        assert_eq!(r.on_error, Some(OnError::FailOpen));
        assert!(r.shadow);
        assert!(deploy_request("colour=red").is_err());
        assert!(deploy_request("config=%7Bnope").is_err());
    }
}
