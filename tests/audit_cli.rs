//! `credlock audit` as an operator runs it, judged by the lock itself: the binary reads a
//! generated CloudTrail corpus (gzipped delivery files, a JSON-lines export, malformed files)
//! with an `--environment` document, renders the session policy for it and evaluates every
//! instance-profile call with credlock's evaluator. Its two lists must equal the generator's
//! answers, which are known by construction (tests/support/cloudtrail_corpus.py), and its exit
//! codes follow grep's.

use std::path::PathBuf;
use std::process::Command;

fn python() -> String {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    if std::path::Path::new(venv).exists() {
        venv.to_string()
    } else {
        "python3".to_string()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("credlock-audit-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn audit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_credlock"))
        .args(["audit", "--config", "/dev/null"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The groups without the advice (the generator's wording is its own).
fn groups(list: &serde_json::Value) -> Vec<serde_json::Value> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let mut g = g.clone();
            g.as_object_mut().unwrap().remove("advice");
            g
        })
        .collect()
}

#[test]
fn the_lock_judges_a_corpus_exactly_as_its_answers_say() {
    let dir = scratch("corpus");
    let corpus = dir.join("logs");
    let answers = dir.join("answers.json");
    let status = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/cloudtrail_corpus.py"
        ))
        .args([
            "--out",
            corpus.to_str().unwrap(),
            "--answers",
            answers.to_str().unwrap(),
        ])
        .args(["--seed", "7", "--files", "12", "--events-per-file", "400"])
        .status()
        .expect("python3 runs the corpus generator");
    assert!(status.success());
    let answers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&answers).unwrap()).unwrap();
    // The generator's environment, as the boot-provider document credlock reads.
    let env = &answers["environment"];
    let (v4, v6): (Vec<_>, Vec<_>) = env["cidrs"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .partition(|c| !c.as_str().unwrap().contains(':'));
    let document =
        serde_json::json!({"ipv4": v4, "ipv6": v6, "vpc_endpoints": env["vpc_endpoints"]});
    let env_file = dir.join("fleet.json");
    std::fs::write(&env_file, document.to_string()).unwrap();

    let (code, stdout, stderr) = audit(&[
        "--json",
        "--environment",
        env_file.to_str().unwrap(),
        corpus.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "findings exit 1: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(!groups(&answers["denied_locked"]).is_empty());
    assert_eq!(
        groups(&report["denied_locked"]),
        groups(&answers["denied_locked"])
    );
    assert_eq!(
        groups(&report["would_deny"]),
        groups(&answers["would_deny"])
    );
    for counter in [
        "records_read",
        "records_denied_locked",
        "records_would_deny",
        "records_native_allowed",
        "records_ignored",
        "files_read",
    ] {
        assert_eq!(report[counter], answers[counter], "{counter}");
    }
    // Every malformed file is named on stderr and skipped; nothing else is lost.
    let skipped = answers["skipped"].as_array().unwrap();
    assert!(!skipped.is_empty());
    for s in skipped {
        let path = s["path"].as_str().or(s.as_str()).unwrap();
        let name = std::path::Path::new(path)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert!(stderr.contains(name), "{name} not reported: {stderr}");
    }
    // The readable table names both lists; the advice names the address and the instance.
    let (code, table, _) = audit(&[
        "--environment",
        env_file.to_str().unwrap(),
        corpus.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(table.contains("Denied by the lock"), "{table}");
    assert!(table.contains("is not in the environment of i-"), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn exit_codes_follow_grep() {
    let dir = scratch("codes");
    let env_file = dir.join("fleet.json");
    std::fs::write(&env_file, r#"{"ipv4": ["203.0.113.0/24"]}"#).unwrap();
    let env = env_file.to_str().unwrap();
    // A clean log: a native session's call from inside the environment.
    let clean = dir.join("clean.json");
    std::fs::write(
        &clean,
        serde_json::json!({"Records": [{
            "eventVersion": "1.09",
            "eventTime": "2026-11-30T10:00:00Z",
            "eventSource": "s3.amazonaws.com",
            "eventName": "GetObject",
            "sourceIPAddress": "203.0.113.10",
            "userIdentity": {
                "type": "AssumedRole",
                "arn": "arn:aws:sts::123456789012:assumed-role/app-role/i-0123456789abcdef0",
                "accessKeyId": "ASIAEXAMPLE",
                "sessionContext": {"ec2RoleDelivery": "2.0"}
            }
        }]})
        .to_string(),
    )
    .unwrap();
    let (code, _, stderr) = audit(&["--environment", env, clean.to_str().unwrap()]);
    assert_eq!(code, 0, "nothing found: {stderr}");
    let (code, _, _) = audit(&["--environment", env]);
    assert_eq!(code, 2, "no path is a usage error");
    let (code, _, stderr) = audit(&[
        "--environment",
        "/nonexistent/env.json",
        clean.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "an unreadable environment: {stderr}");
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "not json").unwrap();
    let (code, _, stderr) = audit(&["--environment", env, junk.to_str().unwrap()]);
    assert_eq!(code, 3, "nothing readable: {stderr}");
    assert!(stderr.contains("junk.json"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tripwire's EventBridge pattern and `audit` agree on what a lock denial is: every sample
/// the pattern must match (tests/tripwire/events/pos-*) is in `denied_locked`, and none it must
/// not match (neg-*) is.
#[test]
fn audit_and_the_tripwire_pattern_agree_on_every_sample() {
    let dir = scratch("tripwire");
    let env_file = dir.join("fleet.json");
    std::fs::write(&env_file, r#"{"ipv4": ["203.0.113.0/24"]}"#).unwrap();
    let events = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tripwire/events"
    ));
    let mut seen = 0;
    for entry in std::fs::read_dir(events).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let positive = name.starts_with("pos-");
        if !(positive || name.starts_with("neg-")) {
            continue;
        }
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = dir.join(&name);
        std::fs::write(
            &file,
            serde_json::json!({ "Records": [record] }).to_string(),
        )
        .unwrap();
        let (_, stdout, stderr) = audit(&[
            "--json",
            "--environment",
            env_file.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        let report: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{name}: {e}: {stderr}"));
        let denied = report["denied_locked"].as_array().unwrap().len();
        assert_eq!(denied, usize::from(positive), "{name}: {stdout}");
        seen += 1;
    }
    assert!(seen >= 15, "{seen} samples");
    std::fs::remove_dir_all(&dir).unwrap();
}
