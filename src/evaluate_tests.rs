//! Hand examples, with the expected results from the IAM User Guide ("IAM JSON policy elements:
//! Condition operators", "IAM JSON policy elements: Resource", "Creating a condition with
//! multiple keys or values", "Policy evaluation logic"). The agreement matrix against iam-rs and
//! the property tests are in `evaluate_matrix_tests.rs`.

use super::*;
use serde_json::{Value, json};

fn policy(v: Value) -> PolicyDocument {
    PolicyDocument::from_value(&v).unwrap_or_else(|e| panic!("{e}: {v}"))
}

/// Allows everything under one condition block: the decision is the block's truth.
fn allow_if(condition: Value) -> PolicyDocument {
    policy(json!({"Version": "2012-10-17", "Statement": {
        "Effect": "Allow", "Action": "*", "Resource": "*", "Condition": condition}}))
}

fn request() -> RequestContext {
    RequestContext {
        action: "s3:GetObject".into(),
        resource: Some("arn:aws:s3:::bucket/key".into()),
        ..Default::default()
    }
}

fn with(key: &str, values: &[&str]) -> RequestContext {
    let mut r = request();
    r.extra.insert(
        key.to_ascii_lowercase(),
        values.iter().map(|v| v.to_string()).collect(),
    );
    r
}

fn holds(op: &str, key: &str, values: Value, req: &RequestContext) -> bool {
    evaluate(&allow_if(json!({ op: { key: values } })), req).allowed()
}

#[test]
fn string_operators_follow_the_docs() {
    let r = with("aws:PrincipalTag/job-category", &["iamuser-admin"]);
    let k = "aws:PrincipalTag/job-category";
    assert!(holds("StringEquals", k, json!("iamuser-admin"), &r));
    assert!(
        !holds("StringEquals", k, json!("IAMUSER-ADMIN"), &r),
        "case sensitive"
    );
    assert!(holds("StringNotEquals", k, json!(["a", "b"]), &r));
    assert!(!holds(
        "StringNotEquals",
        k,
        json!(["a", "iamuser-admin"]),
        &r
    ));
    assert!(holds(
        "StringEqualsIgnoreCase",
        k,
        json!("IAMUSER-Admin"),
        &r
    ));
    assert!(!holds(
        "StringNotEqualsIgnoreCase",
        k,
        json!("IAMUSER-Admin"),
        &r
    ));
    assert!(holds("StringLike", k, json!("iamuser-*"), &r));
    assert!(holds("StringLike", k, json!("iamuser-admi?"), &r));
    assert!(!holds("StringLike", k, json!("iamuser-admin?"), &r));
    assert!(
        !holds("StringLike", k, json!("IAMUSER-*"), &r),
        "case sensitive"
    );
    assert!(holds("StringNotLike", k, json!(["x*", "*y"]), &r));
    assert!(!holds("StringNotLike", k, json!(["x*", "*admin"]), &r));
}

/// "If the key that you specify in a policy condition is not present in the request context,
/// the values do not match and the condition is false. If the policy condition requires that
/// the key is not matched, such as StringNotLike or ArnNotLike, and the right key is not
/// present, the condition is true." `...IfExists` holds on an absent key; `Null` tests it.
#[test]
fn absent_keys_follow_the_documented_rules() {
    let samples = [
        ("StringEquals", json!("x"), false),
        ("StringNotEquals", json!("x"), true),
        ("StringEqualsIgnoreCase", json!("x"), false),
        ("StringNotEqualsIgnoreCase", json!("x"), true),
        ("StringLike", json!("*"), false),
        ("StringNotLike", json!("*"), true),
        ("ArnEquals", json!("arn:aws:s3:::b"), false),
        ("ArnLike", json!("arn:aws:s3:::*"), false),
        ("ArnNotEquals", json!("arn:aws:s3:::b"), true),
        ("ArnNotLike", json!("arn:aws:s3:::*"), true),
        ("NumericEquals", json!(1), false),
        ("NumericNotEquals", json!(1), true),
        ("NumericLessThan", json!(1), false),
        ("NumericLessThanEquals", json!(1), false),
        ("NumericGreaterThan", json!(1), false),
        ("NumericGreaterThanEquals", json!(1), false),
        ("Bool", json!("false"), false),
        ("IpAddress", json!("0.0.0.0/0"), false),
        ("NotIpAddress", json!("0.0.0.0/0"), true),
    ];
    let r = request();
    for (op, value, expected) in samples {
        assert_eq!(
            holds(op, "aws:Missing", value.clone(), &r),
            expected,
            "{op}"
        );
        let if_exists = format!("{op}IfExists");
        assert!(holds(&if_exists, "aws:Missing", value, &r), "{if_exists}");
    }
    assert!(holds("Null", "aws:Missing", json!("true"), &r));
    assert!(!holds("Null", "aws:Missing", json!(false), &r));
    let present = with("aws:TokenIssueTime", &["2020-01-01T00:00:01Z"]);
    assert!(!holds("Null", "aws:TokenIssueTime", json!(true), &present));
    assert!(holds(
        "Null",
        "aws:TokenIssueTime",
        json!("false"),
        &present
    ));
}

#[test]
fn ip_operators_take_cidrs_and_bare_addresses_in_both_families() {
    let v4 = |ip: &str| RequestContext {
        source_ip: Some(ip.parse().unwrap()),
        ..request()
    };
    let k = "aws:SourceIp";
    assert!(holds(
        "IpAddress",
        k,
        json!("203.0.113.0/24"),
        &v4("203.0.113.255")
    ));
    assert!(!holds(
        "IpAddress",
        k,
        json!("203.0.113.0/24"),
        &v4("203.0.114.0")
    ));
    assert!(
        holds("IpAddress", k, json!("203.0.113.7"), &v4("203.0.113.7")),
        "bare = /32"
    );
    assert!(!holds(
        "IpAddress",
        k,
        json!("203.0.113.7"),
        &v4("203.0.113.6")
    ));
    let mixed = json!(["203.0.113.0/24", "2001:DB8:1234:5678::/64"]);
    assert!(holds(
        "IpAddress",
        k,
        mixed.clone(),
        &v4("2001:db8:1234:5678::99")
    ));
    assert!(!holds(
        "IpAddress",
        k,
        mixed.clone(),
        &v4("2001:db8:1234:5679::1")
    ));
    assert!(
        holds("IpAddress", k, json!("2001:db8::1"), &v4("2001:db8::1")),
        "bare = /128"
    );
    assert!(!holds(
        "IpAddress",
        k,
        json!("2001:db8::1"),
        &v4("2001:db8::2")
    ));
    assert!(
        !holds("IpAddress", k, json!("0.0.0.0/0"), &v4("2001:db8::2")),
        "families"
    );
    assert!(holds("NotIpAddress", k, mixed.clone(), &v4("198.51.100.7")));
    assert!(!holds("NotIpAddress", k, mixed, &v4("203.0.113.9")));
    // A request value that is not an address matches no range.
    assert!(!holds(
        "IpAddress",
        "x:ip",
        json!("0.0.0.0/0"),
        &with("x:ip", &["nope"])
    ));
    assert!(holds(
        "NotIpAddress",
        "x:ip",
        json!("0.0.0.0/0"),
        &with("x:ip", &["nope"])
    ));
}

/// The ARN operators example: with `StringLike` the first `*` reaches across colons and the
/// match succeeds; `ArnLike` matches component by component and fails. `ArnEquals` and
/// `ArnLike` "behave identically".
#[test]
fn arn_operators_match_component_by_component() {
    let pattern = json!("arn:aws:someservice:*:111122223333:finance/*");
    let value =
        "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/document.txt";
    let r = with("aws:SourceArn", &[value]);
    assert!(holds("StringLike", "aws:SourceArn", pattern.clone(), &r));
    assert!(!holds("ArnLike", "aws:SourceArn", pattern.clone(), &r));
    assert!(!holds("ArnEquals", "aws:SourceArn", pattern.clone(), &r));
    assert!(holds("ArnNotLike", "aws:SourceArn", pattern.clone(), &r));
    let ok = with(
        "aws:SourceArn",
        &["arn:aws:someservice:us-east-2:111122223333:finance/a:b"],
    );
    for op in ["ArnLike", "ArnEquals"] {
        assert!(holds(op, "aws:SourceArn", pattern.clone(), &ok), "{op}");
    }
    assert!(!holds("ArnNotEquals", "aws:SourceArn", pattern, &ok));
    assert!(!holds(
        "ArnLike",
        "aws:SourceArn",
        json!("arn:aws:sns:*:*:t"),
        &with("aws:SourceArn", &["not-an-arn"])
    ));
}

#[test]
fn bool_numeric_and_values_of_every_json_type() {
    let via = |b: bool| RequestContext {
        via_aws_service: Some(b),
        ..request()
    };
    assert!(holds(
        "Bool",
        "aws:ViaAWSService",
        json!("true"),
        &via(true)
    ));
    assert!(holds("Bool", "aws:ViaAWSService", json!(true), &via(true)));
    assert!(!holds(
        "Bool",
        "aws:ViaAWSService",
        json!("false"),
        &via(true)
    ));
    assert!(holds(
        "BoolIfExists",
        "aws:ViaAWSService",
        json!("false"),
        &via(false)
    ));
    let keys = with("s3:max-keys", &["10"]);
    assert!(holds(
        "NumericLessThanEquals",
        "s3:max-keys",
        json!("10"),
        &keys
    ));
    assert!(holds(
        "NumericLessThanEquals",
        "s3:max-keys",
        json!(10),
        &keys
    ));
    assert!(!holds("NumericLessThan", "s3:max-keys", json!(10), &keys));
    assert!(holds(
        "NumericGreaterThan",
        "s3:max-keys",
        json!(9.5),
        &keys
    ));
    assert!(holds(
        "NumericGreaterThanEquals",
        "s3:max-keys",
        json!([20, 10]),
        &keys
    ));
    assert!(holds("NumericEquals", "s3:max-keys", json!("10.0"), &keys));
    assert!(holds(
        "NumericNotEquals",
        "s3:max-keys",
        json!([1, 2]),
        &keys
    ));
    assert!(!holds(
        "NumericEquals",
        "s3:max-keys",
        json!(10),
        &with("s3:max-keys", &["ten"])
    ));
}

#[test]
fn operators_and_keys_and_together_values_or_together() {
    let mut r = with("aws:PrincipalTag/team", &["blue"]);
    r.source_vpc = Some("vpc-1".into());
    let both =
        |team: &str, vpc: &str| {
            evaluate(&allow_if(json!({
            "StringEquals": {"aws:PrincipalTag/team": [team, "green"], "aws:SourceVpc": vpc},
        })), &r).allowed()
        };
    assert!(both("blue", "vpc-1"));
    assert!(!both("red", "vpc-1"), "keys AND");
    assert!(!both("blue", "vpc-2"), "keys AND");
    let two_ops = |vpc: &str| {
        evaluate(
            &allow_if(json!({
                "StringEquals": {"aws:PrincipalTag/team": "blue"},
                "StringNotEquals": {"aws:SourceVpc": vpc},
            })),
            &r,
        )
        .allowed()
    };
    assert!(two_ops("vpc-9"));
    assert!(!two_ops("vpc-1"), "operators AND");
    // Condition key names are case-insensitive.
    assert!(holds("StringEquals", "AWS:SOURCEVPC", json!("vpc-1"), &r));
}

/// The DynamoDB examples of "Creating a condition with multiple keys or values".
#[test]
fn set_qualifiers_follow_the_docs() {
    let k = "dynamodb:requestedAttributes";
    let allowed = json!(["PostDateTime", "Message", "Tags"]);
    let op = "ForAllValues:StringLike";
    assert!(holds(
        op,
        k,
        allowed.clone(),
        &with(k, &["PostDateTime", "Message"])
    ));
    assert!(!holds(
        op,
        k,
        allowed.clone(),
        &with(k, &["PostDateTime", "UserName"])
    ));
    assert!(
        holds(op, k, allowed.clone(), &request()),
        "no values: ForAllValues is true"
    );
    let forbidden = json!(["ID", "PostDateTime"]);
    let op = "ForAnyValue:StringLike";
    assert!(holds(
        op,
        k,
        forbidden.clone(),
        &with(k, &["UserName", "Message", "PostDateTime"])
    ));
    assert!(!holds(op, k, forbidden.clone(), &with(k, &["UserName"])));
    assert!(
        !holds(op, k, forbidden.clone(), &request()),
        "no values: ForAnyValue is false"
    );
    assert!(holds(
        "ForAnyValue:StringLikeIfExists",
        k,
        forbidden,
        &request()
    ));
    // Negated: every (ForAllValues) or some (ForAnyValue) request value matches none listed.
    let r = with(k, &["Message", "ID"]);
    assert!(!holds("ForAllValues:StringNotEquals", k, json!(["ID"]), &r));
    assert!(holds("ForAnyValue:StringNotEquals", k, json!(["ID"]), &r));
}

#[test]
fn actions_ignore_case_resources_do_not() {
    let p = policy(json!({"Statement": [{"Effect": "Allow",
        "Action": ["iam:*AccessKey*", "S3:get?bject"], "Resource": "arn:aws:iam::1:user/Bob"}]}));
    let call = |action: &str, resource: &str| {
        evaluate(
            &p,
            &RequestContext {
                action: action.into(),
                resource: Some(resource.into()),
                ..Default::default()
            },
        )
        .decision
    };
    assert_eq!(
        call("IAM:listaccesskeys", "arn:aws:iam::1:user/Bob"),
        Decision::Allow
    );
    assert_eq!(
        call("s3:GETOBJECT", "arn:aws:iam::1:user/Bob"),
        Decision::Allow
    );
    assert_eq!(
        call("s3:GetObjects", "arn:aws:iam::1:user/Bob"),
        Decision::ImplicitDeny
    );
    assert_eq!(
        call("iam:ListAccessKeys", "arn:aws:iam::1:user/bob"),
        Decision::ImplicitDeny
    );
}

/// "IAM JSON policy elements: Resource": wildcards stay within their colon-separated segment,
/// `*` spans `/` inside it, and a `*` ending a segment may reach past colons.
#[test]
fn resource_wildcards_follow_the_segment_rules() {
    let m = |p: &str, t: &str| wildcard(p, t, Mode::ArnResource);
    let objects = "arn:aws:s3:::bucket/*/test/*";
    for key in [
        "1/test/object.jpg",
        "1/2/test/3/object.jpg",
        "1///test///object.jpg",
        "1/test/.jpg",
    ] {
        assert!(m(objects, &format!("arn:aws:s3:::bucket/{key}")), "{key}");
    }
    assert!(!m(objects, "arn:aws:s3:::bucket/1/tests"));
    assert!(m(
        "arn:aws:iam::*:role/*/app",
        "arn:aws:iam::123:role/a/b/app"
    ));
    assert!(!m("arn:aws:iam::*:role/*/app", "arn:aws:iam::123:role/app"));
    assert!(m(
        "arn:aws:rds-db:*:*:dbuser:*",
        "arn:aws:rds-db:r:1:dbuser:db-1/u"
    ));
    assert!(
        m("arn:aws:ec2:*", "arn:aws:ec2:us-east-1:1:instance/i-1"),
        "trailing * spans colons"
    );
    assert!(
        !m(
            "arn:aws:ec2:us-*-1:1:*",
            "arn:aws:ec2:us-east:x-1:1:instance/i"
        ),
        "inner * does not"
    );
    assert!(!m("arn:aws:ec2:us-east-?:1:*", "arn:aws:ec2:us-east-:1:x"));
    assert!(
        !m("arn:aws:s3:::Bucket/*", "arn:aws:s3:::bucket/k"),
        "case sensitive"
    );
}

#[test]
fn explicit_deny_wins_and_no_allow_is_an_implicit_deny() {
    let p = policy(json!({"Version": "2012-10-17", "Statement": [
        {"Sid": "All", "Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Sid": "NoDelete", "Effect": "Deny", "Action": "s3:Delete*", "Resource": "*"},
        {"Sid": "NotS3", "Effect": "Deny", "NotAction": "s3:*", "NotResource": "arn:aws:kms:*"},
    ]}));
    let call = |action: &str, resource: &str| {
        evaluate(
            &p,
            &RequestContext {
                action: action.into(),
                resource: Some(resource.into()),
                ..Default::default()
            },
        )
    };
    let e = call("s3:DeleteObject", "arn:aws:s3:::b/k");
    assert_eq!(e.decision, Decision::ExplicitDeny);
    assert_eq!(
        e.statement,
        Some(StatementRef {
            index: 1,
            sid: Some("NoDelete".into())
        })
    );
    let e = call("s3:GetObject", "arn:aws:s3:::b/k");
    assert_eq!(
        (e.decision, e.statement.map(|s| s.index)),
        (Decision::Allow, Some(0))
    );
    assert_eq!(
        call("ec2:RunInstances", "arn:aws:ec2:r:1:i/x").decision,
        Decision::ExplicitDeny
    );
    assert_eq!(
        call("kms:Decrypt", "arn:aws:kms:r:1:key/k").decision,
        Decision::Allow
    );
    let only_deny =
        policy(json!({"Statement": {"Effect": "Deny", "Action": "x:*", "Resource": "*"}}));
    let e = evaluate(&only_deny, &request());
    assert_eq!((e.decision, e.statement), (Decision::ImplicitDeny, None));
}

#[test]
fn an_unknown_resource_never_excludes_a_statement_and_says_so() {
    let p = policy(json!({"Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Sid": "Self", "Effect": "Deny", "Action": "sts:AssumeRole", "Resource": "arn:aws:iam::1:role/r"},
    ]}));
    let r = RequestContext {
        action: "sts:AssumeRole".into(),
        ..Default::default()
    };
    let e = evaluate(&p, &r);
    assert_eq!(e.decision, Decision::ExplicitDeny);
    assert!(
        e.reasons.iter().any(|l| l.contains("resource is unknown")),
        "{:#?}",
        e.reasons
    );
}

#[test]
fn principal_is_ignored_and_a_single_statement_object_is_read() {
    let p = policy(
        json!({"Id": "x", "Statement": {"Sid": "S", "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::1:root"}, "Action": "s3:*", "Resource": ["*"]}}),
    );
    assert_eq!(p.statements.len(), 1);
    assert!(evaluate(&p, &request()).allowed());
    // Under 2008-10-17 `${` is literal text, not a variable.
    let old = policy(
        json!({"Version": "2008-10-17", "Statement": {"Effect": "Allow",
        "Action": "*", "Resource": "arn:aws:s3:::${x}"}}),
    );
    let r = RequestContext {
        resource: Some("arn:aws:s3:::${x}".into()),
        ..request()
    };
    assert!(evaluate(&old, &r).allowed());
}

#[test]
fn malformed_or_unsupported_policies_are_clear_errors() {
    let stmt = |extra: Value| {
        let mut s = json!({"Effect": "Allow", "Action": "*", "Resource": "*"});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        PolicyDocument::from_value(&json!({"Version": "2012-10-17", "Statement": [s]}))
    };
    let cond = |c: Value| stmt(json!({"Condition": c}));
    let unknown = cond(json!({"StringEqualz": {"k": "v"}})).unwrap_err();
    assert_eq!(unknown, EvalError::UnknownOperator("StringEqualz".into()));
    assert!(unknown.to_string().contains("StringEqualz"));
    assert!(matches!(
        cond(json!({"ForSomeValues:StringEquals": {"k": "v"}})),
        Err(EvalError::UnknownOperator(_))
    ));
    assert!(matches!(
        cond(json!({"DateLessThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}})),
        Err(EvalError::Unsupported(_))
    ));
    assert!(matches!(
        cond(json!({"StringEquals": {"k": "${aws:username}"}})),
        Err(EvalError::Unsupported(_))
    ));
    assert!(matches!(
        stmt(json!({"Resource": "arn:aws:s3:::${aws:username}/*"})),
        Err(EvalError::Unsupported(_))
    ));
    let invalid_cases = [
        cond(json!({"NullIfExists": {"k": "true"}})),
        cond(json!({"IpAddress": {"aws:SourceIp": "203.0.113.0/33"}})),
        cond(json!({"IpAddress": {"aws:SourceIp": "not-an-ip"}})),
        cond(json!({"Bool": {"k": "yes"}})),
        cond(json!({"NumericEquals": {"k": "ten"}})),
        cond(json!({"StringEquals": {"k": []}})),
        cond(json!({"StringEquals": {"k": {"nested": 1}}})),
        cond(json!({"StringEquals": {}})),
        cond(json!({"StringEquals": "v"})),
        cond(json!("v")),
        stmt(json!({"Effect": "allow"})),
        stmt(json!({"NotAction": "s3:*"})),
        stmt(json!({"Resource": "bucket/*"})),
        stmt(json!({"Resource": "arn:aws:s3*:::bucket"})),
        stmt(json!({"Resource": []})),
        stmt(json!({"Sid": 1})),
        stmt(json!({"Actions": "*"})),
        PolicyDocument::from_value(&json!({"Version": "2012-10-17"})),
        PolicyDocument::from_value(&json!({"Version": "2020-01-01", "Statement": []})),
        PolicyDocument::from_value(&json!([])),
    ];
    for (i, result) in invalid_cases.into_iter().enumerate() {
        assert!(
            matches!(result, Err(EvalError::Invalid(_))),
            "case {i}: {result:?}"
        );
    }
    let no_effect = PolicyDocument::parse(r#"{"Statement":[{"Action":"*","Resource":"*"}]}"#);
    assert_eq!(
        no_effect.unwrap_err().to_string(),
        "the policy is not valid: Statement[0]: Effect must be \"Allow\" or \"Deny\""
    );
    assert!(matches!(
        PolicyDocument::parse("{"),
        Err(EvalError::Json(_))
    ));
}
