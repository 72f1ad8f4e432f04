//! `credlock publish-environment` (the binary) against moto's EC2, S3 and STS: it writes one
//! document per VPC with exactly what moto's EC2 holds, a valid checksum and its metadata;
//! a second run writes nothing; a change in EC2 rewrites only the document it concerns; a
//! missing bucket fails with exit 1; usage errors exit 2. A recording proxy in front of moto's
//! S3 shows the PutObject and GetObject calls and their `x-amz-expected-bucket-owner`.

mod common;
#[path = "support/s3_fixture.rs"]
mod s3_fixture;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::{Duration, SystemTime};

use common::*;
use s3_fixture::*;

const BUCKET: &str = "credlock-fleet-publish";
const KEY: &str = "env/{account}/{region}/{vpc}.json";

/// The binary with EC2 and STS at `aws_url`, S3 at `s3_url`.
fn publish(aws_url: &str, s3_url: &str, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_credlock"));
    cmd.arg("publish-environment")
        .args(["--region", "us-east-1", "--ec2-endpoint", aws_url])
        .args(["--sts-endpoint", aws_url, "--s3-endpoint", s3_url])
        .args(args)
        // The SDK's default chain, from the environment only: nothing from this host's files
        // or IMDS.
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    for (name, _) in std::env::vars() {
        if name.starts_with("CREDLOCK_PUBLISH_") || name.starts_with("AWS_ENDPOINT_URL") {
            cmd.env_remove(name);
        }
    }
    cmd.output().unwrap()
}

/// The command line's `--bucket` and `--key`, then `rest`.
fn publish_args<'a>(bucket: &'a str, key: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    [&["--bucket", bucket, "--key", key], rest].concat()
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The content a document for these addresses must have, in canonical form.
struct Expected {
    ipv4: Vec<String>,
    vpcs: Vec<String>,
    endpoints: Vec<String>,
}

impl Expected {
    fn new(ips: &[&String], vpc: &str, endpoints: &[&String]) -> Expected {
        let ips: BTreeSet<Ipv4Addr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        let endpoints: BTreeSet<String> = endpoints.iter().map(|e| e.to_string()).collect();
        Expected {
            ipv4: ips.iter().map(|ip| format!("{ip}/32")).collect(),
            vpcs: vec![vpc.to_string()],
            endpoints: endpoints.into_iter().collect(),
        }
    }

    fn checksum(&self) -> String {
        checksum(&self.ipv4, &[], &self.vpcs, &self.endpoints)
    }

    fn updated_line(&self, url: &str) -> String {
        format!(
            "updated {url} {} ({} ipv4, 0 ipv6, {} vpcs, {} vpc endpoints)",
            self.checksum(),
            self.ipv4.len(),
            self.vpcs.len(),
            self.endpoints.len()
        )
    }
}

struct Stored {
    document: serde_json::Value,
    etag: String,
    last_modified: String,
}

async fn stored(s3: &aws_sdk_s3::Client, key: &str) -> Stored {
    let out = s3
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let etag = out.e_tag().unwrap().to_string();
    let last_modified = out.last_modified().unwrap().to_string();
    assert_eq!(out.content_type(), Some("application/json"));
    let body = out.body.collect().await.unwrap().into_bytes();
    Stored {
        document: serde_json::from_slice(&body).unwrap(),
        etag,
        last_modified,
    }
}

fn assert_document(doc: &serde_json::Value, expected: &Expected, caller: &str) {
    assert_eq!(doc["ipv4"], serde_json::json!(expected.ipv4), "{doc}");
    assert_eq!(doc["ipv6"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["vpcs"], serde_json::json!(expected.vpcs), "{doc}");
    assert_eq!(
        doc["vpc_endpoints"],
        serde_json::json!(expected.endpoints),
        "{doc}"
    );
    assert_eq!(doc["format"], "credlock-environment/1");
    assert_eq!(doc["generated_by"], caller);
    assert_eq!(doc["checksum"], expected.checksum());
    let at = humantime::parse_rfc3339(doc["generated_at"].as_str().unwrap()).unwrap();
    #[allow(clippy::disallowed_methods)] // the binary dates documents by the wall clock
    let age = SystemTime::now().duration_since(at).unwrap_or_default();
    assert!(age < Duration::from_secs(120), "generated_at {at:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_once_then_only_when_the_environment_changes() {
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.url);
    let c = ec2_client(&moto).await;
    let s3 = s3_client(&moto.url).await;
    create_bucket(&s3, BUCKET).await;
    let caller = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&sdk_config(&moto.url).await).build(),
    )
    .get_caller_identity()
    .send()
    .await
    .unwrap()
    .arn
    .unwrap();

    // VPC A: two endpoints, a NAT gateway, an instance with an Elastic IP. VPC B: one endpoint
    // and an instance with an Elastic IP. And an Elastic IP on nothing, in neither document.
    let (vpc_a, subnet_a) = create_vpc(&c, "10.1.0.0/16", None).await;
    let (vpc_b, subnet_b) = create_vpc(&c, "10.2.0.0/16", None).await;
    let eps_a = [
        create_endpoint(&c, &vpc_a, "s3").await,
        create_endpoint(&c, &vpc_a, "sts").await,
    ];
    let eps_b = [create_endpoint(&c, &vpc_b, "s3").await];
    let nat_ip = create_nat_gateway(&c, &subnet_a).await;
    let (_, ip_a) = instance_with_eip(&c, &subnet_a).await;
    let (_, ip_b) = instance_with_eip(&c, &subnet_b).await;
    let (_, spare_ip) = allocate_eip(&c).await;

    let key_a = format!("env/{ACCOUNT}/us-east-1/{vpc_a}.json");
    let key_b = format!("env/{ACCOUNT}/us-east-1/{vpc_b}.json");
    let (url_a, url_b) = (
        format!("s3://{BUCKET}/{key_a}"),
        format!("s3://{BUCKET}/{key_b}"),
    );
    let vpc_scope = ["--scope", "vpc", "--vpc", &vpc_a, "--vpc", &vpc_b];
    let args = publish_args(BUCKET, KEY, &vpc_scope);

    // 1. First run: both documents written.
    let out = publish(&moto.url, &proxy.url, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let expected_a = Expected::new(&[&nat_ip, &ip_a], &vpc_a, &[&eps_a[0], &eps_a[1]]);
    let expected_b = Expected::new(&[&ip_b], &vpc_b, &[&eps_b[0]]);
    assert_eq!(
        lines(&out),
        [
            expected_a.updated_line(&url_a),
            expected_b.updated_line(&url_b)
        ],
        "{stderr}"
    );
    let first_a = stored(&s3, &key_a).await;
    let first_b = stored(&s3, &key_b).await;
    assert_document(&first_a.document, &expected_a, &caller);
    assert_document(&first_b.document, &expected_b, &caller);
    for doc in [&first_a.document, &first_b.document] {
        assert!(
            !doc.to_string().contains(&spare_ip),
            "an EIP on nothing: {doc}"
        );
    }
    let puts: Vec<_> = proxy
        .requests()
        .await
        .into_iter()
        .filter(|r| r["method"] == "PUT")
        .collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    for r in proxy.requests().await {
        assert_eq!(
            r["headers"]["x-amz-expected-bucket-owner"], ACCOUNT,
            "the caller's account by default: {r}"
        );
    }

    // 2. Nothing changed: "unchanged", no PutObject, the objects untouched (a rewrite would
    // carry a new generated_at, a second later, so a new ETag).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = proxy.requests().await.len();
    let out = publish(&moto.url, &proxy.url, &args);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        lines(&out),
        [
            format!("unchanged {url_a} {}", expected_a.checksum()),
            format!("unchanged {url_b} {}", expected_b.checksum()),
        ]
    );
    let second_run = proxy.requests().await.split_off(before);
    assert!(
        second_run.iter().all(|r| r["method"] == "GET"),
        "{second_run:?}"
    );
    assert_eq!(second_run.len(), 2);
    for (key, first) in [(&key_a, &first_a), (&key_b, &first_b)] {
        let now = stored(&s3, key).await;
        assert_eq!(now.etag, first.etag);
        assert_eq!(now.last_modified, first.last_modified);
    }

    // 3. A new instance with an Elastic IP in VPC A: A is rewritten, B is not.
    let (_, ip_a2) = instance_with_eip(&c, &subnet_a).await;
    let out = publish(&moto.url, &proxy.url, &args);
    assert_eq!(out.status.code(), Some(0));
    let expected_a2 = Expected::new(&[&nat_ip, &ip_a, &ip_a2], &vpc_a, &[&eps_a[0], &eps_a[1]]);
    assert_eq!(
        lines(&out),
        [
            expected_a2.updated_line(&url_a),
            format!("unchanged {url_b} {}", expected_b.checksum()),
        ]
    );
    let third_a = stored(&s3, &key_a).await;
    assert_document(&third_a.document, &expected_a2, &caller);
    assert_ne!(third_a.etag, first_a.etag);
    assert_eq!(stored(&s3, &key_b).await.etag, first_b.etag);

    // 4. The region scope: one document with every VPC and every Elastic IP of the Region.
    let out = publish(
        &moto.url,
        &proxy.url,
        &publish_args(
            BUCKET,
            "env/{account}/{region}/all.json",
            &["--scope", "region"],
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = stored(&s3, &format!("env/{ACCOUNT}/us-east-1/all.json")).await;
    let vpcs = c.describe_vpcs().send().await.unwrap().vpcs().len();
    assert_eq!(all.document["vpcs"].as_array().unwrap().len(), vpcs);
    for ip in [&nat_ip, &ip_a, &ip_a2, &ip_b, &spare_ip] {
        assert!(
            all.document["ipv4"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(format!("{ip}/32"))),
            "{ip} in {}",
            all.document
        );
    }
    assert_eq!(lines(&out).len(), 1);
    assert!(lines(&out)[0].starts_with(&format!(
        "updated s3://{BUCKET}/env/{ACCOUNT}/us-east-1/all.json sha256:"
    )));

    // 5. A bucket that does not exist: each document fails, exit 1.
    let out = publish(
        &moto.url,
        &proxy.url,
        &publish_args("credlock-no-such-bucket", KEY, &vpc_scope),
    );
    assert_eq!(out.status.code(), Some(1));
    let failed = lines(&out);
    assert_eq!(failed.len(), 2, "{failed:?}");
    for (line, vpc) in failed.iter().zip([&vpc_a, &vpc_b]) {
        assert!(
            line.starts_with(&format!(
                "failed s3://credlock-no-such-bucket/env/{ACCOUNT}/us-east-1/{vpc}.json: "
            )),
            "{line}"
        );
        assert!(line.contains("NoSuchBucket"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2_before_any_call() {
    // No AWS peer at all: these must fail before calling one.
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    for (rest, key, why) in [
        (&["--scope", "vpc"][..], KEY, "vpc scope without --vpc"),
        (&["--scope", "region"], KEY, "{vpc} without the vpc scope"),
        (
            &["--scope", "vpc", "--vpc", "vpc-nothex"],
            "k",
            "not a VPC ID",
        ),
        (&["--scope", "tagged"], "k", "tagged without a tag"),
        (
            &["--scope", "region", "--ipv4", "10.0.0.0/8"],
            "k",
            "a static addition wider than /16",
        ),
        (&[], "k", "no scope"),
    ] {
        let args = publish_args(BUCKET, key, rest);
        let out = publish(&unreachable, &unreachable, &args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{why}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{why}");
    }
}

#[test]
fn check_config_warns_when_every_instance_would_call_ec2() {
    let dir = std::env::temp_dir().join(format!("credlock-publish-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |extra: &str| {
        let file = dir.join("credlock.toml");
        std::fs::write(&file, format!("[discovery.ec2]\nenabled = true\n{extra}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credlock"))
            .args(["check-config", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "a warning, not an invalid config"
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let alone = check("");
    assert!(
        alone.contains("20/s") && alone.contains("credlock publish-environment"),
        "{alone}"
    );
    let with_s3 = check(&format!(
        "[discovery.s3]\nenabled = true\nbucket = \"{BUCKET}\"\nkey = \"k\"\nexpected_bucket_owner = \"{ACCOUNT}\"\n"
    ));
    assert!(!with_s3.contains("warning"), "{with_s3}");
    let with_provider =
        check("[discovery.boot_provider]\nenabled = true\nurl = \"https://provider.example\"\n");
    assert!(!with_provider.contains("warning"), "{with_provider}");
    let _ = std::fs::remove_dir_all(dir);
}
