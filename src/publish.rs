//! `credlock publish-environment`: computes an account's and Region's environment once, on a
//! management host, and writes it to S3 as the environment document (`discovery/document.rs`)
//! that every instance's `s3` source reads. A fleet then makes S3 reads instead of each
//! instance calling EC2 Describe* against the account's shared quota (Amazon EC2 API Reference,
//! "Request throttling for the Amazon EC2 API").
//!
//! The environment comes from the same code as the instances' `ec2` source
//! (`discovery::ec2::discover_scoped`), with the VPCs of the `vpc` scope named instead of read
//! from the host's own IMDS. The caller's ARN (STS GetCallerIdentity) is the document's
//! `generated_by`. The current object is read first (GetObject, bounded like the instances'
//! reads) and the new one written (PutObject) only when the content changed: the checksum of
//! the content, not the metadata, decides, so an unchanged environment costs one GET and no
//! write, and the instances' conditional GETs keep answering 304. Both calls carry
//! `x-amz-expected-bucket-owner` (Amazon S3 User Guide, "Verifying bucket ownership with
//! bucket owner condition").

use crate::clock::Clock;
use crate::config::{Ec2Scope, StaticEnvironment};
use crate::discovery::document::{self, Checksum};
use crate::discovery::s3::{Fetched, GetRequest};
use crate::discovery::s3_sdk::{self, GetError};
use crate::environment::Environment;

/// What to publish, and where.
#[derive(Debug, Clone)]
pub struct Options {
    pub bucket: String,
    /// The key template: `{account}`, `{region}` and `{vpc}` are filled in. With `{vpc}` and
    /// several VPCs, one document per VPC.
    pub key: String,
    /// `None`: the caller's own account.
    pub expected_bucket_owner: Option<String>,
    /// `None`: the SDK's (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// [`Ec2Scope::Vpcs`], [`Ec2Scope::Region`] or [`Ec2Scope::Tagged`] (never
    /// [`Ec2Scope::Vpc`], which reads IMDS).
    pub scope: Ec2Scope,
    /// Static additions (a proxy's or a shared NAT's addresses), as in `[discovery.static]`.
    pub additions: StaticEnvironment,
    pub ec2_endpoint: Option<String>,
    pub s3_endpoint: Option<String>,
    pub sts_endpoint: Option<String>,
}

/// One document's result: one output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged {
        url: String,
        checksum: String,
    },
    Updated {
        url: String,
        checksum: String,
        environment: Environment,
    },
    Failed {
        url: String,
        reason: String,
    },
}

impl Outcome {
    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Unchanged { url, checksum } => write!(f, "unchanged {url} {checksum}"),
            Outcome::Updated {
                url,
                checksum,
                environment: e,
            } => write!(
                f,
                "updated {url} {checksum} ({} ipv4, {} ipv6, {} vpcs, {} vpc endpoints)",
                e.ipv4.len(),
                e.ipv6.len(),
                e.vpcs.len(),
                e.vpc_endpoints.len()
            ),
            Outcome::Failed { url, reason } => write!(f, "failed {url}: {reason}"),
        }
    }
}

/// Checks what can be checked before any call; an error is a usage error (exit 2).
pub fn validate(options: &Options) -> Result<(), String> {
    if options.bucket.is_empty() || options.bucket.contains('/') {
        return Err(format!(
            "--bucket {:?} is not a bucket name",
            options.bucket
        ));
    }
    // Object keys are at most 1,024 bytes (Amazon S3 User Guide, "Naming objects").
    if options.key.is_empty()
        || options.key.len() > 1024
        || options.key.chars().any(char::is_control)
    {
        return Err("--key must be 1-1024 bytes without control characters".into());
    }
    if let Some(owner) = &options.expected_bucket_owner
        && !is_account(owner)
    {
        return Err(format!(
            "--expected-bucket-owner {owner:?} is not a 12-digit account ID"
        ));
    }
    match &options.scope {
        Ec2Scope::Vpc => {
            return Err("the vpc scope needs its VPCs named (--vpc)".into());
        }
        Ec2Scope::Vpcs(ids) => {
            if ids.is_empty() {
                return Err("--scope vpc needs at least one --vpc".into());
            }
            if let Some(bad) = ids.iter().find(|v| !crate::config::is_aws_id(v, "vpc-")) {
                return Err(format!("--vpc {bad:?} is not a VPC ID"));
            }
        }
        Ec2Scope::Region | Ec2Scope::Tagged { .. } => {
            if options.key.contains("{vpc}") {
                return Err("{vpc} in --key needs --scope vpc (one document per named VPC)".into());
            }
        }
    }
    crate::discovery::static_environment(&options.additions, false)?;
    Ok(())
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Publishes every document; one [`Outcome`] each (a failure before the first document, such
/// as no credentials, is one `Failed` for the key template). `clock` dates the documents.
pub async fn run(options: &Options, clock: &dyn Clock) -> Vec<Outcome> {
    let generated = Generated {
        at: crate::credentials::imds_timestamp(clock.now()),
        by: String::new(),
    };
    let template_url = format!("s3://{}/{}", options.bucket, options.key);
    let fail = |reason: String| {
        vec![Outcome::Failed {
            url: template_url.clone(),
            reason,
        }]
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &options.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let sdk = loader.load().await;
    let Some(region) = sdk.region().map(ToString::to_string) else {
        return fail("no Region: give --region or set AWS_REGION".into());
    };

    let mut sts = aws_sdk_sts::config::Builder::from(&sdk);
    if let Some(url) = &options.sts_endpoint {
        sts = sts.endpoint_url(url);
    }
    let sts = aws_sdk_sts::Client::from_conf(sts.build());
    let (arn, account) = match sts.get_caller_identity().send().await {
        Ok(out) => match (out.arn(), out.account()) {
            (Some(arn), Some(account)) if is_account(account) => {
                (arn.to_string(), account.to_string())
            }
            _ => return fail("sts:GetCallerIdentity gave no ARN or account".into()),
        },
        Err(e) => {
            return fail(format!(
                "cannot learn who is publishing: {}",
                s3_sdk::describe("sts:GetCallerIdentity", &e)
            ));
        }
    };
    let generated = Generated {
        by: arn,
        ..generated
    };
    let owner = options
        .expected_bucket_owner
        .clone()
        .unwrap_or_else(|| account.clone());

    let mut ec2 = aws_sdk_ec2::config::Builder::from(&sdk);
    if let Some(url) = &options.ec2_endpoint {
        ec2 = ec2.endpoint_url(url);
    }
    let ec2 = aws_sdk_ec2::Client::from_conf(ec2.build());
    let s3 = s3_sdk::client(&sdk, options.s3_endpoint.as_deref(), true);

    let key = options
        .key
        .replace("{account}", &account)
        .replace("{region}", &region);
    let documents: Vec<(String, Ec2Scope)> = match &options.scope {
        Ec2Scope::Vpcs(ids) if key.contains("{vpc}") => {
            let mut seen = std::collections::BTreeSet::new();
            ids.iter()
                .filter(|vpc| seen.insert(vpc.as_str()))
                .map(|vpc| (key.replace("{vpc}", vpc), Ec2Scope::Vpcs(vec![vpc.clone()])))
                .collect()
        }
        scope => vec![(key, scope.clone())],
    };
    let mut outcomes = Vec::new();
    for (key, scope) in documents {
        let target = Target {
            bucket: &options.bucket,
            key: &key,
            owner: &owner,
        };
        let url = format!("s3://{}/{key}", options.bucket);
        let outcome =
            match publish_one(&ec2, &s3, &scope, &options.additions, &target, &generated).await {
                Ok(outcome) => outcome,
                Err(reason) => Outcome::Failed { url, reason },
            };
        outcomes.push(outcome);
    }
    outcomes
}

/// A document's `generated_at` and `generated_by`.
struct Generated {
    at: String,
    by: String,
}

struct Target<'a> {
    bucket: &'a str,
    key: &'a str,
    owner: &'a str,
}

async fn publish_one(
    ec2: &aws_sdk_ec2::Client,
    s3: &aws_sdk_s3::Client,
    scope: &Ec2Scope,
    additions: &StaticEnvironment,
    target: &Target<'_>,
    generated: &Generated,
) -> Result<Outcome, String> {
    let url = format!("s3://{}/{}", target.bucket, target.key);
    let mut environment =
        crate::discovery::ec2::discover_scoped(ec2, scope, None, crate::discovery::ec2::PAGE_SIZE)
            .await
            .map_err(|e| e.to_string())?;
    environment.merge(&crate::discovery::static_environment(additions, false)?);
    if environment.is_empty() {
        return Err(
            "the environment is empty (no address, VPC or endpoint): not written, instances would refuse it"
                .into(),
        );
    }
    let checksum = document::checksum(&environment);

    // The current document: unchanged content means nothing to write.
    let current = s3_sdk::get(
        s3,
        &GetRequest {
            bucket: target.bucket.to_string(),
            key: target.key.to_string(),
            expected_bucket_owner: target.owner.to_string(),
            if_none_match: None,
        },
    )
    .await;
    match current {
        Ok(Fetched::Object { body, .. }) => {
            // Wide prefixes are accepted here: whatever the old document held, only whether it
            // equals the new content matters.
            match document::parse(&body, true, Checksum::IfPresent) {
                Ok((old, _)) if document::checksum(&old) == checksum => {
                    return Ok(Outcome::Unchanged { url, checksum });
                }
                Ok(_) => {}
                Err(e) => eprintln!("credlock: {url}: replacing a document that is not valid: {e}"),
            }
        }
        Ok(Fetched::NotModified) => {
            return Err("s3:GetObject answered 304 to an unconditional GET".into());
        }
        Err(GetError::NoSuchKey) => {}
        Err(GetError::Other(e)) => return Err(e),
    }

    let body = document::render(&environment, &generated.at, &generated.by);
    // What the instances will do with it (size, fields, caps, checksum), before it is written.
    document::parse(&body, false, Checksum::Required)
        .map_err(|e| format!("not written, the instances would refuse it: {e}"))?;
    s3.put_object()
        .bucket(target.bucket)
        .key(target.key)
        .expected_bucket_owner(target.owner)
        .content_type("application/json")
        .body(aws_sdk_s3::primitives::ByteStream::from(body))
        .send()
        .await
        .map_err(|e| s3_sdk::describe("s3:PutObject", &e))?;
    Ok(Outcome::Updated {
        url,
        checksum,
        environment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(scope: Ec2Scope, key: &str) -> Options {
        Options {
            bucket: "credlock-environments".into(),
            key: key.into(),
            expected_bucket_owner: None,
            region: None,
            scope,
            additions: StaticEnvironment::default(),
            ec2_endpoint: None,
            s3_endpoint: None,
            sts_endpoint: None,
        }
    }

    #[test]
    fn usage_errors_are_found_before_any_call() {
        let vpcs = Ec2Scope::Vpcs(vec!["vpc-0123456789abcdef0".into()]);
        assert!(validate(&options(vpcs.clone(), "env/{account}/{region}/{vpc}.json")).is_ok());
        assert!(validate(&options(Ec2Scope::Region, "env/{account}/{region}.json")).is_ok());
        for (scope, key, why) in [
            (Ec2Scope::Vpcs(vec![]), "k", "no VPC"),
            (Ec2Scope::Vpcs(vec!["vpc-XYZ".into()]), "k", "bad VPC ID"),
            (Ec2Scope::Vpc, "k", "IMDS scope"),
            (Ec2Scope::Region, "env/{vpc}.json", "{vpc} without VPCs"),
            (vpcs.clone(), "", "empty key"),
        ] {
            assert!(validate(&options(scope, key)).is_err(), "{why}");
        }
        let mut o = options(vpcs.clone(), "k");
        o.expected_bucket_owner = Some("12345".into());
        assert!(validate(&o).is_err());
        let mut o = options(vpcs, "k");
        o.additions.ipv4 = vec!["10.0.0.0/8".into()];
        assert!(validate(&o).is_err(), "wider than /16 is refused");
    }

    #[test]
    fn outcome_lines() {
        let mut env = Environment::default();
        env.add_address("198.51.100.7");
        env.vpcs.insert("vpc-0123456789abcdef0".into());
        let updated = Outcome::Updated {
            url: "s3://b/k".into(),
            checksum: "sha256:00".into(),
            environment: env,
        };
        assert_eq!(
            updated.to_string(),
            "updated s3://b/k sha256:00 (1 ipv4, 0 ipv6, 1 vpcs, 0 vpc endpoints)"
        );
        let failed = Outcome::Failed {
            url: "s3://b/k".into(),
            reason: "NoSuchBucket (HTTP 404)".into(),
        };
        assert!(failed.failed());
        assert_eq!(
            failed.to_string(),
            "failed s3://b/k: NoSuchBucket (HTTP 404)"
        );
    }
}
