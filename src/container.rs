//! Locked credentials for ECS tasks: credlock in front of the ECS container agent's
//! task-credential endpoint.
//!
//! On an EC2 container instance, ecs-init sends containers' traffic for `169.254.170.2:80` to
//! the agent on `127.0.0.1:51679`, and the agent answers `GET /v2/credentials/<id>` with the
//! task role's credentials ("IAM roles for tasks", Amazon ECS Developer Guide; "Using IAM roles
//! with Amazon ECS tasks", Amazon ECS Best Practices Guide). With `[containers.ecs]`, the
//! firewall sends that traffic to credlock instead, and credlock forwards every request to the
//! agent unchanged: the agent, not credlock, decides which caller may have which task's
//! credentials, as IMDS does for the instance.
//!
//! What credlock changes is the answer. A credential document (decided by its content, never by
//! the request's path: [`judge_document`]) gets `AccessKeyId`, `SecretAccessKey`, `Token` and
//! `Expiration` replaced by a locked set; every other byte (`RoleArn`, key order) is kept. The
//! locked set comes from `sts:AssumeRole` on the document's `RoleArn`, signed with the task's
//! own credentials from that document, with the same session policy as the instance's lock
//! (the discovered environment; re-assuming the role denied). The task role must therefore
//! trust itself (README, "ECS tasks"). Session name `credlock-ecs-<credential id>`, so
//! CloudTrail shows which task assumed it; SourceIdentity `credlock-<instance id>` as for the
//! instance's own sessions.
//!
//! Invariants:
//! - No raw value reaches a client: a document is served only rewritten, and the rewritten
//!   bytes are checked for the task's raw values before they leave ([`not_servable`]); any
//!   other answer passes only if it carries no secret key and no raw value credlock has seen
//!   from the agent.
//! - Sets are held per raw task credential (its `AccessKeyId`): an answer for task A can only
//!   ever be served the set assumed with A's own credentials. A rotation by the agent (new raw
//!   keys) is a new set; a set unused until it expires is dropped, and an agent error for a
//!   credential id drops that id's sets.
//! - Fail closed: no environment yet, no role, an STS error or an exhausted STS budget answer
//!   502 or 503 with no credentials. The agent's own answers pass unchanged.
//!
//! Cost: one AssumeRole per task per locked session (`lock.session_duration_seconds`, less the
//! serving margin), and one per rotation of the task's credentials by the agent, whichever
//! comes first; a host's rate is capped by `assume_rate` (a token bucket, burst twice the rate).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use aws_credential_types::Credentials;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::credentials::{
    DocumentVerdict, LockedCredentials, RawDocument, Secret, judge_document, not_servable,
    rewrite_document,
};
use crate::environment::Environment;
use crate::identity::RoleArn;
use crate::metrics::Metrics;
use crate::policy;
use crate::sts::{AssumeRequest, AwsIssuer, Issued, StsError, StsErrorCode};
use crate::upstream::{UpstreamClient, strip_hop_by_hop};

/// The longest an AssumeRole for a task may take before the request fails (the SDKs' container
/// provider gives up after a few seconds anyway).
const ASSUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for the STS budget before it is answered 503.
const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// Session names carry the credential id when it fits STS's rules (`[\w+=,.@-]`, 2-64
/// characters, "AssumeRole", AWS STS API Reference) after the prefix.
const SESSION_PREFIX: &str = "credlock-ecs-";
const MAX_ID_IN_NAME: usize = 64 - SESSION_PREFIX.len();

/// What a task-credential answer was (the `result` label of `credlock_task_credentials_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskResult {
    Locked,
    Cached,
    Passed,
    Refused,
    Failed,
}

impl TaskResult {
    pub const ALL: [TaskResult; 5] = [
        Self::Locked,
        Self::Cached,
        Self::Passed,
        Self::Refused,
        Self::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Locked => "locked",
            Self::Cached => "cached",
            Self::Passed => "passed",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// AssumeRole signed with a task's own credentials.
pub trait TaskIssuer: Send + Sync + 'static {
    fn assume_as<'a>(
        &'a self,
        source: Credentials,
        request: &'a AssumeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, StsError>> + Send + 'a>>;
}

impl TaskIssuer for AwsIssuer {
    fn assume_as<'a>(
        &'a self,
        source: Credentials,
        request: &'a AssumeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, StsError>> + Send + 'a>> {
        Box::pin(AwsIssuer::assume_as(self, source, request))
    }
}

/// What the background path hands over once it knows the instance: until then every task
/// credential answer fails closed (503).
pub struct LockContext {
    pub issuer: Arc<dyn TaskIssuer>,
    pub instance_id: String,
    /// Roles a task's locked session may not assume (the instance role, the access rules'
    /// roles): their trust policies may admit the task role.
    pub deny: Vec<RoleArn>,
    pub environment: watch::Receiver<Option<Arc<Environment>>>,
}

/// The settings of one container proxy.
#[derive(Debug, Clone)]
pub struct TaskLockConfig {
    pub session_duration: Duration,
    pub serve_margin: Duration,
    pub source_identity: bool,
    /// Locked sets held at most; the least recently used goes first.
    pub max_sets: usize,
    /// AssumeRole calls per second (a token bucket of twice this).
    pub assume_rate: f64,
}

/// The proxy's state: the agent's client, the sets held, the STS budget.
pub struct TaskLocks {
    agent: UpstreamClient,
    template: Value,
    config: TaskLockConfig,
    clock: Arc<dyn Clock>,
    context: ArcSwapOption<LockContext>,
    /// Keyed by the raw `AccessKeyId` the agent answered with.
    sets: Mutex<HashMap<String, Arc<Slot>>>,
    /// The raw values of every set held, for the check of answers that are not documents.
    known: ArcSwap<Vec<Secret>>,
    budget: Budget,
    metrics: Arc<Metrics>,
    /// Monotonic origin of `Slot::used`.
    epoch: tokio::time::Instant,
}

/// One task credential's locked set, behind a lock held while it is assumed: concurrent
/// requests for one task make one AssumeRole.
struct Slot {
    raw: [Secret; 3],
    /// The credential id last seen with it (for a dropped id).
    credential_id: Mutex<Option<String>>,
    entry: tokio::sync::Mutex<Option<Entry>>,
    /// Milliseconds since `TaskLocks::epoch` of the last use.
    used: AtomicU64,
}

struct Entry {
    role: RoleArn,
    environment: Arc<Environment>,
    locked: Arc<LockedCredentials>,
}

/// Why no locked set could be had.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("credlock does not know the instance or its environment yet")]
    NotReady,
    #[error("the credential document has no RoleArn that credlock can parse")]
    NoRole,
    #[error("the STS budget for task credentials is spent; retry shortly")]
    Budget,
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("AssumeRole failed: {0}")]
    Sts(StsError),
    #[error("AssumeRole gave a set with less than the serving margin left")]
    ShortLived,
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::NotReady | Failure::Budget => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A token bucket on the monotonic clock.
struct Budget {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl Budget {
    fn new(rate: f64) -> Self {
        let burst = (rate * 2.0).max(1.0);
        Budget {
            rate,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    async fn wait(&self) -> Result<(), Failure> {
        let deadline = tokio::time::Instant::now() + BUDGET_WAIT;
        loop {
            match self.take() {
                Ok(()) => return Ok(()),
                Err(wait) if tokio::time::Instant::now() + wait <= deadline => {
                    tokio::time::sleep(wait).await;
                }
                Err(_) => return Err(Failure::Budget),
            }
        }
    }
}

impl TaskLocks {
    pub fn new(
        agent: UpstreamClient,
        template: Value,
        config: TaskLockConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        for result in TaskResult::ALL {
            metrics
                .task_credentials
                .with_label_values(&["ecs", result.label()]);
        }
        metrics.task_sets.with_label_values(&["ecs"]).set(0);
        TaskLocks {
            agent,
            template,
            budget: Budget::new(config.assume_rate),
            config,
            clock,
            context: ArcSwapOption::empty(),
            sets: Mutex::new(HashMap::new()),
            known: ArcSwap::from_pointee(Vec::new()),
            metrics,
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Called by the background path once the instance is known.
    pub fn set_context(&self, context: LockContext) {
        self.context.store(Some(Arc::new(context)));
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The slot for a raw set, made (and room made for it) if new.
    fn slot(&self, raw: &RawDocument) -> Arc<Slot> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = self.now_ms();
        if let Some(slot) = sets.get(&raw.access_key_id) {
            slot.used.store(now_ms, Ordering::Relaxed);
            return slot.clone();
        }
        if sets.len() >= self.config.max_sets {
            // Expired sets first (those whose lock is free to look at), then the least
            // recently used.
            let now = self.clock.now();
            sets.retain(|_, s| {
                s.entry.try_lock().map_or(true, |e| {
                    e.as_ref()
                        .is_some_and(|e| e.locked.remaining(now) > Duration::ZERO)
                })
            });
            while sets.len() >= self.config.max_sets {
                let Some(oldest) = sets
                    .iter()
                    .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                sets.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot {
            raw: [
                Secret::new(raw.access_key_id.clone()),
                raw.secret_access_key.clone(),
                raw.token.clone(),
            ],
            credential_id: Mutex::new(None),
            entry: tokio::sync::Mutex::new(None),
            used: AtomicU64::new(now_ms),
        });
        sets.insert(raw.access_key_id.clone(), slot.clone());
        self.changed(&sets);
        slot
    }

    /// Drops the sets last seen with `credential_id` (the agent no longer serves it).
    fn forget(&self, credential_id: &str) {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let before = sets.len();
        sets.retain(|_, s| {
            s.credential_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                != Some(credential_id)
        });
        if sets.len() != before {
            tracing::info!(
                sets = before - sets.len(),
                "the ECS agent no longer serves a credential id: its locked sets are dropped"
            );
            self.changed(&sets);
        }
    }

    fn changed(&self, sets: &HashMap<String, Arc<Slot>>) {
        self.known.store(Arc::new(
            sets.values().flat_map(|s| s.raw.iter().cloned()).collect(),
        ));
        self.metrics
            .task_sets
            .with_label_values(&["ecs"])
            .set(sets.len() as i64);
    }

    /// The locked set for a task's raw credentials, and whether it was held already.
    async fn locked_for(
        &self,
        raw: &RawDocument,
        credential_id: Option<&str>,
    ) -> Result<(Arc<LockedCredentials>, bool), Failure> {
        let context = self.context.load_full().ok_or(Failure::NotReady)?;
        let environment = context
            .environment
            .borrow()
            .clone()
            .ok_or(Failure::NotReady)?;
        let role = raw
            .role_arn
            .as_deref()
            .and_then(RoleArn::parse)
            .ok_or(Failure::NoRole)?;
        let slot = self.slot(raw);
        if let Some(id) = credential_id {
            *slot.credential_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
        }
        let mut entry = slot.entry.lock().await;
        let now = self.clock.now();
        if let Some(held) = entry.as_ref()
            && held.role == role
            && held.environment == environment
            && held.locked.remaining(now) > self.config.serve_margin
        {
            return Ok((held.locked.clone(), true));
        }
        self.budget.wait().await?;
        let deny: Vec<RoleArn> = context
            .deny
            .iter()
            .filter(|r| **r != role)
            .cloned()
            .collect();
        let policy = policy::render_denying(&self.template, &environment, &role, &deny)?;
        let request = AssumeRequest {
            role_arn: role.to_string(),
            session_name: session_name(credential_id, &raw.access_key_id),
            policy: policy.text,
            duration: self.config.session_duration,
            source_identity: self
                .config
                .source_identity
                .then(|| crate::refresh::source_identity(&context.instance_id)),
            tags: Vec::new(),
        };
        let source = Credentials::new(
            raw.access_key_id.clone(),
            raw.secret_access_key.expose().to_string(),
            Some(raw.token.expose().to_string()),
            None,
            "credlock-task",
        );
        let mut result = self
            .assume(&*context.issuer, source.clone(), &request)
            .await;
        // A task role whose trust policy lacks sts:SetSourceIdentity refuses the marked call
        // ("AssumeRole", AWS STS API Reference: SourceIdentity): lock it unmarked, as the
        // instance's loop does, rather than not at all.
        if let Err(Failure::Sts(e)) = &result
            && e.code == StsErrorCode::AccessDenied
            && request.source_identity.is_some()
        {
            let plain = AssumeRequest {
                source_identity: None,
                ..request.clone()
            };
            result = self.assume(&*context.issuer, source, &plain).await;
        }
        let issued = result?;
        let locked = Arc::new(issued.credentials);
        if locked.remaining(self.clock.now()) <= self.config.serve_margin {
            return Err(Failure::ShortLived);
        }
        tracing::info!(
            role = %role,
            session = %request.session_name,
            expiration = %crate::credentials::imds_timestamp(locked.expiration),
            "locked task credentials issued"
        );
        *entry = Some(Entry {
            role,
            environment,
            locked: locked.clone(),
        });
        Ok((locked, false))
    }

    async fn assume(
        &self,
        issuer: &dyn TaskIssuer,
        source: Credentials,
        request: &AssumeRequest,
    ) -> Result<Issued, Failure> {
        let result =
            match tokio::time::timeout(ASSUME_TIMEOUT, issuer.assume_as(source, request)).await {
                Ok(result) => result,
                Err(_) => Err(StsError {
                    code: StsErrorCode::Timeout,
                    message: "no answer in time".into(),
                }),
            };
        result.map_err(|e| {
            self.metrics
                .task_sts_errors
                .with_label_values(&["ecs", e.code.label()])
                .inc();
            Failure::Sts(e)
        })
    }
}

/// `credlock-ecs-<id>` when the id fits a session name, else a digest of the id (or of the
/// raw key id when the path had none): stable per task, never a raw value.
fn session_name(credential_id: Option<&str>, access_key_id: &str) -> String {
    let fits = |id: &str| {
        (1..=MAX_ID_IN_NAME).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
    };
    match credential_id {
        Some(id) if fits(id) => format!("{SESSION_PREFIX}{id}"),
        other => {
            let digest = Sha256::digest(other.unwrap_or(access_key_id).as_bytes());
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("{SESSION_PREFIX}{hex}")
        }
    }
}

/// The credential id of a task-credential request target (`/v2/credentials/<id>`, or the
/// older `/v1/credentials?id=<id>`), for naming and forgetting only: whether an answer holds
/// credentials is never decided from it.
fn credential_id(target: &str) -> Option<&str> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(id) = path.strip_prefix("/v2/credentials/") {
        return (!id.is_empty()).then_some(id);
    }
    if path == "/v1/credentials" {
        return query
            .split('&')
            .find_map(|p| p.strip_prefix("id="))
            .filter(|id| !id.is_empty());
    }
    None
}

/// Handles one request on the ECS listener; never fails.
pub async fn handle(locks: Arc<TaskLocks>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    // The agent reads no request body; one that is announced is refused before anything is
    // forwarded, as on the IMDS listener (no client byte after a head reaches the agent).
    if parts.headers.contains_key(header::TRANSFER_ENCODING) || !body.is_end_stream() {
        let mut response = local(
            StatusCode::BAD_REQUEST,
            "credlock: task credential requests carry no body\n",
            head,
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        locks.count(TaskResult::Refused);
        return response;
    }
    drop(body);
    let Some(target) = parts
        .uri
        .path_and_query()
        .filter(|_| parts.uri.scheme().is_none())
        .map(|pq| pq.as_str().to_string())
    else {
        locks.count(TaskResult::Refused);
        return local(
            StatusCode::BAD_REQUEST,
            "credlock: request target refused: not origin-form\n",
            head,
        );
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let answer = match locks.agent.send(parts.method, &target, headers).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "the ECS agent did not answer");
            locks.count(TaskResult::Failed);
            return local(e.status(), "credlock: the ECS agent did not answer\n", head);
        }
    };
    let known = locks.known.load();
    // A raw value the agent put in a header (it never does) is refused like one in a body.
    if headers_leak(&answer.headers, &known.iter().collect::<Vec<_>>()) {
        locks.count(TaskResult::Refused);
        return local(
            StatusCode::BAD_GATEWAY,
            "credlock: the agent's answer was refused\n",
            head,
        );
    }
    match judge_document(answer.status.as_u16(), &answer.body, &known) {
        DocumentVerdict::Pass => {
            // 400 InvalidIdInRequest / NoIdInRequest: the agent does not know the id (any
            // more); other errors (429, 503 pending) say nothing about it.
            if matches!(answer.status.as_u16(), 400 | 404)
                && let Some(id) = credential_id(&target)
            {
                locks.forget(id);
            }
            locks.count(TaskResult::Passed);
            upstream(answer.status, answer.headers, answer.body, head)
        }
        DocumentVerdict::Refuse(reason) => {
            tracing::warn!(
                reason = reason.label(),
                status = answer.status.as_u16(),
                "an ECS agent answer was refused: it would have carried raw credentials"
            );
            locks.count(TaskResult::Refused);
            local(
                StatusCode::BAD_GATEWAY,
                "credlock: the agent's answer was refused\n",
                head,
            )
        }
        DocumentVerdict::Credentials(raw) => {
            match locks.locked_for(&raw, credential_id(&target)).await {
                Ok((locked, cached)) => {
                    let key = Secret::new(raw.access_key_id.clone());
                    let raw_values = [&key, &raw.secret_access_key, &raw.token];
                    let served = rewrite_document(&answer.body, &locked)
                        .ok()
                        .filter(|out| !not_servable(out, &raw_values))
                        .filter(|_| !headers_leak(&answer.headers, &raw_values));
                    match served {
                        Some(out) => {
                            locks.count(if cached {
                                TaskResult::Cached
                            } else {
                                TaskResult::Locked
                            });
                            upstream(answer.status, answer.headers, Bytes::from(out), head)
                        }
                        None => {
                            locks.count(TaskResult::Refused);
                            local(
                                StatusCode::BAD_GATEWAY,
                                "credlock: the agent's answer was refused\n",
                                head,
                            )
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no locked task credentials: failing closed");
                    locks.count(TaskResult::Failed);
                    let text = match e {
                        Failure::NotReady => {
                            "credlock: no locked task credentials yet (the instance's environment is not known)\n"
                        }
                        Failure::Budget => {
                            "credlock: too many task credential locks at once; retry shortly\n"
                        }
                        _ => "credlock: no locked task credentials could be had\n",
                    };
                    local(e.status(), text, head)
                }
            }
        }
    }
}

impl TaskLocks {
    fn count(&self, result: TaskResult) {
        self.metrics
            .task_credentials
            .with_label_values(&["ecs", result.label()])
            .inc();
    }
}

/// Whether any header value holds one of `raw`.
fn headers_leak(headers: &http::HeaderMap, raw: &[&Secret]) -> bool {
    headers.values().any(|v| {
        raw.iter().any(|r| {
            let r = r.expose().as_bytes();
            !r.is_empty() && v.as_bytes().windows(r.len()).any(|w| w == r)
        })
    })
}

fn upstream(
    status: StatusCode,
    mut headers: http::HeaderMap,
    body: Bytes,
    head: bool,
) -> Response<Full<Bytes>> {
    strip_hop_by_hop(&mut headers);
    if !head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut response = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn local(status: StatusCode, text: &'static str, head: bool) -> Response<Full<Bytes>> {
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
#[path = "container_tests.rs"]
mod tests;
