//! `credlock publish-environment`: on a management host, the account's environment computed
//! with the ec2 source's code and written to S3 when it changed (`crate::publish`).

use std::process::ExitCode;

use clap::Args;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PublishScope {
    /// The VPCs named with --vpc
    Vpc,
    /// Every VPC of the account in the Region
    Region,
    /// The VPCs carrying --tag-key (with --tag-value, when given)
    Tagged,
}

#[derive(Args)]
pub struct PublishArgs {
    /// The bucket the instances read
    #[arg(long, env = "CREDLOCK_PUBLISH_BUCKET", value_name = "BUCKET")]
    pub bucket: String,
    /// The object key; {account}, {region} and {vpc} are filled in ({vpc}: one document per --vpc)
    #[arg(long, env = "CREDLOCK_PUBLISH_KEY", value_name = "KEY")]
    pub key: String,
    /// The account that must own the bucket [default: the caller's]
    #[arg(
        long,
        env = "CREDLOCK_PUBLISH_EXPECTED_BUCKET_OWNER",
        value_name = "ACCOUNT"
    )]
    pub expected_bucket_owner: Option<String>,
    /// The Region to describe and write to [default: the SDK's, e.g. AWS_REGION]
    #[arg(long, env = "CREDLOCK_PUBLISH_REGION", value_name = "REGION")]
    pub region: Option<String>,
    /// Which VPCs the environment covers, as the ec2 source's scope
    #[arg(long, value_enum, env = "CREDLOCK_PUBLISH_SCOPE")]
    pub scope: PublishScope,
    /// A VPC of the vpc scope (repeatable; a publisher does not read its own VPC from IMDS)
    #[arg(
        long = "vpc",
        value_name = "VPC-ID",
        env = "CREDLOCK_PUBLISH_VPCS",
        value_delimiter = ','
    )]
    pub vpcs: Vec<String>,
    /// The tag of the tagged scope
    #[arg(long, env = "CREDLOCK_PUBLISH_TAG_KEY", value_name = "KEY")]
    pub tag_key: Option<String>,
    /// The tag's value [default: any value]
    #[arg(long, env = "CREDLOCK_PUBLISH_TAG_VALUE", value_name = "VALUE")]
    pub tag_value: Option<String>,
    /// An IPv4 address or CIDR added to every document (repeatable), e.g. a shared egress proxy
    #[arg(
        long,
        value_name = "CIDR",
        env = "CREDLOCK_PUBLISH_IPV4",
        value_delimiter = ','
    )]
    ipv4: Vec<String>,
    /// An IPv6 address or CIDR added to every document (repeatable)
    #[arg(
        long,
        value_name = "CIDR",
        env = "CREDLOCK_PUBLISH_IPV6",
        value_delimiter = ','
    )]
    ipv6: Vec<String>,
    /// EC2 endpoint URL [default: the SDK's, or AWS_ENDPOINT_URL_EC2]
    #[arg(long, value_name = "URL")]
    ec2_endpoint: Option<String>,
    /// S3 endpoint URL, path-style addressing [default: the SDK's, or AWS_ENDPOINT_URL_S3]
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// STS endpoint URL [default: the SDK's, or AWS_ENDPOINT_URL_STS]
    #[arg(long, value_name = "URL")]
    pub sts_endpoint: Option<String>,
}

pub fn publish_environment(args: PublishArgs) -> ExitCode {
    use crate::config::{Ec2Scope, StaticEnvironment};
    use crate::publish::{self, Options};
    let filter = std::env::var("CREDLOCK_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let usage = |e: String| {
        eprintln!("credlock: {e}");
        ExitCode::from(2)
    };
    let scope = match args.scope {
        PublishScope::Vpc => Ec2Scope::Vpcs(args.vpcs.clone()),
        PublishScope::Region => Ec2Scope::Region,
        PublishScope::Tagged => match &args.tag_key {
            Some(key) => Ec2Scope::Tagged {
                key: key.clone(),
                value: args.tag_value.clone(),
            },
            None => return usage("--scope tagged needs --tag-key".into()),
        },
    };
    if !matches!(args.scope, PublishScope::Vpc) && !args.vpcs.is_empty() {
        return usage("--vpc is for --scope vpc".into());
    }
    if !matches!(args.scope, PublishScope::Tagged)
        && (args.tag_key.is_some() || args.tag_value.is_some())
    {
        return usage("--tag-key and --tag-value are for --scope tagged".into());
    }
    let options = Options {
        bucket: args.bucket,
        key: args.key,
        expected_bucket_owner: args.expected_bucket_owner,
        region: args.region,
        scope,
        additions: StaticEnvironment {
            ipv4: args.ipv4,
            ipv6: args.ipv6,
            ..StaticEnvironment::default()
        },
        ec2_endpoint: args.ec2_endpoint,
        s3_endpoint: args.s3_endpoint,
        sts_endpoint: args.sts_endpoint,
    };
    if let Err(e) = publish::validate(&options) {
        return usage(e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("credlock: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(publish::run(&options, &crate::clock::SystemClock));
    for outcome in &outcomes {
        println!("{outcome}");
    }
    if outcomes.iter().any(publish::Outcome::failed) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
