//! The agreement matrix: credlock's real session policies (both templates, roles with and
//! without a path, three environments) evaluated by this module and by the independent
//! evaluator iam-rs over thousands of request contexts; both must agree on Allow vs Deny for
//! every one. Then the cases where iam-rs departs from the IAM User Guide, each asserted both
//! ways, the reasons `explain` shows, and property tests (no input panics; the wildcard matcher
//! agrees with a recursive definition).

use super::*;
use crate::environment::Environment;
use crate::identity::RoleArn;
use crate::policy::{BUILTIN_TEMPLATE, parse_template, render};
use proptest::prelude::*;
use serde_json::{Value, json};

use iam_rs::{
    Arn, Context, Decision as IamDecision, IAMPolicy, IAMRequest, PolicyEvaluator, Principal,
    PrincipalId,
};

const ROLE: &str = "arn:aws:iam::123456789012:role/app-role";
const ROLE_WITH_PATH: &str = "arn:aws:iam::123456789012:role/team/app-role";
const NO_ROLE_CHAINING: &str =
    include_str!("../policy-templates/session-policy-no-role-chaining.json");
const VPC: &str = "vpc-0abc1234def567890";
const VPCE: &str = "vpce-0123456789abcdef0";

/// IPv4 (two neighbours, which the renderer merges into a /31) and IPv6, a VPC and an endpoint.
fn full_env() -> Environment {
    let mut env = ip_only_env();
    env.vpcs.insert(VPC.into());
    env.vpc_endpoints.insert(VPCE.into());
    env
}

/// No VPC lists: the renderer drops the `aws:SourceVpc`/`aws:SourceVpce` keys.
fn ip_only_env() -> Environment {
    let mut env = Environment::default();
    env.add_ip("203.0.113.10");
    env.add_ip("203.0.113.11");
    env.add_ip("2001:db8:1::10");
    env
}

/// No addresses: the renderer drops the whole `NotIpAddressIfExists` block.
fn vpc_only_env() -> Environment {
    let mut env = Environment::default();
    env.vpcs.insert(VPC.into());
    env.vpc_endpoints.insert(VPCE.into());
    env
}

/// Every rendered policy the matrix covers, with a label for failure messages.
fn policies() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (template_name, template) in [
        ("builtin", BUILTIN_TEMPLATE),
        ("no-role-chaining", NO_ROLE_CHAINING),
    ] {
        let template = parse_template(template).unwrap();
        for role in [ROLE, ROLE_WITH_PATH] {
            let envs = [
                ("full", full_env()),
                ("ip-only", ip_only_env()),
                ("vpc-only", vpc_only_env()),
            ];
            for (env_name, env) in envs {
                let text = render(&template, &env, &RoleArn::parse(role).unwrap())
                    .unwrap()
                    .text;
                out.push((
                    format!("{template_name} template, role {role}, {env_name} environment"),
                    text,
                ));
            }
        }
    }
    out
}

/// Actions inside and outside the template's `NotAction` exceptions, and role assumption of
/// the role itself (with and without a path), of look-alikes and of other roles.
const CALLS: &[(&str, &str)] = &[
    ("s3:GetObject", "arn:aws:s3:::bucket/key"),
    (
        "ec2:DescribeInstances",
        "arn:aws:ec2:us-east-1:123456789012:instance/i-0123",
    ),
    (
        "es:ESHttpGet",
        "arn:aws:es:us-east-1:123456789012:domain/d/index",
    ),
    (
        "ES:eshttppost",
        "arn:aws:es:us-east-1:123456789012:domain/d/index",
    ),
    (
        "es:CreateDomain",
        "arn:aws:es:us-east-1:123456789012:domain/d",
    ),
    ("dax:GetItem", "arn:aws:dax:us-east-1:123456789012:cache/c"),
    (
        "dax:CreateCluster",
        "arn:aws:dax:us-east-1:123456789012:cache/c",
    ),
    (
        "rds-db:connect",
        "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-1/u",
    ),
    (
        "rds:DescribeDBInstances",
        "arn:aws:rds:us-east-1:123456789012:db:db-1",
    ),
    (
        "neptune-db:ReadDataViaQuery",
        "arn:aws:neptune-db:us-east-1:123456789012:cluster-1/*",
    ),
    (
        "kafka-cluster:Connect",
        "arn:aws:kafka:us-east-1:123456789012:cluster/c/u",
    ),
    (
        "elasticfilesystem:ClientMount",
        "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-1",
    ),
    (
        "elasticfilesystem:DeleteFileSystem",
        "arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/fs-1",
    ),
    ("kms:Decrypt", "arn:aws:kms:us-east-1:123456789012:key/k"),
    ("sts:AssumeRole", ROLE),
    ("sts:AssumeRole", ROLE_WITH_PATH),
    ("STS:assumerole", ROLE),
    (
        "sts:AssumeRole",
        "arn:aws:iam::123456789012:role/team/sub/app-role",
    ),
    ("sts:AssumeRole", "arn:aws:iam::123456789012:role/other"),
    (
        "sts:AssumeRole",
        "arn:aws:iam::123456789012:role/team/other",
    ),
    (
        "sts:AssumeRole",
        "arn:aws:iam::123456789012:role/app-role-2",
    ),
    ("sts:AssumeRole", "arn:aws:iam::210987654321:role/app-role"),
    (
        "sts:AssumeRoleWithWebIdentity",
        "arn:aws:iam::123456789012:role/other",
    ),
];

const IPS: &[Option<&str>] = &[
    None,
    Some("203.0.113.10"),
    Some("203.0.113.11"),
    Some("203.0.113.12"),
    Some("198.51.100.7"),
    Some("2001:db8:1::10"),
    Some("2001:db8:1::11"),
    Some("2001:db8:9::1"),
];
const VPCS: &[Option<&str>] = &[None, Some(VPC), Some("vpc-0fffffffffffffff0")];
const VPCES: &[Option<&str>] = &[None, Some(VPCE), Some("vpce-0fffffffffffffff0")];
const VIAS: &[Option<bool>] = &[None, Some(true), Some(false)];

fn contexts() -> Vec<RequestContext> {
    let mut out = Vec::new();
    for &(action, resource) in CALLS {
        for ip in IPS {
            for vpc in VPCS {
                for vpce in VPCES {
                    for via in VIAS {
                        out.push(RequestContext {
                            action: action.into(),
                            resource: Some(resource.into()),
                            source_ip: ip.map(|ip| ip.parse().unwrap()),
                            source_vpc: vpc.map(str::to_string),
                            source_vpce: vpce.map(str::to_string),
                            via_aws_service: *via,
                            extra: Default::default(),
                        });
                    }
                }
            }
        }
    }
    out
}

/// The same request as iam-rs sees it: absent keys are left out of its context.
fn iam_rs_allows(evaluator: &PolicyEvaluator, r: &RequestContext) -> bool {
    let mut context = Context::new();
    if let Some(ip) = r.source_ip {
        context = context.with_string("aws:SourceIp", ip.to_string());
    }
    if let Some(vpc) = &r.source_vpc {
        context = context.with_string("aws:SourceVpc", vpc.as_str());
    }
    if let Some(vpce) = &r.source_vpce {
        context = context.with_string("aws:SourceVpce", vpce.as_str());
    }
    if let Some(via) = r.via_aws_service {
        context = context.with_boolean("aws:ViaAWSService", via);
    }
    let resource = r.resource.as_deref().unwrap_or_default();
    let request = IAMRequest::new_with_context(
        Principal::Aws(PrincipalId::String(format!("{ROLE}-session"))),
        &r.action,
        Arn::parse(resource).unwrap(),
        context,
    );
    let decision = evaluator.evaluate(&request).unwrap().decision;
    decision == IamDecision::Allow
}

#[test]
fn agrees_with_iam_rs_on_every_rendered_policy_and_context() {
    let contexts = contexts();
    let (mut cases, mut allowed, mut failures) = (0usize, 0usize, Vec::new());
    for (label, text) in policies() {
        let ours = PolicyDocument::parse(&text).unwrap();
        let theirs = PolicyEvaluator::with_policies(vec![IAMPolicy::from_json(&text).unwrap()]);
        for r in &contexts {
            cases += 1;
            let mine = evaluate(&ours, r);
            allowed += usize::from(mine.allowed());
            if mine.allowed() != iam_rs_allows(&theirs, r) {
                failures.push(format!(
                    "{label}\n  policy {text}\n  {r:?}\n  ours: {:?} {:#?}",
                    mine.decision, mine.reasons
                ));
            }
        }
    }
    assert!(cases >= 1000, "{cases}");
    assert_eq!(
        cases,
        12 * CALLS.len() * IPS.len() * VPCS.len() * VPCES.len() * VIAS.len()
    );
    // Neither answer dominates, so agreement says something.
    assert!(
        allowed > cases / 10 && allowed < cases * 9 / 10,
        "{allowed} of {cases} allowed"
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} disagree; first:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    println!("{cases} cases agree ({allowed} allowed)");
}

/// Spot checks of the matrix against the lock's truth table, independent of iam-rs.
#[test]
fn the_rendered_lock_decides_as_designed() {
    let text = render(
        &parse_template(BUILTIN_TEMPLATE).unwrap(),
        &full_env(),
        &RoleArn::parse(ROLE).unwrap(),
    )
    .unwrap()
    .text;
    let p = PolicyDocument::parse(&text).unwrap();
    let call =
        |action: &str, resource: &str, ip: Option<&str>, vpc: Option<&str>, via: Option<bool>| {
            evaluate(
                &p,
                &RequestContext {
                    action: action.into(),
                    resource: Some(resource.into()),
                    source_ip: ip.map(|i| i.parse().unwrap()),
                    source_vpc: vpc.map(str::to_string),
                    via_aws_service: via,
                    ..Default::default()
                },
            )
            .decision
        };
    let obj = "arn:aws:s3:::bucket/key";
    assert_eq!(
        call("s3:GetObject", obj, Some("203.0.113.11"), None, Some(false)),
        Decision::Allow
    );
    assert_eq!(
        call("s3:GetObject", obj, Some("198.51.100.7"), None, Some(false)),
        Decision::ExplicitDeny
    );
    assert_eq!(
        call("s3:GetObject", obj, Some("198.51.100.7"), None, Some(true)),
        Decision::Allow
    );
    assert_eq!(
        call("s3:GetObject", obj, None, Some(VPC), None),
        Decision::Allow
    );
    assert_eq!(
        call("s3:GetObject", obj, None, Some("vpc-other"), None),
        Decision::ExplicitDeny
    );
    // Every key absent: each IfExists holds, so the network Deny applies.
    assert_eq!(
        call("s3:GetObject", obj, None, None, None),
        Decision::ExplicitDeny
    );
    assert_eq!(
        call(
            "rds-db:connect",
            "arn:aws:rds-db:r:1:dbuser:d/u",
            Some("198.51.100.7"),
            None,
            Some(false)
        ),
        Decision::Allow
    );
    assert_eq!(
        call(
            "sts:AssumeRole",
            ROLE_WITH_PATH,
            Some("203.0.113.10"),
            None,
            None
        ),
        Decision::ExplicitDeny
    );
}

/// Where iam-rs 0.8.0 departs from the IAM User Guide. Each case asserts the documented AWS
/// answer for this evaluator and iam-rs's different answer, so an iam-rs fix shows up here.
/// None of these affects credlock's templates (they use no ARN operators and spell keys as
/// AWS does), which is why the matrix above needs no exceptions.
#[test]
fn documented_differences_from_iam_rs() {
    let allow_if = |condition: &str| {
        format!(
            r#"{{"Version":"2012-10-17","Statement":{{"Effect":"Allow","Action":"*","Resource":"*","Condition":{condition}}}}}"#
        )
    };
    let both = |policy: &str, key: &str, value: &str| {
        let mut r = RequestContext {
            action: "sns:Publish".into(),
            resource: Some("arn:aws:sqs:us-east-1:123456789012:q".into()),
            ..Default::default()
        };
        r.extra
            .insert(key.to_ascii_lowercase(), vec![value.to_string()]);
        let ours = evaluate(&PolicyDocument::parse(policy).unwrap(), &r).allowed();
        let evaluator = PolicyEvaluator::with_policies(vec![IAMPolicy::from_json(policy).unwrap()]);
        let request = IAMRequest::new_with_context(
            Principal::Aws(PrincipalId::String(ROLE.into())),
            &r.action,
            Arn::parse(r.resource.as_deref().unwrap()).unwrap(),
            Context::new().with_string(key, value),
        );
        let theirs = evaluator.evaluate(&request).unwrap().decision == IamDecision::Allow;
        (ours, theirs)
    };
    // 1. "IAM JSON policy elements: Condition operators": "The ArnEquals and ArnLike condition
    //    operators behave identically" (wildcards in each component). iam-rs compares ArnEquals
    //    as an exact string.
    let p = allow_if(r#"{"ArnEquals":{"aws:SourceArn":"arn:aws:sns:*:123456789012:topic"}}"#);
    assert_eq!(
        both(
            &p,
            "aws:SourceArn",
            "arn:aws:sns:us-east-1:123456789012:topic"
        ),
        (true, false)
    );
    // 2. Same page: with ArnLike "the first asterisk matches only us-east-2 and fails" on the
    //    documented value; iam-rs lets it reach across colons, as StringLike would.
    let p =
        allow_if(r#"{"ArnLike":{"aws:SourceArn":"arn:aws:someservice:*:111122223333:finance/*"}}"#);
    let value =
        "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/document.txt";
    assert_eq!(both(&p, "aws:SourceArn", value), (false, true));
    // Agreement, for the record: "IAM JSON policy elements: Condition" says "Condition key
    // names are not case-sensitive", and iam-rs 0.8.0 looks keys up case-insensitively too.
    let p = allow_if(r#"{"StringEquals":{"aws:sourcevpc":"vpc-1"}}"#);
    assert_eq!(both(&p, "aws:SourceVpc", "vpc-1"), (true, true));
    // 3. "IAM JSON policy elements: Resource": "If the * wildcard is the last character of a
    //    resource ARN segment, it can expand to match beyond the colon boundaries". iam-rs
    //    cannot parse a Resource with fewer than six segments and fails the evaluation.
    let p = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"arn:aws:ec2:*"}}"#;
    let r = RequestContext {
        action: "ec2:StopInstances".into(),
        resource: Some("arn:aws:ec2:us-east-1:123456789012:instance/i-1".into()),
        ..Default::default()
    };
    assert!(evaluate(&PolicyDocument::parse(p).unwrap(), &r).allowed());
    let request = IAMRequest::new(
        Principal::Aws(PrincipalId::String(ROLE.into())),
        &r.action,
        Arn::parse(r.resource.as_deref().unwrap()).unwrap(),
    );
    let theirs = IAMPolicy::from_json(p)
        .map_err(|e| e.to_string())
        .and_then(|policy| {
            PolicyEvaluator::with_policies(vec![policy])
                .evaluate(&request)
                .map_err(|e| e.to_string())
        });
    assert!(theirs.is_err(), "{theirs:?}");
}

/// `explain` shows the deciding statement's Sid and the condition that held, and for an
/// Allow why the network Deny did not apply.
#[test]
fn reasons_name_the_deciding_sid_and_the_condition_that_held() {
    let text = render(
        &parse_template(BUILTIN_TEMPLATE).unwrap(),
        &full_env(),
        &RoleArn::parse(ROLE).unwrap(),
    )
    .unwrap()
    .text;
    let p = PolicyDocument::parse(&text).unwrap();
    let outside = RequestContext {
        action: "s3:GetObject".into(),
        resource: Some("arn:aws:s3:::bucket/key".into()),
        source_ip: Some("198.51.100.7".parse().unwrap()),
        via_aws_service: Some(false),
        ..Default::default()
    };
    let e = evaluate(&p, &outside);
    assert_eq!(e.decision, Decision::ExplicitDeny);
    assert_eq!(
        e.statement,
        Some(StatementRef {
            index: 1,
            sid: Some("DenyOutsideInstanceNetwork".into())
        })
    );
    let expected = [
        "Statement[1] \"DenyOutsideInstanceNetwork\" (Deny) applies",
        "NotAction: s3:GetObject matches none of [es:ES*, dax:GetItem, dax:BatchGetItem, dax:Query, dax:Scan, dax:PutItem, dax:UpdateItem, dax:DeleteItem, dax:BatchWriteItem, dax:ConditionCheckItem, neptune-db:*, kafka-cluster:*, elasticfilesystem:Client*, rds-db:connect], so the statement applies",
        "Resource: arn:aws:s3:::bucket/key matches \"*\"",
        "BoolIfExists aws:ViaAWSService: false equals one of [false] -> true",
        "NotIpAddressIfExists aws:SourceIp: 198.51.100.7 is not in [203.0.113.10/31, 2001:db8:1::10/128] -> true",
        "StringNotEqualsIfExists aws:SourceVpc: key absent -> true (IfExists: a missing key satisfies the condition)",
        "StringNotEqualsIfExists aws:SourceVpce: key absent -> true (IfExists: a missing key satisfies the condition)",
    ];
    assert_eq!(e.reasons, expected);

    let inside = RequestContext {
        source_ip: Some("203.0.113.10".parse().unwrap()),
        ..outside
    };
    let e = evaluate(&p, &inside);
    assert_eq!(e.decision, Decision::Allow);
    assert_eq!(
        e.statement.as_ref().and_then(|s| s.sid.as_deref()),
        Some("AllowAllBoundedByRole")
    );
    assert!(e.reasons.contains(&"Statement[1] \"DenyOutsideInstanceNetwork\" (Deny) does not apply: NotIpAddressIfExists aws:SourceIp: 203.0.113.10 is in [203.0.113.10/31, 2001:db8:1::10/128] -> false".to_string()), "{:#?}", e.reasons);
    assert!(e.reasons.contains(&"Statement[2] \"DenySelfAssume\" (Deny) does not apply: Action: s3:GetObject matches none of [sts:AssumeRole]".to_string()), "{:#?}", e.reasons);

    let own = RequestContext {
        action: "sts:AssumeRole".into(),
        resource: Some(ROLE_WITH_PATH.into()),
        ..inside
    };
    let e = evaluate(&p, &own);
    assert_eq!(
        e.statement.as_ref().and_then(|s| s.sid.as_deref()),
        Some("DenySelfAssume")
    );
    assert!(
        e.reasons.contains(&format!(
            "Resource: {ROLE_WITH_PATH} matches \"arn:aws:iam::123456789012:role/*/app-role\""
        )),
        "{:#?}",
        e.reasons
    );
}

proptest! {
    /// No input makes the parser or the evaluator panic.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = PolicyDocument::parse(&text);
    }

    #[test]
    fn arbitrary_conditions_never_panic(
        op in "(ForAnyValue:|ForAllValues:)?(String|Arn|Numeric|Ip|Not|Bool|Null|Like|Equals|IfExists){1,3}",
        key in "[a-zA-Z:/]{1,12}",
        value in prop_oneof![Just(json!(true)), Just(json!(1.5)), ".{0,20}".prop_map(Value::from)],
        ctx in proptest::collection::vec(".{0,20}", 0..3),
        action in ".{0,20}",
        resource in proptest::option::of("[a-z:*?/]{0,30}"),
    ) {
        let doc = json!({"Statement": {"Effect": "Deny", "Action": "*", "Resource": "*",
            "Condition": {op: {key.clone(): value}}}});
        if let Ok(p) = PolicyDocument::from_value(&doc) {
            let mut r = RequestContext { action, resource, ..Default::default() };
            r.extra.insert(key.to_ascii_lowercase(), ctx);
            let e = evaluate(&p, &r);
            prop_assert!(!e.reasons.is_empty());
        }
    }

    /// The dynamic-programming matcher agrees with a plain recursive definition.
    #[test]
    fn wildcard_agrees_with_a_recursive_definition(p in "[ab:*?]{0,8}", t in "[ab:]{0,8}") {
        prop_assert_eq!(wildcard(&p, &t, Mode::Plain), naive(&p.chars().collect::<Vec<_>>(), &t.chars().collect::<Vec<_>>()));
    }
}

fn naive(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('*', rest)) => (0..=t.len()).any(|k| naive(rest, &t[k..])),
        Some(('?', rest)) => !t.is_empty() && naive(rest, &t[1..]),
        Some((c, rest)) => t.first() == Some(c) && naive(rest, &t[1..]),
    }
}
