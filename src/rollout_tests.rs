use super::*;

const ROLE: &str = "arn:aws:iam::123456789012:role/app-role";

fn judge(fleet: &str, own: &[(&str, &str)]) -> LockJudge {
    let dir = std::env::temp_dir().join(format!(
        "credlock-rollout-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fleet.json"), fleet).unwrap();
    for (instance, doc) in own {
        std::fs::write(dir.join(format!("{instance}.json")), doc).unwrap();
    }
    let envs = Environments::load(std::slice::from_ref(&dir)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    LockJudge::new(
        policy::parse_template(policy::BUILTIN_TEMPLATE).unwrap(),
        RoleArn::parse(ROLE).unwrap(),
        envs,
    )
}

fn call<'a>(instance: &'a str, ip: Option<&str>, vpce: Option<&'a str>, via: bool) -> Call<'a> {
    Call {
        instance_id: instance,
        action: "s3:GetObject".into(),
        source_ip: ip.map(|i| i.parse().unwrap()),
        vpc_endpoint_id: vpce,
        via_aws_service: via,
        event_source: "s3.amazonaws.com",
        event_name: "GetObject",
    }
}

const A: &str = "i-0123456789abcdef0";
const B: &str = "i-0fedcba9876543210";

#[test]
fn each_instance_is_judged_by_the_fleet_environment_and_its_own() {
    let j = judge(
        r#"{"ipv4": ["198.51.100.0/24"], "vpcs": ["vpc-0abc1234def567890"]}"#,
        &[
            (A, r#"{"ipv4": ["203.0.113.10"]}"#),
            (B, r#"{"ipv4": ["203.0.113.20"]}"#),
        ],
    );
    // The fleet's NAT range and each instance's own address pass.
    assert_eq!(
        j.would_deny(&call(A, Some("198.51.100.7"), None, false)),
        None
    );
    assert_eq!(
        j.would_deny(&call(A, Some("203.0.113.10"), None, false)),
        None
    );
    assert_eq!(
        j.would_deny(&call(B, Some("203.0.113.20"), None, false)),
        None
    );
    // B's address is not A's: from A's credentials it is outside.
    let advice = j
        .would_deny(&call(A, Some("203.0.113.20"), None, false))
        .unwrap();
    assert!(
        advice.contains("203.0.113.20 is not in the environment of i-0123456789abcdef0"),
        "{advice}"
    );
    assert!(advice.contains("NAT gateway or a proxy"), "{advice}");
    // An AWS service on the caller's behalf: the lock's exemption.
    assert_eq!(j.would_deny(&call(A, Some("52.94.0.1"), None, true)), None);
}

#[test]
fn endpoint_calls_are_judged_by_the_endpoint_in_the_instances_vpc() {
    let j = judge(
        r#"{"vpcs": ["vpc-0abc1234def567890"], "vpc_endpoints": ["vpce-0123456789abcdef0"]}"#,
        &[(A, r#"{"ipv4": ["203.0.113.10"]}"#)],
    );
    // Through the environment's VPC (the private address is not aws:SourceIp): passes.
    assert_eq!(
        j.would_deny(&call(
            A,
            Some("10.0.1.5"),
            Some("vpce-0123456789abcdef0"),
            false
        )),
        None
    );
    assert_eq!(
        j.would_deny(&call(
            A,
            Some("10.0.1.5"),
            Some("vpce-0fffffffffffffff0"),
            false
        )),
        None
    );
    // Without any VPC in the environment, an unknown endpoint is outside.
    let j = judge(r#"{"ipv4": ["203.0.113.10"]}"#, &[]);
    let advice = j
        .would_deny(&call(
            A,
            Some("10.0.1.5"),
            Some("vpce-0fffffffffffffff0"),
            false,
        ))
        .unwrap();
    assert!(
        advice.starts_with("vpce-0fffffffffffffff0 is not in the environment"),
        "{advice}"
    );
}

#[test]
fn an_instance_without_an_environment_is_flagged_not_passed() {
    let j = judge(r#"{}"#, &[(A, r#"{"ipv4": ["203.0.113.10"]}"#)]);
    let advice = j
        .would_deny(&call(B, Some("203.0.113.10"), None, false))
        .unwrap();
    assert!(
        advice.contains("no lock can be rendered for i-0fedcba9876543210"),
        "{advice}"
    );
}

#[test]
fn bad_documents_are_errors_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("credlock-rollout-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.json");
    for bad in [
        r#"{"ipv4": ["not-an-ip"]}"#,
        r#"{"vpcs": ["subnet-0abc"]}"#,
        r#"{"ipv4": [], "extra": 1}"#,
        "{",
    ] {
        std::fs::write(&file, bad).unwrap();
        let e = Environments::load(std::slice::from_ref(&file)).unwrap_err();
        assert!(e.starts_with(&file.display().to_string()), "{bad}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(is_instance_id("i-0123456789abcdef0") && is_instance_id("i-12345678"));
    assert!(!is_instance_id("i-0123456789ABCDEF0") && !is_instance_id("fleet"));
}
