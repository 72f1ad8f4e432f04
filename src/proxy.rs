//! The IMDS-facing request handler: classify, then pass through, serve locked credentials, or
//! refuse. Every outcome, errors included, becomes a response in [`respond`]; nothing here can
//! take the process down.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::access::Identity;
use crate::class_role::{ClassRole, ClassRoles};
use crate::clock::Clock;
use crate::credentials::{
    self, AnswerRefusal, CredentialStore, KnownRaw, LockedCredentials, Secret, Verdict,
};
use crate::gate::AccessControl;
use crate::identity::RoleArn;
use crate::metrics::{Metrics, RefusalReason, RouteLabel};
use crate::route::{self, Refusal, Route, TOKEN_HEADER};
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamResponse, strip_hop_by_hop};

/// The only request headers forwarded on a credential route. IMDS reads the session token;
/// the others change nothing it answers. Everything else (`Range`, `If-*`, `Accept-Encoding`,
/// `Accept`, ...) could ask an upstream for another representation of the raw document, so it
/// is dropped: an allow list, not a block list, fails closed on headers nobody thought of.
const CREDENTIAL_REQUEST_HEADERS: [&str; 3] = [TOKEN_HEADER, "user-agent", "x-forwarded-for"];

fn credential_request_header(name: &HeaderName) -> bool {
    CREDENTIAL_REQUEST_HEADERS.contains(&name.as_str())
}

fn any_header(_: &HeaderName) -> bool {
    true
}

/// What the upstream showed about its token mode (for `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    Unknown = 0,
    /// A tokenless GET was answered: IMDSv1 allowed.
    Optional = 1,
    /// A tokenless GET got 401: IMDSv2 required.
    Required = 2,
}

#[path = "proxy_view.rs"]
mod view;
pub use view::{HeldSet, View};

/// The handler's shared state. Everything is read-only or lock-free on the request path.
pub struct ProxyState {
    pub upstream: UpstreamClient,
    pub store: Arc<CredentialStore>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub serve_margin: Duration,
    /// The raw values credlock read from the instance role itself: no answer may carry them.
    pub known_raw: Arc<KnownRaw>,
    /// The per-process access policy; `None`: no rules, every caller as before.
    pub access: Option<Arc<AccessControl>>,
    /// The access rules' own roles (`access.rule.role`); empty without them.
    pub class_roles: Arc<ClassRoles>,
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
        known_raw: Arc<KnownRaw>,
    ) -> Self {
        ProxyState {
            upstream,
            store,
            metrics,
            clock,
            serve_margin,
            known_raw,
            access: None,
            class_roles: Arc::default(),
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
/// `who`: the caller, identified once per connection (only while an access policy is set).
pub async fn handle(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
    who: Option<Arc<Identity>>,
) -> Response<Full<Bytes>> {
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

    // No IMDS request has a body, the token PUT included: one that announces any (a non-zero
    // Content-Length, any Transfer-Encoding) is refused here, before anything reaches the
    // upstream, and its connection closed without reading the body. So no client byte after
    // a request head is ever forwarded (request smuggling), and no slot waits for a body.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) || !body.is_end_stream() {
        state.metrics.refused(RefusalReason::Body);
        let mut response = respond(
            Outcome::Local(
                StatusCode::BAD_REQUEST,
                "credlock: IMDS requests carry no body\n",
            ),
            method == Method::HEAD,
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        state
            .metrics
            .answered(RouteLabel::Refused, response.status());
        return response;
    }
    drop(body);

    // Who may get what: decided before anything reaches the upstream.
    let mut class: Option<&ClassRole> = None;
    if let Some(access) = &state.access {
        // Present and not empty: IMDS judges the token itself on every forwarded request.
        let has_token = parts
            .headers
            .get(TOKEN_HEADER)
            .is_some_and(|v| !v.is_empty());
        match access.check(who.as_deref(), &route, has_token) {
            Err((status, text)) => {
                let response = respond(Outcome::Local(status, text), method == Method::HEAD);
                state.metrics.answered(label, response.status());
                return response;
            }
            Ok(rule) => class = rule.and_then(|i| state.class_roles.for_rule(i)),
        }
    }

    let outcome = match route {
        Route::Refused(reason) => refuse(&state, reason),
        Route::RoleListing { path, .. } if class.is_some() => {
            let name = class.map_or("", |c| c.arn.name.as_str());
            match forward(&state, label, method.clone(), path, parts.headers).await {
                // IMDS judged the caller's token and lists a role: the class sees its own.
                Outcome::Upstream(mut response) if response.status == StatusCode::OK => {
                    response.body = Bytes::copy_from_slice(name.as_bytes());
                    response.headers.remove(header::CONTENT_LENGTH);
                    Outcome::Upstream(response)
                }
                other => other,
            }
        }
        Route::Token | Route::RoleListing { .. } | Route::Passthrough { .. } => {
            let target = match route {
                Route::Passthrough { target } | Route::RoleListing { path: target, .. } => target,
                _ => route::TOKEN_PATH,
            };
            forward(&state, label, method.clone(), target, parts.headers).await
        }
        Route::Credentials { path, role, .. } => match class {
            None => {
                credentials(
                    &state,
                    &state.store,
                    None,
                    path,
                    parts.headers,
                    who.as_deref(),
                )
                .await
            }
            Some(class) => {
                class_credentials(&state, class, role, path, parts.headers, who.as_deref()).await
            }
        },
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
    state.metrics.refused(reason.into());
    let body = match reason {
        Refusal::BadTarget => "credlock: request target refused: not a form IMDS clients send\n",
        Refusal::UnknownCredentialPath => "credlock: not found\n",
        Refusal::Method => "credlock: only GET and HEAD are allowed on credential paths\n",
    };
    Outcome::Local(reason.status(), body)
}

async fn exchange(
    state: &ProxyState,
    label: RouteLabel,
    method: Method,
    target: &str,
    mut headers: HeaderMap,
    keep: fn(&HeaderName) -> bool,
) -> Result<UpstreamResponse, Outcome> {
    strip_hop_by_hop(&mut headers);
    let tokenless_get = method == Method::GET && !headers.contains_key(TOKEN_HEADER);
    let started = Instant::now();
    let result = state
        .upstream
        .send_only(method, target, &headers, keep)
        .await;
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
) -> Outcome {
    match exchange(state, label, method, target, headers, any_header).await {
        Ok(response) => Outcome::Upstream(response),
        Err(outcome) => outcome,
    }
}

/// Forward-then-replace: the upstream judges the caller's token and role name; what it answers
/// is served only as [`credentials::judge`] allows (the documented success shape, locked, or a
/// secret-free documented error), never as it came. HEAD is forwarded as GET so the rewritten
/// length is known.
/// `store`: the instance role's, or a class role's (`role`, for the log line).
async fn credentials(
    state: &ProxyState,
    store: &CredentialStore,
    role: Option<&RoleArn>,
    path: &str,
    client_headers: HeaderMap,
    who: Option<&Identity>,
) -> Outcome {
    let Some(locked) = store.servable(state.clock.now(), state.serve_margin) else {
        state.metrics.refused(RefusalReason::NoLockedCredentials);
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
        client_headers,
        credential_request_header,
    )
    .await
    {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    let known = state.known_raw.load();
    match state
        .rewrites
        .judge(response.status, &response.body, &locked, &known)
    {
        Judged::Locked(body) => {
            if let Some(access) = &state.access {
                let role = role.map(RoleArn::to_string);
                access.served(who, role.as_deref(), &locked.access_key_id);
            }
            response.body = body;
            response.headers.remove(header::CONTENT_LENGTH);
            Outcome::Upstream(response)
        }
        Judged::PassError => Outcome::Upstream(response),
        Judged::Refuse(reason) => {
            tracing::error!(
                status = response.status.as_u16(),
                reason = reason.label(),
                "refusing an upstream credential answer credlock cannot lock"
            );
            state.metrics.answer_refused(reason);
            Outcome::Local(
                StatusCode::BAD_GATEWAY,
                "credlock: the upstream credential answer could not be locked\n",
            )
        }
    }
}

/// A class role's credentials (see `class_role.rs`): only its own name answers; the request
/// goes upstream as the instance role's (IMDS judges the caller's token), and IMDS's success
/// body is replaced with the class role's locked set.
async fn class_credentials(
    state: &ProxyState,
    class: &ClassRole,
    asked: &str,
    path: &str,
    client_headers: HeaderMap,
    who: Option<&Identity>,
) -> Outcome {
    if asked != class.arn.name {
        state.metrics.refused(RefusalReason::UnknownCredentialPath);
        return Outcome::Local(StatusCode::NOT_FOUND, "404 - Not Found\n");
    }
    let instance_role = state.class_roles.instance_role_name();
    let Some(instance_role) = instance_role.as_deref() else {
        state.metrics.refused(RefusalReason::NoLockedCredentials);
        return Outcome::Local(
            StatusCode::SERVICE_UNAVAILABLE,
            "credlock: no locked credentials available yet\n",
        );
    };
    // The classifier's canonical path ends with the asked name, then perhaps one slash.
    let (base, slash) = path
        .strip_suffix('/')
        .map_or((path, ""), |base| (base, "/"));
    let Some(prefix) = base.strip_suffix(asked) else {
        return Outcome::Local(StatusCode::NOT_FOUND, "404 - Not Found\n");
    };
    let upstream_path = format!("{prefix}{instance_role}{slash}");
    match credentials(
        state,
        &class.store,
        Some(&class.arn),
        &upstream_path,
        client_headers,
        who,
    )
    .await
    {
        // The extended form names the account of the credentials: the class role's, which
        // may be another account than the instance role's.
        Outcome::Upstream(mut response) if response.status == StatusCode::OK => {
            if let Some(body) = with_account(&response.body, &class.arn.account) {
                response.body = body;
            }
            Outcome::Upstream(response)
        }
        other => other,
    }
}

/// `body` with the value of its `"AccountId"` member (12 digits) replaced by `account`; `None`
/// when it has none (the plain credential form) or it is not 12 digits.
fn with_account(body: &[u8], account: &str) -> Option<Bytes> {
    const KEY: &[u8] = b"\"AccountId\"";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &body[at..];
    let skip = |bytes: &[u8], from: usize| {
        from + bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count()
    };
    let colon = skip(rest, 0);
    if rest.get(colon) != Some(&b':') {
        return None;
    }
    let quote = skip(rest, colon + 1);
    let digits = rest.get(quote + 1..quote + 13)?;
    if rest.get(quote) != Some(&b'"')
        || rest.get(quote + 13) != Some(&b'"')
        || !digits.iter().all(u8::is_ascii_digit)
        || account.len() != 12
    {
        return None;
    }
    let start = at + quote + 1;
    let mut out = body.to_vec();
    out[start..start + 12].copy_from_slice(account.as_bytes());
    Some(Bytes::from(out))
}

/// What [`RewriteCache::judge`] decided.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    Locked(Bytes),
    PassError,
    Refuse(AnswerRefusal),
}

/// The last credential judgement. Its result depends only on the upstream's status and bytes,
/// the locked set and the known raw values, and all of them change rarely (IMDS rotates its
/// set about hourly, credlock refreshes its own at half the session's life, 7.5-30 min), so
/// while the upstream answers with the same bytes and the same set and known values (the same
/// `Arc`s, held here so their addresses cannot be reused) are in use, the answer is reused
/// instead of parsing and checking the JSON again. Holds one copy of the last upstream
/// document (the instance role's own credentials, which never leave the process) and the last
/// answer.
#[derive(Default)]
struct RewriteCache {
    last: Mutex<Option<LastRewrite>>,
}

struct LastRewrite {
    locked: Arc<LockedCredentials>,
    known: Arc<Vec<Secret>>,
    upstream: Bytes,
    rewritten: Bytes,
}

impl RewriteCache {
    /// [`credentials::judge`], remembered. Only locked success bodies are remembered: error
    /// documents and refusals are rare and always judged afresh.
    fn judge(
        &self,
        status: StatusCode,
        upstream: &Bytes,
        locked: &Arc<LockedCredentials>,
        known: &Arc<Vec<Secret>>,
    ) -> Judged {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if status == StatusCode::OK
            && let Some(l) = last.as_ref()
            && Arc::ptr_eq(&l.locked, locked)
            && Arc::ptr_eq(&l.known, known)
            && l.upstream == *upstream
        {
            return Judged::Locked(l.rewritten.clone());
        }
        let rewritten = match credentials::judge(status.as_u16(), upstream, locked, known) {
            Verdict::Locked(body) => Bytes::from(body),
            Verdict::PassError => return Judged::PassError,
            Verdict::Refuse(reason) => return Judged::Refuse(reason),
        };
        *last = Some(LastRewrite {
            locked: Arc::clone(locked),
            known: Arc::clone(known),
            // A copy: the answer's bytes share the pooled connection's read buffer.
            upstream: Bytes::copy_from_slice(upstream),
            rewritten: rewritten.clone(),
        });
        Judged::Locked(rewritten)
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
        Outcome::Local(status, text) => local_text(status, text, head),
    }
}

/// An answer credlock makes itself: a line of plain text (no body for HEAD), on every listener.
pub fn local_text(status: StatusCode, text: &'static str, head: bool) -> Response<Full<Bytes>> {
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

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests build sets around the real time
#[path = "proxy_tests.rs"]
mod tests;
