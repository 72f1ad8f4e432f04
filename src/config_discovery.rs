//! `[discovery]`: which sources find the environment the lock allows, and how often
//! (`crate::discovery`).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, check_url, invalid, is_aws_id, millis};

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub interval: Duration,
    pub imds: bool,
    pub echo_urls: Vec<String>,
    pub echo_timeout: Duration,
    pub ec2: Option<Ec2Scope>,
    pub ec2_interval: Duration,
    /// An EC2 endpoint URL; `None`: the SDK's regional one, or `AWS_ENDPOINT_URL_EC2`.
    pub ec2_endpoint: Option<String>,
    pub boot_provider: Option<String>,
    /// The `s3` source: an environment document published once for the account and Region.
    pub s3: Option<S3Config>,
    pub static_env: StaticEnvironment,
    /// Accept prefixes wider than /16 (IPv4) or /32 (IPv6) from static or boot-provider
    /// sources.
    pub allow_wide_prefixes: bool,
}

/// Where the `s3` source reads the environment document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// The object key; `{account}`, `{region}` and `{vpc}` are replaced by the instance's
    /// account, Region and VPC (so one AMI's config fits every account).
    pub key: String,
    /// The account that must own the bucket (S3's `x-amz-expected-bucket-owner`): a bucket of
    /// the same name in another account is never read.
    pub expected_bucket_owner: String,
    /// The bucket's Region; `None`: the instance's.
    pub region: Option<String>,
    /// An S3 endpoint URL; `None`: the SDK's regional one, or `AWS_ENDPOINT_URL_S3`.
    pub endpoint: Option<String>,
    /// Poll period (default: `discovery.interval_seconds`), with the sources' ±10 % jitter.
    pub interval: Duration,
}

/// How wide the EC2 API source looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Scope {
    /// The instance's own VPCs only (read from IMDS).
    Vpc,
    /// These VPCs: `credlock publish-environment --scope vpc --vpc ...`, which runs on a
    /// management host and so cannot read the VPCs it describes from its own IMDS.
    Vpcs(Vec<String>),
    /// Every VPC of the account in the region.
    Region,
    /// VPCs carrying this tag (and value, when given).
    Tagged { key: String, value: Option<String> },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StaticEnvironment {
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
    pub vpcs: Vec<String>,
    pub vpc_endpoints: Vec<String>,
}

// ---- the file format ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DiscoverySection {
    interval_seconds: Option<u64>,
    allow_wide_prefixes: Option<bool>,
    imds: ToggleSection,
    echo: EchoSection,
    ec2: Ec2Section,
    boot_provider: BootProviderSection,
    s3: S3Section,
    #[serde(rename = "static")]
    static_env: StaticEnvironment,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ToggleSection {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EchoSection {
    enabled: Option<bool>,
    urls: Option<Vec<String>>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Ec2Section {
    enabled: Option<bool>,
    scope: Option<String>,
    tag_key: Option<String>,
    tag_value: Option<String>,
    interval_seconds: Option<u64>,
    endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BootProviderSection {
    enabled: Option<bool>,
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct S3Section {
    enabled: Option<bool>,
    bucket: Option<String>,
    key: Option<String>,
    expected_bucket_owner: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    interval_seconds: Option<u64>,
}

fn validate_s3(s: S3Section, interval: u64) -> Result<S3Config, ConfigError> {
    let required = |key: &str, v: Option<String>| {
        v.ok_or_else(|| invalid(key, "", "is required when the s3 source is enabled"))
    };
    let bucket = required("discovery.s3.bucket", s.bucket)?;
    // Bucket naming rules (Amazon S3 User Guide, "General purpose bucket naming rules"):
    // 3-63 characters, lowercase letters, digits, dots and hyphens, starting and ending with a
    // letter or digit.
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        || !edge(bucket.chars().next())
        || !edge(bucket.chars().last())
    {
        return Err(invalid(
            "discovery.s3.bucket",
            &bucket,
            "is not an S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)",
        ));
    }
    let key = required("discovery.s3.key", s.key)?;
    // Object keys are at most 1,024 bytes of UTF-8 (Amazon S3 User Guide, "Naming objects").
    if key.is_empty() || key.len() > 1024 || key.chars().any(char::is_control) {
        return Err(invalid(
            "discovery.s3.key",
            &key,
            "must be 1-1024 bytes without control characters",
        ));
    }
    let owner = required(
        "discovery.s3.expected_bucket_owner",
        s.expected_bucket_owner,
    )?;
    if owner.len() != 12 || !owner.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "discovery.s3.expected_bucket_owner",
            &owner,
            "must be the 12-digit account ID that owns the bucket",
        ));
    }
    if let Some(url) = &s.endpoint {
        check_url("discovery.s3.endpoint", url)?;
    }
    let poll = s.interval_seconds.unwrap_or(interval);
    if !(5..=86_400).contains(&poll) {
        return Err(invalid(
            "discovery.s3.interval_seconds",
            poll,
            "must be between 5 and 86400",
        ));
    }
    Ok(S3Config {
        bucket,
        key,
        expected_bucket_owner: owner,
        region: s.region,
        endpoint: s.endpoint,
        interval: Duration::from_secs(poll),
    })
}

pub(super) fn validate_discovery(d: DiscoverySection) -> Result<DiscoveryConfig, ConfigError> {
    let interval = d.interval_seconds.unwrap_or(300);
    if !(5..=86_400).contains(&interval) {
        return Err(invalid(
            "discovery.interval_seconds",
            interval,
            "must be between 5 and 86400",
        ));
    }
    let echo_urls = if d.echo.enabled.unwrap_or(true) {
        d.echo
            .urls
            .unwrap_or_else(|| vec!["https://checkip.amazonaws.com".into()])
    } else {
        Vec::new()
    };
    for url in &echo_urls {
        check_url("discovery.echo.urls", url)?;
    }
    let echo_timeout = millis(
        "discovery.echo.timeout_ms",
        d.echo.timeout_ms.unwrap_or(3000),
        100..=60_000,
    )?;
    let ec2 = if d.ec2.enabled.unwrap_or(false) {
        let scope = d.ec2.scope.unwrap_or_else(|| "vpc".into());
        Some(match scope.as_str() {
            "vpc" => Ec2Scope::Vpc,
            "region" => Ec2Scope::Region,
            "tagged" => Ec2Scope::Tagged {
                key: d.ec2.tag_key.ok_or_else(|| {
                    invalid(
                        "discovery.ec2.tag_key",
                        "",
                        "is required with scope = \"tagged\"",
                    )
                })?,
                value: d.ec2.tag_value,
            },
            _ => {
                return Err(invalid(
                    "discovery.ec2.scope",
                    scope,
                    "must be \"vpc\", \"region\" or \"tagged\"",
                ));
            }
        })
    } else {
        None
    };
    let ec2_interval = d.ec2.interval_seconds.unwrap_or(3600);
    if !(60..=86_400).contains(&ec2_interval) {
        return Err(invalid(
            "discovery.ec2.interval_seconds",
            ec2_interval,
            "must be between 60 and 86400",
        ));
    }
    if let Some(url) = &d.ec2.endpoint {
        check_url("discovery.ec2.endpoint", url)?;
    }
    let boot_provider = if d.boot_provider.enabled.unwrap_or(false) {
        let url = d.boot_provider.url.ok_or_else(|| {
            invalid(
                "discovery.boot_provider.url",
                "",
                "is required when the source is enabled",
            )
        })?;
        check_url("discovery.boot_provider.url", &url)?;
        Some(url)
    } else {
        None
    };
    let s3 = if d.s3.enabled.unwrap_or(false) {
        Some(validate_s3(d.s3, interval)?)
    } else {
        None
    };
    let s = &d.static_env;
    let allow_wide_prefixes = d.allow_wide_prefixes.unwrap_or(false);
    for v in &s.ipv4 {
        if v.parse::<ipnet::Ipv4Net>().is_err() && v.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(invalid(
                "discovery.static.ipv4",
                v,
                "not an IPv4 address or CIDR",
            ));
        }
        crate::environment::check_prefix_text(v, allow_wide_prefixes)
            .map_err(|why| invalid("discovery.static.ipv4", v, &why))?;
    }
    for v in &s.ipv6 {
        if v.parse::<ipnet::Ipv6Net>().is_err() && v.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid(
                "discovery.static.ipv6",
                v,
                "not an IPv6 address or CIDR",
            ));
        }
        crate::environment::check_prefix_text(v, allow_wide_prefixes)
            .map_err(|why| invalid("discovery.static.ipv6", v, &why))?;
    }
    for v in &s.vpcs {
        if !is_aws_id(v, "vpc-") {
            return Err(invalid(
                "discovery.static.vpcs",
                v,
                "not a VPC ID (vpc-xxxxxxxx)",
            ));
        }
    }
    for v in &s.vpc_endpoints {
        if !is_aws_id(v, "vpce-") {
            return Err(invalid(
                "discovery.static.vpc_endpoints",
                v,
                "not a VPC endpoint ID (vpce-xxxxxxxx)",
            ));
        }
    }
    Ok(DiscoveryConfig {
        interval: Duration::from_secs(interval),
        imds: d.imds.enabled.unwrap_or(true),
        echo_urls,
        echo_timeout,
        ec2,
        ec2_interval: Duration::from_secs(ec2_interval),
        ec2_endpoint: d.ec2.endpoint,
        boot_provider,
        s3,
        static_env: d.static_env,
        allow_wide_prefixes,
    })
}
