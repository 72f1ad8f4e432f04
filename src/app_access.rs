//! The per-process access policy's start-up (`[access]`): the policy compiled, callers'
//! identification per connection, names re-resolved every minute.

use std::sync::Arc;
use std::time::Duration;

use super::StartError;
use crate::metrics::Metrics;
use crate::server;

/// The per-process access policy, when rules exist: the gate and the per-connection
/// identification it needs. With no rules, neither exists and connections are not identified.
/// A policy that does not compile (the configuration's validation refuses it first, so only a
/// `Config` built by hand meets this) stops the start: never a proxy without its rules.
pub(super) fn access_control(
    cfg: &crate::access::AccessConfig,
    metrics: &Arc<Metrics>,
) -> Result<Option<(Arc<crate::gate::AccessControl>, server::Identify)>, StartError> {
    use crate::access::{Identity, Policy, Unidentified};
    use crate::peer::{GroupCache, Identifier, SystemDirectory};
    // The configuration was validated at load: compile cannot fail here but for a name that
    // resolves differently now, which is a warning, not an error, at run time.
    let (policy, warnings) = Policy::compile(cfg, &SystemDirectory, false)
        .map_err(|e| StartError::Access(e.to_string()))?;
    for warning in &warnings {
        tracing::warn!(%warning, "access policy");
    }
    if policy.is_empty() {
        return Ok(None);
    }
    tracing::info!(rules = ?policy.rule_names(), "access policy: callers are identified per connection");
    let groups = Arc::new(GroupCache::default());
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
            Some((nix::unistd::getuid().as_raw(), path))
        });
    let identifier = Arc::new(Identifier::new());
    let access = Arc::new(
        crate::gate::AccessControl::new(
            policy,
            Box::new(move |uid| groups.groups_of(uid)),
            own,
            metrics,
        )
        .with_cgroup_root(identifier.cgroup_root().map(Into::into)),
    );
    // Names that did not resolve (a user created after the image was baked) are tried again.
    let refreshed = Arc::downgrade(&access);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(access) = refreshed.upgrade() else {
                return;
            };
            let mut policy = Policy::clone(&access.policy.load());
            for warning in policy.refresh(&SystemDirectory) {
                tracing::warn!(%warning, "access policy");
            }
            access.policy.store(Arc::new(policy));
        }
    });
    if !identifier.has_cgroups() {
        tracing::error!(
            "access policy: no cgroup v2 hierarchy in /proc/self/mountinfo: no caller can be identified, every connection is unidentified"
        );
    }
    // Learn the cgroups there are now, off the serving thread.
    let primed = identifier.clone();
    tokio::task::spawn_blocking(move || primed.prime());
    // Resolved once: one series per result, no label hashing per connection.
    let identified = metrics.identified.with_label_values(&["identified"]);
    let reasons = crate::access::Unidentified::ALL.map(|reason| {
        (
            reason,
            metrics.identified.with_label_values(&[reason.label()]),
        )
    });
    let counters = Arc::new((identified, reasons));
    fn count(
        (identified, reasons): &(
            prometheus::IntCounter,
            [(Unidentified, prometheus::IntCounter); 3],
        ),
        who: &Identity,
    ) {
        match who {
            Identity::Identified(_) => identified.inc(),
            Identity::Unidentified(reason) => {
                if let Some((_, counter)) = reasons.iter().find(|(r, _)| r == reason) {
                    counter.inc();
                }
            }
        }
    }
    let identify: server::Identify = Arc::new(move |stream, peer, local| {
        // The fast part now, while the client waits for its answer (a known caller costs no
        // more); a new cgroup's path is looked for on the blocking pool.
        let who = match identifier
            .owner_of(stream, peer, local)
            .map(|owner| identifier.cached(owner))
        {
            Err(reason) => Arc::new(Identity::Unidentified(reason)),
            Ok(Ok(known)) => known,
            Ok(Err(owner)) => {
                let (identifier, counters) = (identifier.clone(), counters.clone());
                return server::Identified::Pending(Box::pin(async move {
                    let who = Arc::new(
                        tokio::task::spawn_blocking(move || identifier.resolve_blocking(owner))
                            .await
                            .unwrap_or(Identity::Unidentified(Unidentified::LookupFailed)),
                    );
                    count(&counters, &who);
                    who
                }));
            }
        };
        count(&counters, &who);
        server::Identified::Known(who)
    });
    Ok(Some((access, identify)))
}
