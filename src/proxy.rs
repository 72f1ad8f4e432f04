//! The IMDS-facing request handler: classify, then pass through, serve locked credentials, or
//! refuse. Every outcome, errors included, becomes a response in [`respond`]; nothing here can
//! take the process down.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::clock::Clock;
use crate::credentials::{self, CredentialStore, LockedCredentials, RewriteError};
use crate::metrics::{Metrics, RouteLabel};
use crate::route::{self, Refusal, Route};
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamResponse, strip_hop_by_hop};

/// IMDS requests carry no body; a token PUT has none either.
const MAX_REQUEST_BODY: usize = 64 * 1024;
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// What the upstream showed about its token mode (for `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    Unknown = 0,
    /// A tokenless GET was answered: IMDSv1 allowed.
    Optional = 1,
    /// A tokenless GET got 401: IMDSv2 required.
    Required = 2,
}

/// The handler's shared state. Everything is read-only or lock-free on the request path.
pub struct ProxyState {
    pub upstream: UpstreamClient,
    pub store: Arc<CredentialStore>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub serve_margin: Duration,
    token_mode: AtomicU8,
    rewrites: RewriteCache,
}

impl ProxyState {
    pub fn new(
        upstream: UpstreamClient,
        store: Arc<CredentialStore>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        serve_margin: Duration,
    ) -> Self {
        ProxyState {
            upstream,
            store,
            metrics,
            clock,
            serve_margin,
            token_mode: AtomicU8::new(TokenMode::Unknown as u8),
            rewrites: RewriteCache::default(),
        }
    }

    pub fn token_mode(&self) -> TokenMode {
        match self.token_mode.load(Ordering::Relaxed) {
            1 => TokenMode::Optional,
            2 => TokenMode::Required,
            _ => TokenMode::Unknown,
        }
    }
}

/// One outcome of a request, before it becomes a response.
enum Outcome {
    Upstream(UpstreamResponse),
    Local(StatusCode, &'static str),
}

/// Handles one request; never fails.
pub async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let absolute;
    let target = match (parts.uri.scheme(), parts.uri.path_and_query()) {
        (None, Some(pq)) => pq.as_str(),
        (None, None) => "",
        (Some(_), _) => {
            absolute = parts.uri.to_string();
            absolute.as_str()
        }
    };
    let method = parts.method.clone();
    let route = route::classify(&method, target);
    let label = route_label(&route);

    let outcome = match route {
        Route::Refused(reason) => refuse(&state, reason),
        Route::Token | Route::RoleListing { .. } | Route::Passthrough { .. } => {
            let target = match route {
                Route::Passthrough { target } | Route::RoleListing { path: target, .. } => target,
                _ => route::TOKEN_PATH,
            };
            match read_body(body).await {
                Some(bytes) => {
                    forward(&state, label, method.clone(), target, parts.headers, bytes).await
                }
                None => {
                    state
                        .metrics
                        .refused
                        .with_label_values(&["too_large"])
                        .inc();
                    Outcome::Local(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "credlock: request body too large\n",
                    )
                }
            }
        }
        Route::Credentials { path, .. } => credentials(&state, path, parts.headers).await,
    };
    let response = respond(outcome, method == Method::HEAD);
    state.metrics.answered(label, response.status());
    response
}

fn route_label(route: &Route) -> RouteLabel {
    match route {
        Route::Token => RouteLabel::Token,
        Route::RoleListing { .. } => RouteLabel::RoleListing,
        Route::Credentials { .. } => RouteLabel::Credentials,
        Route::Passthrough { .. } => RouteLabel::Passthrough,
        Route::Refused(_) => RouteLabel::Refused,
    }
}

fn refuse(state: &ProxyState, reason: Refusal) -> Outcome {
    state
        .metrics
        .refused
        .with_label_values(&[reason.label()])
        .inc();
    let body = match reason {
        Refusal::BadTarget => "credlock: request target refused: not a form IMDS clients send\n",
        Refusal::UnknownCredentialPath => "credlock: not found\n",
        Refusal::Method => "credlock: only GET and HEAD are allowed on credential paths\n",
    };
    Outcome::Local(reason.status(), body)
}

async fn read_body(body: Incoming) -> Option<Bytes> {
    // GET and HEAD, nearly every IMDS request, have no body to wait for.
    if body.is_end_stream() {
        return Some(Bytes::new());
    }
    Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes())
}

async fn exchange(
    state: &ProxyState,
    label: RouteLabel,
    method: Method,
    target: &str,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<UpstreamResponse, Outcome> {
    strip_hop_by_hop(&mut headers);
    let tokenless_get = method == Method::GET && !headers.contains_key(TOKEN_HEADER);
    let started = Instant::now();
    let result = state.upstream.send(method, target, headers, body).await;
    state
        .metrics
        .upstream_round_trip(label, started.elapsed().as_secs_f64());
    match result {
        Ok(response) => {
            if tokenless_get {
                let mode = match response.status {
                    StatusCode::UNAUTHORIZED => Some(TokenMode::Required),
                    s if s.is_success() => Some(TokenMode::Optional),
                    _ => None,
                };
                if let Some(mode) = mode {
                    state.token_mode.store(mode as u8, Ordering::Relaxed);
                }
            }
            Ok(response)
        }
        Err(e) => Err(upstream_failed(state, &e)),
    }
}

fn upstream_failed(state: &ProxyState, e: &UpstreamError) -> Outcome {
    state
        .metrics
        .upstream_errors
        .with_label_values(&[e.label()])
        .inc();
    tracing::warn!(error = %e, "upstream IMDS exchange failed");
    let body = match e {
        UpstreamError::Timeout(_) => "credlock: the IMDS upstream did not answer in time\n",
        UpstreamError::Connect => "credlock: cannot reach the IMDS upstream\n",
        UpstreamError::Protocol => "credlock: bad answer from the IMDS upstream\n",
    };
    Outcome::Local(e.status(), body)
}

async fn forward(
    state: &ProxyState,
    label: RouteLabel,
    method: Method,
    target: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Outcome {
    match exchange(state, label, method, target, headers, body).await {
        Ok(response) => Outcome::Upstream(response),
        Err(outcome) => outcome,
    }
}

/// Forward-then-replace: the upstream judges the caller's token and role name; a success body
/// gets the locked set. HEAD is forwarded as GET so the rewritten length is known.
async fn credentials(state: &ProxyState, path: &str, headers: HeaderMap) -> Outcome {
    let Some(locked) = state.store.servable(state.clock.now(), state.serve_margin) else {
        state
            .metrics
            .refused
            .with_label_values(&["no_locked_credentials"])
            .inc();
        return Outcome::Local(
            StatusCode::SERVICE_UNAVAILABLE,
            "credlock: no locked credentials available yet\n",
        );
    };
    let mut response = match exchange(
        state,
        RouteLabel::Credentials,
        Method::GET,
        path,
        headers,
        Bytes::new(),
    )
    .await
    {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    if response.status != StatusCode::OK {
        return Outcome::Upstream(response);
    }
    match state.rewrites.rewrite(&response.body, &locked) {
        Ok(Some(body)) => {
            response.body = body;
            response.headers.remove(header::CONTENT_LENGTH);
            Outcome::Upstream(response)
        }
        Ok(None) => Outcome::Upstream(response),
        Err(e) => {
            tracing::error!(error = %e, "refusing an upstream credential answer credlock cannot lock");
            state
                .metrics
                .upstream_errors
                .with_label_values(&["protocol"])
                .inc();
            Outcome::Local(
                StatusCode::BAD_GATEWAY,
                "credlock: the upstream credential answer could not be locked\n",
            )
        }
    }
}

/// The last credential rewrite. Its result depends only on the upstream's bytes and the locked
/// set, and both change rarely (IMDS rotates its set about hourly, credlock refreshes its own at
/// half the session's life, 7.5-30 min), so while the upstream answers with the same bytes and
/// the same set (the same `Arc`, held here so its address cannot be reused) is served, the
/// answer is reused instead of parsing the JSON again. Holds one copy of the last upstream document (the instance role's own
/// credentials, which never leave the process) and the last answer.
#[derive(Default)]
struct RewriteCache {
    last: Mutex<Option<LastRewrite>>,
}

struct LastRewrite {
    locked: Arc<LockedCredentials>,
    upstream: Bytes,
    rewritten: Bytes,
}

impl RewriteCache {
    /// [`credentials::rewrite`], remembered. Only success bodies are remembered: error
    /// documents and refusals are rare and always judged afresh.
    fn rewrite(
        &self,
        upstream: &Bytes,
        locked: &Arc<LockedCredentials>,
    ) -> Result<Option<Bytes>, RewriteError> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = last.as_ref()
            && Arc::ptr_eq(&l.locked, locked)
            && l.upstream == *upstream
        {
            return Ok(Some(l.rewritten.clone()));
        }
        let Some(rewritten) = credentials::rewrite(upstream, locked)? else {
            return Ok(None);
        };
        let rewritten = Bytes::from(rewritten);
        *last = Some(LastRewrite {
            locked: Arc::clone(locked),
            // A copy: the answer's bytes share the pooled connection's read buffer.
            upstream: Bytes::copy_from_slice(upstream),
            rewritten: rewritten.clone(),
        });
        Ok(Some(rewritten))
    }
}

/// Turns every outcome into a response: the one place statuses and bodies are built.
fn respond(outcome: Outcome, head: bool) -> Response<Full<Bytes>> {
    match outcome {
        Outcome::Upstream(UpstreamResponse {
            status,
            mut headers,
            body,
        }) => {
            strip_hop_by_hop(&mut headers);
            if !headers.contains_key(header::CONTENT_LENGTH) {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            let body = if head { Bytes::new() } else { body };
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Outcome::Local(status, text) => {
            let mut response = Response::new(Full::new(if head {
                Bytes::new()
            } else {
                Bytes::from_static(text.as_bytes())
            }));
            *response.status_mut() = status;
            let h = response.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::credentials::Secret;

    fn locked(key: &str) -> Arc<LockedCredentials> {
        let now = SystemTime::now();
        Arc::new(LockedCredentials::new(
            key.into(),
            Secret::new(format!("{key}/secret")),
            Secret::new(format!("{key}-token")),
            now + Duration::from_secs(3600),
            now,
        ))
    }

    fn upstream(code: &str, updated: &str) -> Bytes {
        Bytes::from(format!(
            "{{\n  \"Code\" : \"{code}\",\n  \"LastUpdated\" : \"{updated}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIARAWRAWRAW\",\n  \"SecretAccessKey\" : \"rawSecret\",\n  \"Token\" : \"rawToken\",\n  \"Expiration\" : \"2026-11-30T21:00:00Z\"\n}}"
        ))
    }

    /// Whatever came before, the cache answers exactly what a fresh rewrite of this upstream body
    /// with this locked set answers: a changed upstream document or a new locked set is never
    /// served the previous answer.
    #[test]
    fn the_rewrite_cache_answers_what_a_fresh_rewrite_answers() {
        let cache = RewriteCache::default();
        let (a, b) = (locked("ASIALOCKEDA"), locked("ASIALOCKEDB"));
        let (one, two) = (
            upstream("Success", "2026-11-30T15:00:00Z"),
            upstream("Success", "2026-11-30T16:00:00Z"),
        );
        let error = upstream("AssumeRoleUnauthorizedAccess", "2026-11-30T15:00:00Z");
        let broken = Bytes::from_static(b"{\"Code\":\"Success\",\"AccessKeyId\":\"ASIARAW\"}");
        let steps = [
            (&one, &a),
            (&one, &a),
            (&two, &a),
            (&two, &b),
            (&one, &b),
            (&error, &b),
            (&one, &b),
            (&broken, &b),
            (&one, &a),
            (&one, &a),
        ];
        for (i, (body, set)) in steps.into_iter().enumerate() {
            let fresh = credentials::rewrite(body, set).map(|o| o.map(Bytes::from));
            assert_eq!(cache.rewrite(body, set), fresh, "step {i}");
        }
    }

    #[test]
    fn the_same_upstream_body_and_set_reuse_the_last_answer() {
        let cache = RewriteCache::default();
        let set = locked("ASIALOCKEDA");
        let first = cache
            .rewrite(&upstream("Success", "x"), &set)
            .unwrap()
            .unwrap();
        // An equal body in another buffer (the next answer on another connection) still hits.
        let again = cache
            .rewrite(&upstream("Success", "x"), &set)
            .unwrap()
            .unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr());
        let text = std::str::from_utf8(&again).unwrap();
        assert!(text.contains("ASIALOCKEDA/secret") && !text.contains("rawSecret"));
        // The same values in a new set (a refresh) are a new rewrite, not the held one.
        let refreshed = cache
            .rewrite(&upstream("Success", "x"), &locked("ASIALOCKEDA"))
            .unwrap()
            .unwrap();
        assert_ne!(first.as_ptr(), refreshed.as_ptr());
    }
}
