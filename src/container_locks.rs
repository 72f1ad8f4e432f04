//! The sets `container.rs` serves: one locked set per raw task credential, assumed with the
//! task's own credentials, cached, budgeted and forgotten (see the parent module's invariants).

use super::*;

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
    pub kind: AgentKind,
    /// Pod Identity: the roles with a path (see [`AgentKind::PodIdentity`]).
    pub roles: Vec<RoleArn>,
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
    pub(super) agent: UpstreamClient,
    pub(super) template: Value,
    pub(super) config: TaskLockConfig,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) context: ArcSwapOption<LockContext>,
    /// Keyed by a digest of the whole raw set the agent answered with (key id, secret and
    /// token): two answers share a set only if they carry the same raw credentials.
    pub(super) sets: Mutex<HashMap<String, Arc<Slot>>>,
    /// The raw values of every set held, and of those dropped within [`RETIRED_FOR`], for the
    /// check of every answer.
    pub(super) known: ArcSwap<Vec<Secret>>,
    pub(super) retired: Mutex<std::collections::VecDeque<(tokio::time::Instant, Secret)>>,
    pub(super) budget: Budget,
    /// What a task whose last lock failed may spend when it is tried again: a quarter of the
    /// rate, of its own, so tasks whose role refuses can never spend the budget of the tasks
    /// that have not been tried.
    pub(super) retry_budget: Budget,
    /// Roles that refused the SourceIdentity marker, until when: their next calls go unmarked
    /// at once (one call, not two).
    pub(super) unmarked: Mutex<HashMap<String, tokio::time::Instant>>,
    pub(super) metrics: Arc<Metrics>,
    /// Uses so far: the clock of `Slot::used`.
    pub(super) uses: AtomicU64,
}

/// One task credential's locked set, behind a lock held while it is assumed: concurrent
/// requests for one task make one AssumeRole.
pub(super) struct Slot {
    pub(super) raw: [Secret; 3],
    /// The credential id last seen with it (for a dropped id).
    pub(super) credential_id: Mutex<Option<String>>,
    pub(super) entry: tokio::sync::Mutex<Option<Entry>>,
    /// When it was last used, in [`TaskLocks::uses`]' count (least recently used goes first).
    pub(super) used: AtomicU64,
    /// The last lock failed: answer 502 at once until then ([`FAILED_FIRST`]).
    pub(super) failed: Mutex<Option<(tokio::time::Instant, u32)>>,
    /// Pod Identity: the role and session name GetCallerIdentity gave for these raw values.
    pub(super) caller: Mutex<Option<(RoleArn, String)>>,
}

pub(super) struct Entry {
    pub(super) role: RoleArn,
    pub(super) environment: Arc<Environment>,
    pub(super) locked: Arc<LockedCredentials>,
}

/// Why no locked set could be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("credlock does not know the instance or its environment yet")]
    NotReady,
    #[error("the credential document has no RoleArn that credlock can parse")]
    NoRole,
    #[error("the pod's credentials are {0}, not a role session")]
    NotRoleSession(String),
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
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Failure::NotReady | Failure::Budget | Failure::Busy => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A token bucket on the monotonic clock.
pub(super) struct Budget {
    pub(super) rate: f64,
    pub(super) burst: f64,
    pub(super) state: Mutex<(f64, tokio::time::Instant)>,
}

impl Budget {
    pub(super) fn new(rate: f64) -> Self {
        let burst = (rate * 2.0).max(1.0);
        Budget {
            rate,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(super) fn take(&self) -> Result<(), Duration> {
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

    pub(super) async fn wait(&self) -> Result<(), Failure> {
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
        let label = config.kind.label();
        for result in TaskResult::ALL {
            metrics
                .task_credentials
                .with_label_values(&[label, result.label()]);
        }
        metrics.task_sets.with_label_values(&[label]).set(0);
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

    pub fn kind(&self) -> AgentKind {
        self.config.kind
    }

    /// Called by the background path once the instance is known.
    pub fn set_context(&self, context: LockContext) {
        self.context.store(Some(Arc::new(context)));
    }

    pub(super) fn use_count(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed)
    }

    /// The slot for a raw set, made (and room made for it) if new.
    pub(super) fn slot(&self, raw: &RawDocument) -> Arc<Slot> {
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
            caller: Mutex::new(None),
        });
        sets.insert(key, slot.clone());
        self.changed(&sets);
        slot
    }

    /// Drops the sets last seen with `credential_id` (the agent no longer serves it).
    pub(super) fn forget(&self, credential_id: &str) {
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
    pub(super) fn retire(&self, dropped: &[Arc<Slot>]) {
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

    pub(super) fn changed(&self, sets: &HashMap<String, Arc<Slot>>) {
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        self.known.store(Arc::new(
            sets.values()
                .flat_map(|s| s.raw.iter().cloned())
                .chain(retired.iter().map(|(_, r)| r.clone()))
                .collect(),
        ));
        self.metrics
            .task_sets
            .with_label_values(&[self.config.kind.label()])
            .set(sets.len() as i64);
    }

    /// The locked set for a task's raw credentials, and whether it was held already.
    pub(super) async fn locked_for(
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
        // Pod Identity answers name no role; one that does is not believed: the role is the
        // pod's own session's, whatever the answer says.
        let named = match self.config.kind {
            AgentKind::Ecs => Some(
                raw.role_arn
                    .as_deref()
                    .and_then(RoleArn::parse)
                    .ok_or(Failure::NoRole)?,
            ),
            AgentKind::PodIdentity => None,
        };
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
        let (role, session_id) = match named {
            Some(role) => (role, credential_id.map(str::to_string)),
            None => match self.pod_caller(&context, &slot, raw, budget).await {
                Ok(found) => found,
                Err(e) => return Err(self.failed(&slot, e)),
            },
        };
        let now = self.clock.now();
        if let Some(held) = entry.as_ref()
            && held.role == role
            && held.environment == environment
            && held.locked.remaining(now) > self.config.serve_margin
        {
            return Ok((held.locked.clone(), true));
        }
        let result = self
            .lock(
                &context,
                raw,
                &role,
                &environment,
                session_id.as_deref(),
                budget,
            )
            .await;
        match result {
            Ok(locked) => {
                *slot.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *entry = Some(Entry {
                    role,
                    environment,
                    locked: locked.clone(),
                });
                Ok((locked, false))
            }
            Err(e) => Err(self.failed(&slot, e)),
        }
    }

    /// Starts (or lengthens) a slot's back-off after a failure; waiting for the budget is not
    /// the task's failure.
    pub(super) fn failed(&self, slot: &Slot, e: Failure) -> Failure {
        if matches!(e, Failure::Budget) {
            return e;
        }
        let mut failed = slot.failed.lock().unwrap_or_else(|e| e.into_inner());
        let n = failed.map_or(1, |(_, n)| n.saturating_add(1));
        let wait = FAILED_FIRST
            .saturating_mul(1 << (n - 1).min(8))
            .min(FAILED_MAX);
        *failed = Some((tokio::time::Instant::now() + wait, n));
        e
    }

    /// A pod's role and session name, from GetCallerIdentity signed with its raw credentials
    /// (once per raw set, within the budget); the role's path from `roles` when listed there.
    pub(super) async fn pod_caller(
        &self,
        context: &LockContext,
        slot: &Slot,
        raw: &RawDocument,
        budget: &Budget,
    ) -> Result<(RoleArn, Option<String>), Failure> {
        if let Some((role, session)) = &*slot.caller.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok((role.clone(), Some(session.clone())));
        }
        budget.wait().await?;
        let call = context.issuer.caller_as(source_of(raw));
        let arn = match tokio::time::timeout(ASSUME_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(StsError {
                code: StsErrorCode::Timeout,
                message: "no answer in time".into(),
            }),
        }
        .map_err(|e| {
            self.metrics
                .task_sts_errors
                .with_label_values(&[self.config.kind.label(), e.code.label()])
                .inc();
            Failure::Sts(e)
        })?;
        let (role, session) = pod_role(&arn, &self.config.roles)
            .ok_or_else(|| Failure::NotRoleSession(arn.clone()))?;
        *slot.caller.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((role.clone(), session.clone()));
        Ok((role, Some(session)))
    }

    /// One AssumeRole (two when the role refuses the SourceIdentity), each within the budget.
    pub(super) async fn lock(
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
            session_name: session_name(self.config.kind, credential_id, &raw.access_key_id),
            policy: policy.text,
            duration: self.config.session_duration,
            source_identity: (self.config.source_identity && !unmarked)
                .then(|| crate::refresh::source_identity(&context.instance_id)),
            tags: Vec::new(),
        };
        let source = source_of(raw);
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

    pub(super) async fn assume(
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
                .with_label_values(&[self.config.kind.label(), e.code.label()])
                .inc();
            Failure::Sts(e)
        })
    }
}

/// The raw set as the SDK's credentials, to sign a task's own calls with.
fn source_of(raw: &RawDocument) -> Credentials {
    Credentials::new(
        raw.access_key_id.clone(),
        raw.secret_access_key.expose().to_string(),
        Some(raw.token.expose().to_string()),
        None,
        "credlock-task",
    )
}

/// A pod's role from its session's ARN (`arn:aws:sts::<account>:assumed-role/<name>/<session>`,
/// "IAM identifiers", IAM User Guide) and the session name: the role listed in `roles` with that
/// account, partition and name, else the name without a path.
pub(super) fn pod_role(arn: &str, roles: &[RoleArn]) -> Option<(RoleArn, String)> {
    let found = crate::cli::credentials::role_of_session(arn)?;
    let session = crate::identity::AssumedRoleArn::parse(arn)?
        .session
        .to_string();
    let role = roles
        .iter()
        .find(|r| {
            r.name == found.name && r.account == found.account && r.partition == found.partition
        })
        .cloned()
        .unwrap_or(found);
    Some((role, session))
}

/// `credlock-ecs-<id>` (`credlock-eks-<pod session>`) when the id fits a session name, else a
/// digest of the id (or of the raw key id when there is none): stable per task, never a raw
/// value.
pub(super) fn session_name(kind: AgentKind, id: Option<&str>, access_key_id: &str) -> String {
    let prefix = kind.session_prefix();
    let fits = |id: &str| {
        (1..=MAX_ID_IN_NAME).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
    };
    match id {
        Some(id) if fits(id) => format!("{prefix}{id}"),
        other => {
            let digest = Sha256::digest(other.unwrap_or(access_key_id).as_bytes());
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            format!("{prefix}{hex}")
        }
    }
}

/// The key of a raw set's slot: a digest of all three raw values.
pub(super) fn slot_key(raw: &RawDocument) -> String {
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
