//! `credlock explain` as an operator runs it: the binary, a session policy rendered from the
//! shipped template for a known environment, and the exit codes the README promises (0 allowed,
//! 1 denied, 2 usage, 3 no policy to evaluate). The evaluator's agreement with an independent
//! one (iam-rs) over a generated matrix is in `src/evaluate_matrix_tests.rs`.

use std::process::Command;

use credlock::environment::Environment;
use credlock::identity::RoleArn;
use credlock::policy;

const ROLE: &str = "arn:aws:iam::123456789012:role/team/app-role";

fn policy_file() -> tempfile_path::TempPath {
    let mut env = Environment::default();
    env.add_ip("203.0.113.10");
    env.add_ip("2001:db8:1::10");
    env.vpcs.insert("vpc-0abc1234def567890".into());
    env.vpc_endpoints.insert("vpce-0123456789abcdef0".into());
    let template = policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap();
    let rendered = policy::render(&template, &env, &RoleArn::parse(ROLE).unwrap()).unwrap();
    tempfile_path::TempPath::with(&rendered.text)
}

/// A file removed when dropped (no extra dependency for one temp file).
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(text: &str) -> TempPath {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("credlock-explain-{}-{n}.json", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempPath(path)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn explain(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_credlock"))
        .arg("explain")
        .args(["--config", "/dev/null"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_thief_is_denied_and_the_instance_allowed_with_the_deciding_statement() {
    let file = policy_file();
    let policy = file.0.to_str().unwrap();
    let object = "arn:aws:s3:::bucket/key";
    let base = [
        "--policy",
        policy,
        "--action",
        "s3:GetObject",
        "--resource",
        object,
    ];

    // A stolen set used from another address: the lock's deny, and why.
    let (code, out) = explain(&[&base[..], &["--source-ip", "198.51.100.7"]].concat());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("DENY: explicit deny by Statement[1] \"DenyOutsideInstanceNetwork\""),
        "{out}"
    );
    assert!(
        out.contains("NotIpAddressIfExists aws:SourceIp: 198.51.100.7 is not in"),
        "{out}"
    );

    // The instance's own address, IPv4 and IPv6: allowed by the allow-all statement.
    for ip in ["203.0.113.10", "2001:db8:1::10"] {
        let (code, out) = explain(&[&base[..], &["--source-ip", ip]].concat());
        assert_eq!(code, 0, "{ip}: {out}");
        assert!(
            out.starts_with("ALLOW: allow by Statement[0] \"AllowAllBoundedByRole\""),
            "{out}"
        );
    }
    // Through the instance's VPC endpoint (no public source address): allowed; through
    // another endpoint: denied.
    let (code, out) = explain(
        &[
            &base[..],
            &[
                "--vpc",
                "vpc-0abc1234def567890",
                "--vpce",
                "vpce-0123456789abcdef0",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = explain(
        &[
            &base[..],
            &["--vpc", "vpc-0fff", "--vpce", "vpce-0fffffffffffffff0"],
        ]
        .concat(),
    );
    assert_eq!(code, 1, "{out}");
    // An AWS service on the caller's behalf (its own address): not the lock's business.
    let (code, out) = explain(
        &[
            &base[..],
            &["--source-ip", "52.94.0.1", "--via-aws-service"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}");
    // Re-assuming the role from inside the network: denied by its own statement.
    let (code, out) = explain(&[
        "--policy",
        policy,
        "--action",
        "sts:AssumeRole",
        "--resource",
        ROLE,
        "--source-ip",
        "203.0.113.10",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DenySelfAssume"), "{out}");
}

#[test]
fn usage_and_missing_policies_have_their_own_exit_codes() {
    let (code, out) = explain(&["--source-ip", "198.51.100.7"]);
    assert_eq!(code, 2, "no --action is a usage error: {out}");
    let (code, out) = explain(&["--action", "s3:GetObject", "--source-ip", "not-an-ip"]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = explain(&[
        "--policy",
        "/nonexistent/policy.json",
        "--action",
        "s3:GetObject",
    ]);
    assert_eq!(code, 3, "{out}");
    let bad = tempfile_path::TempPath::with(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"MadeUpOperator":{"aws:SourceIp":"1.2.3.4"}}}]}"#,
    );
    let (code, out) = explain(&[
        "--policy",
        bad.0.to_str().unwrap(),
        "--action",
        "s3:GetObject",
    ]);
    assert_eq!(
        code, 3,
        "an operator it cannot read is refused, never guessed: {out}"
    );
    assert!(out.contains("MadeUpOperator"), "{out}");
}
