//! Environment discovery: each enabled source on its own schedule, each keeping its last known
//! value when it fails, merged into one [`Environment`] published to the lock loop whenever it
//! changes. Until some source has answered, nothing is published: credlock never locks to an
//! empty or made-up environment.

pub mod boot_provider;
pub mod document;
pub mod ec2;
pub mod echo;
pub mod imds;
pub mod s3;
pub mod s3_sdk;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::clock::{Clock, Random};
use crate::config::{DiscoveryConfig, StaticEnvironment};
use crate::credentials::imds_timestamp;
use crate::environment::Environment;
use crate::identity::InstanceIdentity;
use crate::imds::Imds;
use crate::metrics::Metrics;
use crate::refresh::backoff;

/// The sources, in the order `credlock discover` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Imds,
    Echo,
    Ec2,
    BootProvider,
    S3,
    Static,
}

impl SourceKind {
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Imds => "imds",
            SourceKind::Echo => "echo",
            SourceKind::Ec2 => "ec2",
            SourceKind::BootProvider => "boot_provider",
            SourceKind::S3 => "s3",
            SourceKind::Static => "static",
        }
    }
}

/// What one source last found, for `/status` and `credlock discover`.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub source: SourceKind,
    pub environment: Option<Environment>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// The `s3` source: the document it serves from (key, ETag, generated_at/by, checksum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<s3::DocumentInfo>,
}

/// Everything a source may need. The EC2 and S3 clients are built once the identity (Region)
/// is known; both are traits, so the fleet simulation can count their calls.
pub struct Context {
    pub imds: Arc<Imds>,
    pub http: reqwest::Client,
    pub config: DiscoveryConfig,
    pub identity: InstanceIdentity,
    pub ec2: Option<Arc<dyn ec2::Ec2Api>>,
    pub s3: Option<Arc<s3::S3Source>>,
    /// Off an instance (`credlock credentials` on another host): its name, which the boot
    /// provider is told instead of an instance identity document; `None` on an instance.
    pub host: Option<String>,
}

/// Why one run of a source found nothing (the source keeps its last known environment).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the {} source is not configured", .0.label())]
    NotConfigured(SourceKind),
    #[error(transparent)]
    Metadata(#[from] imds::MetadataError),
    #[error(transparent)]
    Echo(#[from] echo::EchoError),
    #[error(transparent)]
    Ec2(#[from] ec2::Ec2Error),
    #[error(transparent)]
    BootProvider(#[from] boot_provider::BootProviderError),
    #[error(transparent)]
    S3(#[from] s3::S3Error),
    /// A configured prefix wider than the caps without `allow_wide_prefixes`.
    #[error("{0}")]
    Static(String),
}

/// Runs one source once.
pub async fn run_source(kind: SourceKind, ctx: &Context) -> Result<Environment, SourceError> {
    let not_configured = || SourceError::NotConfigured(kind);
    Ok(match kind {
        SourceKind::Imds => imds::discover(&ctx.imds).await?,
        SourceKind::Echo => echo::discover(&ctx.http, &ctx.config.echo_urls).await?,
        SourceKind::Ec2 => match (&ctx.ec2, &ctx.config.ec2) {
            (Some(client), Some(scope)) => client.discover(scope, &ctx.imds).await?,
            _ => return Err(not_configured()),
        },
        SourceKind::BootProvider => {
            let url = ctx
                .config
                .boot_provider
                .as_ref()
                .ok_or_else(not_configured)?;
            let (identity, wide) = (&ctx.identity, ctx.config.allow_wide_prefixes);
            let asker = match &ctx.host {
                Some(host) => boot_provider::Asker::Host(host),
                None => boot_provider::Asker::Instance(&ctx.imds),
            };
            boot_provider::discover(&ctx.http, url, identity, asker, wide).await?
        }
        SourceKind::S3 => {
            let source = ctx.s3.as_ref().ok_or_else(not_configured)?;
            source.discover(&ctx.identity, &ctx.imds).await?
        }
        SourceKind::Static => {
            static_environment(&ctx.config.static_env, ctx.config.allow_wide_prefixes)
                .map_err(SourceError::Static)?
        }
    })
}

/// The configured static additions (validated with the config), or a boot provider's
/// document: prefixes wider than the caps are refused unless `allow_wide`.
pub fn static_environment(s: &StaticEnvironment, allow_wide: bool) -> Result<Environment, String> {
    let mut env = Environment::default();
    for ip in s.ipv4.iter().chain(&s.ipv6) {
        env.add_prefix(ip, allow_wide)?;
    }
    env.vpcs.extend(s.vpcs.iter().cloned());
    env.vpc_endpoints.extend(s.vpc_endpoints.iter().cloned());
    Ok(env)
}

/// The enabled sources for a configuration.
pub fn enabled_sources(config: &DiscoveryConfig) -> Vec<SourceKind> {
    let mut kinds = Vec::new();
    if config.imds {
        kinds.push(SourceKind::Imds);
    }
    if !config.echo_urls.is_empty() {
        kinds.push(SourceKind::Echo);
    }
    if config.ec2.is_some() {
        kinds.push(SourceKind::Ec2);
    }
    if config.boot_provider.is_some() {
        kinds.push(SourceKind::BootProvider);
    }
    if config.s3.is_some() {
        kinds.push(SourceKind::S3);
    }
    let s = &config.static_env;
    if !(s.ipv4.is_empty() && s.ipv6.is_empty() && s.vpcs.is_empty() && s.vpc_endpoints.is_empty())
    {
        kinds.push(SourceKind::Static);
    }
    kinds
}

struct SourceState {
    kind: SourceKind,
    interval: Duration,
    next_run: SystemTime,
    status: SourceStatus,
}

/// The discovery task.
pub struct Discoverer {
    pub context: Context,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub publish: watch::Sender<Option<Arc<Environment>>>,
    pub status: Arc<ArcSwap<Vec<SourceStatus>>>,
    /// Jitter of polls and retries (seeded in the fleet simulation).
    pub random: Arc<dyn Random>,
}

impl Discoverer {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let now = self.clock.now();
        let mut sources: Vec<SourceState> = enabled_sources(&self.context.config)
            .into_iter()
            .map(|kind| SourceState {
                kind,
                interval: match kind {
                    SourceKind::Ec2 => self.context.config.ec2_interval,
                    SourceKind::S3 => (self.context.config.s3.as_ref())
                        .map_or(self.context.config.interval, |s| s.interval),
                    _ => self.context.config.interval,
                },
                next_run: now,
                status: SourceStatus {
                    source: kind,
                    environment: None,
                    last_success: None,
                    last_error: None,
                    consecutive_failures: 0,
                    document: None,
                },
            })
            .collect();
        if sources.is_empty() {
            tracing::error!("no discovery source is enabled: credlock cannot lock credentials");
        }
        loop {
            let now = self.clock.now();
            for source in sources.iter_mut().filter(|s| s.next_run <= now) {
                self.run_one(source).await;
            }
            self.publish_merged(&sources);
            let next = sources.iter().map(|s| s.next_run).min();
            let wait = next
                .and_then(|n| n.duration_since(self.clock.now()).ok())
                .unwrap_or(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn run_one(&self, source: &mut SourceState) {
        let label = source.kind.label();
        let result = run_source(source.kind, &self.context).await;
        if source.kind == SourceKind::S3 {
            source.status.document = self.context.s3.as_ref().and_then(|s| s.info());
        }
        let now = self.clock.now();
        match result {
            Ok(env) => {
                if source.status.environment.as_ref() != Some(&env) {
                    tracing::info!(source = label, environment = ?env, "discovered");
                }
                source.status.environment = Some(env);
                source.status.last_success = Some(imds_timestamp(now));
                source.status.consecutive_failures = 0;
                // ±10 % so a fleet does not poll in step.
                let jitter = 0.9 + 0.2 * self.random.unit();
                source.next_run = now + source.interval.mul_f64(jitter);
                self.metrics
                    .discovery_runs
                    .with_label_values(&[label, "success"])
                    .inc();
                let unix = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                self.metrics
                    .discovery_last_success
                    .with_label_values(&[label])
                    .set(unix);
            }
            Err(e) => {
                source.status.consecutive_failures += 1;
                let retry = backoff(source.status.consecutive_failures, self.random.unit())
                    .max(Duration::from_secs(2))
                    .min(source.interval);
                source.next_run = now + retry;
                tracing::warn!(
                    source = label,
                    error = %e,
                    retry_in = ?retry,
                    keeping_last_known = source.status.environment.is_some(),
                    "discovery source failed"
                );
                source.status.last_error = Some(format!("{} {e}", imds_timestamp(now)));
                self.metrics
                    .discovery_runs
                    .with_label_values(&[label, "failure"])
                    .inc();
            }
        }
    }

    fn publish_merged(&self, sources: &[SourceState]) {
        self.status
            .store(Arc::new(sources.iter().map(|s| s.status.clone()).collect()));
        let mut merged = Environment::default();
        let mut any = false;
        for env in sources.iter().filter_map(|s| s.status.environment.as_ref()) {
            any = true;
            merged.merge(env);
        }
        if !any {
            return;
        }
        for (kind, n) in [
            ("ipv4", merged.ipv4.len()),
            ("ipv6", merged.ipv6.len()),
            ("vpc", merged.vpcs.len()),
            ("vpce", merged.vpc_endpoints.len()),
        ] {
            self.metrics
                .environment_entries
                .with_label_values(&[kind])
                .set(n as i64);
        }
        self.publish.send_if_modified(|current| {
            if current.as_deref() == Some(&merged) {
                false
            } else {
                tracing::info!(environment = ?merged, "environment changed");
                *current = Some(Arc::new(merged));
                true
            }
        });
    }
}

/// The discovery sources' shared clients. The EC2 and S3 clients use the instance role's own
/// credentials (never the locked ones, which the lock may not let reach them).
pub async fn context(
    config: &crate::config::Config,
    imds: Arc<Imds>,
    identity: InstanceIdentity,
    source: aws_credential_types::provider::SharedCredentialsProvider,
) -> Context {
    let http = reqwest::Client::builder()
        .timeout(config.discovery.echo_timeout)
        .user_agent(concat!("credlock/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot build the HTTPS client; echo and boot-provider sources will fail");
            reqwest::Client::new()
        });
    let ec2 = match config.discovery.ec2 {
        Some(_) => {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(identity.region.clone()))
                .credentials_provider(source.clone());
            if let Some(url) = &config.discovery.ec2_endpoint {
                loader = loader.endpoint_url(url);
            }
            let sdk = loader.load().await;
            Some(Arc::new(aws_sdk_ec2::Client::new(&sdk)) as Arc<dyn ec2::Ec2Api>)
        }
        None => None,
    };
    let s3 = match &config.discovery.s3 {
        Some(s3) => {
            // The bucket's Region when given (one bucket serving a fleet in several Regions),
            // else the instance's.
            let region = s3.region.clone().unwrap_or_else(|| identity.region.clone());
            let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(region))
                .credentials_provider(source)
                .load()
                .await;
            let store = s3_sdk::SdkObjectStore {
                client: s3_sdk::client(&sdk, s3.endpoint.as_deref(), false),
            };
            Some(Arc::new(s3::S3Source::new(
                Arc::new(store),
                s3.clone(),
                config.discovery.allow_wide_prefixes,
            )))
        }
        None => None,
    };
    Context {
        imds,
        http,
        config: config.discovery.clone(),
        identity,
        ec2,
        s3,
        host: None,
    }
}
