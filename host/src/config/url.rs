//! A backend's base URL as the config gives it, checked once.

use http::uri::{Authority, Scheme};
use http::Uri;

/// A backend's base URL, split once at load so each request only appends
/// its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl std::fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

impl BackendUrl {
    pub fn parse(url: &str) -> Result<BackendUrl, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let scheme = uri.scheme().cloned();
        if scheme != Some(Scheme::HTTP) {
            return Err(format!(
                "`{url}` must start with http:// (TLS to backends is not supported yet)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{url}` must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(BackendUrl {
            scheme: Scheme::HTTP,
            authority,
            prefix,
        })
    }

    /// The backend URI for a client's path and query, e.g. `/v1/models`.
    /// `host:port` as written.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.prefix))
            .build()
    }
}
