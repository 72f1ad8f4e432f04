//! The lock loop: render the session policy for the current environment, assume the role, store
//! the locked set, refresh at about half its lifetime (with jitter), back off on failure while
//! the last good set is served, and re-lock at once when the environment or the instance role
//! changes. One task owns the loop, so refreshes are single-flight; STS is never called on a
//! client's request path.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::LockConfig;
use crate::credentials::{CredentialStore, imds_timestamp};
use crate::environment::Environment;
use crate::identity::{InstanceIdentity, RoleArn};
use crate::imds::{Imds, ImdsError};
use crate::metrics::LockSeries;
use crate::policy;
use crate::sts::{AssumeRequest, Issuer, StsErrorCode};

/// First retry after a failure; doubles up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
const RECENT_ERRORS: usize = 10;

/// When to refresh a set that expires at `expires`, seen at `now`: half the time left, moved by
/// up to ±10 % (`jitter` in -1..=1) so a fleet does not refresh in step.
pub fn refresh_at(now: SystemTime, expires: SystemTime, jitter: f64) -> SystemTime {
    let left = expires.duration_since(now).unwrap_or(Duration::ZERO);
    now + (left / 2).mul_f64(1.0 + 0.1 * jitter.clamp(-1.0, 1.0))
}

/// The wait before retry number `failures` (1-based): exponential, capped, with "equal jitter"
/// (`unit` in 0..=1 picks a point in the upper half).
pub fn backoff(failures: u32, unit: f64) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(MAX_BACKOFF);
    capped / 2 + (capped / 2).mul_f64(unit.clamp(0.0, 1.0))
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
/// instance role drops the class's set too (it was assumed with the old role's credentials). The session name stays the instance
/// id, so CloudTrail shows which instance assumed the role.
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
    pub role_arn: Option<String>,
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
}

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
}

impl<I: Issuer, S: InstanceSource> Locker<I, S> {
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut locked: Option<Locked> = None;
        let mut next_refresh = SystemTime::UNIX_EPOCH;
        let mut failures = 0u32;
        loop {
            let wait = self
                .step(&mut locked, &mut next_refresh, &mut failures)
                .await;
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

    /// One pass: lock if due, and say how long to wait before the next pass.
    async fn step(
        &mut self,
        locked: &mut Option<Locked>,
        next_refresh: &mut SystemTime,
        failures: &mut u32,
    ) -> Duration {
        let Some(environment) = self.environment.borrow_and_update().clone() else {
            return self.recheck;
        };
        let identity = match self.instance.identity().await {
            Ok(identity) => identity,
            Err(e) => return self.failed(failures, format!("reading the instance identity: {e}")),
        };
        if let Some(tell) = &self.on_identity {
            tell(&identity);
        }
        if locked.as_ref().is_some_and(|l| {
            l.identity.role != identity.role || l.identity.assumed_with != identity.assumed_with
        }) {
            tracing::warn!(
                old = %locked.as_ref().map(|l| l.identity.role.to_string()).unwrap_or_default(),
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
        let due = locked.as_ref() != Some(&wanted)
            || now >= *next_refresh
            || self.store.servable(now, self.config.serve_margin).is_none();
        if !due {
            return next_refresh
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(self.recheck);
        }

        // No locked session may assume another role credlock serves (the instance role from a
        // class role's session, a class role from any other): that session would carry no lock.
        let others: Vec<RoleArn> = (self.also_deny.iter())
            .chain(&wanted.identity.assumed_with)
            .filter(|r| **r != wanted.identity.role)
            .cloned()
            .collect();
        let policy = match policy::render_denying(
            &self.template,
            &wanted.environment,
            &wanted.identity.role,
            &others,
        ) {
            Ok(p) => p,
            Err(e) => return self.failed(failures, e.to_string()),
        };
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
        let started = Instant::now();
        let mut result = self.issuer.assume(&request).await;
        let mut unmarked = None;
        // A role whose trust policy lacks sts:SetSourceIdentity refuses the marked call with
        // AccessDenied ("AssumeRole", STS API Reference: SourceIdentity). Lock unmarked rather
        // than not at all, and say so loudly: the sessions are then invisible to the CloudTrail
        // tripwire. Every refresh tries the marked call first, so fixing the role heals it.
        if let Err(e) = &result
            && e.code == StsErrorCode::AccessDenied
            && request.source_identity.is_some()
        {
            let refused = e.message.clone();
            let plain = AssumeRequest {
                source_identity: None,
                ..request.clone()
            };
            result = self.issuer.assume(&plain).await;
            if result.is_ok() {
                unmarked = Some(format!(
                    "AssumeRole with SourceIdentity was refused ({refused}); locked without it: add sts:SetSourceIdentity to the role's trust policy (policy-templates/trust-policy.json)"
                ));
            }
        }
        self.metrics
            .assume_role_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(issued) => {
                let marked = request.source_identity.is_some() && unmarked.is_none();
                self.metrics.marked.set(i64::from(marked));
                if let Some(why) = &unmarked {
                    tracing::error!(
                        role = %wanted.identity.role,
                        error = %why,
                        "locked sessions are NOT marked: CloudTrail cannot tell them from others and the tripwire is blind"
                    );
                }
                let now = self.clock.now();
                let expiration = issued.credentials.expiration;
                *next_refresh = refresh_at(now, expiration, rand::random::<f64>() * 2.0 - 1.0);
                *failures = 0;
                self.store.store(issued.credentials);
                self.metrics.success.inc();
                if let Some(p) = issued.packed_policy_percent {
                    self.metrics.policy_packed_percent.set(i64::from(p));
                }
                tracing::info!(
                    role = %wanted.identity.role,
                    expiration = %imds_timestamp(expiration),
                    next_refresh = %imds_timestamp(*next_refresh),
                    policy_characters = policy.characters,
                    packed_policy_percent = issued.packed_policy_percent,
                    addresses = wanted.environment.ipv4.len() + wanted.environment.ipv6.len(),
                    vpcs = wanted.environment.vpcs.len(),
                    vpc_endpoints = wanted.environment.vpc_endpoints.len(),
                    "locked credentials issued"
                );
                let mut status = (**self.status.load()).clone();
                status.role_arn = Some(wanted.identity.role.to_string());
                status.instance_id = Some(wanted.identity.instance_id.clone());
                status.region = Some(wanted.identity.region.clone());
                status.locked_environment = Some((*wanted.environment).clone());
                status.policy_characters = Some(policy.characters);
                status.packed_policy_percent = issued.packed_policy_percent;
                status.last_refresh = Some(imds_timestamp(now));
                status.next_refresh = Some(imds_timestamp(*next_refresh));
                status.expiration = Some(imds_timestamp(expiration));
                status.consecutive_failures = 0;
                status.marked = Some(marked);
                status.unmarked_reason = match (&unmarked, request.source_identity.is_some()) {
                    (Some(why), _) => Some(why.clone()),
                    (None, false) => Some("lock.source_identity = false".into()),
                    (None, true) => None,
                };
                self.status.store(Arc::new(status));
                *locked = Some(wanted);
                self.ready.send_replace(true);
                next_refresh
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .min(self.recheck)
            }
            Err(e) => {
                self.metrics.sts_error(e.code.label());
                self.failed(failures, e.to_string())
            }
        }
    }

    fn failed(&self, failures: &mut u32, message: String) -> Duration {
        *failures += 1;
        self.metrics.failure.inc();
        let wait = backoff(*failures, rand::random::<f64>());
        let serving = self
            .store
            .servable(self.clock.now(), self.config.serve_margin)
            .is_some();
        tracing::warn!(
            error = %message,
            failures = *failures,
            retry_in = ?wait,
            still_serving_last_good_set = serving,
            "locking credentials failed"
        );
        let mut status = (**self.status.load()).clone();
        status.consecutive_failures = *failures;
        if status.recent_errors.len() == RECENT_ERRORS {
            status.recent_errors.pop_front();
        }
        status
            .recent_errors
            .push_back(format!("{} {message}", imds_timestamp(self.clock.now())));
        self.status.store(Arc::new(status));
        wait
    }
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
