//! `sluice policy …`: the admin API from the command line.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct AdminClient {
    base: String,
    token: Option<String>,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// Sends one call; returns the response body, or an error carrying the
    /// API's message for a non-2xx status.
    pub async fn call(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<String> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(body))?;
        if let Some(token) = &self.token {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, format!("Bearer {token}").parse()?);
        }
        let response = tokio::time::timeout(Duration::from_secs(120), client.request(request))
            .await
            .context("the admin API did not answer within 120 s")?
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            anyhow::bail!("{status}: {message}");
        }
        Ok(text)
    }

    pub async fn deploy(
        &self,
        name: &str,
        module: &Path,
        config: Option<&Path>,
        position: Option<usize>,
        on_error: Option<&str>,
        shadow: bool,
    ) -> anyhow::Result<String> {
        let bytes =
            std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(config) = config {
            let text = std::fs::read_to_string(config)
                .with_context(|| format!("reading {}", config.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", config.display()))?;
            query.append_pair("config", &json.to_string());
        }
        if let Some(position) = position {
            query.append_pair("position", &position.to_string());
        }
        if let Some(on_error) = on_error {
            query.append_pair("on_error", on_error);
        }
        if shadow {
            query.append_pair("shadow", "true");
        }
        let query = query.finish();
        let path = format!(
            "/admin/policies/{name}{}{query}",
            if query.is_empty() { "" } else { "?" }
        );
        self.call(Method::PUT, &path, Bytes::from(bytes)).await
    }
}
