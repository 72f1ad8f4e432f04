//! Counting stand-ins for STS, S3 and EC2, at the level of credlock's own traits
//! (`sts::Issuer`, `discovery::s3::ObjectStore`, `discovery::ec2::Ec2Api`), and the record of
//! everything the fleet did that the report is computed from.
//!
//! Each service enforces its account quota as a token bucket and refuses a call when the
//! bucket is empty, so throttling feeds back into credlock's behaviour as it would in AWS:
//! - STS: 600 requests per second per account and Region, shared by every STS call ("IAM and
//!   AWS STS quotas", IAM User Guide); `Throttling` when exceeded. The burst is not documented;
//!   one second's worth is assumed.
//! - S3: 5,500 GET/HEAD requests per second per prefix ("Best practices design patterns:
//!   optimizing Amazon S3 performance", Amazon S3 User Guide); `SlowDown` (503) when exceeded.
//! - EC2: non-mutating actions (Describe*) share one bucket of 100 with a refill of 20 per
//!   second ("Request throttling for the Amazon EC2 API", Amazon EC2 API Reference);
//!   `RequestLimitExceeded` when empty. A throttled call takes no token.
//!
//! Each answer takes a latency drawn uniformly (STS 50-200 ms, S3 10-50 ms, EC2 50-200 ms) from
//! the calling instance's own seeded generator, so the numbers do not depend on which instance
//! happened to call first.
//!
//! Below credlock's traits sits the AWS SDK, whose standard retry mode re-sends a throttled or
//! failed call up to 3 attempts in all, after min(1 s × 2^(n-1), 20 s) × a random fraction, while
//! its per-client retry quota (500 tokens, 5 per retry, refunded by a successful retry, 1 back
//! per first-try success) lasts ("Retry behavior", AWS SDKs and Tools Reference Guide). The
//! stand-ins model it per service with the attempt counts production configures
//! ([`SdkAttempts`]: today 1 for STS and S3, whose SDK retries credlock turns off, 3 for EC2),
//! so the rates are what each AWS API would see.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use credlock::clock::{Random, SeededRandom};
use credlock::credentials::{CredentialStore, LockedCredentials, Secret};
use credlock::discovery::ec2::{Ec2Api, Ec2Error};
use credlock::discovery::s3::{BoxFuture, Fetched, GetRequest, ObjectStore};
use credlock::environment::Environment;
use credlock::identity::InstanceIdentity;
use credlock::imds::{Imds, ImdsError};
use credlock::refresh::InstanceSource;
use credlock::sts::{AssumeRequest, Issued, Issuer, StsError, StsErrorCode};

/// The APIs the fleet calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    AssumeRole,
    GetObject,
    DescribeVpcs,
    DescribeVpcEndpoints,
    DescribeNatGateways,
    DescribeAddresses,
}

impl Api {
    pub const ALL: [Api; 6] = [
        Api::AssumeRole,
        Api::GetObject,
        Api::DescribeVpcs,
        Api::DescribeVpcEndpoints,
        Api::DescribeNatGateways,
        Api::DescribeAddresses,
    ];
    /// The four calls of one EC2 discovery, in the order `discovery/ec2.rs` makes them.
    pub const EC2_DISCOVERY: [Api; 4] = [
        Api::DescribeVpcs,
        Api::DescribeVpcEndpoints,
        Api::DescribeNatGateways,
        Api::DescribeAddresses,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Api::AssumeRole => "sts:AssumeRole",
            Api::GetObject => "s3:GetObject",
            Api::DescribeVpcs => "ec2:DescribeVpcs",
            Api::DescribeVpcEndpoints => "ec2:DescribeVpcEndpoints",
            Api::DescribeNatGateways => "ec2:DescribeNatGateways",
            Api::DescribeAddresses => "ec2:DescribeAddresses",
        }
    }

    pub fn index(self) -> usize {
        Api::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }

    /// Which quota bucket the call draws on.
    fn bucket(self) -> usize {
        match self {
            Api::AssumeRole => 0,
            Api::GetObject => 1,
            _ => 2,
        }
    }
}

/// A quota: `rate` tokens per second into a bucket of `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub rate: f64,
    pub burst: f64,
}

/// The three quotas, AWS's defaults times `scale` (tests run a small fleet against
/// proportionally smaller quotas, so demand over quota is what a large fleet meets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quotas {
    pub sts: Quota,
    pub s3: Quota,
    pub ec2: Quota,
}

impl Quotas {
    pub fn aws(scale: f64) -> Quotas {
        let q = |rate: f64, burst: f64| Quota {
            rate: rate * scale,
            burst: (burst * scale).max(1.0),
        };
        Quotas {
            sts: q(600.0, 600.0),
            s3: q(5500.0, 5500.0),
            ec2: q(20.0, 100.0),
        }
    }

    fn of(&self, bucket: usize) -> Quota {
        [self.sts, self.s3, self.ec2][bucket]
    }

    /// The sustained rate an API may be called at (its bucket's refill).
    pub fn rate(&self, api: Api) -> f64 {
        self.of(api.bucket()).rate
    }
}

/// Attempts per call the AWS SDK makes for each service (1: the SDK does not retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdkAttempts {
    pub sts: u32,
    pub s3: u32,
    pub ec2: u32,
}

struct Bucket {
    quota: Quota,
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn new(quota: Quota) -> Bucket {
        Bucket {
            quota,
            tokens: quota.burst,
            at: 0.0,
        }
    }

    fn take(&mut self, now: f64) -> bool {
        self.tokens =
            (self.tokens + (now - self.at).max(0.0) * self.quota.rate).min(self.quota.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What one attempt met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Throttled,
    /// The service did not answer (the STS outage).
    Down,
}

/// Per-second counts of one API, indexed by virtual second since the scenario began.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub calls: Vec<u32>,
    pub throttled: Vec<u32>,
    pub failed: Vec<u32>,
}

fn bump(v: &mut Vec<u32>, second: usize) {
    if v.len() <= second {
        v.resize(second + 1, 0);
    }
    v[second] += 1;
}

/// What the stand-ins know about one instance.
#[derive(Clone, Default)]
pub struct InstanceRecord {
    /// When its tasks were started (seconds since the scenario began).
    pub started: Option<f64>,
    /// When its `ready` watch turned true.
    pub ready: Option<f64>,
    /// Expiration of the last set STS issued it.
    pub expires: Option<f64>,
    /// Longest time with no servable set after its first one (issued sets back to back: a new
    /// set issued after the previous one came within the serve margin of its expiry).
    pub longest_unserved: f64,
    /// Consecutive failed AssumeRole calls, and when the last one was answered.
    pub failures: u32,
    pub failed_at: f64,
    pub last_failure_throttled: bool,
    /// First set issued for the published change.
    pub relocked: Option<f64>,
    /// An AssumeRole call failed in the outage; and the first success after it.
    pub outage_failed: bool,
    pub recovered: Option<f64>,
    /// Sampled: it served nothing while its last issued set was still within its validity.
    pub stopped_while_valid: u32,
    pub store: Option<Arc<CredentialStore>>,
}

/// The environment change a scenario publishes, and how to tell a policy locked to it.
#[derive(Debug, Clone)]
pub struct Change {
    pub at: f64,
    /// The policy text holds this (an added address) ...
    pub policy_has: Option<String>,
    /// ... or no longer holds this (a removed one).
    pub policy_lacks: Option<String>,
}

/// The S3 object: the rendered document and its ETag.
struct Object {
    etag: String,
    body: Arc<Vec<u8>>,
    environment: Environment,
}

struct State {
    buckets: [Bucket; 3],
    series: [Series; 6],
    object: Object,
    version: u32,
    instances: Vec<InstanceRecord>,
    /// Waits between a first throttled AssumeRole and the instance's next call.
    first_retry_waits: Vec<f64>,
    retries_after_failure: u64,
    /// A call made sooner after a failure than the lock loop's documented minimum back-off.
    early_retries: u64,
    /// A call made later after the n-th failure than that back-off's documented maximum.
    late_retries: u64,
}

/// Everything the stand-ins share: the quotas, the object, the records.
pub struct World {
    pub epoch: tokio::time::Instant,
    pub wall_epoch: SystemTime,
    pub quotas: Quotas,
    pub sdk: SdkAttempts,
    pub seed: u64,
    /// Seconds since the scenario began, `[from, to)`: STS answers nothing.
    pub outage: Option<(f64, f64)>,
    pub change: Option<Change>,
    /// `lock.serve_margin_seconds`.
    pub margin: f64,
    /// The lock loop's documented back-off bounds after the n-th consecutive failure.
    pub backoff_min: f64,
    pub backoff_max: fn(u32) -> f64,
    pub bucket_name: String,
    pub key: String,
    pub owner: String,
    state: Mutex<State>,
}

pub const GENERATED_AT: &str = "2027-01-15T08:00:00Z";
pub const GENERATED_BY: &str = "arn:aws:sts::111122223333:assumed-role/publisher/fleet-sim";

/// The object's ETag for version `v` (S3 quotes it: Amazon S3 API Reference, "Common Response
/// Headers": `ETag`).
fn etag(v: u32, env: &Environment) -> String {
    let sum = credlock::discovery::document::checksum(env);
    format!("\"{v}-{}\"", &sum[7..23])
}

impl World {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instances: usize,
        quotas: Quotas,
        sdk: SdkAttempts,
        seed: u64,
        environment: Environment,
        wall_epoch: SystemTime,
        (bucket_name, key, owner): (String, String, String),
        margin: f64,
        (backoff_min, backoff_max): (f64, fn(u32) -> f64),
    ) -> World {
        let body = credlock::discovery::document::render(&environment, GENERATED_AT, GENERATED_BY);
        World {
            epoch: tokio::time::Instant::now(),
            wall_epoch,
            quotas,
            sdk,
            seed,
            outage: None,
            change: None,
            margin,
            backoff_min,
            backoff_max,
            bucket_name,
            key,
            owner,
            state: Mutex::new(State {
                buckets: [
                    Bucket::new(quotas.sts),
                    Bucket::new(quotas.s3),
                    Bucket::new(quotas.ec2),
                ],
                series: Default::default(),
                object: Object {
                    etag: etag(1, &environment),
                    body: Arc::new(body),
                    environment,
                },
                version: 1,
                instances: vec![InstanceRecord::default(); instances],
                first_retry_waits: Vec::new(),
                retries_after_failure: 0,
                early_retries: 0,
                late_retries: 0,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Virtual seconds since the scenario began.
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Replaces the document (the publisher wrote a new one).
    pub fn publish(&self, environment: Environment) {
        let mut s = self.state();
        s.version += 1;
        let body = credlock::discovery::document::render(&environment, GENERATED_AT, GENERATED_BY);
        s.object = Object {
            etag: etag(s.version, &environment),
            body: Arc::new(body),
            environment,
        };
    }

    /// One attempt arrives at the service: counted, then judged.
    fn arrive(&self, api: Api) -> Outcome {
        let now = self.now();
        let second = now as usize;
        let mut s = self.state();
        let series = &mut s.series[api.index()];
        bump(&mut series.calls, second);
        if api == Api::AssumeRole && self.outage.is_some_and(|(a, b)| now >= a && now < b) {
            bump(&mut s.series[api.index()].failed, second);
            return Outcome::Down;
        }
        if s.buckets[api.bucket()].take(now) {
            Outcome::Ok
        } else {
            bump(&mut s.series[api.index()].throttled, second);
            Outcome::Throttled
        }
    }

    pub fn started(&self, i: usize, store: Arc<CredentialStore>) {
        let now = self.now();
        let mut s = self.state();
        if let Some(r) = s.instances.get_mut(i) {
            r.started = Some(now);
            r.store = Some(store);
        }
    }

    pub fn ready(&self, i: usize) {
        let now = self.now();
        if let Some(r) = self.state().instances.get_mut(i) {
            r.ready.get_or_insert(now);
        }
    }

    /// The lock loop of instance `i` calls AssumeRole: is it a retry, and did it wait?
    fn assume_called(&self, i: usize) {
        let now = self.now();
        let mut s = self.state();
        let Some(r) = s.instances.get(i) else { return };
        if r.failures == 0 {
            return;
        }
        let (failures, wait, throttled) = (r.failures, now - r.failed_at, r.last_failure_throttled);
        s.retries_after_failure += 1;
        // Timer resolution is 1 ms: allow that much either way.
        if wait + 0.001 < self.backoff_min {
            s.early_retries += 1;
        }
        if wait > (self.backoff_max)(failures) + 0.001 {
            s.late_retries += 1;
        }
        if failures == 1 && throttled {
            s.first_retry_waits.push(wait);
        }
    }

    fn assume_failed(&self, i: usize, throttled: bool) {
        let now = self.now();
        let in_outage = self.outage.is_some_and(|(a, b)| now >= a && now < b);
        if let Some(r) = self.state().instances.get_mut(i) {
            r.failures += 1;
            r.failed_at = now;
            r.last_failure_throttled = throttled;
            r.outage_failed |= in_outage;
        }
    }

    fn issued(&self, i: usize, expires: f64, policy: &str) {
        let now = self.now();
        let margin = self.margin;
        let outage_end = self.outage.map(|(_, b)| b);
        let change = self.change.as_ref().filter(|c| now >= c.at).filter(|c| {
            c.policy_has.as_ref().is_none_or(|has| policy.contains(has))
                && c.policy_lacks
                    .as_ref()
                    .is_none_or(|gone| !policy.contains(gone))
        });
        if let Some(r) = self.state().instances.get_mut(i) {
            if let Some(prev) = r.expires {
                r.longest_unserved = r.longest_unserved.max(now - (prev - margin));
            }
            r.expires = Some(expires);
            r.failures = 0;
            if change.is_some() {
                r.relocked.get_or_insert(now);
            }
            if r.outage_failed && outage_end.is_some_and(|end| now >= end) {
                r.recovered.get_or_insert(now);
            }
        }
    }

    /// Checks every instance's real credential store: one that serves nothing while the last
    /// set it was issued is still more than the margin from expiry stopped serving early.
    pub fn sample(&self) {
        let now = self.now();
        let wall = self.wall(now);
        let margin = Duration::from_secs_f64(self.margin);
        let mut s = self.state();
        for r in s.instances.iter_mut() {
            let (Some(store), Some(expires)) = (&r.store, r.expires) else {
                continue;
            };
            if now < expires - self.margin && store.servable(wall, margin).is_none() {
                r.stopped_while_valid += 1;
            }
        }
    }

    /// The wall-clock time at virtual second `t` (what credlock's injected clock reads).
    pub fn wall(&self, t: f64) -> SystemTime {
        self.wall_epoch + Duration::from_secs_f64(t.max(0.0))
    }

    /// Everything recorded, at the end (the stand-ins drop with the runtime).
    pub fn take(&self, end: f64) -> Recorded {
        let mut s = self.state();
        let margin = self.margin;
        let mut instances = std::mem::take(&mut s.instances);
        for r in &mut instances {
            // Still without a newer set at the end.
            if let Some(expires) = r.expires {
                r.longest_unserved = r.longest_unserved.max(end - (expires - margin));
            }
            r.store = None;
        }
        Recorded {
            series: std::mem::take(&mut s.series),
            instances,
            first_retry_waits: std::mem::take(&mut s.first_retry_waits),
            retries_after_failure: s.retries_after_failure,
            early_retries: s.early_retries,
            late_retries: s.late_retries,
        }
    }
}

/// What a run recorded.
pub struct Recorded {
    pub series: [Series; 6],
    pub instances: Vec<InstanceRecord>,
    pub first_retry_waits: Vec<f64>,
    pub retries_after_failure: u64,
    pub early_retries: u64,
    pub late_retries: u64,
}

/// One instance's SDK client for one service: its latency, its retries, its retry quota.
pub struct Client {
    pub world: Arc<World>,
    random: SeededRandom,
    attempts: u32,
    latency: (f64, f64),
    quota: Mutex<u32>,
}

/// The SDK's retry quota ("Retry behavior", AWS SDKs and Tools Reference Guide).
const RETRY_QUOTA: u32 = 500;
const RETRY_COST: u32 = 5;

impl Client {
    pub fn new(world: Arc<World>, seed: u64, attempts: u32, latency: (f64, f64)) -> Client {
        Client {
            world,
            random: SeededRandom::new(seed),
            attempts: attempts.max(1),
            latency,
            quota: Mutex::new(RETRY_QUOTA),
        }
    }

    async fn pause(&self, seconds: f64) {
        tokio::time::sleep(Duration::from_secs_f64(seconds.max(0.0))).await;
    }

    /// One SDK call: attempts until one succeeds, the attempts or the retry quota run out.
    async fn call(&self, api: Api) -> Outcome {
        let mut attempt = 1u32;
        loop {
            let outcome = self.world.arrive(api);
            let (lo, hi) = self.latency;
            self.pause(lo + (hi - lo) * self.random.unit()).await;
            let mut quota = *self.quota.lock().unwrap_or_else(|e| e.into_inner());
            if outcome == Outcome::Ok {
                quota = (quota + if attempt > 1 { RETRY_COST } else { 1 }).min(RETRY_QUOTA);
                *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = quota;
                return outcome;
            }
            if attempt >= self.attempts || quota < RETRY_COST {
                return outcome;
            }
            *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = quota - RETRY_COST;
            let cap = 2f64.powi(attempt as i32 - 1).min(20.0);
            self.pause(cap * self.random.unit()).await;
            attempt += 1;
        }
    }
}

/// STS for one instance.
pub struct SimSts {
    pub client: Client,
    pub index: usize,
}

impl Issuer for SimSts {
    async fn assume(&self, request: &AssumeRequest) -> Result<Issued, StsError> {
        let world = &self.client.world;
        world.assume_called(self.index);
        match self.client.call(Api::AssumeRole).await {
            Outcome::Ok => {
                let now = world.now();
                let expires = now + request.duration.as_secs_f64();
                world.issued(self.index, expires, &request.policy);
                Ok(Issued {
                    credentials: LockedCredentials::new(
                        format!("ASIAFLEETSIM{:08}", self.index),
                        Secret::new("simulated-secret"),
                        Secret::new("simulated-token"),
                        world.wall(expires),
                        world.wall(now),
                    ),
                    packed_policy_percent: Some(30),
                })
            }
            Outcome::Throttled => {
                world.assume_failed(self.index, true);
                Err(StsError {
                    code: StsErrorCode::Throttling,
                    message: "Throttling: Rate exceeded".into(),
                })
            }
            Outcome::Down => {
                world.assume_failed(self.index, false);
                Err(StsError {
                    code: StsErrorCode::Unreachable,
                    message: "cannot reach STS: connection refused (simulated outage)".into(),
                })
            }
        }
    }
}

/// S3 for one instance: the object, its ETag, 304 for a matching `If-None-Match`.
pub struct SimS3 {
    pub client: Client,
}

impl ObjectStore for SimS3 {
    fn get<'a>(&'a self, request: &'a GetRequest) -> BoxFuture<'a, Result<Fetched, String>> {
        Box::pin(async move {
            let world = &self.client.world;
            match self.client.call(Api::GetObject).await {
                Outcome::Ok => {}
                Outcome::Throttled => {
                    return Err("SlowDown: Please reduce your request rate. (503)".into());
                }
                Outcome::Down => return Err("S3 did not answer".into()),
            }
            if request.bucket != world.bucket_name || request.expected_bucket_owner != world.owner {
                return Err("AccessDenied: Access Denied (403)".into());
            }
            if request.key != world.key {
                return Err("NoSuchKey: The specified key does not exist. (404)".into());
            }
            let s = world.state();
            if request.if_none_match.as_deref() == Some(s.object.etag.as_str()) {
                return Ok(Fetched::NotModified);
            }
            Ok(Fetched::Object {
                etag: Some(s.object.etag.clone()),
                body: s.object.body.as_ref().clone(),
            })
        })
    }
}

/// EC2 for one instance: one discovery is the four Describe calls, each on the shared bucket;
/// the first refused one fails the discovery, as an SDK error does in `discovery/ec2.rs`.
pub struct SimEc2 {
    pub client: Client,
}

impl Ec2Api for SimEc2 {
    fn discover<'a>(
        &'a self,
        _scope: &'a credlock::config::Ec2Scope,
        _imds: &'a Imds,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Environment, Ec2Error>> + Send + 'a>,
    > {
        Box::pin(async move {
            for api in Api::EC2_DISCOVERY {
                let message = match self.client.call(api).await {
                    Outcome::Ok => continue,
                    Outcome::Throttled => "RequestLimitExceeded: Request limit exceeded.",
                    Outcome::Down => "no answer",
                };
                return Err(Ec2Error::Api {
                    call: api.name().trim_start_matches("ec2:"),
                    message: message.into(),
                });
            }
            Ok(self.client.world.state().object.environment.clone())
        })
    }
}

/// The instance's identity, as IMDS would tell it.
pub struct SimInstance(pub InstanceIdentity);

impl InstanceSource for SimInstance {
    async fn identity(&self) -> Result<InstanceIdentity, ImdsError> {
        Ok(self.0.clone())
    }
}
