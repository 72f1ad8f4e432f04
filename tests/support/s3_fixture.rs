//! S3 test fixtures shared by tests/s3_source.rs and tests/publish.rs (included with
//! `#[path]`): moto's S3 through the SDK, the recording proxy (recording_proxy.py), and
//! environment documents written from the envelope's specification rather than by credlock's
//! own renderer. Built on tests/common/mod.rs: a test including this file has `mod common;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{ChildStdin, Command, Stdio};

use sha2::Digest;

use crate::common::{Proc, get_json, repo, sdk_config};

pub const ACCOUNT: &str = "123456789012";

/// An S3 client for `url` (moto or the proxy), path-style, with moto's test credentials.
pub async fn s3_client(url: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk_config(url).await)
            .force_path_style(true)
            .build(),
    )
}

pub async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) {
    s3.create_bucket().bucket(bucket).send().await.unwrap();
}

pub async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &str) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from(
            body.as_bytes().to_vec(),
        ))
        .send()
        .await
        .unwrap();
}

/// The checksum as the envelope defines it: `sha256:` and the hex SHA-256 of the content as
/// compact JSON, fields in the order ipv4, ipv6, vpcs, vpc_endpoints, each list sorted and
/// deduplicated (addresses in numeric order), addresses as canonical prefixes. The caller
/// passes the lists in that form.
pub fn checksum<S: serde::Serialize>(
    ipv4: &[S],
    ipv6: &[S],
    vpcs: &[S],
    endpoints: &[S],
) -> String {
    let content = format!(
        r#"{{"ipv4":{},"ipv6":{},"vpcs":{},"vpc_endpoints":{}}}"#,
        serde_json::to_string(ipv4).unwrap(),
        serde_json::to_string(ipv6).unwrap(),
        serde_json::to_string(vpcs).unwrap(),
        serde_json::to_string(endpoints).unwrap()
    );
    let digest = sha2::Sha256::digest(content.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A document as a publisher writes it.
pub fn document(ipv4: &[&str], ipv6: &[&str], vpcs: &[&str], endpoints: &[&str]) -> String {
    serde_json::json!({
        "ipv4": ipv4, "ipv6": ipv6, "vpcs": vpcs, "vpc_endpoints": endpoints,
        "format": "credlock-environment/1",
        "generated_at": "2026-12-01T22:00:00Z",
        "generated_by": format!("arn:aws:sts::{ACCOUNT}:assumed-role/publisher/test"),
        "checksum": checksum(ipv4, ipv6, vpcs, endpoints),
    })
    .to_string()
}

/// tests/support/recording_proxy.py in front of `upstream`; killed on drop, and it exits by
/// itself when its stdin closes (this process ending).
pub struct RecordingProxy {
    _proc: Proc,
    _stdin: ChildStdin,
    pub url: String,
    control: String,
}

impl RecordingProxy {
    pub fn start(upstream: &str) -> RecordingProxy {
        let mut child = Command::new("python3")
            .arg(repo().join("tests/support/recording_proxy.py"))
            .args(["--upstream", upstream])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the recording proxy (python3 needed)");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut url, mut control) = (None, None);
        // Two lines, then the proxy is serving.
        for _ in 0..2 {
            let line = lines
                .next()
                .expect("the proxy exited before listening")
                .unwrap();
            match line.split_once(' ') {
                Some(("listening", a)) => url = Some(format!("http://{a}")),
                Some(("control", a)) => control = Some(format!("http://{a}")),
                _ => panic!("unexpected proxy output {line:?}"),
            }
        }
        RecordingProxy {
            _proc: Proc(child),
            _stdin: stdin,
            url: url.unwrap(),
            control: control.unwrap(),
        }
    }

    /// Every request so far: method, path, headers (lower-case names), status, mode.
    pub async fn requests(&self) -> Vec<serde_json::Value> {
        get_json(format!("{}/requests", self.control)).await
    }

    /// The GETs of one object so far.
    pub async fn gets(&self, path_prefix: &str) -> Vec<serde_json::Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| {
                r["method"] == "GET" && r["path"].as_str().unwrap().starts_with(path_prefix)
            })
            .collect()
    }

    pub async fn mode(&self, mode: &str, stall_seconds: f64) {
        let r = reqwest::Client::new()
            .post(format!("{}/mode", self.control))
            .json(&serde_json::json!({"mode": mode, "stall_seconds": stall_seconds}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}
