//! Time-driven tests: tokio's paused clock drives both the sleeps and the injected wall clock,
//! so hours pass in milliseconds and every assertion is about when things happened. The loop's
//! randomness is a [`SeededRandom`]; a second generator with the same seed replays its draws,
//! so a test can say exactly when each call must come (to the millisecond tokio's timer keeps).

use std::sync::Mutex;

use super::*;
use crate::clock::SeededRandom;
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

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// tokio's timer rounds each sleep up to the next millisecond.
const TIMER_SLACK: Duration = Duration::from_millis(2);

fn near(actual: Duration, expected: Duration) -> bool {
    actual.abs_diff(expected) <= TIMER_SLACK
}

fn env(ips: &[&str]) -> Arc<Environment> {
    let mut env = Environment::default();
    for ip in ips {
        assert!(env.add_ip(ip), "{ip}");
    }
    Arc::new(env)
}

/// The address every harness starts locked to.
const BOOT_IP: &str = "203.0.113.10";

/// Issues one-hour sets, or fails with `failing`'s code while it is set; refuses a
/// SourceIdentity with AccessDenied while `no_source_identity` is set (a trust policy without
/// sts:SetSourceIdentity); records every call with its time since `t(0)`.
struct FakeSts {
    clock: Arc<TokioClock>,
    failing: Arc<Mutex<Option<StsErrorCode>>>,
    no_source_identity: Arc<Mutex<bool>>,
    calls: Arc<Mutex<Vec<(Duration, AssumeRequest)>>>,
}

impl Issuer for FakeSts {
    async fn assume(&self, request: &AssumeRequest) -> Result<Issued, StsError> {
        let now = self.clock.now();
        let at = now.duration_since(t(0)).unwrap();
        self.calls.lock().unwrap().push((at, request.clone()));
        if let Some(code) = *self.failing.lock().unwrap() {
            return Err(StsError {
                code,
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

/// How a harness starts.
struct Setup {
    seed: u64,
    /// `lock.relock_spread_seconds`; `None` keeps the configuration's default.
    spread: Option<Duration>,
    /// STS fails with this from the first call on.
    failing: Option<StsErrorCode>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            seed: 1,
            spread: None,
            failing: None,
        }
    }
}

struct Harness {
    clock: Arc<TokioClock>,
    store: Arc<CredentialStore>,
    failing: Arc<Mutex<Option<StsErrorCode>>>,
    no_source_identity: Arc<Mutex<bool>>,
    calls: Arc<Mutex<Vec<(Duration, AssumeRequest)>>>,
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
        Harness::start_with(Setup::default())
    }

    fn start_with(setup: Setup) -> Harness {
        let clock = Arc::new(TokioClock {
            base: t(0),
            start: tokio::time::Instant::now(),
        });
        let store = Arc::new(CredentialStore::default());
        let failing = Arc::new(Mutex::new(setup.failing));
        let no_source_identity = Arc::new(Mutex::new(false));
        let status = Arc::new(ArcSwap::from_pointee(LockStatus::default()));
        let series = crate::metrics::Metrics::new().lock_series(None);
        let marked = series.marked.clone();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let role = Arc::new(Mutex::new("app-role".to_string()));
        let assumed_with = Arc::new(Mutex::new(None));
        let (env_tx, env_rx) = watch::channel(Some(env(&[BOOT_IP])));
        let (ready_tx, ready_rx) = watch::channel(false);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut config = crate::config::from_toml("", &Default::default())
            .unwrap()
            .lock;
        if let Some(spread) = setup.spread {
            config.relock_spread = spread;
        }
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
            config,
            template: policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap(),
            environment: env_rx,
            recheck: Duration::from_secs(300),
            status: status.clone(),
            on_identity: None,
            also_deny: Vec::new(),
            ready: ready_tx,
            random: Arc::new(SeededRandom::new(setup.seed)),
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

    fn fail(&self, code: Option<StsErrorCode>) {
        *self.failing.lock().unwrap() = code;
    }

    /// The calls' times since `t(0)`.
    fn call_times(&self) -> Vec<Duration> {
        self.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }

    /// The calls' times, in whole seconds.
    fn call_secs(&self) -> Vec<u64> {
        self.call_times().iter().map(Duration::as_secs).collect()
    }

    fn policies(&self) -> Vec<String> {
        let calls = self.calls.lock().unwrap();
        calls.iter().map(|c| c.1.policy.clone()).collect()
    }

    fn servable_at_now(&self) -> bool {
        self.store
            .servable(self.clock.now(), Duration::from_secs(300))
            .is_some()
    }

    fn elapsed(&self) -> Duration {
        self.clock.now().duration_since(t(0)).unwrap()
    }
}

/// `n` harnesses with seeds `1..=n`, the rest of the setup from `setup`.
fn fleet(n: u64, setup: impl Fn(u64) -> Setup) -> Vec<Harness> {
    (1..=n)
        .map(|seed| Harness::start_with(setup(seed)))
        .collect()
}

/// The loop's draws for `seed`, in order.
fn draws(seed: u64, n: usize) -> Vec<f64> {
    let random = SeededRandom::new(seed);
    (0..n).map(|_| random.unit()).collect()
}

async fn sleep_secs(s: u64) {
    tokio::time::sleep(Duration::from_secs(s)).await;
}

/// Sleeps until `at` after `t(0)` (as the harnesses' clocks read it).
async fn sleep_until(h: &Harness, at: Duration) {
    tokio::time::sleep(at.saturating_sub(h.elapsed())).await;
}

// ---- the laws --------------------------------------------------------------------------------

#[test]
fn refresh_is_at_half_life_with_ten_percent_jitter() {
    for _ in 0..50 {
        let at = refresh_at(t(0), t(3600), rand::random::<f64>() * 2.0 - 1.0);
        let secs = at.duration_since(t(0)).unwrap().as_secs_f64();
        assert!((1620.0..=1980.0).contains(&secs), "{secs}");
    }
}

#[test]
fn backoff_is_full_jitter_under_a_ceiling_that_doubles_to_a_minute() {
    // "Exponential Backoff And Jitter": sleep = random_between(0, min(cap, base * 2^attempt)),
    // base 1 s, cap 60 s, here with a 100 ms floor.
    let ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60];
    for (i, c) in ceilings.iter().enumerate() {
        let n = i as u32 + 1;
        let c = Duration::from_secs(*c);
        assert_eq!(backoff_ceiling(n), c, "failure {n}");
        assert_eq!(backoff(n, 0.0), Duration::from_millis(100), "failure {n}");
        assert_eq!(backoff(n, 1.0), c, "failure {n}");
        let mid = Duration::from_millis(50) + c / 2;
        assert!(
            backoff(n, 0.5).abs_diff(mid) < Duration::from_micros(1),
            "failure {n}"
        );
    }
    assert_eq!(
        backoff(0, 1.0),
        Duration::from_secs(1),
        "0 counts as the first"
    );
    assert_eq!(backoff(u32::MAX, 1.0), MAX_BACKOFF);
    assert_eq!(backoff(3, 7.0), Duration::from_secs(4), "unit clamped");
    assert_eq!(backoff(3, -1.0), MIN_BACKOFF, "unit clamped");

    // 10,000 draws per failure count: never outside [floor, ceiling], each tenth of the range
    // gets about a tenth of them (binomial: 1,000 ± 30; ± 150 is five deviations).
    let random = SeededRandom::new(17);
    for n in [1, 3, 6, 7, 30] {
        let ceiling = backoff_ceiling(n);
        let width = (ceiling - MIN_BACKOFF).as_secs_f64();
        let mut tenths = [0u32; 10];
        for _ in 0..10_000 {
            let wait = backoff(n, random.unit());
            assert!(
                (MIN_BACKOFF..=ceiling).contains(&wait) && wait <= MAX_BACKOFF,
                "failure {n}: {wait:?}"
            );
            let x = (wait - MIN_BACKOFF).as_secs_f64() / width;
            tenths[((x * 10.0) as usize).min(9)] += 1;
        }
        assert!(
            tenths.iter().all(|c| (850..=1150).contains(c)),
            "failure {n}: not uniform: {tenths:?}"
        );
    }
}

#[test]
fn only_adds_is_true_exactly_when_nothing_the_old_lock_allowed_is_gone() {
    let mut old = Environment::default();
    old.add_ip("203.0.113.10");
    old.add_ip("2001:db8::10");
    old.vpcs.insert("vpc-0a".into());
    old.vpc_endpoints.insert("vpce-0a".into());

    let adds = |f: &dyn Fn(&mut Environment)| {
        let mut new = old.clone();
        f(&mut new);
        only_adds(&old, &new)
    };
    assert!(adds(&|_| {}), "the same environment");
    assert!(adds(&|e| {
        e.add_ip("198.51.100.7");
    }));
    assert!(adds(&|e| {
        e.add_ip("2001:db8::77");
    }));
    assert!(adds(&|e| {
        e.vpcs.insert("vpc-0b".into());
    }));
    assert!(adds(&|e| {
        e.vpc_endpoints.insert("vpce-0b".into());
    }));
    assert!(
        adds(&|e| {
            e.ipv4.clear();
            e.add_ip("203.0.113.0/24");
        }),
        "the old address inside a wider prefix"
    );

    assert!(!adds(&|e| {
        e.ipv4.clear();
    }));
    assert!(!adds(&|e| {
        e.ipv6.clear();
        e.add_ip("2001:db8::11");
    }));
    assert!(!adds(&|e| {
        e.vpcs.clear();
        e.vpcs.insert("vpc-0b".into());
    }));
    assert!(!adds(&|e| {
        e.vpc_endpoints.clear();
    }));
    // A prefix narrowed to part of itself removes the rest.
    let mut wide = Environment::default();
    wide.add_ip("203.0.113.0/24");
    let mut narrow = Environment::default();
    narrow.add_ip("203.0.113.0/25");
    narrow.add_ip("198.51.100.0/24");
    assert!(!only_adds(&wide, &narrow));
    assert!(only_adds(&narrow, &{
        let mut e = narrow.clone();
        e.add_ip("203.0.113.0/24");
        e
    }));
}

#[path = "refresh_failure_tests.rs"]
mod failure;

#[path = "refresh_change_tests.rs"]
mod change;
