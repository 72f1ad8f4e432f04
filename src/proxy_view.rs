//! What the admin listener sees of the request path (`/readyz`, `/status`, `/metrics`): a
//! snapshot taken at one instant through these methods, never the proxy's own fields, and no
//! secret (not even the access key id: [`View::serves`] only compares one).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{ProxyState, TokenMode};
use crate::class_role::ClassRoleStatus;
use crate::gate::RuleStatus;

/// The request path's state at [`View::now`].
pub struct View {
    pub now: SystemTime,
    /// The locked set held, servable or not.
    pub held: Option<HeldSet>,
    /// A set is held and outside the serving margin: credential requests get it.
    pub servable: bool,
    pub token_mode: TokenMode,
    servable_key: Option<String>,
}

/// The held set's times.
pub struct HeldSet {
    pub expiration: SystemTime,
    pub remaining: Duration,
}

impl View {
    /// Whether `access_key_id` is the servable set's (what `/readyz` checks an answer by).
    pub fn serves(&self, access_key_id: &str) -> bool {
        self.servable_key.as_deref() == Some(access_key_id)
    }
}

impl TokenMode {
    pub fn label(self) -> &'static str {
        match self {
            TokenMode::Unknown => "unknown",
            TokenMode::Optional => "optional",
            TokenMode::Required => "required",
        }
    }
}

impl ProxyState {
    /// The state now (never before the epoch, whatever the injected clock says).
    pub fn view(&self) -> View {
        let now = SystemTime::max(self.clock.now(), SystemTime::UNIX_EPOCH);
        let servable = self.store.servable(now, self.serve_margin);
        View {
            now,
            held: self.store.peek().map(|c| HeldSet {
                expiration: c.expiration,
                remaining: c.remaining(now),
            }),
            servable: servable.is_some(),
            token_mode: self.token_mode(),
            servable_key: servable.map(|c| c.access_key_id.clone()),
        }
    }

    /// Sets the gauges that are computed at scrape time (time left, readiness, class roles).
    pub fn refresh_gauges(&self) {
        let view = self.view();
        let left = view
            .held
            .as_ref()
            .map_or(0.0, |h| h.remaining.as_secs_f64());
        self.metrics.remaining_seconds.set(left);
        self.metrics.ready.set(i64::from(view.servable));
        self.class_roles.refresh_gauges(view.now);
    }

    /// The access policy's rules with their decision counts; `None` without rules.
    pub fn access_status(&self) -> Option<Vec<RuleStatus>> {
        self.access.as_ref().map(|a| a.status())
    }

    /// The access rules' roles, each with its lock loop's status (`lock`, by role index).
    pub fn class_role_status<L: Serialize + Clone>(
        &self,
        now: SystemTime,
        lock: impl Fn(usize) -> L,
    ) -> Vec<ClassRoleStatus<L>> {
        self.class_roles.status(now, lock)
    }
}
