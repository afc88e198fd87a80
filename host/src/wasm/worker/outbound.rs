//! A worker's outbound HTTP: only to the hosts its config lists.
//!
//! Every `wasi:http` request a worker makes (0.2 `outgoing-handler` or 0.3
//! `client`) goes through [`Outbound::send_request`], which refuses any
//! authority not on the list with `HTTP-request-denied` before a socket is
//! opened, and sends the rest with wasmtime's client.

use std::future::Future;
use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// One allowed destination: a host, and a port unless any port will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    host: String,
    port: Option<u16>,
}

/// Parses `host` or `host:port` (IPv6 in brackets), as in
/// `workers[].allowed_hosts`.
pub fn parse_allowed_host(text: &str) -> Result<AllowedHost, String> {
    let (host, port) = crate::config::names::host_and_port(text)?;
    Ok(AllowedHost { host, port })
}

/// The `wasi:http` hooks of one worker's store.
pub struct Outbound {
    pub worker: Arc<str>,
    pub allowed: Arc<[AllowedHost]>,
}

impl Outbound {
    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        self.allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port))
    }
}

type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        if !self.allows(request.uri()) {
            tracing::warn!(
                worker = &*self.worker,
                uri = %request.uri(),
                "worker's outbound request refused: host not in allowed_hosts"
            );
            crate::metrics::metrics().worker_outbound_refused(&self.worker);
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(hosts: &[&str]) -> Outbound {
        Outbound {
            worker: "w".into(),
            allowed: hosts
                .iter()
                .map(|h| parse_allowed_host(h).expect("valid"))
                .collect(),
        }
    }

    #[test]
    fn only_listed_hosts_and_ports_are_allowed() {
        let o = outbound(&["127.0.0.1:8080", "API.example.com", "[::1]:9000"]);
        let allows = |uri: &str| o.allows(&uri.parse().expect("uri"));
        assert!(allows("http://127.0.0.1:8080/x"));
        assert!(!allows("http://127.0.0.1:8081/x"));
        assert!(!allows("http://127.0.0.2:8080/x"));
        assert!(allows("https://api.example.com/v1"));
        assert!(allows("http://api.example.com:1234/"));
        assert!(!allows("https://evil.example.com/"));
        assert!(!allows("https://api.example.com.evil.net/"));
        assert!(allows("http://[::1]:9000/"));
        assert!(!allows("/relative"));
    }

    #[test]
    fn allowed_host_syntax() {
        for good in ["localhost", "127.0.0.1:80", "a.b.c:65535", "[::1]:9000"] {
            assert!(parse_allowed_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "http://x",
            "x/y",
            "*.example.com",
            "x:99999",
            "x:",
            "u@x",
            "::1",
        ] {
            assert!(parse_allowed_host(bad).is_err(), "{bad}");
        }
    }
}
