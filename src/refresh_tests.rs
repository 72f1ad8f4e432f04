//! Time-driven tests: tokio's paused clock drives both the sleeps and the injected wall clock,
//! so hours pass in milliseconds and every assertion is about when things happened.

use std::sync::Mutex;

use super::*;
use crate::credentials::{LockedCredentials, Secret};
use crate::sts::{Issued, StsError, StsErrorCode};

/// Wall time that follows tokio's (paused) clock.
struct TokioClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

const T0: u64 = 1_800_000_000;

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

/// Issues one-hour sets, or fails while `failing` is set; refuses a SourceIdentity with
/// AccessDenied while `no_source_identity` is set (a trust policy without
/// sts:SetSourceIdentity); records every call.
struct FakeSts {
    clock: Arc<TokioClock>,
    failing: Arc<Mutex<bool>>,
    no_source_identity: Arc<Mutex<bool>>,
    calls: Arc<Mutex<Vec<(u64, AssumeRequest)>>>,
}

impl Issuer for FakeSts {
    async fn assume(&self, request: &AssumeRequest) -> Result<Issued, StsError> {
        let now = self.clock.now();
        let at = now.duration_since(t(0)).unwrap().as_secs();
        self.calls.lock().unwrap().push((at, request.clone()));
        if *self.failing.lock().unwrap() {
            return Err(StsError {
                code: StsErrorCode::Throttling,
                message: "Rate exceeded".into(),
            });
        }
        if *self.no_source_identity.lock().unwrap() && request.source_identity.is_some() {
            return Err(StsError {
                code: StsErrorCode::AccessDenied,
                message: "not authorized to perform: sts:SetSourceIdentity".into(),
            });
        }
        let n = self.calls.lock().unwrap().len();
        Ok(Issued {
            credentials: LockedCredentials::new(
                format!("ASIALOCKED{n:010}"),
                Secret::new("s"),
                Secret::new("t"),
                now + Duration::from_secs(3600),
                now,
            ),
            packed_policy_percent: Some(7),
        })
    }
}

/// The role to lock, and (for a class role) the instance role that assumes it.
struct FakeInstance(Arc<Mutex<String>>, Arc<Mutex<Option<String>>>);

impl InstanceSource for FakeInstance {
    async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        Ok(InstanceIdentity {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            role: RoleArn::derived("aws", "123456789012", &self.0.lock().unwrap()),
            assumed_with: (self.1.lock().unwrap().as_deref())
                .map(|name| RoleArn::derived("aws", "123456789012", name)),
        })
    }
}

struct Harness {
    clock: Arc<TokioClock>,
    store: Arc<CredentialStore>,
    failing: Arc<Mutex<bool>>,
    no_source_identity: Arc<Mutex<bool>>,
    calls: Arc<Mutex<Vec<(u64, AssumeRequest)>>>,
    role: Arc<Mutex<String>>,
    assumed_with: Arc<Mutex<Option<String>>>,
    status: Arc<ArcSwap<LockStatus>>,
    marked: prometheus::IntGauge,
    env: watch::Sender<Option<Arc<Environment>>>,
    ready: watch::Receiver<bool>,
    _shutdown: watch::Sender<bool>,
}

impl Harness {
    fn start() -> Harness {
        let clock = Arc::new(TokioClock {
            base: t(0),
            start: tokio::time::Instant::now(),
        });
        let store = Arc::new(CredentialStore::default());
        let failing = Arc::new(Mutex::new(false));
        let no_source_identity = Arc::new(Mutex::new(false));
        let status = Arc::new(ArcSwap::from_pointee(LockStatus::default()));
        let series = crate::metrics::Metrics::new().lock_series(None);
        let marked = series.marked.clone();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let role = Arc::new(Mutex::new("app-role".to_string()));
        let assumed_with = Arc::new(Mutex::new(None));
        let mut env = Environment::default();
        env.add_ip("203.0.113.10");
        let (env_tx, env_rx) = watch::channel(Some(Arc::new(env)));
        let (ready_tx, ready_rx) = watch::channel(false);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let locker = Locker {
            issuer: FakeSts {
                clock: clock.clone(),
                failing: failing.clone(),
                no_source_identity: no_source_identity.clone(),
                calls: calls.clone(),
            },
            instance: FakeInstance(role.clone(), assumed_with.clone()),
            store: store.clone(),
            metrics: series,
            clock: clock.clone(),
            config: crate::config::from_toml("", &Default::default())
                .unwrap()
                .lock,
            template: policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap(),
            environment: env_rx,
            recheck: Duration::from_secs(300),
            status: status.clone(),
            on_identity: None,
            also_deny: Vec::new(),
            ready: ready_tx,
        };
        tokio::spawn(locker.run(shutdown_rx));
        Harness {
            clock,
            store,
            failing,
            no_source_identity,
            calls,
            role,
            assumed_with,
            status,
            marked,
            env: env_tx,
            ready: ready_rx,
            _shutdown: shutdown_tx,
        }
    }

    fn call_times(&self) -> Vec<u64> {
        self.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }

    fn servable_at_now(&self) -> bool {
        self.store
            .servable(self.clock.now(), Duration::from_secs(300))
            .is_some()
    }
}

async fn sleep_secs(s: u64) {
    tokio::time::sleep(Duration::from_secs(s)).await;
}

#[test]
fn refresh_is_at_half_life_with_ten_percent_jitter() {
    for _ in 0..50 {
        let at = refresh_at(t(0), t(3600), rand::random::<f64>() * 2.0 - 1.0);
        let secs = at.duration_since(t(0)).unwrap().as_secs_f64();
        assert!((1620.0..=1980.0).contains(&secs), "{secs}");
    }
}

#[test]
fn backoff_doubles_and_is_capped() {
    assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
    assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
    assert_eq!(backoff(4, 0.0), Duration::from_secs(4));
    assert_eq!(backoff(30, 1.0), MAX_BACKOFF);
    assert_eq!(backoff(30, 0.0), MAX_BACKOFF / 2);
}

#[tokio::test(start_paused = true)]
async fn locks_at_start_then_refreshes_at_half_life() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    assert_eq!(h.call_times(), [0]);
    let first = &h.calls.lock().unwrap()[0].1.clone();
    assert_eq!(first.role_arn, "arn:aws:iam::123456789012:role/app-role");
    assert_eq!(first.session_name, "i-0123456789abcdef0");
    assert_eq!(first.duration, Duration::from_secs(3600));
    assert!(first.policy.contains("203.0.113.10/32"));

    sleep_secs(2 * 3600).await;
    let times = h.call_times();
    assert!(times.len() >= 4, "{times:?}");
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (1620..=1981).contains(&gap),
            "refresh gap {gap} s in {times:?}"
        );
    }
    assert!(h.servable_at_now());
}

#[tokio::test(start_paused = true)]
async fn backs_off_under_sts_failure_serves_the_last_good_set_then_fails_closed() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    *h.failing.lock().unwrap() = true;

    // Past the first refresh point the calls fail and back off: 1, 2, 4 ... 60 s apart.
    sleep_secs(1980 + 600).await;
    let times = h.call_times();
    let retries: Vec<u64> = times.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    assert!(retries.len() >= 6, "{times:?}");
    for (i, gap) in retries.iter().enumerate() {
        let cap = backoff(i as u32 + 1, 1.0).as_secs();
        let floor = backoff(i as u32 + 1, 0.0).as_secs();
        assert!(
            (floor..=cap + 1).contains(gap),
            "retry {i}: {gap} s not in {floor}..={cap} ({times:?})"
        );
    }
    // The last good set is still served while it has more than the margin left...
    assert!(h.servable_at_now());
    // ...and not once it is within the margin of expiry: fail closed.
    let until_margin = t(3600 - 300).duration_since(h.clock.now()).unwrap();
    tokio::time::sleep(until_margin).await;
    assert!(!h.servable_at_now());

    // STS recovers: a new set within one backoff period.
    *h.failing.lock().unwrap() = false;
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    assert!(h.servable_at_now());
}

#[tokio::test(start_paused = true)]
async fn a_role_change_relocks_within_the_recheck_interval() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    sleep_secs(10).await;
    *h.role.lock().unwrap() = "new-role".into();
    sleep_secs(301).await;
    let calls = h.calls.lock().unwrap().clone();
    let last = calls.last().unwrap();
    assert_eq!(last.1.role_arn, "arn:aws:iam::123456789012:role/new-role");
    assert!(last.0 <= 10 + 300, "re-locked at {} s", last.0);
    assert!(last.1.policy.contains("role/new-role"));
}

#[tokio::test(start_paused = true)]
async fn an_environment_change_relocks_at_once() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    sleep_secs(100).await;
    let mut env = Environment::default();
    env.add_ip("203.0.113.10");
    env.add_ip("198.51.100.77");
    h.env.send_replace(Some(Arc::new(env)));
    sleep_secs(1).await;
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].0, 100);
    assert!(calls[1].1.policy.contains("198.51.100.77/32"));
}

#[tokio::test(start_paused = true)]
async fn no_environment_means_no_lock() {
    let h = Harness::start();
    h.env.send_replace(Some(Arc::new(Environment::default())));
    // Whatever was issued at start, an empty environment is never locked.
    let before = h.call_times().len();
    h.store.clear();
    sleep_secs(3600).await;
    assert_eq!(h.call_times().len(), before);
    assert!(!h.servable_at_now());
}

#[tokio::test(start_paused = true)]
async fn sessions_are_marked_and_a_role_refusing_the_marker_locks_unmarked_loudly() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    let first = h.calls.lock().unwrap()[0].1.clone();
    assert_eq!(
        first.source_identity.as_deref(),
        Some("credlock-i-0123456789abcdef0"),
        "marked by default, with the credlock- prefix"
    );
    assert_eq!((h.status.load().marked, h.marked.get()), (Some(true), 1));

    // The role's trust policy loses sts:SetSourceIdentity: the next lock is refused marked,
    // retried at once unmarked, and served; status and gauge say the tripwire is blind.
    *h.no_source_identity.lock().unwrap() = true;
    let before = h.calls.lock().unwrap().len();
    h.env.send_replace(Some(Arc::new({
        let mut env = Environment::default();
        env.add_ip("203.0.113.99");
        env
    })));
    sleep_secs(1).await;
    let calls = h.calls.lock().unwrap()[before..].to_vec();
    assert_eq!(calls.len(), 2, "one marked try, one unmarked: {calls:?}");
    assert!(calls[0].1.source_identity.is_some() && calls[1].1.source_identity.is_none());
    assert!(h.servable_at_now(), "never fails to lock over the marker");
    let status = h.status.load();
    assert_eq!((status.marked, h.marked.get()), (Some(false), 0));
    assert!(
        status
            .unmarked_reason
            .as_deref()
            .is_some_and(|why| why.contains("sts:SetSourceIdentity")),
        "{:?}",
        status.unmarked_reason
    );
    assert_eq!(status.consecutive_failures, 0);

    // Fixed: the next refresh is marked again.
    *h.no_source_identity.lock().unwrap() = false;
    sleep_secs(3600).await;
    let status = h.status.load();
    assert_eq!((status.marked, h.marked.get()), (Some(true), 1));
    assert_eq!(status.unmarked_reason, None);
}

#[tokio::test(start_paused = true)]
async fn a_class_roles_set_is_dropped_when_the_instance_role_that_assumed_it_changes() {
    let mut h = Harness::start();
    *h.role.lock().unwrap() = "worker-s3".into();
    *h.assumed_with.lock().unwrap() = Some("instance-a".into());
    sleep_secs(301).await;
    h.ready.wait_for(|r| *r).await.unwrap();
    let last = h.calls.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(last.role_arn, "arn:aws:iam::123456789012:role/worker-s3");
    // The class role's session may not assume the instance role (nor itself).
    let policy: serde_json::Value = serde_json::from_str(&last.policy).unwrap();
    let deny = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "DenyAssumingOtherCredlockRoles")
        .expect("the other roles are denied");
    assert_eq!(
        deny["Resource"],
        serde_json::json!([
            "arn:aws:iam::123456789012:role/instance-a",
            "arn:aws:iam::123456789012:role/*/instance-a"
        ]),
        "a role without a path: its two forms, once each"
    );

    // The instance profile is swapped (say, to a quarantine role): the class's set, assumed
    // with the old role's credentials, is dropped at the next identity check, not served on.
    let held = h.store.peek().unwrap().access_key_id.clone();
    *h.failing.lock().unwrap() = true;
    *h.assumed_with.lock().unwrap() = Some("quarantine".into());
    sleep_secs(301).await;
    assert!(
        h.store.peek().is_none_or(|s| s.access_key_id != held),
        "the old set is gone"
    );
    assert!(
        !h.servable_at_now(),
        "nothing to serve until the new role locks"
    );
}
