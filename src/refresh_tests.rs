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

// ---- refresh and failure ---------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn locks_at_start_then_refreshes_at_half_life() {
    let mut h = Harness::start();
    h.ready.wait_for(|r| *r).await.unwrap();
    assert_eq!(h.call_secs(), [0]);
    let first = &h.calls.lock().unwrap()[0].1.clone();
    assert_eq!(first.role_arn, "arn:aws:iam::123456789012:role/app-role");
    assert_eq!(first.session_name, "i-0123456789abcdef0");
    assert_eq!(first.duration, Duration::from_secs(3600));
    assert!(first.policy.contains("203.0.113.10/32"));

    sleep_secs(2 * 3600).await;
    let times = h.call_secs();
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
    let seed = 5;
    let mut h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    h.ready.wait_for(|r| *r).await.unwrap();
    h.fail(Some(StsErrorCode::Throttling));

    // The refresh is due at half-life (the first draw); from then on every call fails and the
    // n-th failure waits backoff(n, draw n+1): full jitter, exactly as drawn.
    sleep_secs(1980 + 600).await;
    let r = draws(seed, 64);
    let times = h.call_times();
    let refresh = refresh_at(t(0), t(3600), r[0] * 2.0 - 1.0);
    assert!(near(times[1], refresh.duration_since(t(0)).unwrap()));
    let gaps: Vec<Duration> = times.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 10, "{times:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let n = i as u32 + 1;
        let want = backoff(n, r[i + 1]);
        assert!(near(*gap, want), "retry {n}: {gap:?}, drawn {want:?}");
        assert!(*gap <= MAX_BACKOFF + TIMER_SLACK);
    }
    assert_eq!(
        h.status.load().consecutive_failures as usize,
        gaps.len() + 1
    );
    // The last good set is still served while it has more than the margin left...
    assert!(h.servable_at_now());
    // ...and not once it is within the margin of expiry: fail closed.
    let until_margin = t(3600 - 300).duration_since(h.clock.now()).unwrap();
    tokio::time::sleep(until_margin).await;
    assert!(!h.servable_at_now());

    // STS recovers: a new set within one back-off period.
    h.fail(None);
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    assert!(h.servable_at_now());
    assert_eq!(h.status.load().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn throttled_at_boot_it_backs_off_with_growing_jittered_waits_and_ends_holding_a_set() {
    // One instance, exactly: the n-th wait is backoff(n, n-th draw).
    let seed = 11;
    let h = Harness::start_with(Setup {
        seed,
        failing: Some(StsErrorCode::Throttling),
        ..Setup::default()
    });
    sleep_secs(300).await;
    assert!(!*h.ready.borrow(), "nothing held while throttled");
    assert!(!h.servable_at_now());
    let r = draws(seed, 64);
    let times = h.call_times();
    assert_eq!(times[0], Duration::ZERO, "the first lock is immediate");
    assert!(times.len() >= 8, "{times:?}");
    for (i, w) in times.windows(2).enumerate() {
        let want = backoff(i as u32 + 1, r[i]);
        assert!(
            near(w[1] - w[0], want),
            "wait {i}: {:?} vs {want:?}",
            w[1] - w[0]
        );
    }
    // Throttling ends: the next retry, as drawn, locks.
    h.fail(None);
    let failed = times.len();
    let next = *times.last().unwrap() + backoff(failed as u32, r[failed - 1]);
    sleep_until(&h, next + Duration::from_millis(10)).await;
    assert!(*h.ready.borrow());
    assert!(h.servable_at_now());
    let times = h.call_times();
    assert_eq!(times.len(), failed + 1);
    assert!(near(times[failed], next));

    // A hundred instances throttled together: each wait lies between the floor and its
    // ceiling, spread over all of it (full jitter: equal jitter would never go below half the
    // ceiling), and the ceilings grow.
    let fleet = fleet(100, |seed| Setup {
        seed: seed + 100,
        failing: Some(StsErrorCode::Throttling),
        ..Setup::default()
    });
    sleep_secs(200).await;
    let mut means = Vec::new();
    for n in 1..=6u32 {
        let ceiling = backoff_ceiling(n);
        let waits: Vec<f64> = (fleet.iter())
            .map(|h| {
                let times = h.call_times();
                (times[n as usize] - times[n as usize - 1]).as_secs_f64()
            })
            .collect();
        let (lo, hi) = (MIN_BACKOFF.as_secs_f64(), ceiling.as_secs_f64());
        assert!(
            waits.iter().all(|w| (lo - 0.002..=hi + 0.002).contains(w)),
            "failure {n}: {waits:?}"
        );
        let min = waits.iter().copied().fold(f64::MAX, f64::min);
        let max = waits.iter().copied().fold(0.0, f64::max);
        assert!(min < lo + 0.2 * (hi - lo), "failure {n}: none low: {min}");
        assert!(max > lo + 0.8 * (hi - lo), "failure {n}: none high: {max}");
        let mean = waits.iter().sum::<f64>() / waits.len() as f64;
        let want = (lo + hi) / 2.0;
        assert!((mean - want).abs() < 0.2 * want, "failure {n}: mean {mean}");
        means.push(mean);
    }
    assert!(means.windows(2).all(|m| m[1] > m[0]), "{means:?}");
    for h in &fleet {
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    assert!(fleet.iter().all(Harness::servable_at_now));
}

#[tokio::test(start_paused = true)]
async fn a_change_during_the_backoff_waits_for_it() {
    let seed = 3;
    let mut h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    h.ready.wait_for(|r| *r).await.unwrap();
    h.fail(Some(StsErrorCode::Throttling));
    // A removal re-locks at once: the call at 100 s fails, and each retry fails too.
    sleep_secs(100).await;
    h.env.send_replace(Some(env(&["198.51.100.1"])));
    // Replay the schedule (draw 0 was the boot refresh time) and find a wait of over 4 s.
    let r = draws(seed, 64);
    let mut at = Duration::from_secs(100);
    let mut n = 1;
    let gap = loop {
        let gap = backoff(n, r[n as usize]);
        if gap > Duration::from_secs(4) {
            break gap;
        }
        at += gap;
        n += 1;
        assert!(n < 12, "seed {seed} never waits 4 s");
    };
    // `at` adds up the drawn waits; each real one is up to a millisecond longer (tokio's
    // timer), so take the n-th call's own time from the record.
    sleep_until(&h, at + Duration::from_secs(1)).await;
    let times = h.call_times();
    assert_eq!(times.len(), 1 + n as usize, "{times:?}");
    let last = times[n as usize];
    // Halfway through that wait, another removal: no call until the wait is over.
    sleep_until(&h, last + gap / 2).await;
    let before = h.call_times().len();
    h.env.send_replace(Some(env(&["198.51.100.2"])));
    sleep_until(&h, last + gap - Duration::from_millis(5)).await;
    assert_eq!(
        h.call_times().len(),
        before,
        "called STS during the back-off"
    );
    h.fail(None);
    sleep_until(&h, last + gap + Duration::from_millis(5)).await;
    let times = h.call_times();
    assert_eq!(times.len(), before + 1);
    assert!(
        near(times[before], last + gap),
        "{:?} vs {:?}",
        times[before],
        last + gap
    );
    assert!(h.policies()[before].contains("198.51.100.2/32"));
    assert!(h.servable_at_now(), "the boot set was served throughout");
}

// ---- re-lock after an environment change -----------------------------------------------------

/// The boot environment plus one address: a change that only adds.
fn added(ip: &str) -> Arc<Environment> {
    env(&[BOOT_IP, ip])
}

#[tokio::test(start_paused = true)]
async fn an_additive_change_relocks_at_a_drawn_point_within_the_spread_window() {
    const SPREAD: f64 = 300.0;
    let fleet = fleet(200, |seed| Setup {
        seed,
        ..Setup::default()
    });
    sleep_secs(100).await;
    for h in &fleet {
        assert_eq!(h.call_times().len(), 1);
        h.env.send_replace(Some(added("198.51.100.77")));
    }
    // Draw 0 was the boot refresh time, draw 1 the re-lock point.
    sleep_secs(1).await;
    let seed1 = &fleet[0];
    let r = draws(1, 2);
    assert!(r[1] * SPREAD > 1.0, "seed 1 draws a re-lock later than 1 s");
    assert_eq!(seed1.call_times().len(), 1, "not at once");
    let pending = seed1.status.load().pending_relock.clone().unwrap();
    assert_eq!(
        pending.at,
        imds_timestamp(t(100) + secs(r[1] * SPREAD)),
        "/status shows the drawn time"
    );
    assert!(pending.reason.contains("relock_spread_seconds"));

    sleep_secs(SPREAD as u64).await;
    let mut delays = Vec::new();
    for (i, h) in fleet.iter().enumerate() {
        let r = draws(i as u64 + 1, 2);
        let times = h.call_times();
        assert_eq!(times.len(), 2, "seed {}: {times:?}", i + 1);
        let delay = times[1] - Duration::from_secs(100);
        assert!(
            near(delay, secs(r[1] * SPREAD)),
            "seed {}: {delay:?}",
            i + 1
        );
        assert!(h.policies()[1].contains("198.51.100.77/32"));
        assert!(h.status.load().pending_relock.is_none());
        delays.push(delay.as_secs_f64());
    }
    // Uniform over the window: every quarter gets about a quarter (50 ± 6 for 200).
    let mut quarters = [0u32; 4];
    for d in &delays {
        assert!(*d < SPREAD, "{d}");
        quarters[((d / SPREAD * 4.0) as usize).min(3)] += 1;
    }
    assert!(
        quarters.iter().all(|q| (30..=70).contains(q)),
        "{quarters:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_additive_change_keeps_the_drawn_time() {
    const SPREAD: f64 = 300.0;
    // A seed whose re-lock falls after the second change (at 150 s) and inside the window.
    let seed = (1..100)
        .find(|s| (0.2..0.95).contains(&draws(*s, 2)[1]))
        .unwrap();
    let h = Harness::start_with(Setup {
        seed,
        ..Setup::default()
    });
    let due = Duration::from_secs(100) + secs(draws(seed, 2)[1] * SPREAD);
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(50).await;
    h.env
        .send_replace(Some(env(&[BOOT_IP, "198.51.100.77", "198.51.100.99"])));
    sleep_until(&h, due - Duration::from_millis(5)).await;
    assert_eq!(h.call_times().len(), 1, "no call before the drawn time");
    sleep_until(&h, due + Duration::from_secs(1)).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], due), "{:?} vs {due:?}", times[1]);
    let policy = &h.policies()[1];
    assert!(policy.contains("198.51.100.77/32") && policy.contains("198.51.100.99/32"));
}

#[tokio::test(start_paused = true)]
async fn a_change_that_removes_an_entry_relocks_at_once_even_with_a_relock_pending() {
    let h = Harness::start();
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    assert_eq!(h.call_times().len(), 1);
    assert!(h.status.load().pending_relock.is_some());
    // The boot address is gone: at once.
    h.env.send_replace(Some(env(&["198.51.100.77"])));
    sleep_secs(1).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2);
    assert!(near(times[1], Duration::from_secs(101)), "{times:?}");
    assert!(!h.policies()[1].contains("203.0.113.10/32"));
    assert!(h.status.load().pending_relock.is_none());
    // A removal with nothing pending, likewise.
    sleep_secs(100).await;
    h.env.send_replace(Some(env(&["198.51.100.78"])));
    sleep_secs(1).await;
    assert!(near(h.call_times()[2], Duration::from_secs(202)));
}

#[tokio::test(start_paused = true)]
async fn with_no_spread_an_additive_change_relocks_at_once() {
    let h = Harness::start_with(Setup {
        spread: Some(Duration::ZERO),
        ..Setup::default()
    });
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(near(calls[1].0, Duration::from_secs(100)));
    assert!(calls[1].1.policy.contains("198.51.100.77/32"));
}

#[tokio::test(start_paused = true)]
async fn an_additive_change_with_no_servable_set_relocks_at_once() {
    let h = Harness::start();
    sleep_secs(10).await;
    h.store.clear();
    sleep_secs(90).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(1).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], Duration::from_secs(100)));
}

#[tokio::test(start_paused = true)]
async fn the_normal_refresh_comes_first_when_it_is_sooner_than_the_drawn_point() {
    // A one-hour window: a seed whose drawn point falls after its half-life refresh.
    let spread = 3600.0;
    let seed = (1..100)
        .find(|s| 100.0 + draws(*s, 2)[1] * spread > 2000.0)
        .unwrap();
    let h = Harness::start_with(Setup {
        seed,
        spread: Some(secs(spread)),
        ..Setup::default()
    });
    let refresh = refresh_at(t(0), t(3600), draws(seed, 1)[0] * 2.0 - 1.0)
        .duration_since(t(0))
        .unwrap();
    sleep_secs(100).await;
    h.env.send_replace(Some(added("198.51.100.77")));
    sleep_secs(2000).await;
    let times = h.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert!(near(times[1], refresh), "{:?} vs {refresh:?}", times[1]);
    assert!(h.policies()[1].contains("198.51.100.77/32"));
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
    assert!(last.0.as_secs() <= 10 + 300, "re-locked at {:?}", last.0);
    assert!(last.1.policy.contains("role/new-role"));
}

// ---- an STS outage ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn through_an_outage_every_set_is_served_while_valid_and_all_relock_within_a_minute() {
    // Fifty instances locked together at boot; STS is down from 1500 s to 2100 s, which
    // covers every refresh point (half-life ± 10 %: 1620-1980 s).
    let fleet = fleet(50, |seed| Setup {
        seed,
        ..Setup::default()
    });
    sleep_secs(1500).await;
    for h in &fleet {
        h.fail(Some(StsErrorCode::Unreachable));
    }
    for _ in 0..(600 / 5) {
        sleep_secs(5).await;
        for h in &fleet {
            assert!(h.servable_at_now(), "stopped serving at {:?}", h.elapsed());
        }
    }
    for h in &fleet {
        assert!(
            h.call_times().len() > 2,
            "every refresh failed at least once"
        );
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    for h in &fleet {
        let fresh = h.store.peek().unwrap();
        assert!(
            fresh.issued >= t(2100) && fresh.issued <= t(2100 + 60) + TIMER_SLACK,
            "a fresh set within a minute of STS returning"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_at_boot_the_fleet_relocks_spread_over_the_window_not_in_one_wave() {
    // A hundred instances booted together into an STS outage of ten minutes: they failed in
    // step, and their recovery calls must not come in step.
    let fleet = fleet(100, |seed| Setup {
        seed,
        failing: Some(StsErrorCode::Unreachable),
        ..Setup::default()
    });
    sleep_secs(600).await;
    for h in &fleet {
        h.fail(None);
    }
    sleep_secs(MAX_BACKOFF.as_secs() + 1).await;
    let mut first_success: Vec<f64> = (fleet.iter())
        .map(|h| {
            assert!(
                h.servable_at_now(),
                "every instance holds a set a minute later"
            );
            h.call_times().last().unwrap().as_secs_f64()
        })
        .collect();
    first_success.sort_by(f64::total_cmp);
    let (first, last) = (first_success[0], first_success[99]);
    assert!(first >= 600.0 && last <= 660.0 + 0.002, "{first}..{last}");
    assert!(last - first > 40.0, "bunched: {first}..{last}");
    // No second holds more than a tenth of the fleet (uniform over 60 s: about 2 a second).
    let busiest = (first_success.iter())
        .map(|s| {
            (first_success.iter())
                .filter(|o| (*s..*s + 1.0).contains(*o))
                .count()
        })
        .max()
        .unwrap();
    assert!(busiest <= 10, "{busiest} re-locks within one second");
}

// ---- what is locked and how ------------------------------------------------------------------

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
    h.env.send_replace(Some(env(&["203.0.113.99"])));
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
    h.fail(Some(StsErrorCode::Throttling));
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
