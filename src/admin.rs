//! The admin listener (loopback only): `/healthz`, `/readyz`, `/metrics`, `/status`. Nothing it
//! answers contains a secret: `/status` shows expiry times, the environment and errors, never a
//! credential, a token or even an access key id.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;

use crate::config::Upstream;
use crate::credentials::imds_timestamp;
use crate::discovery::SourceStatus;
use crate::firewall::{FirewallState, FirewallWatch};
use crate::metrics::Metrics;
use crate::proxy::ProxyState;
use crate::refresh::LockStatus;
use crate::upstream::UpstreamClient;

pub struct AdminState {
    /// Read through its view ([`ProxyState::view`] and the status methods) only.
    pub proxy: Arc<ProxyState>,
    pub metrics: Arc<Metrics>,
    pub lock_status: Arc<ArcSwap<LockStatus>>,
    pub discovery_status: Arc<ArcSwap<Vec<SourceStatus>>>,
    /// A client to credlock's own IMDS listener: `/readyz` goes through the real data path.
    pub self_client: UpstreamClient,
    pub imds_listener: SocketAddr,
    pub firewall: FirewallWatch,
    /// The lock status of each access rule role (`ProxyState::class_roles` order).
    pub class_lock_status: Vec<Arc<ArcSwap<LockStatus>>>,
    /// The last data-path check: probes within [`READY_CACHE`] reuse it, so a tight probe loop
    /// does not turn into IMDS traffic.
    last_ready: Mutex<Option<(Instant, Result<String, String>)>>,
}

const READY_CACHE: Duration = Duration::from_secs(5);

impl AdminState {
    pub fn new(
        proxy: Arc<ProxyState>,
        lock_status: Arc<ArcSwap<LockStatus>>,
        discovery_status: Arc<ArcSwap<Vec<SourceStatus>>>,
        imds_listener: SocketAddr,
        firewall: FirewallWatch,
    ) -> Self {
        let authority = imds_listener
            .to_string()
            .parse()
            .expect("a socket address is an authority");
        AdminState {
            metrics: proxy.metrics.clone(),
            proxy,
            lock_status,
            discovery_status,
            self_client: UpstreamClient::new(&Upstream { authority }, Duration::from_secs(2)),
            imds_listener,
            firewall,
            class_lock_status: Vec::new(),
            last_ready: Mutex::new(None),
        }
    }
}

pub async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => healthz(&state).await,
        "/readyz" => match cached_readyz(&state).await {
            Ok(msg) => text(StatusCode::OK, msg),
            Err(msg) => text(StatusCode::SERVICE_UNAVAILABLE, msg),
        },
        "/metrics" => metrics(&state),
        "/status" => status(&state),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz /readyz /metrics /status\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The process answers and its IMDS listener accepts connections.
async fn healthz(state: &AdminState) -> Response<Full<Bytes>> {
    let connect = tokio::net::TcpStream::connect(state.imds_listener);
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(_)) => text(StatusCode::OK, "ok\n".into()),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the IMDS listener {} does not accept connections\n",
                state.imds_listener
            ),
        ),
    }
}

async fn cached_readyz(state: &AdminState) -> Result<String, String> {
    // The firewall first, and never cached: rules removed by hand turn the probe unready as
    // soon as the firewall's check has seen it.
    if state.firewall.required {
        let fw = state.firewall.read(firewall_now());
        state.metrics.firewall(&fw);
        if !fw.enforced() {
            return Err(format!(
                "not ready: the firewall is not enforced (backend {}, ipv4 {}, ipv6 {}){}\n",
                fw.backend,
                fw.ipv4.label(),
                fw.ipv6.label(),
                fw.problem.map(|p| format!(": {p}")).unwrap_or_default()
            ));
        }
    }
    // The servable check is cheap and always fresh: expiry turns a probe unready at once.
    if !state.proxy.view().servable {
        return readyz(state).await;
    }
    if let Some((at, result)) = state
        .last_ready
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        && at.elapsed() < READY_CACHE
    {
        return result.clone();
    }
    let result = readyz(state).await;
    *state.last_ready.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((Instant::now(), result.clone()));
    result
}

/// Ready: a servable locked set is held, and a credential request through credlock's own
/// listener (token PUT, then GET of the role's credentials) returns that set. The probe goes
/// through the listener on purpose: ready means an application asking now gets the locked set,
/// not only that one is held.
async fn readyz(state: &AdminState) -> Result<String, String> {
    let view = state.proxy.view();
    if !view.servable {
        return Err(match &view.held {
            Some(held) => format!(
                "not ready: the locked set expires at {}, within the serving margin\n",
                imds_timestamp(held.expiration)
            ),
            None => "not ready: no locked credentials yet\n".into(),
        });
    }
    let role = (state.lock_status.load().role_arn.as_ref())
        .map(|arn| arn.name.clone())
        .ok_or("not ready: no role locked yet\n")?;
    let mut headers = HeaderMap::new();
    headers.insert(
        crate::route::TOKEN_TTL_HEADER,
        HeaderValue::from_static("60"),
    );
    let token = state
        .self_client
        .send(Method::PUT, crate::route::TOKEN_PATH, headers)
        .await
        .map_err(|e| format!("not ready: token through credlock: {e}\n"))?;
    if token.status != StatusCode::OK {
        return Err(format!(
            "not ready: token through credlock: HTTP {}\n",
            token.status
        ));
    }
    let mut headers = HeaderMap::new();
    let mut value = HeaderValue::from_maybe_shared(token.body)
        .map_err(|_| "not ready: the upstream token is not a header value\n".to_string())?;
    value.set_sensitive(true);
    headers.insert(crate::route::TOKEN_HEADER, value);
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let answer = state
        .self_client
        .send(Method::GET, &path, headers)
        .await
        .map_err(|e| format!("not ready: credentials through credlock: {e}\n"))?;
    if answer.status != StatusCode::OK {
        return Err(format!(
            "not ready: credentials through credlock: HTTP {}\n",
            answer.status
        ));
    }
    let served: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|_| "not ready: the credential answer is not JSON\n".to_string())?;
    if !served["AccessKeyId"]
        .as_str()
        .is_some_and(|k| view.serves(k))
    {
        return Err("not ready: the credential answer does not carry the locked set\n".into());
    }
    let left = view.held.map_or(0, |h| h.remaining.as_secs());
    Ok(format!("ready: locked credentials served, {left} s left\n"))
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    state.proxy.refresh_gauges();
    state.metrics.firewall(&state.firewall.read(firewall_now()));
    let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[derive(Serialize)]
struct Status<'a> {
    version: &'static str,
    ready: bool,
    upstream_token_mode: &'static str,
    credentials: CredentialStatus,
    lock: &'a LockStatus,
    discovery: &'a [SourceStatus],
    firewall: FirewallStatus,
    /// The access policy's rules in order with their decision counts; absent without rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<Vec<crate::gate::RuleStatus>>,
    /// The access rules' own roles and their lock loops; absent without them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    class_roles: Vec<crate::class_role::ClassRoleStatus<LockStatus>>,
}

#[derive(Serialize)]
struct FirewallStatus {
    /// Whether readiness depends on it.
    required: bool,
    enforced: bool,
    #[serde(flatten)]
    state: FirewallState,
}

#[derive(Serialize)]
struct CredentialStatus {
    held: bool,
    expiration: Option<String>,
    remaining_seconds: Option<u64>,
}

fn status(state: &AdminState) -> Response<Full<Bytes>> {
    let view = state.proxy.view();
    let lock = state.lock_status.load();
    let discovery = state.discovery_status.load();
    let body = Status {
        version: env!("CARGO_PKG_VERSION"),
        ready: view.servable,
        upstream_token_mode: view.token_mode.label(),
        credentials: CredentialStatus {
            held: view.held.is_some(),
            expiration: view.held.as_ref().map(|h| imds_timestamp(h.expiration)),
            remaining_seconds: view.held.as_ref().map(|h| h.remaining.as_secs()),
        },
        lock: &lock,
        discovery: &discovery,
        firewall: {
            let fw = state.firewall.read(firewall_now());
            FirewallStatus {
                required: state.firewall.required,
                enforced: fw.enforced(),
                state: fw,
            }
        },
        access: state.proxy.access_status(),
        class_roles: state.proxy.class_role_status(view.now, |i| {
            state
                .class_lock_status
                .get(i)
                .map(|s| (**s.load()).clone())
                .unwrap_or_default()
        }),
    };
    let json = serde_json::to_vec_pretty(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(json)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The time the firewall's state file is judged against: the wall clock, not the injected one,
/// because the file carries the wall-clock time of another process (the firewall check).
#[allow(clippy::disallowed_methods)]
fn firewall_now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
#[path = "admin_tests.rs"]
mod tests;
