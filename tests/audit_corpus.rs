//! `credlock audit` against a generated corpus with known answers
//! (tests/support/cloudtrail_corpus.py): thousands of events in gzipped delivery files, a plain
//! file, a JSON-lines export, a digest file and malformed files. Both lists, every counter and
//! the skipped files must equal the generator's answers exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

use credlock::audit::{AuditOptions, Call, audit_paths, render_table};
use ipnet::IpNet;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// CREDLOCK_PYTHON, the repo's venv, or python3 (the generator needs only the standard library).
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CREDLOCK_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn generate(dir: &Path, extra: &[&str]) -> Value {
    let answers = dir.join("answers.json");
    let out = dir.join("corpus");
    let status = Command::new(python())
        .arg(repo().join("tests/support/cloudtrail_corpus.py"))
        .arg("--out")
        .arg(&out)
        .arg("--answers")
        .arg(&answers)
        .args(extra)
        .status()
        .expect("cannot run the corpus generator (python3 needed)");
    assert!(status.success(), "generator failed: {status}");
    serde_json::from_slice(&std::fs::read(&answers).unwrap()).unwrap()
}

/// The generator's environment rule: via an AWS service, through one of its VPC endpoints, or
/// (no endpoint) from an address in its CIDRs is allowed.
fn environment_judge(answers: &Value) -> impl Fn(&Call<'_>) -> Option<String> + use<> {
    let env = &answers["environment"];
    let cidrs: Vec<IpNet> = env["cidrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().parse().unwrap())
        .collect();
    let vpces: Vec<String> = env["vpc_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    move |call: &Call<'_>| {
        if call.via_aws_service {
            return None;
        }
        let source = match (call.vpc_endpoint_id, call.source_ip) {
            (Some(vpce), _) if vpces.iter().any(|v| v == vpce) => return None,
            (Some(vpce), _) => vpce.to_string(),
            (None, Some(ip)) if cidrs.iter().any(|c| c.contains(&ip)) => return None,
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "nowhere".to_string(),
        };
        Some(format!(
            "{} from {source} is outside the environment of {}",
            call.action, call.instance_id
        ))
    }
}

#[test]
fn a_generated_corpus_gives_exactly_the_known_answers() {
    let dir = std::env::temp_dir().join(format!("credlock-audit-corpus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let answers = generate(
        &dir,
        &["--seed", "16", "--files", "40", "--events-per-file", "150"],
    );
    let judge = environment_judge(&answers);
    let report = audit_paths(&[dir.join("corpus")], &judge, &AuditOptions::default());
    let got = serde_json::to_value(&report).unwrap();

    let records = answers["records_read"].as_u64().unwrap();
    assert!(records >= 6_000, "{records} records");
    let denied = answers["denied_locked"].as_array().unwrap();
    let would = answers["would_deny"].as_array().unwrap();
    assert!(
        denied.len() > 50 && would.len() > 50,
        "{} / {}",
        denied.len(),
        would.len()
    );
    assert_eq!(
        got["denied_locked"], answers["denied_locked"],
        "denied_locked differs"
    );
    assert_eq!(
        got["would_deny"], answers["would_deny"],
        "would_deny differs"
    );
    for counter in [
        "files_read",
        "digest_files",
        "records_read",
        "records_denied_locked",
        "records_locked_other",
        "records_would_deny",
        "records_native_allowed",
        "records_ignored",
        "records_cross_account",
        "dropped_groups",
        "dropped_events",
    ] {
        assert_eq!(got[counter], answers[counter], "{counter}");
    }
    assert!(answers["records_cross_account"].as_u64().unwrap() > 0);
    let mut skipped: Vec<&str> = report.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort_unstable();
    let expected: Vec<&str> = answers["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(skipped, expected, "{:#?}", report.skipped);

    // The table names every group.
    let table = render_table(&report);
    assert!(table.lines().count() > denied.len() + 2 * would.len());

    // A cap below the number of groups: the counts kept plus the events dropped still add up.
    let capped = audit_paths(
        &[dir.join("corpus")],
        &judge,
        &AuditOptions {
            max_groups: 20,
            progress: false,
        },
    );
    assert_eq!(capped.denied_locked.len(), 20);
    assert!(capped.dropped_groups > 0);
    let kept: u64 = capped.denied_locked.iter().map(|g| g.count).sum();
    assert_eq!(
        kept + capped.dropped.denied_locked.events,
        capped.records_denied_locked
    );
    let kept: u64 = capped.would_deny.iter().map(|g| g.count).sum();
    assert_eq!(
        kept + capped.dropped.would_deny.events,
        capped.records_would_deny
    );
}
