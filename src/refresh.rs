//! The lock loop: render the session policy for the current environment, assume the role, store
//! the locked set, refresh at about half its lifetime (with jitter), back off on failure while
//! the last good set is served, and re-lock when the environment or the instance role changes.
//! One task owns the loop, so refreshes are single-flight; STS is never called on a client's
//! request path.
//!
//! # Fleet budget
//!
//! Every instance of a fleet draws on one STS quota per account and Region (600 requests per
//! second by default, shared by all STS calls: "IAM and AWS STS quotas", IAM User Guide). So the
//! loop calls STS only when one of these rules says so, never in step with its neighbours:
//!
//! - **First lock:** at once. A quiet account pays nothing for the rules below.
//! - **Refresh:** at half the set's lifetime, ±10 % ([`refresh_at`]).
//! - **Failure** (any: `Throttling`, an outage, a refused policy, an unreadable identity): the
//!   n-th consecutive failure waits [`backoff`], "full jitter" ("Exponential Backoff And
//!   Jitter", AWS Architecture Blog): uniform between [`MIN_BACKOFF`] (100 ms, so a retry never
//!   spins) and min([`MAX_BACKOFF`], [`BASE_BACKOFF`] × 2^(n-1)). Nothing calls STS before the
//!   back-off ends: an environment change arriving meanwhile waits for it, a removal included
//!   (under throttling, "at once" means "at the next retry"). A role change still drops the old
//!   set at the next identity check; only the call waits. The last good set is served
//!   meanwhile until it is within `lock.serve_margin_seconds` of expiry, then the credential
//!   routes fail closed.
//! - **Environment change** (from any source), compared with the environment the served set
//!   was locked to:
//!   - if it only **adds** (every old address is inside a new address or prefix, every old VPC
//!     and VPC endpoint is still there), the identity and role are the same, and the served set
//!     is still servable: re-lock at a point drawn uniformly in `[0, lock.relock_spread_seconds)`
//!     after the loop sees the change, or at the normal refresh if that comes first. The served
//!     set still works everywhere it did; only the new entries wait. A further adding change in
//!     the window keeps the drawn time (and the re-lock takes the newest environment);
//!   - if it **removes** anything, or the identity or role changed, or no set is servable:
//!     re-lock at once, since what was removed must stop working as soon as possible (still
//!     subject to a running back-off, above);
//!   - `lock.relock_spread_seconds = 0`: every change re-locks at once.
//! - **Recovery after an outage:** each instance's retries are its own full-jitter draws, at
//!   most [`MAX_BACKOFF`] apart, so when STS returns the fleet's retries arrive spread over that
//!   minute rather than as one wave, and every instance holds a fresh set within about a minute.
//! - **No hidden retries:** the AWS SDK's own retries are off for STS (`sts.rs`); this loop is
//!   the only retry, so a throttled fleet makes the calls these rules say, not three times as
//!   many.
//!
//! `/status` shows a drawn re-lock time as `pending_relock`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::clock::{Clock, Random};
use crate::config::LockConfig;
use crate::credentials::{CredentialStore, imds_timestamp};
use crate::environment::Environment;
use crate::identity::{InstanceIdentity, RoleArn};
use crate::imds::{Imds, ImdsError};
use crate::metrics::LockSeries;
use crate::policy;
use crate::sts::{AssumeRequest, Issued, Issuer, StsError, StsErrorCode};

/// The ceiling of the first retry's wait; it doubles with each failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// The highest ceiling: after an outage every instance retries within a minute of STS
/// returning, while a set refreshed at half-life has far longer before its serve margin.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The shortest wait before a retry, so a loop that fails at once never spins.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
const RECENT_ERRORS: usize = 10;

/// When to refresh a set that expires at `expires`, seen at `now`: half the time left, moved by
/// up to ±10 % (`jitter` in -1..=1) so a fleet does not refresh in step.
pub fn refresh_at(now: SystemTime, expires: SystemTime, jitter: f64) -> SystemTime {
    let left = expires.duration_since(now).unwrap_or(Duration::ZERO);
    now + (left / 2).mul_f64(1.0 + 0.1 * jitter.clamp(-1.0, 1.0))
}

/// The ceiling of the wait after failure number `failures` (1-based; 0 counts as 1):
/// min([`MAX_BACKOFF`], [`BASE_BACKOFF`] × 2^(failures-1)).
pub fn backoff_ceiling(failures: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(MAX_BACKOFF)
}

/// The wait before retry number `failures` (1-based): "full jitter" ("Exponential Backoff And
/// Jitter", AWS Architecture Blog), `unit` in 0..=1 picking a point uniformly between
/// [`MIN_BACKOFF`] and [`backoff_ceiling`]. Full rather than equal jitter: clients that failed
/// together spread over the whole window instead of its upper half, which the blog measures
/// as less work for the contended service and sooner completion.
pub fn backoff(failures: u32, unit: f64) -> Duration {
    let ceiling = backoff_ceiling(failures);
    MIN_BACKOFF + (ceiling - MIN_BACKOFF).mul_f64(unit.clamp(0.0, 1.0))
}

/// Whether `new` only adds to `old`: every old address or prefix lies inside one of `new`'s,
/// and every old VPC and VPC endpoint is still there. Then a set locked to `old` allows nothing
/// `new` does not, and it may keep being served while the re-lock is spread.
pub fn only_adds(old: &Environment, new: &Environment) -> bool {
    old.ipv4
        .iter()
        .all(|o| new.ipv4.iter().any(|n| n.contains(o)))
        && old
            .ipv6
            .iter()
            .all(|o| new.ipv6.iter().any(|n| n.contains(o)))
        && old.vpcs.is_subset(&new.vpcs)
        && old.vpc_endpoints.is_subset(&new.vpc_endpoints)
}

/// Where the instance's identity comes from (IMDS in production).
pub trait InstanceSource: Send + Sync + 'static {
    fn identity(&self) -> impl Future<Output = Result<InstanceIdentity, ImdsError>> + Send;
}

pub struct ImdsInstance {
    pub imds: Arc<Imds>,
    pub configured: Option<RoleArn>,
}

impl InstanceSource for ImdsInstance {
    async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        self.imds.identity(self.configured.as_ref()).await
    }
}

/// The identity a class role's lock loop locks: the instance's own (read from IMDS the same way
/// as for the instance role, so an unreachable IMDS is noticed the same way) with the class's
/// role in place of the instance role, which is kept as `assumed_with`: a change of the
/// instance role drops the class's set too (it was assumed with the old role's credentials).
/// The session name stays the instance id, so CloudTrail shows which instance assumed the role.
pub struct ClassInstance {
    pub instance: ImdsInstance,
    pub role: RoleArn,
}

impl InstanceSource for ClassInstance {
    async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        let mut identity = self.instance.identity().await?;
        let instance_role = std::mem::replace(&mut identity.role, self.role.clone());
        identity.assumed_with = Some(instance_role);
        Ok(identity)
    }
}

/// See [`Locker::on_identity`].
pub type OnIdentity = Box<dyn Fn(&InstanceIdentity) + Send + Sync>;

/// What `/status` shows about the lock. No secret: the access key id is not shown either.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockStatus {
    pub role_arn: Option<RoleArn>,
    pub instance_id: Option<String>,
    pub region: Option<String>,
    pub locked_environment: Option<Environment>,
    pub policy_characters: Option<usize>,
    pub packed_policy_percent: Option<i32>,
    pub last_refresh: Option<String>,
    pub next_refresh: Option<String>,
    pub expiration: Option<String>,
    pub consecutive_failures: u32,
    pub recent_errors: VecDeque<String>,
    /// Whether the last locked session carries credlock's SourceIdentity marker
    /// ([`source_identity`]); `None` before the first lock.
    pub marked: Option<bool>,
    /// Why it does not (configuration, or the role refused SetSourceIdentity).
    pub unmarked_reason: Option<String>,
    /// A re-lock drawn within `lock.relock_spread_seconds` after the environment gained
    /// entries (module doc, "Fleet budget"); `None` when none is waiting.
    pub pending_relock: Option<PendingRelock>,
}

/// See [`LockStatus::pending_relock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingRelock {
    /// When the re-lock is due (or the normal refresh, if that comes first).
    pub at: String,
    pub reason: &'static str,
}

const SPREAD_REASON: &str =
    "the environment gained entries: re-lock spread over lock.relock_spread_seconds";

/// The SourceIdentity credlock sets on its sessions: `credlock-<instance id>`. It persists into
/// every event CloudTrail records for the session (`userIdentity.sessionContext.sourceIdentity`)
/// and through role chaining, so a locked session is recognisable without a lookup table
/// ("Monitor and control actions taken with assumed roles", IAM User Guide). Allowed characters:
/// letters, digits and `=,.@-`; 2-64 characters (STS API Reference, "AssumeRole").
pub fn source_identity(instance_id: &str) -> String {
    format!("credlock-{instance_id}")
}

/// The set being served: what it was locked to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Locked {
    identity: InstanceIdentity,
    environment: Arc<Environment>,
}

pub struct Locker<I, S> {
    pub issuer: I,
    pub instance: S,
    pub store: Arc<CredentialStore>,
    pub metrics: LockSeries,
    pub clock: Arc<dyn Clock>,
    pub config: LockConfig,
    pub template: Value,
    pub environment: watch::Receiver<Option<Arc<Environment>>>,
    /// How often the identity is re-read to notice a role change.
    pub recheck: Duration,
    pub status: Arc<ArcSwap<LockStatus>>,
    pub ready: watch::Sender<bool>,
    /// The access rules' roles: every locked session is denied `sts:AssumeRole` on them
    /// (the locked role itself is denied by the template's own statement).
    pub also_deny: Vec<RoleArn>,
    /// Told the identity each time it is read (the instance role's loop tells the per-class
    /// roles which role name IMDS answers credentials for).
    pub on_identity: Option<OnIdentity>,
    /// Jitter of refreshes and retries (seeded in the fleet simulation).
    pub random: Arc<dyn Random>,
}

/// How a new set was had: whether its session carries the SourceIdentity marker (and why not),
/// and its session policy's length.
struct Held {
    marked: bool,
    unmarked: Option<String>,
    characters: usize,
}

/// What the loop remembers between passes.
struct LoopState {
    /// What the served set was locked to.
    locked: Option<Locked>,
    /// The normal refresh of the served set.
    next_refresh: SystemTime,
    /// Consecutive failures (0 after a success).
    failures: u32,
    /// No AssumeRole before this: the end of the running back-off. Monotonic (tokio's clock,
    /// which a paused runtime moves too): a wall clock stepped back by NTP, or a frozen test
    /// clock, must not stretch a back-off.
    retry_at: Option<tokio::time::Instant>,
    /// The drawn re-lock time for an environment that only gained entries.
    spread_at: Option<SystemTime>,
}

/// Whether to call STS now, or when to look again.
enum Plan {
    Now,
    At(SystemTime),
}

impl<I: Issuer, S: InstanceSource> Locker<I, S> {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut state = LoopState {
            locked: None,
            next_refresh: SystemTime::UNIX_EPOCH,
            failures: 0,
            retry_at: None,
            spread_at: None,
        };
        loop {
            let wait = self.step(&mut state).await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = self.environment.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// When the set locked to `state.locked` must be replaced by one locked to `wanted` (module
    /// doc, "Fleet budget"), ignoring the back-off. Draws the spread re-lock time the first
    /// time an only-adding change is seen.
    fn plan(&self, state: &mut LoopState, wanted: &Locked, now: SystemTime) -> Plan {
        let Some(locked) = &state.locked else {
            return Plan::Now;
        };
        if now >= state.next_refresh || self.store.servable(now, self.config.serve_margin).is_none()
        {
            return Plan::Now;
        }
        if locked == wanted {
            self.set_spread(state, None);
            return Plan::At(state.next_refresh);
        }
        let spread = self.config.relock_spread;
        if spread.is_zero()
            || locked.identity != wanted.identity
            || !only_adds(&locked.environment, &wanted.environment)
        {
            return Plan::Now;
        }
        let at = match state.spread_at {
            Some(at) => at,
            None => {
                let at = now + spread.mul_f64(self.random.unit());
                tracing::info!(
                    relock_at = %imds_timestamp(at.min(state.next_refresh)),
                    "the environment gained entries: the set being served still works, re-lock spread"
                );
                self.set_spread(state, Some(at));
                at
            }
        };
        if now >= at {
            Plan::Now
        } else {
            Plan::At(at.min(state.next_refresh))
        }
    }

    /// Records the drawn re-lock time, and shows it in `/status`.
    fn set_spread(&self, state: &mut LoopState, at: Option<SystemTime>) {
        if state.spread_at == at {
            return;
        }
        state.spread_at = at;
        let mut status = (**self.status.load()).clone();
        status.pending_relock = at.map(|at| PendingRelock {
            at: imds_timestamp(at.min(state.next_refresh)),
            reason: SPREAD_REASON,
        });
        self.status.store(Arc::new(status));
    }

    /// How long to sleep until `at` (at most the identity recheck interval).
    fn until(&self, at: SystemTime, now: SystemTime) -> Duration {
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(self.recheck)
    }

    /// One pass: lock if due, and say how long to wait before the next pass.
    async fn step(&mut self, state: &mut LoopState) -> Duration {
        let Some(environment) = self.environment.borrow_and_update().clone() else {
            return self.recheck;
        };
        let identity = match self.instance.identity().await {
            Ok(identity) => identity,
            Err(e) => return self.failed(state, format!("reading the instance identity: {e}")),
        };
        if let Some(tell) = &self.on_identity {
            tell(&identity);
        }
        if state.locked.as_ref().is_some_and(|l| {
            l.identity.role != identity.role || l.identity.assumed_with != identity.assumed_with
        }) && self.store.peek().is_some()
        {
            tracing::warn!(
                old = %state.locked.as_ref().map(|l| l.identity.role.to_string()).unwrap_or_default(),
                new = %identity.role,
                "the instance role changed: dropping the old locked set and re-locking"
            );
            self.store.clear();
        }
        let now = self.clock.now();
        let wanted = Locked {
            identity,
            environment,
        };
        if let Plan::At(at) = self.plan(state, &wanted, now) {
            return self.until(at, now);
        }
        // Due, but a failure's back-off is still running: nothing calls STS early.
        if let Some(left) = state
            .retry_at
            .and_then(|at| at.checked_duration_since(tokio::time::Instant::now()))
            .filter(|left| !left.is_zero())
        {
            return left.min(self.recheck);
        }
        let (request, characters) = match self.request(&wanted) {
            Ok(r) => r,
            Err(e) => return self.failed(state, e),
        };
        match self.assume_marked(&request).await {
            Ok((issued, unmarked)) => {
                let held = Held {
                    marked: request.source_identity.is_some() && unmarked.is_none(),
                    unmarked: match (unmarked, request.source_identity.is_some()) {
                        (Some(why), _) => Some(why),
                        (None, false) => Some("lock.source_identity = false".into()),
                        (None, true) => None,
                    },
                    characters,
                };
                self.issued(state, wanted, issued, held)
            }
            Err(e) => {
                self.metrics.sts_error(e.code.label());
                self.failed(state, e.to_string())
            }
        }
    }

    /// The AssumeRole request for `wanted`: its session policy rendered, and its length.
    fn request(&self, wanted: &Locked) -> Result<(AssumeRequest, usize), String> {
        // No locked session may assume another role credlock serves (the instance role from a
        // class role's session, a class role from any other): that session would carry no lock.
        let others: Vec<RoleArn> = (self.also_deny.iter())
            .chain(&wanted.identity.assumed_with)
            .filter(|r| **r != wanted.identity.role)
            .cloned()
            .collect();
        let policy = policy::render_denying(
            &self.template,
            &wanted.environment,
            &wanted.identity.role,
            &others,
        )
        .map_err(|e| e.to_string())?;
        self.metrics.policy_characters.set(policy.characters as i64);
        let request = AssumeRequest {
            role_arn: wanted.identity.role.to_string(),
            session_name: wanted.identity.instance_id.clone(),
            policy: policy.text,
            duration: self.config.session_duration,
            source_identity: self
                .config
                .source_identity
                .then(|| source_identity(&wanted.identity.instance_id)),
            tags: self.config.session_tags.clone().into_iter().collect(),
        };
        Ok((request, policy.characters))
    }

    /// AssumeRole, marked when asked. A role whose trust policy lacks sts:SetSourceIdentity
    /// refuses the marked call with AccessDenied ("AssumeRole", STS API Reference:
    /// SourceIdentity): then lock unmarked rather than not at all, and say why (the sessions are
    /// invisible to the CloudTrail tripwire). Every refresh tries the marked call first, so
    /// fixing the role heals it.
    async fn assume_marked(
        &self,
        request: &AssumeRequest,
    ) -> Result<(Issued, Option<String>), StsError> {
        let started = Instant::now();
        let mut result = self.issuer.assume(request).await.map(|i| (i, None));
        if let Err(e) = &result
            && e.code == StsErrorCode::AccessDenied
            && request.source_identity.is_some()
        {
            let refused = e.message.clone();
            let plain = AssumeRequest {
                source_identity: None,
                ..request.clone()
            };
            result = self.issuer.assume(&plain).await.map(|issued| {
                let why = format!(
                    "AssumeRole with SourceIdentity was refused ({refused}); locked without it: add sts:SetSourceIdentity to the role's trust policy (policy-templates/trust-policy.json)"
                );
                tracing::error!(
                    role = %request.role_arn,
                    error = %why,
                    "locked sessions are NOT marked: CloudTrail cannot tell them from others and the tripwire is blind"
                );
                (issued, Some(why))
            });
        }
        self.metrics
            .assume_role_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// A new locked set: stored and served, the next refresh drawn, the status and metrics told.
    fn issued(
        &self,
        state: &mut LoopState,
        wanted: Locked,
        issued: Issued,
        held: Held,
    ) -> Duration {
        self.metrics.marked.set(i64::from(held.marked));
        let now = self.clock.now();
        let expiration = issued.credentials.expiration;
        state.next_refresh = refresh_at(now, expiration, self.random.unit() * 2.0 - 1.0);
        state.failures = 0;
        state.retry_at = None;
        state.spread_at = None;
        self.store.store(issued.credentials);
        self.metrics.success.inc();
        if let Some(p) = issued.packed_policy_percent {
            self.metrics.policy_packed_percent.set(i64::from(p));
        }
        tracing::info!(
            role = %wanted.identity.role,
            expiration = %imds_timestamp(expiration),
            next_refresh = %imds_timestamp(state.next_refresh),
            policy_characters = held.characters,
            packed_policy_percent = issued.packed_policy_percent,
            addresses = wanted.environment.ipv4.len() + wanted.environment.ipv6.len(),
            vpcs = wanted.environment.vpcs.len(),
            vpc_endpoints = wanted.environment.vpc_endpoints.len(),
            "locked credentials issued"
        );
        let mut status = (**self.status.load()).clone();
        status.role_arn = Some(wanted.identity.role.clone());
        status.instance_id = Some(wanted.identity.instance_id.clone());
        status.region = Some(wanted.identity.region.clone());
        status.locked_environment = Some((*wanted.environment).clone());
        status.policy_characters = Some(held.characters);
        status.packed_policy_percent = issued.packed_policy_percent;
        status.last_refresh = Some(imds_timestamp(now));
        status.next_refresh = Some(imds_timestamp(state.next_refresh));
        status.expiration = Some(imds_timestamp(expiration));
        status.consecutive_failures = 0;
        status.pending_relock = None;
        status.marked = Some(held.marked);
        status.unmarked_reason = held.unmarked;
        self.status.store(Arc::new(status));
        state.locked = Some(wanted);
        self.ready.send_replace(true);
        self.until(state.next_refresh, now)
    }

    /// Counts a failure and starts its back-off: no AssumeRole before it ends.
    fn failed(&self, state: &mut LoopState, message: String) -> Duration {
        state.failures += 1;
        self.metrics.failure.inc();
        let wait = backoff(state.failures, self.random.unit());
        let now = self.clock.now();
        let at = tokio::time::Instant::now() + wait;
        state.retry_at = Some(state.retry_at.map_or(at, |r| r.max(at)));
        let serving = self.store.servable(now, self.config.serve_margin).is_some();
        tracing::warn!(
            error = %message,
            failures = state.failures,
            retry_in = ?wait,
            still_serving_last_good_set = serving,
            "locking credentials failed"
        );
        let mut status = (**self.status.load()).clone();
        status.consecutive_failures = state.failures;
        if status.recent_errors.len() == RECENT_ERRORS {
            status.recent_errors.pop_front();
        }
        status
            .recent_errors
            .push_back(format!("{} {message}", imds_timestamp(now)));
        self.status.store(Arc::new(status));
        state
            .retry_at
            .map_or(Duration::ZERO, |at| {
                at.saturating_duration_since(tokio::time::Instant::now())
            })
            .min(self.recheck)
    }
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
