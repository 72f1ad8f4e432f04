//! The pooled HTTP/1.1 client to the upstream IMDS. One round trip per call, a hard deadline
//! on the whole exchange (SDKs give up after about a second, `reference/aws-imds-sts-iam.md`
//! §2.8), bounded response size.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::config::Upstream;

/// IMDS answers are small (user-data is at most 16 KiB); anything larger is not IMDS.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the IMDS upstream")]
    Connect,
    #[error("the IMDS upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the IMDS upstream sent a malformed or oversized response")]
    Protocol,
}

impl UpstreamError {
    /// The closed label set for `credlock_upstream_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Protocol => "protocol",
        }
    }

    /// What the client is told: 504 for a hang, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A complete upstream answer. Its body may hold the instance role's raw credentials, so
/// `Debug` never shows it.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for UpstreamResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamResponse")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Cheap to clone: the pool is shared.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, Full<Bytes>>,
    host: HeaderValue,
    base: String,
    timeout: Duration,
}

impl UpstreamClient {
    pub fn new(upstream: &Upstream, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        let authority = upstream.authority.as_str();
        UpstreamClient {
            client,
            host: HeaderValue::from_str(authority).expect("an authority is a valid header value"),
            base: format!("http://{authority}"),
            timeout,
        }
    }

    /// Sends one request. `path_and_query` is origin-form; `headers` are end-to-end headers
    /// (the caller has removed hop-by-hop ones); Host is set to the upstream's authority.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut uri = String::with_capacity(self.base.len() + path_and_query.len());
        uri.push_str(&self.base);
        uri.push_str(path_and_query);
        headers.insert(header::HOST, self.host.clone());
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|_| UpstreamError::Protocol)?;
        *request.headers_mut() = headers;

        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect
                } else {
                    UpstreamError::Protocol
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|_| UpstreamError::Protocol)?
                .to_bytes();
            Ok(UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named by `Connection` and the fixed set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_end_to_end_headers_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-aws-ec2-metadata-token", HeaderValue::from_static("t"));
        h.insert(
            "x-aws-ec2-metadata-token-ttl-seconds",
            HeaderValue::from_static("21600"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            left,
            [
                "x-aws-ec2-metadata-token",
                "x-aws-ec2-metadata-token-ttl-seconds",
                "x-forwarded-for"
            ]
        );
    }
}
