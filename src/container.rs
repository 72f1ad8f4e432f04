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
//! - No raw value reaches a client: what an answer must be to pass is
//!   [`crate::container_judge`]'s (a document only rewritten and only in the documented shape,
//!   checked again after the rewrite; anything else only without a secret key, a raw value
//!   seen in the last 6 hours or a credential-shaped string, in the body or the headers), and
//!   only allow-listed request headers reach the agent, so the bytes judged are the bytes
//!   served.
//! - Sets are held per raw task credential (its `AccessKeyId`): an answer for task A can only
//!   ever be served the set assumed with A's own credentials. A rotation by the agent (new raw
//!   keys) is a new set; a set unused until it expires is dropped, and an agent error for a
//!   credential id drops that id's sets.
//! - Fail closed: no environment yet, no role, an STS error or an exhausted STS budget answer
//!   502 or 503 with no credentials. The agent's own answers pass unchanged.
//! - A task that cannot be locked costs nothing shared: it is answered 502 at once during its
//!   back-off, and tried again on a budget of its own; no request waits on another's
//!   AssumeRole for longer than [`LOCK_WAIT`].
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
use crate::container_judge::{RawDocument, Verdict, judge, servable};
use crate::credentials::{LockedCredentials, Secret, rewrite_document};
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
/// How long a request waits for another request of the same task that is locking it (an
/// AssumeRole in flight) before it is answered 503: a connection slot is never held for the
/// length of a slow STS call per waiting request.
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// After a failed lock, a task's requests are answered 502 at once, without STS or waiting,
/// for this long, doubling per consecutive failure up to [`FAILED_MAX`]: a task whose role
/// refuses cannot hold connection slots or spend the STS budget of the others.
const FAILED_FIRST: Duration = Duration::from_secs(5);
const FAILED_MAX: Duration = Duration::from_secs(60);
/// How long the raw values of a set no longer held are still checked for in answers (the
/// agent's task credentials live 6 hours: "IAM roles for tasks", Amazon ECS Developer Guide).
const RETIRED_FOR: Duration = Duration::from_secs(6 * 3600);
/// How long a role that refused the SourceIdentity marker is called unmarked before the marked
/// call is tried again (a fixed trust policy heals within this).
const UNMARKED_FOR: Duration = Duration::from_secs(3600);
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
    /// Keyed by a digest of the whole raw set the agent answered with (key id, secret and
    /// token): two answers share a set only if they carry the same raw credentials.
    sets: Mutex<HashMap<String, Arc<Slot>>>,
    /// The raw values of every set held, and of those dropped within [`RETIRED_FOR`], for the
    /// check of every answer.
    known: ArcSwap<Vec<Secret>>,
    retired: Mutex<std::collections::VecDeque<(tokio::time::Instant, Secret)>>,
    budget: Budget,
    /// What a task whose last lock failed may spend when it is tried again: a quarter of the
    /// rate, of its own, so tasks whose role refuses can never spend the budget of the tasks
    /// that have not been tried.
    retry_budget: Budget,
    /// Roles that refused the SourceIdentity marker, until when: their next calls go unmarked
    /// at once (one call, not two).
    unmarked: Mutex<HashMap<String, tokio::time::Instant>>,
    metrics: Arc<Metrics>,
    /// Uses so far: the clock of `Slot::used`.
    uses: AtomicU64,
}

/// One task credential's locked set, behind a lock held while it is assumed: concurrent
/// requests for one task make one AssumeRole.
struct Slot {
    raw: [Secret; 3],
    /// The credential id last seen with it (for a dropped id).
    credential_id: Mutex<Option<String>>,
    entry: tokio::sync::Mutex<Option<Entry>>,
    /// When it was last used, in [`TaskLocks::uses`]' count (least recently used goes first).
    used: AtomicU64,
    /// The last lock failed: answer 502 at once until then ([`FAILED_FIRST`]).
    failed: Mutex<Option<(tokio::time::Instant, u32)>>,
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
    #[error("another request of this task is locking it; retry shortly")]
    Busy,
    #[error("locking this task failed moments ago; not retried for {0:?}")]
    Backoff(Duration),
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
            Failure::NotReady | Failure::Budget | Failure::Busy => StatusCode::SERVICE_UNAVAILABLE,
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
            retry_budget: Budget::new(config.assume_rate / 4.0),
            unmarked: Mutex::new(HashMap::new()),
            config,
            clock,
            context: ArcSwapOption::empty(),
            sets: Mutex::new(HashMap::new()),
            known: ArcSwap::from_pointee(Vec::new()),
            retired: Mutex::new(std::collections::VecDeque::new()),
            metrics,
            uses: AtomicU64::new(0),
        }
    }

    /// Called by the background path once the instance is known.
    pub fn set_context(&self, context: LockContext) {
        self.context.store(Some(Arc::new(context)));
    }

    fn use_count(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed)
    }

    /// The slot for a raw set, made (and room made for it) if new.
    fn slot(&self, raw: &RawDocument) -> Arc<Slot> {
        let key = slot_key(raw);
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let use_count = self.use_count();
        if let Some(slot) = sets.get(&key) {
            slot.used.store(use_count, Ordering::Relaxed);
            return slot.clone();
        }
        if sets.len() >= self.config.max_sets {
            // Expired sets first (those whose lock is free to look at), then the least
            // recently used.
            let now = self.clock.now();
            let mut dropped = Vec::new();
            sets.retain(|_, s| {
                let keep = s.entry.try_lock().map_or(true, |e| {
                    e.as_ref()
                        .is_some_and(|e| e.locked.remaining(now) > Duration::ZERO)
                });
                if !keep {
                    dropped.push(s.clone());
                }
                keep
            });
            while sets.len() >= self.config.max_sets {
                let Some(oldest) = sets
                    .iter()
                    .min_by_key(|(_, s)| s.used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                dropped.extend(sets.remove(&oldest));
            }
            self.retire(&dropped);
        }
        let slot = Arc::new(Slot {
            raw: [
                Secret::new(raw.access_key_id.clone()),
                raw.secret_access_key.clone(),
                raw.token.clone(),
            ],
            credential_id: Mutex::new(None),
            entry: tokio::sync::Mutex::new(None),
            used: AtomicU64::new(use_count),
            failed: Mutex::new(None),
        });
        sets.insert(key, slot.clone());
        self.changed(&sets);
        slot
    }

    /// Drops the sets last seen with `credential_id` (the agent no longer serves it).
    fn forget(&self, credential_id: &str) {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let before = sets.len();
        let mut dropped = Vec::new();
        sets.retain(|_, s| {
            let keep = s
                .credential_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                != Some(credential_id);
            if !keep {
                dropped.push(s.clone());
            }
            keep
        });
        self.retire(&dropped);
        if sets.len() != before {
            tracing::info!(
                sets = before - sets.len(),
                "the ECS agent no longer serves a credential id: its locked sets are dropped"
            );
            self.changed(&sets);
        }
    }

    /// Keeps the raw values of dropped sets among the known ones for [`RETIRED_FOR`].
    fn retire(&self, dropped: &[Arc<Slot>]) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        for slot in dropped {
            retired.extend(slot.raw.iter().map(|r| (now + RETIRED_FOR, r.clone())));
        }
        while retired.front().is_some_and(|(until, _)| *until <= now)
            || retired.len() > 3 * 4 * self.config.max_sets
        {
            retired.pop_front();
        }
    }

    fn changed(&self, sets: &HashMap<String, Arc<Slot>>) {
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        self.known.store(Arc::new(
            sets.values()
                .flat_map(|s| s.raw.iter().cloned())
                .chain(retired.iter().map(|(_, r)| r.clone()))
                .collect(),
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
        if let Some((until, _)) = *slot.failed.lock().unwrap_or_else(|e| e.into_inner())
            && let Some(left) = until.checked_duration_since(tokio::time::Instant::now())
        {
            return Err(Failure::Backoff(left));
        }
        let Ok(mut entry) = tokio::time::timeout(LOCK_WAIT, slot.entry.lock()).await else {
            return Err(Failure::Busy);
        };
        let now = self.clock.now();
        if let Some(held) = entry.as_ref()
            && held.role == role
            && held.environment == environment
            && held.locked.remaining(now) > self.config.serve_margin
        {
            return Ok((held.locked.clone(), true));
        }
        let retry = slot
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let budget = if retry {
            &self.retry_budget
        } else {
            &self.budget
        };
        let result = self
            .lock(&context, raw, &role, &environment, credential_id, budget)
            .await;
        let mut failed = slot.failed.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(locked) => {
                *failed = None;
                *entry = Some(Entry {
                    role,
                    environment,
                    locked: locked.clone(),
                });
                Ok((locked, false))
            }
            // Waiting for the budget is not the task's failure.
            Err(e @ Failure::Budget) => Err(e),
            Err(e) => {
                let n = failed.map_or(1, |(_, n)| n.saturating_add(1));
                let wait = FAILED_FIRST
                    .saturating_mul(1 << (n - 1).min(8))
                    .min(FAILED_MAX);
                *failed = Some((tokio::time::Instant::now() + wait, n));
                Err(e)
            }
        }
    }

    /// One AssumeRole (two when the role refuses the SourceIdentity), each within the budget.
    async fn lock(
        &self,
        context: &LockContext,
        raw: &RawDocument,
        role: &RoleArn,
        environment: &Arc<Environment>,
        credential_id: Option<&str>,
        budget: &Budget,
    ) -> Result<Arc<LockedCredentials>, Failure> {
        budget.wait().await?;
        let role_key = role.to_string();
        let unmarked = {
            let mut roles = self.unmarked.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            roles.retain(|_, until| *until > now);
            roles.contains_key(&role_key)
        };
        let deny: Vec<RoleArn> = context
            .deny
            .iter()
            .filter(|r| *r != role)
            .cloned()
            .collect();
        let policy = policy::render_denying(&self.template, environment, role, &deny)?;
        let request = AssumeRequest {
            role_arn: role.to_string(),
            session_name: session_name(credential_id, &raw.access_key_id),
            policy: policy.text,
            duration: self.config.session_duration,
            source_identity: (self.config.source_identity && !unmarked)
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
            self.unmarked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(role_key, tokio::time::Instant::now() + UNMARKED_FOR);
            budget.wait().await?;
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
        Ok(locked)
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
    let answer = match locks
        .agent
        .send_only(parts.method, &target, &headers, forwarded_header)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "the ECS agent did not answer");
            locks.count(TaskResult::Failed);
            return local(e.status(), "credlock: the ECS agent did not answer\n", head);
        }
    };
    let known = locks.known.load();
    match judge(
        answer.status.as_u16(),
        &answer.headers,
        &answer.body,
        &known,
    ) {
        Verdict::Pass => {
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
        Verdict::Refuse(reason) => {
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
        Verdict::Document(raw) => match locks.locked_for(&raw, credential_id(&target)).await {
            Ok((locked, cached)) => {
                let mut raw_values = raw.raw_values().to_vec();
                raw_values.extend(known.iter().cloned());
                let served = rewrite_document(&answer.body, &locked)
                    .ok()
                    .filter(|out| servable(out, &raw_values));
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
        },
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

/// The request headers forwarded to the agent: what an SDK's container provider sends and the
/// agent may read. Nothing that changes the answer's encoding or asks for part of it
/// (`Accept-Encoding`, `Range`, `If-*`): its bytes must be the ones judged.
fn forwarded_header(name: &http::HeaderName) -> bool {
    matches!(name.as_str(), "user-agent" | "accept" | "authorization")
}

/// The key of a raw set's slot: a digest of all three raw values.
fn slot_key(raw: &RawDocument) -> String {
    let mut hash = Sha256::new();
    for value in raw.raw_values() {
        hash.update(value.expose().as_bytes());
        hash.update([0]);
    }
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
