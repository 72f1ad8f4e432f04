//! The fleet simulation engine (issue 17, part 4): N instances in one process, on tokio's paused
//! clock, each running credlock's own lock loop (`refresh::Locker::run`) and discovery
//! scheduler (`discovery::Discoverer::run`), wired as `app.rs` wires them (a `watch` channel from
//! discoverer to locker, a `CredentialStore`, a `LockStatus`, the `ready` watch), against the
//! counting stand-ins of `stand_ins.rs`. Virtual time: a day of a 50,000-instance fleet runs in
//! minutes. The same seed gives the same numbers.
//!
//! Used by the `fleet-sim` bench (`main.rs`, the CLI) and by `tests/fleet_sim.rs`.

#[path = "stand_ins.rs"]
pub mod stand_ins;

#[path = "report.rs"]
pub mod report;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use credlock::clock::{Clock, SeededRandom, TokioClock};
use credlock::config::Config;
use credlock::credentials::CredentialStore;
use credlock::discovery::{Context, Discoverer};
use credlock::environment::Environment;
use credlock::identity::{InstanceIdentity, RoleArn};
use credlock::imds::Imds;
use credlock::metrics::{LockSeries, Metrics};
use credlock::refresh::{LockStatus, Locker};

use self::report::Report;
use self::stand_ins::{
    Change, Client, Quotas, SdkAttempts, SimEc2, SimInstance, SimS3, SimSts, World,
};

/// Which discovery source every instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    S3,
    Ec2,
}

/// What happens to a running fleet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    None,
    /// The publisher writes a document with one more address.
    AddAddress {
        at: f64,
    },
    /// The publisher writes a document with one address fewer.
    RemoveAddress {
        at: f64,
    },
    /// STS answers nothing in `[from, to)`.
    StsOutage {
        from: f64,
        to: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub name: &'static str,
    /// Instances start at times drawn uniformly in `[0, boot_window)` seconds.
    pub boot_window: f64,
    pub source: Source,
    pub event: Event,
    /// Virtual seconds simulated.
    pub run_for: f64,
    /// The seconds `[from, to)` the call rates are reported over.
    pub window: (f64, f64),
}

const HOUR: f64 = 3600.0;
/// When a steady fleet's event comes: an hour after the last instance started.
const EVENT_AT: f64 = 2.0 * HOUR;

/// A fleet booting over `boot_window` s, nothing happening, watched from boot for `run_for` s.
const fn booting(name: &'static str, boot_window: f64, source: Source, run_for: f64) -> Scenario {
    Scenario {
        name,
        boot_window,
        source,
        event: Event::None,
        run_for,
        window: (0.0, run_for),
    }
}

/// A steady S3 fleet meeting `event` at [`EVENT_AT`], watched for `watch` s from then.
const fn steady_then(name: &'static str, event: Event, watch: f64) -> Scenario {
    Scenario {
        name,
        boot_window: HOUR,
        source: Source::S3,
        event,
        run_for: EVENT_AT + watch,
        window: (EVENT_AT, EVENT_AT + watch),
    }
}

/// The scenarios of issue 17. A "steady" fleet started over one session lifetime (one hour),
/// so its refreshes are as spread as a fleet that has been running for a while; its events come
/// an hour after the last instance started.
pub const SCENARIOS: [Scenario; 7] = [
    booting("boot-60s", 60.0, Source::S3, 900.0),
    booting("boot-5min", 300.0, Source::S3, 1200.0),
    Scenario {
        name: "steady-24h",
        boot_window: HOUR,
        source: Source::S3,
        event: Event::None,
        run_for: HOUR + 24.0 * HOUR,
        window: (HOUR, HOUR + 24.0 * HOUR),
    },
    steady_then("change-add", Event::AddAddress { at: EVENT_AT }, 1800.0),
    steady_then(
        "change-remove",
        Event::RemoveAddress { at: EVENT_AT },
        1800.0,
    ),
    steady_then(
        "sts-outage",
        Event::StsOutage {
            from: EVENT_AT,
            to: EVENT_AT + 600.0,
        },
        2400.0,
    ),
    booting("boot-60s-ec2", 60.0, Source::Ec2, HOUR),
];

pub fn scenario(name: &str) -> Option<Scenario> {
    SCENARIOS.iter().find(|s| s.name == name).copied()
}

/// How a run is set up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub instances: usize,
    pub seed: u64,
    /// AWS's default quotas times this (1.0: the real ones).
    pub quota_scale: f64,
    pub sdk: SdkAttempts,
}

/// What production's SDK clients do: STS and the instances' S3 polls with the SDK's retries
/// off (`sts.rs`, `discovery/s3_sdk.rs`: credlock's own back-off is the only retry), EC2 with
/// the SDK's default standard mode (3 attempts: `app.rs` sets no retry configuration).
pub const PRODUCTION_SDK: SdkAttempts = SdkAttempts {
    sts: 1,
    s3: 1,
    ec2: 3,
};

impl Params {
    pub fn new(instances: usize, seed: u64) -> Params {
        Params {
            instances,
            seed,
            quota_scale: 1.0,
            sdk: PRODUCTION_SDK,
        }
    }
}

/// The lock loop's back-off, as `refresh.rs` documents it ("Fleet budget"): uniform between
/// 100 ms and min(60 s, 1 s × 2^(n-1)) after the n-th consecutive failure.
pub const BACKOFF_MIN_S: f64 = 0.1;
pub fn backoff_max_s(failures: u32) -> f64 {
    2f64.powi(failures.saturating_sub(1).min(16) as i32)
        .min(60.0)
}

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "credlock-fleet-environment";
pub const BUCKET_OWNER: &str = "111122223333";
/// The address the add scenario publishes and the one the remove scenario withdraws.
pub const ADDED: &str = "198.51.100.7";
pub const REMOVED: &str = "203.0.113.20";

/// The account's environment before any change.
pub fn base_environment() -> Environment {
    let mut env = Environment::default();
    for ip in ["203.0.113.10", REMOVED, "2001:db8:100::10"] {
        env.add_ip(ip);
    }
    env.vpcs.insert("vpc-0a1b2c3d4e5f60718".into());
    env.vpc_endpoints.insert("vpce-0a1b2c3d4e5f60719".into());
    env
}

/// The configuration every instance runs: production defaults, the one source on, IMDS and
/// echo off (the key names no `{vpc}`, so IMDS is never read).
pub fn config_text(source: Source) -> String {
    let source = match source {
        Source::S3 => format!(
            "[discovery.s3]\nenabled = true\nbucket = \"{BUCKET}\"\nkey = \"environment/{{account}}/{{region}}.json\"\nexpected_bucket_owner = \"{BUCKET_OWNER}\"\n"
        ),
        Source::Ec2 => "[discovery.ec2]\nenabled = true\nscope = \"region\"\n".to_string(),
    };
    format!(
        "[server]\nupstream = \"http://127.0.0.1:9\"\n[discovery.imds]\nenabled = false\n[discovery.echo]\nenabled = false\n{source}"
    )
}

/// What every instance shares: one clock, one metrics registry, one IMDS client that is never
/// called, one HTTP client that is never used.
struct Shared {
    world: Arc<World>,
    config: Config,
    template: serde_json::Value,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    series: LockSeries,
    imds: Arc<Imds>,
    http: reqwest::Client,
    role: RoleArn,
    source: Source,
    shutdown: watch::Receiver<bool>,
}

/// A per-instance, per-purpose seed: the run's seed, the instance, the purpose.
fn seed_for(seed: u64, instance: usize, purpose: u64) -> u64 {
    seed ^ (instance as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose.rotate_left(48)
}

/// Starts instance `i`: its discovery task, its lock loop and a watcher of its `ready` watch.
fn start_instance(shared: &Shared, i: usize) {
    let seed = shared.world.seed;
    let random = |purpose| Arc::new(SeededRandom::new(seed_for(seed, i, purpose)));
    // A stand-in's client: its own seed, the SDK's attempts, a latency range in seconds.
    let client = |purpose, attempts, latency| {
        Client::new(
            shared.world.clone(),
            seed_for(seed, i, purpose),
            attempts,
            latency,
        )
    };
    let identity = InstanceIdentity {
        instance_id: format!("i-{i:017x}"),
        region: REGION.into(),
        role: shared.role.clone(),
        assumed_with: None,
    };
    let world = shared.world.clone();
    let sdk = world.sdk;
    let (s3, ec2) = match shared.source {
        Source::S3 => {
            let store = SimS3 {
                client: client(3, sdk.s3, (0.010, 0.050)),
            };
            let s3_config = shared.config.discovery.s3.clone();
            let source = s3_config.map(|c| {
                Arc::new(credlock::discovery::s3::S3Source::new(
                    Arc::new(store),
                    c,
                    false,
                ))
            });
            (source, None)
        }
        Source::Ec2 => {
            let api = SimEc2 {
                client: client(4, sdk.ec2, (0.050, 0.200)),
            };
            (
                None,
                Some(Arc::new(api) as Arc<dyn credlock::discovery::ec2::Ec2Api>),
            )
        }
    };
    let store = Arc::new(CredentialStore::default());
    world.started(i, store.clone());
    let (env_tx, env_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let discoverer = Discoverer {
        context: Context {
            imds: shared.imds.clone(),
            http: shared.http.clone(),
            config: shared.config.discovery.clone(),
            identity: identity.clone(),
            ec2,
            s3,
            host: None,
        },
        metrics: shared.metrics.clone(),
        clock: shared.clock.clone(),
        publish: env_tx,
        status: Arc::new(ArcSwap::from_pointee(Vec::new())),
        random: random(1),
    };
    let locker = Locker {
        issuer: SimSts {
            client: client(5, sdk.sts, (0.050, 0.200)),
            index: i,
        },
        instance: SimInstance(identity),
        store,
        metrics: shared.series.clone(),
        clock: shared.clock.clone(),
        config: shared.config.lock.clone(),
        template: shared.template.clone(),
        environment: env_rx,
        recheck: shared.config.discovery.interval,
        status: Arc::new(ArcSwap::from_pointee(LockStatus::default())),
        ready: ready_tx,
        also_deny: Vec::new(),
        on_identity: None,
        random: random(2),
    };
    tokio::spawn(discoverer.run(shared.shutdown.clone()));
    tokio::spawn(locker.run(shared.shutdown.clone()));
    tokio::spawn(async move {
        if ready_rx.wait_for(|ready| *ready).await.is_ok() {
            world.ready(i);
        }
    });
}

async fn sleep_until(world: &World, t: f64) {
    tokio::time::sleep_until(world.epoch + Duration::from_secs_f64(t.max(0.0))).await;
}

/// The wall-clock time at virtual zero (any fixed time: the run must not depend on today).
const WALL_EPOCH_SECS: u64 = 1_800_000_000;

/// Runs one scenario to its end; the caller's runtime must have a paused clock.
pub async fn simulate(scenario: &Scenario, params: &Params) -> Result<report::Raw, String> {
    let config = credlock::config::from_toml(
        &config_text(scenario.source),
        &credlock::config::Overrides::default(),
    )
    .map_err(|e| e.to_string())?;
    let template = credlock::policy::parse_template(credlock::policy::BUILTIN_TEMPLATE)
        .map_err(|e| e.to_string())?;
    let upstream = config.upstream.clone();
    let wall_epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(WALL_EPOCH_SECS);
    let mut world = World::new(
        params.instances,
        Quotas::aws(params.quota_scale),
        params.sdk,
        params.seed,
        base_environment(),
        wall_epoch,
        (
            BUCKET.to_string(),
            format!("environment/{ACCOUNT}/{REGION}.json"),
            BUCKET_OWNER.to_string(),
        ),
        config.lock.serve_margin.as_secs_f64(),
        (BACKOFF_MIN_S, backoff_max_s),
    );
    let mut changed = None;
    match scenario.event {
        Event::None => {}
        Event::StsOutage { from, to } => world.outage = Some((from, to)),
        Event::AddAddress { at } => {
            let mut env = base_environment();
            env.add_ip(ADDED);
            world.change = Some(Change {
                at,
                policy_has: Some(format!("\"{ADDED}/32\"")),
                policy_lacks: None,
            });
            changed = Some((at, env));
        }
        Event::RemoveAddress { at } => {
            let mut env = base_environment();
            env.ipv4.retain(|n| n.addr().to_string() != REMOVED);
            world.change = Some(Change {
                at,
                policy_has: None,
                policy_lacks: Some(format!("\"{REMOVED}/32\"")),
            });
            changed = Some((at, env));
        }
    }
    let world = Arc::new(world);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let shared = Shared {
        world: world.clone(),
        template,
        clock: Arc::new(TokioClock::new(wall_epoch)),
        series: metrics.lock_series(None),
        metrics,
        imds: Arc::new(Imds::new(credlock::upstream::UpstreamClient::new(
            &upstream,
            config.upstream_timeout,
        ))),
        http: reqwest::Client::new(),
        role: RoleArn::derived("aws", ACCOUNT, "fleet-app"),
        source: scenario.source,
        shutdown: shutdown_rx,
        config,
    };

    // Start times, drawn from the run's own generator, in order.
    let starts_random = SeededRandom::new(params.seed);
    let mut starts: Vec<(f64, usize)> = (0..params.instances)
        .map(|i| {
            use credlock::clock::Random;
            (starts_random.unit() * scenario.boot_window, i)
        })
        .collect();
    starts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let launcher_world = world.clone();
    tokio::spawn(async move {
        for (at, i) in starts {
            sleep_until(&launcher_world, at).await;
            start_instance(&shared, i);
        }
        // `shared` lives as long as the launcher: keep it until the run ends.
        std::future::pending::<()>().await;
    });

    if let Some((at, env)) = changed {
        let w = world.clone();
        tokio::spawn(async move {
            sleep_until(&w, at).await;
            w.publish(env);
        });
    }

    // The served-set sampler: about 1,500 samples over the window, 5-60 s apart.
    let (from, to) = scenario.window;
    let period = ((to - from) / 1500.0).clamp(5.0, 60.0);
    let sampler_world = world.clone();
    tokio::spawn(async move {
        let mut t = from;
        while t < to {
            sleep_until(&sampler_world, t).await;
            sampler_world.sample();
            t += period;
        }
    });

    sleep_until(&world, scenario.run_for).await;
    let _ = shutdown_tx.send(true);
    Ok(report::Raw {
        recorded: world.take(scenario.run_for),
        quotas: world.quotas,
        sample_period: period,
    })
}

/// Runs one scenario on a fresh current-thread runtime with a paused clock, measuring wall
/// time and the process's peak RSS.
pub fn run(scenario: &Scenario, params: &Params) -> Result<Report, String> {
    reset_peak_rss();
    let wall = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build the runtime: {e}"))?;
    let raw = runtime.block_on(simulate(scenario, params))?;
    let peak_rss_mb = peak_rss_kb().map(|kb| kb as f64 / 1024.0);
    drop(runtime);
    Ok(Report::new(
        scenario,
        params,
        raw,
        wall.elapsed().as_secs_f64(),
        peak_rss_mb,
    ))
}

/// Resets the kernel's peak-RSS mark for this process (proc(5): writing 5 to
/// `/proc/PID/clear_refs`), so each scenario reports its own peak. Best effort.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `VmHWM` (peak resident set size) from proc(5) `/proc/self/status`, in KiB.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
