//! Per-class roles (`access.rule.role`): a class of callers is served locked credentials for
//! another IAM role instead of the instance role's.
//!
//! Each distinct role has its own lock loop (`refresh::Locker` with a
//! `refresh::ClassInstance`), store, `/status` entry and `credlock_class_role_*` series. The
//! role is assumed with the instance role's own credentials and the same session policy, so
//! the target role must trust the instance role ("IAM roles: Methods to assume a role", role
//! chaining).
//!
//! On the request path ([`crate::proxy`]) a caller of such a class sees this role only:
//! - the role listing is forwarded (IMDS still judges the caller's token) and, when IMDS lists
//!   a role, answered with this role's name instead;
//! - the credential path answers for this role's name only (another name: 404, as IMDS says
//!   for a role that is not attached). It is forwarded as the instance role's credential
//!   request with the caller's token, and IMDS's success body is replaced with this role's
//!   locked set, exactly as the instance role's is.
//!
//! A class role that cannot be locked (its trust policy does not admit the instance role, STS
//! fails) leaves its class with 503 "no locked credentials": never the instance role's set,
//! which may carry rights the class was meant not to have. credlock's readiness follows the
//! instance role only, so one misconfigured class does not hold every application's boot.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::access::AccessConfig;
use crate::credentials::{CredentialStore, imds_timestamp};
use crate::identity::RoleArn;
use crate::metrics::Metrics;

/// One configured role and what serves it.
pub struct ClassRole {
    pub arn: RoleArn,
    /// The names of the rules that give this role (one lock loop per role, not per rule).
    pub rules: Vec<String>,
    pub store: Arc<CredentialStore>,
    remaining: prometheus::Gauge,
}

/// Every configured role, and which rule gives which.
#[derive(Default)]
pub struct ClassRoles {
    roles: Vec<Arc<ClassRole>>,
    /// Rule index (configuration order) to its role's index in `roles`.
    by_rule: Vec<Option<usize>>,
    /// The instance role's name as last locked (set by its lock loop): the credential path
    /// IMDS answers.
    instance_role: ArcSwap<Option<String>>,
}

impl ClassRoles {
    /// From the validated access configuration. A role that does not parse is an error (the
    /// configuration's validation refuses it first): its class must never fall back to the
    /// instance role's set.
    pub fn new(cfg: &AccessConfig, metrics: &Metrics) -> Result<Self, String> {
        let mut roles: Vec<Arc<ClassRole>> = Vec::new();
        let mut by_rule = Vec::with_capacity(cfg.rules.len());
        for rule in &cfg.rules {
            let Some(text) = rule.role.as_deref() else {
                by_rule.push(None);
                continue;
            };
            let arn = RoleArn::parse(text).ok_or_else(|| {
                format!(
                    "access rule {:?}: role {text:?} is not an IAM role ARN",
                    rule.name
                )
            })?;
            let index = match roles.iter().position(|r| r.arn == arn) {
                Some(i) => i,
                None => {
                    let label = arn.to_string();
                    roles.push(Arc::new(ClassRole {
                        remaining: metrics.class_remaining_seconds.with_label_values(&[&label]),
                        arn,
                        rules: Vec::new(),
                        store: Arc::new(CredentialStore::default()),
                    }));
                    roles.len() - 1
                }
            };
            if let Some(role) = Arc::get_mut(&mut roles[index]) {
                role.rules.push(rule.name.clone());
            }
            by_rule.push(Some(index));
        }
        Ok(ClassRoles {
            roles,
            by_rule,
            instance_role: ArcSwap::from_pointee(None),
        })
    }

    pub fn roles(&self) -> &[Arc<ClassRole>] {
        &self.roles
    }

    /// The role the rule at `rule` (configuration order) gives its class, if any.
    pub fn for_rule(&self, rule: usize) -> Option<&ClassRole> {
        self.by_rule
            .get(rule)
            .copied()
            .flatten()
            .map(|i| &*self.roles[i])
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The instance role's name as last locked: the credential path IMDS answers.
    pub fn instance_role_name(&self) -> Arc<Option<String>> {
        self.instance_role.load_full()
    }

    /// Called by the instance role's lock loop whenever it locks.
    pub fn set_instance_role(&self, name: &str) {
        if self.instance_role.load().as_deref() != Some(name) {
            self.instance_role.store(Arc::new(Some(name.to_owned())));
        }
    }

    /// Sets the remaining-seconds gauges (at scrape time).
    pub fn refresh_gauges(&self, now: SystemTime) {
        for role in &self.roles {
            let left = role
                .store
                .peek()
                .map_or(0.0, |c| c.remaining(now).as_secs_f64());
            role.remaining.set(left);
        }
    }

    /// What `/status` shows for each role; `lock`: each role's lock loop status, in order.
    pub fn status<L: Serialize + Clone>(
        &self,
        now: SystemTime,
        lock: impl Fn(usize) -> L,
    ) -> Vec<ClassRoleStatus<L>> {
        self.roles
            .iter()
            .enumerate()
            .map(|(i, role)| {
                let held = role.store.peek();
                ClassRoleStatus {
                    role_arn: role.arn.to_string(),
                    rules: role.rules.clone(),
                    held: held.is_some(),
                    expiration: held.as_ref().map(|c| imds_timestamp(c.expiration)),
                    remaining_seconds: held.as_ref().map(|c| c.remaining(now).as_secs()),
                    lock: lock(i),
                }
            })
            .collect()
    }
}

/// One role in `/status`. No secret: not even the access key id.
#[derive(Debug, Serialize)]
pub struct ClassRoleStatus<L> {
    pub role_arn: String,
    pub rules: Vec<String>,
    pub held: bool,
    pub expiration: Option<String>,
    pub remaining_seconds: Option<u64>,
    pub lock: L,
}
