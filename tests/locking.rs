//! Locked credentials end to end: the IMDS emulator upstream, moto as STS, credlock in-process,
//! and the Rust AWS SDK's own IMDS client and credential provider as the application.

mod common;

use aws_credential_types::provider::ProvideCredentials;
use common::*;
use std::time::Duration;

const ROLE: &str = "credlock-test-role";

async fn get(base: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.header("x-aws-ec2-metadata-token", t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_credential_route_serves_the_sts_set_and_never_the_raw_one() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let running = start(config(&emu.url(), Some(&moto.url), "")).await;
    wait_ready(&running).await;
    let base = base(&running);
    let raw = emu.raw_secrets().await;
    let tok = token(&base).await;

    let mut served = Vec::new();
    for version in ["latest", "2012-01-12", "2016-09-02", "2022-09-24"] {
        for kind in ["security-credentials", "security-credentials-extended"] {
            for suffix in ["", "/"] {
                for t in [Some(tok.as_str()), None] {
                    let path = format!("/{version}/meta-data/iam/{kind}/{ROLE}{suffix}");
                    let (status, body) = get(&base, &path, t).await;
                    assert_eq!(status, 200, "{path}: {body}");
                    for secret in &raw {
                        assert!(!body.contains(secret.as_str()), "{path} leaked a raw value");
                    }
                    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(doc["Code"], "Success");
                    assert_eq!(doc["Type"], "AWS-HMAC");
                    if kind.ends_with("extended") {
                        assert_eq!(
                            doc["AccountId"], "123456789012",
                            "{path}: extra fields kept"
                        );
                    }
                    served.push(doc["AccessKeyId"].as_str().unwrap().to_string());
                }
            }
        }
    }
    served.dedup();
    assert_eq!(
        served.len(),
        1,
        "one locked set for every route: {served:?}"
    );

    // The served set is moto's: it knows the session, as the assumed role named after the
    // instance id.
    let (_, body) = get(
        &base,
        &format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        Some(&tok),
    )
    .await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let creds = aws_credential_types::Credentials::new(
        doc["AccessKeyId"].as_str().unwrap(),
        doc["SecretAccessKey"].as_str().unwrap(),
        doc["Token"].as_str().map(str::to_string),
        None,
        "test",
    );
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(&moto.url)
        .load()
        .await;
    let me = aws_sdk_sts::Client::new(&sdk)
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    assert_eq!(
        me.arn(),
        Some("arn:aws:sts::123456789012:assumed-role/credlock-test-role/i-0123456789abcdef0")
    );
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_sdk_reads_metadata_and_gets_locked_credentials_through_credlock() {
    let emu = Emulator::start(&["--tokens", "required"]);
    let moto = Moto::start();
    let running = start(config(&emu.url(), Some(&moto.url), "")).await;
    wait_ready(&running).await;
    let raw = emu.raw_secrets().await;

    let client = aws_config::imds::Client::builder()
        .endpoint(base(&running))
        .unwrap()
        .build();
    let id = client.get("/latest/meta-data/instance-id").await.unwrap();
    assert_eq!(id.as_ref(), "i-0123456789abcdef0");
    let region = client
        .get("/latest/meta-data/placement/region")
        .await
        .unwrap();
    assert_eq!(region.as_ref(), "us-east-1");

    let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder()
        .imds_client(client)
        .build();
    let creds = provider.provide_credentials().await.unwrap();
    assert!(!raw.contains(&creds.access_key_id().to_string()));
    assert!(!raw.contains(&creds.secret_access_key().to_string()));
    // Less than the one-hour chained-session cap left: these are AssumeRole credentials.
    #[allow(clippy::disallowed_methods)] // the SDK's expiry is wall-clock time
    let left = creds
        .expiry()
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= std::time::Duration::from_secs(3600), "{left:?}");

    // IMDSv2 required upstream: a tokenless credential request gets the upstream's 401.
    let (status, body) = get(
        &base(&running),
        &format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        None,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("AccessKeyId"));
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_sts_credentials_are_refused_and_metadata_still_flows() {
    let emu = Emulator::start(&[]);
    // STS on a closed port: no locked set can ever be obtained.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let running = start(config(&emu.url(), Some(&dead), "")).await;
    let base = base(&running);
    let raw = emu.raw_secrets().await;
    let (status, body) = get(&base, "/latest/meta-data/instance-id", None).await;
    assert_eq!((status, body.as_str()), (200, "i-0123456789abcdef0"));
    for path in [
        format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        format!("/latest/meta-data/iam/security-credentials-extended/{ROLE}/"),
    ] {
        let (status, body) = get(&base, &path, None).await;
        assert_eq!(status, 503, "{path}: {body}");
        for secret in &raw {
            assert!(!body.contains(secret.as_str()));
        }
    }
    // The role listing holds no secret and passes.
    let (status, body) = get(&base, "/latest/meta-data/iam/security-credentials/", None).await;
    assert_eq!((status, body.as_str()), (200, ROLE));
    let admin = format!("http://{}", running.admin_addr);
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_or_changed_role_upstream_is_followed() {
    let emu = Emulator::start(&[]);
    let moto = Moto::start();
    let running = start(config(&emu.url(), Some(&moto.url), "")).await;
    wait_ready(&running).await;
    let base = base(&running);
    // The upstream rotates its raw credentials: the new raw values never leak either.
    let _ = reqwest::Client::new()
        .post(format!("http://{}/rotate", emu.control))
        .send()
        .await
        .unwrap();
    let raw = emu.raw_secrets().await;
    let tok = token(&base).await;
    let (status, body) = get(
        &base,
        &format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        Some(&tok),
    )
    .await;
    assert_eq!(status, 200);
    for secret in &raw {
        assert!(!body.contains(secret.as_str()));
    }
    // A wrong role name is the upstream's 404, not credentials.
    let (status, body) = get(
        &base,
        "/latest/meta-data/iam/security-credentials/other-role",
        Some(&tok),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("AccessKeyId"));
    let _ = running.shutdown.send(true);
}

/// STS's documented AssumeRole answer (STS API Reference, "AssumeRole": Response Elements;
/// the Query API wraps them in `AssumeRoleResponse`/`AssumeRoleResult`), valid for an hour.
fn assume_role_answer(key: &str) -> String {
    let expires = humantime::format_rfc3339_seconds(
        credlock::clock::Clock::now(&credlock::clock::SystemClock) + Duration::from_secs(3600),
    );
    format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
         <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/{ROLE}/i-0123456789abcdef0</Arn>\
         <AssumedRoleId>AROA3XFRBF535PLBIFPI4:i-0123456789abcdef0</AssumedRoleId></AssumedRoleUser>\
         <Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>\
         <SessionToken>FwoGZXIvYXdzEXAMPLETOKEN</SessionToken><Expiration>{expires}</Expiration></Credentials>\
         <PackedPolicySize>6</PackedPolicySize></AssumeRoleResult>\
         <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata></AssumeRoleResponse>"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_carry_the_source_identity_and_a_role_refusing_it_is_locked_unmarked() {
    let emu = Emulator::start(&[]);
    // STS refuses a SourceIdentity (the role's trust policy lacks sts:SetSourceIdentity) with
    // its documented error document, and answers a request without one.
    let sts = FakeHttp::start(&assume_role_answer("ASIAUNMARKED")).await;
    *sts.unless.lock().unwrap() = Some((
        "SourceIdentity=".into(),
        Answer {
            status: 403,
            body: "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
                   <Code>AccessDenied</Code><Message>User: arn:aws:sts::123456789012:assumed-role/credlock-test-role/i-0123456789abcdef0 \
                   is not authorized to perform: sts:SetSourceIdentity on resource: arn:aws:iam::123456789012:role/credlock-test-role</Message>\
                   </Error><RequestId>x</RequestId></ErrorResponse>"
                .into(),
            delay: Duration::ZERO,
            down: false,
        },
    ));
    let running = start(config(&emu.url(), Some(sts.url.trim_end_matches('/')), "")).await;
    wait_ready(&running).await;
    let bodies = sts.bodies.lock().unwrap().clone();
    let assumes: Vec<&String> = bodies
        .iter()
        .filter(|b| b.contains("Action=AssumeRole"))
        .collect();
    assert!(assumes.len() >= 2, "{bodies:?}");
    assert!(
        assumes[0].contains("SourceIdentity=credlock-i-0123456789abcdef0"),
        "marked first, with the credlock- prefix: {}",
        assumes[0]
    );
    assert!(
        !assumes[1].contains("SourceIdentity"),
        "then unmarked: {}",
        assumes[1]
    );
    let admin = format!("http://{}", running.admin_addr);
    let status: serde_json::Value = reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["lock"]["marked"], false, "{status}");
    assert!(
        status["lock"]["unmarked_reason"]
            .as_str()
            .is_some_and(|r| r.contains("sts:SetSourceIdentity")),
        "{status}"
    );
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\ncredlock_sessions_marked 0\n"),
        "{metrics}"
    );
    let raw = get(
        &base(&running),
        &format!("/latest/meta-data/iam/security-credentials/{ROLE}"),
        None,
    )
    .await;
    assert!(
        raw.1.contains("ASIAUNMARKED"),
        "locked and served unmarked: {}",
        raw.1
    );
    let _ = running.shutdown.send(true);
}
