//! The admin API, on its own listener: deploy, list, roll back, remove and
//! shadow policies. Every call needs the admin bearer token when one is
//! configured (compared in constant time); without one the listener only
//! binds to loopback.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::config::OnError;
use crate::deploy::{DeployError, DeployRequest, Deployer};
use crate::errors::GatewayError;

/// Largest component accepted by a deploy.
const MAX_MODULE_BYTES: u64 = 64 << 20;

pub struct Admin {
    pub deployer: Arc<Deployer>,
    pub token: Option<String>,
    pub usage: Option<crate::usage::UsageStore>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if !self.authorized(&request) {
            // Read the upload before refusing it: answering mid-upload makes
            // the connection close under the client, which then sees a reset
            // instead of the 401.
            drain(request.into_body(), MAX_MODULE_BYTES).await;
            let mut response = GatewayError::AdminUnauthorized.into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return response;
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
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), token.as_bytes())
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let path = request.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let method = request.method().clone();
        let deployer = &self.deployer;
        match (&method, segments.as_slice()) {
            (&Method::GET, ["admin", "policies"]) => json(StatusCode::OK, &deployer.list().await),
            (&Method::GET, ["admin", "usage"]) => {
                let query = usage_query(request.uri().query().unwrap_or(""))?;
                let Some(store) = self.usage.clone() else {
                    return Err(GatewayError::Admin {
                        status: StatusCode::NOT_FOUND,
                        code: "usage_disabled",
                        message: "Usage records are not kept (usage.disabled).".into(),
                    });
                };
                let rows = tokio::task::spawn_blocking(move || store.query(&query))
                    .await
                    .map_err(|e| internal(e.to_string()))?
                    .map_err(|e| internal(format!("{e:#}")))?;
                json(StatusCode::OK, &serde_json::json!({"rows": rows}))
            }
            (&Method::PUT, ["admin", "policies", name]) => {
                let name = name.to_string();
                let query = request.uri().query().unwrap_or("").to_string();
                let mut deploy = deploy_request(&query)?;
                let (parts, body) = request.into_parts();
                let bytes =
                    crate::server::read_body(&parts.headers, body, MAX_MODULE_BYTES).await?;
                deploy.source = "api".into();
                let version = deployer.deploy(&name, bytes.to_vec(), deploy).await?;
                json(StatusCode::OK, &version)
            }
            (&Method::DELETE, ["admin", "policies", name]) => {
                deployer.remove(name).await?;
                json(StatusCode::OK, &serde_json::json!({"removed": name}))
            }
            (&Method::POST, ["admin", "policies", name, "rollback"]) => {
                json(StatusCode::OK, &deployer.rollback(name).await?)
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
            _ => Err(GatewayError::NotFound(path)),
        }
    }
}

/// Reads and discards a request body, up to `limit` bytes.
async fn drain(mut body: Incoming, limit: u64) {
    use http_body_util::BodyExt;
    let mut read = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, |d| d.len() as u64);
        if read > limit {
            break;
        }
    }
}

/// Reads `config` (JSON), `position`, `on_error` and `shadow` from the
/// query string.
fn deploy_request(query: &str) -> Result<DeployRequest, GatewayError> {
    let mut request = DeployRequest::default();
    let bad = |key: &str, message: String| GatewayError::BadRequest {
        message: format!("Query parameter `{key}`: {message}."),
        code: "invalid_parameter",
        param: None,
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
fn usage_query(query: &str) -> Result<crate::usage::UsageQuery, GatewayError> {
    let mut usage = crate::usage::UsageQuery::default();
    let bad = |key: &str, message: String| GatewayError::BadRequest {
        message: format!("Query parameter `{key}`: {message}."),
        code: "invalid_parameter",
        param: None,
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

fn internal(message: String) -> GatewayError {
    GatewayError::Admin {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal_error",
        message,
    }
}

impl From<DeployError> for GatewayError {
    fn from(e: DeployError) -> Self {
        let (status, code) = match &e {
            DeployError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy"),
            DeployError::NotFound(_) => (StatusCode::NOT_FOUND, "policy_not_found"),
            DeployError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            DeployError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        GatewayError::Admin {
            status,
            code,
            message: e.to_string(),
        }
    }
}

fn json<T: serde::Serialize>(
    status: StatusCode,
    value: &T,
) -> Result<Response<Body>, GatewayError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| GatewayError::Admin {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        code: "internal_error",
        message: e.to_string(),
    })?;
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
