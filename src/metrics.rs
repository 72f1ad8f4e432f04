//! Prometheus metrics: one explicit registry, every metric documented in the README, closed
//! label sets only (no path, IP, role or error text ever becomes a label).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[path = "metrics_labels.rs"]
mod labels;
pub use labels::{EndpointResult, ROUTES, RefusalReason, RouteLabel, code_class};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub refused: IntCounterVec,
    pub answers_refused: IntCounterVec,
    pub evicted: IntCounterVec,
    pub open_connections: IntGaugeVec,
    pub refreshes: IntCounterVec,
    pub remaining_seconds: Gauge,
    pub assume_role_duration: Histogram,
    pub sts_errors: IntCounterVec,
    pub discovery_runs: IntCounterVec,
    pub discovery_last_success: GaugeVec,
    pub environment_entries: IntGaugeVec,
    pub policy_characters: IntGauge,
    pub policy_packed_percent: IntGauge,
    pub ready: IntGauge,
    pub firewall_enforced: IntGaugeVec,
    pub firewall_required: IntGauge,
    pub firewall_state: IntGaugeVec,
    /// Per-process access decisions (`credlock_access_decisions_total{rule, decision}`): rule
    /// names come from the validated configuration, a closed set.
    pub access_decisions: IntCounterVec,
    /// Connections by how their caller was identified (`credlock_connections_identified_total`).
    pub identified: IntCounterVec,
    /// The lock loops of the access policy's per-class roles, by `role` (the ARN from the
    /// validated configuration, a closed set): the instance role's series above stay as they
    /// were, so no dashboard or alert on them changes meaning.
    pub class_refreshes: IntCounterVec,
    pub class_sts_errors: IntCounterVec,
    pub class_assume_role_duration: HistogramVec,
    pub class_remaining_seconds: GaugeVec,
    pub class_policy_characters: IntGaugeVec,
    pub class_policy_packed_percent: IntGaugeVec,
    pub class_sessions_marked: IntGaugeVec,
    /// `credlock_sessions_marked`: 1 while the locked session carries the SourceIdentity marker.
    pub sessions_marked: IntGauge,
    /// Task-credential answers of the container proxies, by `agent` (`ecs`) and `result`
    /// ([`crate::container::TaskResult`]).
    pub task_credentials: IntCounterVec,
    /// Locked task sets held, by `agent`.
    pub task_sets: IntGaugeVec,
    /// Failed AssumeRole calls for task sets, by `agent` and STS error `code`.
    pub task_sts_errors: IntCounterVec,
    /// Answers of the loopback container-credentials endpoint, by [`EndpointResult`].
    pub endpoint_requests: IntCounterVec,
    /// Resolved once: the request path never hashes a label set (see [`Metrics::answered`]).
    answered_handles: [[IntCounter; 3]; ROUTES.len()],
    /// Every route but `refused`, which never reaches the upstream.
    upstream_handles: [Histogram; ROUTES.len() - 1],
}

/// One lock loop's series, resolved once: the instance role's own families, or the
/// `credlock_class_role_*` families with this role's label.
#[derive(Clone)]
pub struct LockSeries {
    pub success: IntCounter,
    pub failure: IntCounter,
    pub assume_role_duration: Histogram,
    pub policy_characters: IntGauge,
    pub policy_packed_percent: IntGauge,
    /// 1 while the last locked session carries credlock's SourceIdentity marker.
    pub marked: IntGauge,
    sts_errors: IntCounterVec,
    role: Option<String>,
}

impl LockSeries {
    pub fn sts_error(&self, code: &str) {
        match &self.role {
            None => self.sts_errors.with_label_values(&[code]).inc(),
            Some(role) => self
                .sts_errors
                .with_label_values(&[role.as_str(), code])
                .inc(),
        }
    }
}

/// The status classes whose series exist from the first scrape, in handle order.
const COMMON_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = counter(
            "credlock_requests_total",
            "IMDS requests answered, by route and status class.",
            &["route", "code_class"],
        );
        let upstream_errors = counter(
            "credlock_upstream_errors_total",
            "Upstream IMDS exchanges that failed, by kind.",
            &["kind"],
        );
        let refused = counter(
            "credlock_refused_requests_total",
            "Requests answered locally without reaching the upstream, by reason.",
            &["reason"],
        );
        let answers_refused = counter(
            "credlock_credential_answers_refused_total",
            "Upstream answers on a credential route answered 502 instead (not the documented success shape, an undocumented status, or a raw secret that would have reached the client), by reason.",
            &["reason"],
        );
        let evicted = counter(
            "credlock_connections_evicted_total",
            "Idle or stalled client connections closed to make room for a new one when every slot was taken, by listener.",
            &["listener"],
        );
        let refreshes = counter(
            "credlock_credential_refreshes_total",
            "Attempts to obtain a locked credential set, by result.",
            &["result"],
        );
        let access_decisions = counter(
            "credlock_access_decisions_total",
            "Requests judged by the per-process access policy, by rule (its configured name; '(none)': no rule matched, '(unidentified)': an unidentified caller with no rule for it) and decision (allowed, denied, token_required).",
            &["rule", "decision"],
        );
        let identified = counter(
            "credlock_connections_identified_total",
            "Client connections by identification result (identified, or the reason they were not).",
            &["result"],
        );
        let sts_errors = counter(
            "credlock_sts_errors_total",
            "STS AssumeRole failures, by error code.",
            &["code"],
        );
        let class_refreshes = counter(
            "credlock_class_role_refreshes_total",
            "Attempts to obtain a locked set for an access rule's role (access.rule.role), by role ARN and result.",
            &["role", "result"],
        );
        let class_sts_errors = counter(
            "credlock_class_role_sts_errors_total",
            "STS AssumeRole failures for an access rule's role, by role ARN and error code.",
            &["role", "code"],
        );
        let class_assume_role_duration = HistogramVec::new(
            HistogramOpts::new(
                "credlock_class_role_assume_role_duration_seconds",
                "Time for one sts:AssumeRole call for an access rule's role, by role ARN.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["role"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(class_assume_role_duration.clone()))
            .expect("unique metric");
        let class_remaining_seconds = GaugeVec::new(
            Opts::new(
                "credlock_class_role_remaining_seconds",
                "Seconds until the locked set of an access rule's role expires (0 when none is held), by role ARN.",
            ),
            &["role"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(class_remaining_seconds.clone()))
            .expect("unique metric");
        let discovery_runs = counter(
            "credlock_discovery_runs_total",
            "Environment discovery runs, by source and result.",
            &["source", "result"],
        );
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "credlock_upstream_request_duration_seconds",
                "Time for one upstream IMDS round trip, by route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(upstream_duration.clone()))
            .expect("unique metric");
        let assume_role_duration = Histogram::with_opts(
            HistogramOpts::new(
                "credlock_assume_role_duration_seconds",
                "Time for one sts:AssumeRole call.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(assume_role_duration.clone()))
            .expect("unique metric");
        let remaining_seconds = Gauge::new(
            "credlock_locked_credentials_remaining_seconds",
            "Seconds until the locked credential set expires (0 when none is held).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(remaining_seconds.clone()))
            .expect("unique metric");
        let discovery_last_success = GaugeVec::new(
            Opts::new(
                "credlock_discovery_last_success_timestamp_seconds",
                "Unix time of the last successful run of each discovery source.",
            ),
            &["source"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(discovery_last_success.clone()))
            .expect("unique metric");
        let environment_entries = IntGaugeVec::new(
            Opts::new(
                "credlock_environment_entries",
                "Entries in the locked environment, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(environment_entries.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let policy_characters = gauge(
            "credlock_policy_characters",
            "Characters in the injected session policy (STS limit: 2048).",
        );
        let policy_packed_percent = gauge(
            "credlock_policy_packed_size_percent",
            "PackedPolicySize reported by STS for the current session (100 fails).",
        );
        let sessions_marked = gauge(
            "credlock_sessions_marked",
            "1 while the locked session carries credlock's SourceIdentity marker (credlock-<instance id>), which the CloudTrail tripwire keys on; 0 when unmarked (lock.source_identity = false, or the role refused sts:SetSourceIdentity) or before the first lock.",
        );
        let ready = gauge(
            "credlock_ready",
            "1 while credlock holds a servable locked credential set.",
        );
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let class_policy_characters = int_gauge_vec(
            "credlock_class_role_policy_characters",
            "Characters in the session policy of an access rule's role, by role ARN.",
            &["role"],
        );
        let class_sessions_marked = int_gauge_vec(
            "credlock_class_role_sessions_marked",
            "1 while the locked session of an access rule's role carries credlock's SourceIdentity marker, by role ARN.",
            &["role"],
        );
        let class_policy_packed_percent = int_gauge_vec(
            "credlock_class_role_policy_packed_size_percent",
            "PackedPolicySize reported by STS for an access rule's role, by role ARN.",
            &["role"],
        );
        let firewall_enforced = int_gauge_vec(
            "credlock_firewall_enforced",
            "1 while the firewall's last check (at most a minute old) found every process of this address family forced through credlock (strict or boot mode, or IPv6 deliberately off); 0 otherwise.",
            &["family"],
        );
        let open_connections = int_gauge_vec(
            "credlock_open_connections",
            "Client connections open now, by listener.",
            &["listener"],
        );
        let firewall_required = gauge(
            "credlock_firewall_required",
            "1 when readiness needs the firewall enforced ([firewall] required, or auto on a host where credlock-firewall ran); 0 for credlock run without a firewall (a demo, a test).",
        );
        let firewall_state = int_gauge_vec(
            "credlock_firewall_state",
            "The firewall's rules per address family as its last check found them: 1 for the current state (strict, boot, missing, partial, off, unknown), 0 for the others.",
            &["family", "state"],
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new("credlock_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("unique metric");

        // Pre-create the closed label sets so every series exists from the first scrape, and
        // keep the handles the request path uses.
        let answered_handles = ROUTES
            .map(|route| COMMON_CLASSES.map(|class| requests.with_label_values(&[route, class])));
        let upstream_handles = [
            RouteLabel::Token,
            RouteLabel::Credentials,
            RouteLabel::RoleListing,
            RouteLabel::Passthrough,
        ]
        .map(|route| upstream_duration.with_label_values(&[route.as_str()]));
        for kind in crate::upstream::UpstreamError::LABELS {
            upstream_errors.with_label_values(&[kind]);
        }
        for result in ["success", "failure"] {
            refreshes.with_label_values(&[result]);
        }
        let task_credentials = counter(
            "credlock_task_credentials_total",
            "Answers of a container credential proxy (the ECS agent's task credentials), by agent and result: locked (a new locked set), cached (a held one), passed (the agent's own secret-free answer), refused (an answer that would carry a raw value, or of the wrong shape: 502), failed (no locked set could be had: 502/503).",
            &["agent", "result"],
        );
        let endpoint_requests = counter(
            "credlock_endpoint_requests_total",
            "Answers of the loopback container-credentials endpoint ([containers.endpoint]), by result: served (the locked set), unauthorized (no token: 401), forbidden (a token not trusted, or an unsafe token file: 403), unavailable (no locked set: 503), refused (a trusted token, another path or method: 404/405).",
            &["result"],
        );
        let task_sts_errors = counter(
            "credlock_task_sts_errors_total",
            "Failed AssumeRole calls for task sets, by agent and STS error code.",
            &["agent", "code"],
        );
        let task_sets = IntGaugeVec::new(
            Opts::new(
                "credlock_task_sets",
                "Locked task sets held by a container credential proxy, by agent.",
            ),
            &["agent"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(task_sets.clone()))
            .expect("unique metric");
        for reason in RefusalReason::ALL {
            refused.with_label_values(&[reason.label()]);
        }
        for reason in crate::credentials::AnswerRefusal::ALL {
            answers_refused.with_label_values(&[reason.label()]);
        }
        identified.with_label_values(&["identified"]);
        for reason in crate::access::Unidentified::ALL {
            identified.with_label_values(&[reason.label()]);
        }
        for listener in ["imds", "admin"] {
            evicted.with_label_values(&[listener]);
            open_connections.with_label_values(&[listener]);
        }
        #[cfg(feature = "daemon")]
        for code in crate::sts::StsErrorCode::ALL {
            sts_errors.with_label_values(&[code.label()]);
        }
        for kind in ["ipv4", "ipv6", "vpc", "vpce"] {
            environment_entries.with_label_values(&[kind]);
        }

        Metrics {
            registry,
            requests,
            upstream_duration,
            upstream_errors,
            refused,
            answers_refused,
            evicted,
            open_connections,
            refreshes,
            remaining_seconds,
            assume_role_duration,
            sts_errors,
            discovery_runs,
            discovery_last_success,
            environment_entries,
            policy_characters,
            policy_packed_percent,
            ready,
            firewall_enforced,
            firewall_required,
            access_decisions,
            identified,
            class_refreshes,
            class_sts_errors,
            class_assume_role_duration,
            class_remaining_seconds,
            class_policy_characters,
            class_policy_packed_percent,
            class_sessions_marked,
            sessions_marked,
            firewall_state,
            task_credentials,
            task_sets,
            task_sts_errors,
            endpoint_requests,
            answered_handles,
            upstream_handles,
        }
    }

    /// The lock loop's series for the instance role (`None`) or an access rule's `role`.
    pub fn lock_series(&self, role: Option<&str>) -> LockSeries {
        match role {
            None => LockSeries {
                success: self.refreshes.with_label_values(&["success"]),
                failure: self.refreshes.with_label_values(&["failure"]),
                assume_role_duration: self.assume_role_duration.clone(),
                policy_characters: self.policy_characters.clone(),
                policy_packed_percent: self.policy_packed_percent.clone(),
                marked: self.sessions_marked.clone(),
                sts_errors: self.sts_errors.clone(),
                role: None,
            },
            Some(role) => {
                self.class_remaining_seconds.with_label_values(&[role]);
                #[cfg(feature = "daemon")]
                for code in crate::sts::StsErrorCode::ALL {
                    self.class_sts_errors
                        .with_label_values(&[role, code.label()]);
                }
                LockSeries {
                    success: self.class_refreshes.with_label_values(&[role, "success"]),
                    failure: self.class_refreshes.with_label_values(&[role, "failure"]),
                    assume_role_duration: self
                        .class_assume_role_duration
                        .with_label_values(&[role]),
                    policy_characters: self.class_policy_characters.with_label_values(&[role]),
                    policy_packed_percent: self
                        .class_policy_packed_percent
                        .with_label_values(&[role]),
                    marked: self.class_sessions_marked.with_label_values(&[role]),
                    sts_errors: self.class_sts_errors.clone(),
                    role: Some(role.to_owned()),
                }
            }
        }
    }

    /// The connection series of one listener (`imds` or `admin`).
    pub fn connections(&self, listener: &str) -> crate::server::ConnectionMetrics {
        crate::server::ConnectionMetrics {
            evicted: self.evicted.with_label_values(&[listener]),
            open: self.open_connections.with_label_values(&[listener]),
        }
    }

    /// Sets the firewall gauges from a state read.
    pub fn firewall(&self, state: &crate::firewall::FirewallState) {
        for (family, current) in state.families() {
            self.firewall_enforced
                .with_label_values(&[family])
                .set(i64::from(current.enforced()));
            for s in crate::firewall::FamilyState::ALL {
                self.firewall_state
                    .with_label_values(&[family, s.label()])
                    .set(i64::from(s == current));
            }
        }
    }

    /// Counts one request answered locally (`credlock_refused_requests_total`).
    pub fn refused(&self, reason: RefusalReason) {
        self.refused.with_label_values(&[reason.label()]).inc();
    }

    /// Counts one credential-route answer refused (`credlock_credential_answers_refused_total`).
    pub fn answer_refused(&self, reason: crate::credentials::AnswerRefusal) {
        self.answers_refused
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Counts one answered IMDS request in `credlock_requests_total`.
    pub fn answered(&self, route: RouteLabel, status: http::StatusCode) {
        let class = match status.as_u16() {
            200..=299 => 0,
            400..=499 => 1,
            500..=599 => 2,
            _ => {
                self.requests
                    .with_label_values(&[route.as_str(), code_class(status)])
                    .inc();
                return;
            }
        };
        self.answered_handles[route as usize][class].inc();
    }

    /// Records one upstream round trip in `credlock_upstream_request_duration_seconds`.
    pub fn upstream_round_trip(&self, route: RouteLabel, seconds: f64) {
        if let Some(h) = self.upstream_handles.get(route as usize) {
            h.observe(seconds);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
