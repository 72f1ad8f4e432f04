//! The `s3` discovery source against moto's S3: `credlock discover` reports exactly the
//! published document; a running credlock re-locks when the document is replaced and keeps the
//! last good value through a corrupted document, a missing object, a 403 and a slow S3. A
//! recording proxy between credlock and moto shows what moto does not check: every GET carries
//! `x-amz-expected-bucket-owner`, and every poll after the first is conditional
//! (`If-None-Match`) and answered 304 while the document is unchanged.

mod common;
#[path = "support/s3_fixture.rs"]
mod s3_fixture;

use std::time::{Duration, Instant};

use common::*;
use credlock::app::Running;
use s3_fixture::*;

const BUCKET: &str = "credlock-fleet-env";
/// The emulator's instance: account, Region, and its primary interface's VPC.
const KEY_TEMPLATE: &str = "env/{account}/{region}/{vpc}.json";
const KEY: &str = "env/123456789012/us-east-1/vpc-0abc1234def567890.json";

const VPC: &str = "vpc-0abc1234def567890";
const VPCE: &str = "vpce-0123456789abcdef0";

fn config_text(emu: &Emulator, sts: &str, s3: &str) -> String {
    // Only the s3 source: what is locked is exactly what the document says.
    loopback_toml(
        &emu.url(),
        sts,
        &format!(
            "relock_spread_seconds = 2\n\
             [discovery]\ninterval_seconds = 5\n\
             [discovery.imds]\nenabled = false\n[discovery.echo]\nenabled = false\n\
             [discovery.s3]\nenabled = true\nbucket = \"{BUCKET}\"\nkey = \"{KEY_TEMPLATE}\"\n\
             expected_bucket_owner = \"{ACCOUNT}\"\nendpoint = \"{s3}\"\n"
        ),
    )
}

/// What every test here runs against: the IMDS emulator, moto, and an S3 client of moto.
struct Peers {
    s3: aws_sdk_s3::Client,
    moto: Moto,
    emu: Emulator,
}

impl Peers {
    /// The emulator and moto started, the bucket created.
    async fn start() -> Peers {
        let emu = Emulator::start(&[]);
        let moto = Moto::start();
        let s3 = s3_client(&moto.url).await;
        create_bucket(&s3, BUCKET).await;
        Peers { s3, moto, emu }
    }

    /// Writes `body` as the emulator instance's document.
    async fn put_document(&self, body: &str) {
        put(&self.s3, BUCKET, KEY, body).await;
    }
}

/// The peers with `body` published as the document, and credlock, once ready, reading it
/// through a recording proxy in front of moto.
async fn serving(body: &str) -> (Peers, RecordingProxy, Running) {
    let peers = Peers::start().await;
    peers.put_document(body).await;
    let proxy = RecordingProxy::start(&peers.moto.url);
    let running = start_toml(&config_text(&peers.emu, &peers.moto.url, &proxy.url)).await;
    wait_ready(&running).await;
    (peers, proxy, running)
}

fn s3_status(status: &serde_json::Value) -> serde_json::Value {
    status["discovery"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["source"] == "s3")
        .cloned()
        .unwrap_or_else(|| panic!("no s3 source in {status}"))
}

fn locked(status: &serde_json::Value) -> serde_json::Value {
    status["lock"]["locked_environment"].clone()
}

fn env_json(ipv4: &[&str], vpcs: &[&str], endpoints: &[&str]) -> serde_json::Value {
    serde_json::json!({"ipv4": ipv4, "ipv6": [], "vpcs": vpcs, "vpc_endpoints": endpoints})
}

/// Polls `check` every 100 ms until it gives `Some`, or fails after `limit`.
async fn within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_every_get_names_the_owner(gets: &[serde_json::Value]) {
    assert!(!gets.is_empty());
    for get in gets {
        assert_eq!(
            get["headers"]["x-amz-expected-bucket-owner"], ACCOUNT,
            "a GET without the expected bucket owner: {get}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discover_reports_exactly_the_documents_entries() {
    let peers = Peers::start().await;
    let ipv4 = ["192.0.2.0/24", "198.51.100.7/32"];
    let ipv6 = ["2001:db8:aaaa::/48"];
    peers
        .put_document(&document(&ipv4, &ipv6, &[VPC], &[VPCE]))
        .await;

    let dir = std::env::temp_dir().join(format!("credlock-s3-discover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("credlock.toml");
    let moto_url = &peers.moto.url;
    std::fs::write(&file, config_text(&peers.emu, moto_url, moto_url)).unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credlock"))
            .args(["discover", "--config", file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = serde_json::json!({
        "ipv4": ipv4, "ipv6": ipv6, "vpcs": [VPC], "vpc_endpoints": [VPCE]
    });
    assert_eq!(report["sources"]["s3"]["environment"], expected, "{report}");
    assert_eq!(report["merged"], expected, "the only source: {report}");

    // The same key with a hand-widened list and the old checksum: refused, nothing merged.
    let tampered = document(&ipv4, &ipv6, &[VPC], &[VPCE]).replace("198.51.100.7/32", "0.0.0.0/0");
    peers.put_document(&tampered).await;
    let out = run();
    assert_eq!(out.status.code(), Some(1), "no source answered");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = report["sources"]["s3"]["error"].as_str().unwrap();
    assert!(error.contains(&format!("s3://{BUCKET}/{KEY}")), "{error}");
    assert!(
        error.contains("0.0.0.0/0") || error.contains("checksum"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_document_is_locked_within_the_spread_and_polls_are_conditional() {
    let (peers, proxy, running) = serving(&document(&["198.51.100.7/32"], &[], &[VPC], &[])).await;
    assert_eq!(
        locked(&admin_status(&running).await),
        env_json(&["198.51.100.7/32"], &[VPC], &[])
    );
    assert_eq!(credentials_status(&running).await, 200);

    // Two polls of the unchanged document: the second is conditional and costs a 304.
    let object = format!("/{BUCKET}/{KEY}");
    within(Duration::from_secs(8), "a second poll", || async {
        (proxy.gets(&object).await.len() >= 2).then_some(())
    })
    .await;

    // A new NAT gateway address is published: re-locked within one poll (5 s, +10 %) plus
    // the spread window (2 s) plus the AssumeRole.
    peers
        .put_document(&document(
            &["198.51.100.7/32", "198.51.100.8/32"],
            &[],
            &[VPC],
            &[],
        ))
        .await;
    let replaced = Instant::now();
    let new_env = env_json(&["198.51.100.7/32", "198.51.100.8/32"], &[VPC], &[]);
    within(
        Duration::from_secs(10),
        "the replaced document locked",
        || async { (locked(&admin_status(&running).await) == new_env).then_some(()) },
    )
    .await;
    println!("re-locked {:?} after the replacement", replaced.elapsed());
    // And one more poll of the new document, conditional on its ETag.
    let polls_then = proxy.gets(&object).await.len();
    within(
        Duration::from_secs(8),
        "a poll after the change",
        || async { (proxy.gets(&object).await.len() > polls_then).then_some(()) },
    )
    .await;

    let gets = proxy.gets(&object).await;
    assert_every_get_names_the_owner(&gets);
    assert!(
        gets[0]["headers"].get("if-none-match").is_none(),
        "the first read is unconditional: {}",
        gets[0]
    );
    assert_eq!(gets[0]["status"], 200);
    for get in &gets[1..] {
        assert!(
            get["headers"]["if-none-match"].is_string(),
            "every later poll is conditional: {get}"
        );
    }
    let answers: Vec<i64> = gets.iter().map(|g| g["status"].as_i64().unwrap()).collect();
    // 200 (first), 304 while unchanged, one 200 for the new document, 304 again after it.
    assert!(
        answers[1] == 304,
        "the second poll of an unchanged document: {answers:?}"
    );
    let changed_at = answers
        .iter()
        .skip(1)
        .position(|&s| s == 200)
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("the new document was never read: {answers:?}"));
    assert!(
        answers[1..changed_at].iter().all(|&s| s == 304),
        "{answers:?}"
    );
    assert!(
        answers[changed_at + 1..].iter().all(|&s| s == 304) && answers.len() > changed_at + 1,
        "after the new document, 304s on its ETag: {answers:?}"
    );
    assert_ne!(
        gets[changed_at]["headers"]["if-none-match"],
        gets[changed_at + 1]["headers"]["if-none-match"],
        "the ETag sent follows the document read"
    );
    let _ = running.shutdown.send(true);
}

/// Waits for the s3 source's error to mention `needle`, then checks the last good document is
/// still the source's value and the lock's, and credentials are still served.
async fn assert_kept(
    running: &Running,
    what: &str,
    needle: &str,
    limit: Duration,
    good: &serde_json::Value,
) {
    let s = within(limit, what, || async {
        let s = admin_status(running).await;
        let err = s3_status(&s)["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        err.contains(needle).then_some(s)
    })
    .await;
    let source = s3_status(&s);
    println!("{what}: {}", source["last_error"]);
    assert!(
        source["consecutive_failures"].as_u64().unwrap() >= 1,
        "{what}: {source}"
    );
    assert_eq!(&source["environment"], good, "{what}: last good value kept");
    assert_eq!(&locked(&s), good, "{what}: lock unchanged");
    assert_eq!(
        credentials_status(running).await,
        200,
        "{what}: still serving"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_or_missing_document_keeps_the_last_good_value() {
    let good_doc = document(&["198.51.100.7/32"], &[], &[VPC], &[VPCE]);
    let good = env_json(&["198.51.100.7/32"], &[VPC], &[VPCE]);
    let (peers, proxy, running) = serving(&good_doc).await;
    assert_eq!(locked(&admin_status(&running).await), good);

    // Hand edits that keep the old checksum: one wider than the cap, one within it.
    let widened = good_doc.replace("198.51.100.7/32", "0.0.0.0/0");
    let edited = good_doc.replace("198.51.100.7/32", "198.51.100.9/32");
    let empty = document(&[], &[], &[], &[]);
    // Over the 64 KiB limit (read only that far).
    let huge = format!("{}{}", good_doc, " ".repeat(200 * 1024));
    for (what, body, needle) in [
        ("too large", huge.as_str(), "larger than the 65536 bytes"),
        ("truncated", &good_doc[..good_doc.len() / 2], "EOF"),
        ("widened", widened.as_str(), "0.0.0.0/0 is wider than /16"),
        ("edited, old checksum", edited.as_str(), "checksum mismatch"),
        ("empty", empty.as_str(), "refusing to lock to nothing"),
    ] {
        peers.put_document(body).await;
        assert_kept(&running, what, needle, Duration::from_secs(10), &good).await;
    }
    peers
        .s3
        .delete_object()
        .bucket(BUCKET)
        .key(KEY)
        .send()
        .await
        .unwrap();
    assert_kept(
        &running,
        "deleted",
        "NoSuchKey",
        Duration::from_secs(10),
        &good,
    )
    .await;
    assert_every_get_names_the_owner(&proxy.gets(&format!("/{BUCKET}/{KEY}")).await);
    let _ = running.shutdown.send(true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_or_a_slow_s3_keeps_the_last_good_value() {
    let good = env_json(&["198.51.100.7/32"], &[VPC], &[]);
    let (_peers, proxy, running) = serving(&document(&["198.51.100.7/32"], &[], &[VPC], &[])).await;

    // A bucket policy refusing the instance role: S3 answers 403 AccessDenied.
    proxy.mode("deny", 0.0).await;
    assert_kept(
        &running,
        "403",
        "AccessDenied (HTTP 403)",
        Duration::from_secs(10),
        &good,
    )
    .await;

    // S3 takes 30 s to answer: the poll gives up after its 10 s timeout.
    proxy.mode("stall", 30.0).await;
    let stalled = Instant::now();
    assert_kept(
        &running,
        "slow",
        "timed out after 10 s",
        Duration::from_secs(20),
        &good,
    )
    .await;
    let took = stalled.elapsed();
    assert!(
        took >= Duration::from_secs(9),
        "the timeout is 10 s: {took:?}"
    );

    // S3 answers again: the source recovers, and nothing was ever unlocked.
    proxy.mode("forward", 0.0).await;
    within(Duration::from_secs(20), "recovered", || async {
        let s = admin_status(&running).await;
        (s3_status(&s)["consecutive_failures"] == 0).then_some(())
    })
    .await;
    assert_eq!(locked(&admin_status(&running).await), good);
    assert_every_get_names_the_owner(&proxy.gets(&format!("/{BUCKET}/{KEY}")).await);
    let _ = running.shutdown.send(true);
}
