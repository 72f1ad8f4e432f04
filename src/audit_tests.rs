//! Tests of `credlock audit` (src/audit.rs): input formats, malformed input, files and
//! directories. Classification and grouping: `audit_classify_tests.rs`.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

use super::*;

const ACCOUNT: &str = "111122223333";
const ROLE: &str = "web-role";
const INSTANCE: &str = "i-0123456789abcdef0";
const OTHER_INSTANCE: &str = "i-0fedcba9876543210";
const ATTACKER: &str = "198.51.100.7";
const INSIDE: &str = "203.0.113.10";
const GOOD_VPCE: &str = "vpce-0aaaaaaaaaaaaaaaa";
const BAD_VPCE: &str = "vpce-0bbbbbbbbbbbbbbbb";
const EXPLICIT_DENY: &str = "User: arn:aws:sts::111122223333:assumed-role/web-role/i-0123456789abcdef0 \
     is not authorized to perform: s3:GetObject on resource: \"arn:aws:s3:::bucket/key\" with an \
     explicit deny in a session policy";

// ---- records in the shapes of "CloudTrail userIdentity element" (CloudTrail User Guide) ----

/// A role session: the documented "userIdentity with temporary security credentials" example,
/// with the session context fields this audit reads.
fn role_session(
    session: &str,
    source_identity: Option<&str>,
    role_delivery: Option<&str>,
) -> Value {
    let mut context = json!({
        "sessionIssuer": {
            "type": "Role",
            "principalId": "AROAIDPPEZS35WEXAMPLE",
            "arn": format!("arn:aws:iam::{ACCOUNT}:role/{ROLE}"),
            "accountId": ACCOUNT,
            "userName": ROLE
        },
        "attributes": { "mfaAuthenticated": "false", "creationDate": "2026-11-30T10:00:00Z" }
    });
    if let Some(s) = source_identity {
        context["sourceIdentity"] = json!(s);
    }
    if let Some(d) = role_delivery {
        context["ec2RoleDelivery"] = json!(d);
    }
    json!({
        "type": "AssumedRole",
        "principalId": format!("AROAIDPPEZS35WEXAMPLE:{session}"),
        "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE}/{session}"),
        "accountId": ACCOUNT,
        "accessKeyId": "ASIAIOSFODNN7EXAMPLE",
        "sessionContext": context
    })
}

fn locked(instance: &str) -> Value {
    role_session(instance, Some(&format!("credlock-{instance}")), None)
}

fn native(instance: &str) -> Value {
    role_session(instance, None, Some("2.0"))
}

/// The documented IAM user example (`Alice`).
fn iam_user() -> Value {
    json!({
        "type": "IAMUser",
        "principalId": "AIDAJ45Q7YFFAREXAMPLE",
        "arn": "arn:aws:iam::123456789012:user/Alice",
        "accountId": "123456789012",
        "accessKeyId": "",
        "userName": "Alice"
    })
}

fn event(identity: Value, source: &str, name: &str, ip: &str, time: &str) -> Value {
    json!({
        "eventVersion": "1.09",
        "userIdentity": identity,
        "eventTime": time,
        "eventSource": source,
        "eventName": name,
        "awsRegion": "eu-west-1",
        "sourceIPAddress": ip,
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": { "bucketName": "bucket", "key": "key", "nested": [1, {"a": null}] },
        "responseElements": null,
        "requestID": "EXAMPLE",
        "eventID": "0ee2e4c2-0000-0000-0000-000000000000",
        "readOnly": true,
        "eventType": "AwsApiCall",
        "managementEvent": false,
        "recipientAccountId": ACCOUNT,
        "eventCategory": "Data"
    })
}

fn denied(mut e: Value, code: &str, message: &str) -> Value {
    e["errorCode"] = json!(code);
    e["errorMessage"] = json!(message);
    e
}

fn delivery(records: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "Records": records })).unwrap()
}

fn lines(records: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).unwrap();
        out.push(b'\n');
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The judge the tests use: inside = 203.0.113.0/24, the good endpoint, or via a service.
fn judge(call: &Call<'_>) -> Option<String> {
    if call.via_aws_service {
        return None;
    }
    if let Some(vpce) = call.vpc_endpoint_id {
        return (vpce != GOOD_VPCE)
            .then(|| format!("{vpce} is not an endpoint of {}", call.instance_id));
    }
    match call.source_ip {
        Some(IpAddr::V4(ip)) if ip.octets()[..3] == [203, 0, 113] => None,
        Some(ip) => Some(format!(
            "{ip} is not in the environment of {}",
            call.instance_id
        )),
        None => Some(format!("no source address for {}", call.action)),
    }
}

fn run_with(inputs: &[(&str, Vec<u8>)], max_groups: usize) -> Report {
    let mut acc = Accumulator::new(max_groups);
    for (name, bytes) in inputs {
        audit_reader(name, bytes.as_slice(), &judge, &mut acc);
    }
    acc.finish()
}

fn run(name: &str, bytes: Vec<u8>) -> Report {
    run_with(&[(name, bytes)], DEFAULT_MAX_GROUPS)
}

fn mixed_records() -> Vec<Value> {
    vec![
        denied(
            event(
                locked(INSTANCE),
                "s3.amazonaws.com",
                "GetObject",
                ATTACKER,
                "2026-11-30T12:00:05Z",
            ),
            "AccessDenied",
            EXPLICIT_DENY,
        ),
        event(
            locked(INSTANCE),
            "s3.amazonaws.com",
            "GetObject",
            INSIDE,
            "2026-11-30T12:00:06Z",
        ),
        event(
            native(OTHER_INSTANCE),
            "sts.amazonaws.com",
            "GetCallerIdentity",
            ATTACKER,
            "2026-11-30T12:00:07Z",
        ),
        event(
            native(OTHER_INSTANCE),
            "sts.amazonaws.com",
            "GetCallerIdentity",
            INSIDE,
            "2026-11-30T12:00:08Z",
        ),
        event(
            iam_user(),
            "s3.amazonaws.com",
            "ListBuckets",
            ATTACKER,
            "2026-11-30T12:00:09Z",
        ),
    ]
}

fn assert_mixed(report: &Report) {
    assert_eq!(report.records_read, 5, "{report:#?}");
    assert_eq!(report.records_denied_locked, 1);
    assert_eq!(report.records_locked_other, 1);
    assert_eq!(report.records_would_deny, 1);
    assert_eq!(report.records_native_allowed, 1);
    assert_eq!(report.records_ignored, 1);
    assert_eq!(report.denied_locked.len(), 1);
    assert_eq!(report.would_deny.len(), 1);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.files_read, 1);
}

// ---- formats ----

#[test]
fn delivery_files_plain_and_gzipped_read_alike() {
    let plain = run("a.json", delivery(&mixed_records()));
    let gz = run("a.json.gz", gzip(&delivery(&mixed_records())));
    assert_mixed(&plain);
    assert_eq!(plain, gz);
    // Pretty-printed, with the Records key not first and a byte order mark.
    let mut pretty = vec![0xef, 0xbb, 0xbf];
    pretty.extend(
        serde_json::to_vec_pretty(&json!({ "other": {"x": [1]}, "Records": mixed_records() }))
            .unwrap(),
    );
    assert_eq!(run("a.json", pretty), plain);
}

#[test]
fn json_lines_plain_and_gzipped_and_arrays_of_events() {
    let expected = run("a.json", delivery(&mixed_records()));
    assert_eq!(run("a.json", lines(&mixed_records())), expected);
    assert_eq!(run("a.json", gzip(&lines(&mixed_records()))), expected);
    // Values back to back, CRLF, blank lines and trailing whitespace.
    let records = mixed_records();
    let mut packed = Vec::new();
    for (i, r) in records.iter().enumerate() {
        packed.extend(serde_json::to_vec(r).unwrap());
        packed.extend_from_slice(if i % 2 == 0 { b"" } else { b"\r\n\r\n  " });
    }
    assert_eq!(run("a.jsonl", packed), expected);
    assert_eq!(
        run("a.json", serde_json::to_vec(&records).unwrap()),
        expected
    );
    // Concatenated gzip members are one stream.
    let mut two = gzip(&lines(&records[..2]));
    two.extend(gzip(&lines(&records[2..])));
    assert_eq!(run("a.json.gz", two), expected);
}

#[test]
fn lower_cased_keys_of_sql_exports_are_read() {
    let e = denied(
        event(
            locked(INSTANCE),
            "s3.amazonaws.com",
            "GetObject",
            ATTACKER,
            "2026-11-30T12:00:05Z",
        ),
        "AccessDenied",
        EXPLICIT_DENY,
    );
    let lower = serde_json::to_string(&e).unwrap();
    let lower = [
        "eventTime",
        "eventSource",
        "eventName",
        "errorCode",
        "errorMessage",
        "sourceIPAddress",
        "userIdentity",
        "sessionContext",
        "sourceIdentity",
    ]
    .iter()
    .fold(lower, |s, k| {
        s.replace(&format!("\"{k}\""), &format!("\"{}\"", k.to_lowercase()))
    });
    assert!(lower.contains("\"sourceipaddress\""));
    let report = run("athena.json", lower.into_bytes());
    assert_eq!(report.records_denied_locked, 1, "{report:#?}");
}

#[test]
fn records_are_handed_over_as_they_are_read() {
    // A stream that fails after two complete records: they are counted although the file is
    // never read to its end, so nothing waits for the whole file.
    struct FailsAfter(std::io::Cursor<Vec<u8>>);
    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::other("disk on fire")),
                n => Ok(n),
            }
        }
    }
    let records = mixed_records();
    let mut head = br#"{"Records":["#.to_vec();
    head.extend(serde_json::to_vec(&records[0]).unwrap());
    head.push(b',');
    head.extend(serde_json::to_vec(&records[2]).unwrap());
    head.push(b',');
    let mut acc = Accumulator::new(10);
    audit_reader(
        "stream",
        FailsAfter(std::io::Cursor::new(head)),
        &judge,
        &mut acc,
    );
    let report = acc.finish();
    assert_eq!(report.records_read, 2);
    assert_eq!(report.records_denied_locked, 1);
    assert_eq!(report.records_would_deny, 1);
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.contains("disk on fire"),
        "{:?}",
        report.skipped
    );
}

// ---- malformed input ----

#[test]
fn malformed_files_are_skipped_by_name_and_the_rest_is_counted() {
    let good = delivery(&mixed_records());
    let records = mixed_records();
    let mut truncated = br#"{"Records":["#.to_vec();
    truncated.extend(serde_json::to_vec(&records[0]).unwrap());
    truncated.extend(b",{\"eventVersion\":\"1.0");
    let mut wrong_type = records[0].clone();
    wrong_type["eventName"] = json!(42);
    let mut deep = String::from(r#"{"Records":[{"requestParameters":"#);
    deep.push_str(&"[".repeat(100_000));
    let mut bad_gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    bad_gzip.extend(b"this is not deflate data at all");
    let cut_gzip = gzip(&good);
    let cut_gzip = cut_gzip[..cut_gzip.len() / 2].to_vec();
    let mut trailing = gzip(&good);
    trailing.extend(b"garbage after the member");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-gzip.json.gz", bad_gzip, "read error"),
        ("cut.json.gz", cut_gzip, ""),
        ("trailing.json.gz", trailing, "read error"),
        (
            "invalid.json",
            b"{\"Records\": [ {\"eventName\": } ]}".to_vec(),
            "invalid JSON",
        ),
        ("truncated.json", truncated, "truncated"),
        (
            "records-object.json",
            br#"{"Records": {"eventName": "GetObject"}}"#.to_vec(),
            "not a CloudTrail log",
        ),
        (
            "records-null.json",
            br#"{"Records": null}"#.to_vec(),
            "not a CloudTrail log",
        ),
        (
            "wrong-type.json",
            delivery(&[records[0].clone(), wrong_type, records[2].clone()]),
            "invalid type",
        ),
        (
            "identity-string.json",
            delivery(&[json!({"eventName": "X", "userIdentity": "me"})]),
            "invalid type",
        ),
        (
            "digest.json",
            br#"{"awsAccountId": "1", "digestStartTime": "x", "logFiles": []}"#.to_vec(),
            "neither Records",
        ),
        ("empty.json", Vec::new(), "empty"),
        ("spaces.json", b" \n\t ".to_vec(), "empty"),
        ("numbers.json", b"42".to_vec(), "not a CloudTrail log"),
        (
            "csv.csv",
            b"eventTime,eventName\n".to_vec(),
            "not a CloudTrail log",
        ),
        // Skipped values are skipped without recursion: an unclosed one is truncated.
        ("deep.json", deep.into_bytes(), "truncated"),
        (
            "bad-second-line.jsonl",
            [
                lines(&records[..1]),
                b"{\"eventName\": \n".to_vec(),
                lines(&records[1..]),
            ]
            .concat(),
            "JSON value 2",
        ),
    ];
    let mut inputs: Vec<(&str, Vec<u8>)> = vec![("good-1.json", good.clone())];
    inputs.extend(cases.iter().map(|(n, b, _)| (*n, b.clone())));
    inputs.push(("good-2.json", good));
    let report = run_with(&inputs, DEFAULT_MAX_GROUPS);
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.path.as_str()).collect();
    let names: Vec<&str> = cases.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(skipped, names, "{:#?}", report.skipped);
    for ((_, _, why), s) in cases.iter().zip(&report.skipped) {
        assert!(s.reason.contains(why), "{}: {}", s.path, s.reason);
    }
    assert_eq!(report.files_read, 2);
    // Both good files (5 records each), the file with garbage after its gzip member (5), the
    // truncated file's complete record, the record before the wrong type, the line before the
    // bad one; the cut gzip file counts whatever complete records its first half held.
    let cut = run("cut.json.gz", inputs[2].1.clone());
    assert_eq!(report.records_read, 10 + 5 + 1 + 1 + 1 + cut.records_read);
    assert_eq!(
        report.records_denied_locked,
        2 + 1 + 1 + 1 + 1 + cut.records_denied_locked
    );
}

#[test]
fn no_prefix_of_a_file_panics_or_counts_more_than_it_holds() {
    let whole = delivery(&mixed_records());
    for bytes in [whole.clone(), gzip(&whole), lines(&mixed_records())] {
        for cut in 0..bytes.len() {
            let report = run("cut", bytes[..cut].to_vec());
            assert!(report.records_read <= 5);
            assert_eq!(report.skipped.len() + report.files_read as usize, 1);
        }
        // Every byte flipped, one at a time.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x55;
            let report = run("flipped", b);
            assert!(report.records_read <= 6, "{i}");
        }
    }
}

// ---- files and directories ----

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("credlock-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn directories_are_walked_recursively_and_every_file_is_accounted_for() {
    let tmp = TempDir::new("walk");
    let base = "AWSLogs/111122223333/CloudTrail/eu-west-1/2026/11/30";
    let good = gzip(&delivery(&mixed_records()));
    tmp.write(
        &format!("{base}/111122223333_CloudTrail_eu-west-1_20261130T1200Z_a.json.gz"),
        &good,
    );
    tmp.write(
        &format!("{base}/111122223333_CloudTrail_eu-west-1_20261130T1205Z_b.json.gz"),
        &good,
    );
    tmp.write(
        "AWSLogs/111122223333/CloudTrail/eu-west-1/2026/12/01/plain.json",
        &delivery(&mixed_records()),
    );
    tmp.write("exports/lake.jsonl.gz", &gzip(&lines(&mixed_records())));
    tmp.write(
        "AWSLogs/111122223333/CloudTrail-Digest/eu-west-1/2026/11/30/111122223333_CloudTrail-Digest_eu-west-1_t_eu-west-1_20261130T1300Z.json.gz",
        &gzip(br#"{"awsAccountId": "111122223333", "logFiles": []}"#),
    );
    let broken = tmp.write(&format!("{base}/broken.json.gz"), &good[..good.len() - 20]);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&tmp.0, tmp.0.join("exports/loop")).unwrap();
    let single = tmp.write("single.json", &lines(&mixed_records()[..1]));
    let missing = tmp.0.join("missing.json.gz");
    let report = audit_paths(
        &[
            tmp.0.join("AWSLogs"),
            tmp.0.join("exports"),
            single,
            missing.clone(),
        ],
        &judge,
        &AuditOptions {
            max_groups: 100,
            progress: false,
        },
    );
    assert_eq!(report.files_read, 5, "{report:#?}");
    assert_eq!(report.digest_files, 1);
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        skipped,
        [broken.display().to_string(), missing.display().to_string()]
    );
    let broken_counted = run("b", good[..good.len() - 20].to_vec()).records_read;
    assert_eq!(report.records_read, 4 * 5 + 1 + broken_counted);
    assert_eq!(
        report.denied_locked[0].count,
        5 + run("b", good[..good.len() - 20].to_vec()).records_denied_locked
    );
}

#[test]
fn deeply_nested_values_neither_overflow_the_stack_nor_fail() {
    // Skipped values are skipped iteratively (any depth); values the audit reads are objects
    // a few levels deep, and serde_json's recursion limit guards the rest.
    let depth = 200_000;
    let mut skipped = String::from(r#"{"Records":[{"eventName":"X","requestParameters":"#);
    skipped.push_str(&"[".repeat(depth));
    skipped.push_str(&"]".repeat(depth));
    skipped.push_str("}]}");
    let report = run("deep.json", skipped.into_bytes());
    assert_eq!(
        (report.files_read, report.records_ignored),
        (1, 1),
        "{:?}",
        report.skipped
    );
    let mut read =
        String::from(r#"{"Records":[{"userIdentity":{"sessionContext":{"sourceIdentity":"#);
    read.push_str(&"[".repeat(depth));
    let report = run("deep.json", read.into_bytes());
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.contains("invalid type"),
        "{:?}",
        report.skipped
    );
}

#[path = "audit_classify_tests.rs"]
mod classify;
