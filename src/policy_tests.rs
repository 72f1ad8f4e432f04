use super::*;
use iam_rs::{
    Arn, Context, Decision, IAMPolicy, IAMRequest, Principal, PrincipalId, evaluate_policy,
};

const ROLE: &str = "arn:aws:iam::123456789012:role/app-role";

fn env() -> Environment {
    let mut env = Environment::default();
    env.add_ip("203.0.113.10");
    env.add_ip("203.0.113.11");
    env.add_ip("2001:db8:1::10");
    env.vpcs.insert("vpc-0abc1234def567890".into());
    env.vpc_endpoints.insert("vpce-0123456789abcdef0".into());
    env
}

fn rendered(env: &Environment) -> SessionPolicy {
    let template = parse_template(BUILTIN_TEMPLATE).unwrap();
    render(&template, env, &RoleArn::parse(ROLE).unwrap()).unwrap()
}

/// A request context as AWS builds it for each network path (§4.2 truth table).
enum From {
    Ip(&'static str),
    Vpc(&'static str, &'static str),
    Service,
}

fn decide(policy: &SessionPolicy, action: &str, resource: &str, from: From) -> Decision {
    let policy = IAMPolicy::from_json(&policy.text).expect("iam-rs parses the rendered policy");
    let mut context = Context::new().with_boolean("aws:ViaAWSService", false);
    match from {
        From::Ip(ip) => context = context.with_string("aws:SourceIp", ip),
        From::Vpc(vpc, vpce) => {
            context = context
                .with_string("aws:SourceVpc", vpc)
                .with_string("aws:SourceVpce", vpce)
        }
        From::Service => {
            context = context
                .with_boolean("aws:ViaAWSService", true)
                .with_string("aws:SourceIp", "52.94.0.1")
        }
    }
    let request = IAMRequest::new_with_context(
        Principal::Aws(PrincipalId::String(format!("{ROLE}-session"))),
        action,
        Arn::parse(resource).unwrap(),
        context,
    );
    evaluate_policy(&policy, &request).unwrap()
}

const OBJECT: &str = "arn:aws:s3:::bucket/key";

#[test]
fn the_lock_allows_the_instance_network_and_denies_everything_else() {
    let p = rendered(&env());
    let cases = [
        (
            "listed IPv4",
            "s3:GetObject",
            OBJECT,
            From::Ip("203.0.113.10"),
            Decision::Allow,
        ),
        (
            "merged neighbour",
            "s3:GetObject",
            OBJECT,
            From::Ip("203.0.113.11"),
            Decision::Allow,
        ),
        (
            "other IPv4",
            "s3:GetObject",
            OBJECT,
            From::Ip("198.51.100.1"),
            Decision::Deny,
        ),
        (
            "listed IPv6",
            "s3:GetObject",
            OBJECT,
            From::Ip("2001:db8:1::10"),
            Decision::Allow,
        ),
        (
            "other IPv6",
            "s3:GetObject",
            OBJECT,
            From::Ip("2001:db8:9::1"),
            Decision::Deny,
        ),
        (
            "listed VPC, other endpoint",
            "s3:GetObject",
            OBJECT,
            From::Vpc("vpc-0abc1234def567890", "vpce-0fffffffffffffff0"),
            Decision::Allow,
        ),
        (
            "other VPC, listed endpoint",
            "s3:GetObject",
            OBJECT,
            From::Vpc("vpc-0fffffffffffffff0", "vpce-0123456789abcdef0"),
            Decision::Allow,
        ),
        (
            "foreign VPC and endpoint",
            "s3:GetObject",
            OBJECT,
            From::Vpc("vpc-0fffffffffffffff0", "vpce-0fffffffffffffff0"),
            Decision::Deny,
        ),
        (
            "AWS service on the caller's behalf",
            "kms:Decrypt",
            "arn:aws:kms:us-east-1:123456789012:key/k",
            From::Service,
            Decision::Allow,
        ),
        (
            "in-VPC data plane exemption",
            "rds-db:connect",
            "arn:aws:rds-db:us-east-1:123456789012:dbuser:db-1/u",
            From::Ip("198.51.100.1"),
            Decision::Allow,
        ),
        (
            "assume itself",
            "sts:AssumeRole",
            ROLE,
            From::Ip("203.0.113.10"),
            Decision::Deny,
        ),
        (
            "assume itself, with a path",
            "sts:AssumeRole",
            "arn:aws:iam::123456789012:role/team/app-role",
            From::Ip("203.0.113.10"),
            Decision::Deny,
        ),
        (
            "assume another role",
            "sts:AssumeRole",
            "arn:aws:iam::123456789012:role/other",
            From::Ip("203.0.113.10"),
            Decision::Allow,
        ),
        (
            "assume another role from outside",
            "sts:AssumeRole",
            "arn:aws:iam::123456789012:role/other",
            From::Ip("198.51.100.1"),
            Decision::Deny,
        ),
    ];
    for (name, action, resource, from, expected) in cases {
        assert_eq!(decide(&p, action, resource, from), expected, "{name}");
    }
}

#[test]
fn empty_lists_drop_their_keys_and_only_widen_the_deny() {
    let mut env = Environment::default();
    env.add_ip("203.0.113.10");
    let p = rendered(&env);
    assert!(!p.text.contains("SourceVpc"), "{}", p.text);
    assert_eq!(
        decide(&p, "s3:GetObject", OBJECT, From::Ip("203.0.113.10")),
        Decision::Allow
    );
    assert_eq!(
        decide(
            &p,
            "s3:GetObject",
            OBJECT,
            From::Vpc("vpc-0abc1234def567890", "vpce-0123456789abcdef0")
        ),
        Decision::Deny
    );

    let mut env = Environment::default();
    env.vpcs.insert("vpc-0abc1234def567890".into());
    let p = rendered(&env);
    assert!(!p.text.contains("SourceIp"), "{}", p.text);
    assert_eq!(
        decide(&p, "s3:GetObject", OBJECT, From::Ip("203.0.113.10")),
        Decision::Deny
    );
    assert_eq!(
        decide(
            &p,
            "s3:GetObject",
            OBJECT,
            From::Vpc("vpc-0abc1234def567890", "vpce-0fffffffffffffff0")
        ),
        Decision::Allow
    );
}

#[test]
fn minified_with_the_placeholders_filled() {
    let p = rendered(&env());
    assert!(!p.text.contains(' ') || !p.text.contains("\n"));
    assert!(!p.text.contains("${"));
    assert!(
        p.text
            .contains(r#""aws:SourceIp":["203.0.113.10/31","2001:db8:1::10/128"]"#),
        "{}",
        p.text
    );
    assert!(
        p.text
            .contains(r#""arn:aws:iam::123456789012:role/*/app-role""#)
    );
    assert_eq!(p.characters, p.text.chars().count());
    assert!(p.characters < 1100, "{}", p.characters);
}

#[test]
fn refuses_an_empty_environment() {
    let template = parse_template(BUILTIN_TEMPLATE).unwrap();
    assert_eq!(
        render(
            &template,
            &Environment::default(),
            &RoleArn::parse(ROLE).unwrap()
        ),
        Err(PolicyError::EmptyEnvironment)
    );
}

#[test]
fn too_large_says_by_how_much_and_what_to_cut() {
    let mut env = Environment::default();
    // Every other address, so nothing merges.
    for i in 0..120u32 {
        env.add_ip(&std::net::Ipv4Addr::from(0xCB00_7100 + i * 2).to_string());
    }
    let template = parse_template(BUILTIN_TEMPLATE).unwrap();
    let err = render(&template, &env, &RoleArn::parse(ROLE).unwrap()).unwrap_err();
    let PolicyError::TooLarge {
        characters,
        excess,
        ips,
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(ips, 120);
    assert_eq!(characters - excess, MAX_POLICY_CHARS);
    assert!(err.to_string().contains("cut at least"));

    // The same count of adjacent addresses merges into a few CIDRs and fits.
    let mut env = Environment::default();
    for i in 0..128u32 {
        env.add_ip(&std::net::Ipv4Addr::from(0xCB00_7100 + i).to_string());
    }
    let p = render(&template, &env, &RoleArn::parse(ROLE).unwrap()).unwrap();
    assert!(p.text.contains("203.0.113.0/25"), "{}", p.text);
}

#[test]
fn values_cannot_break_out_of_their_json_string() {
    let template = parse_template(
        r#"{"Statement":[{"Resource":"arn:${Partition}:iam::${AccountId}:role/${RoleName}"}]}"#,
    )
    .unwrap();
    let role = RoleArn {
        partition: "aws".into(),
        account: "123456789012".into(),
        path: "/".into(),
        name: "x\",\"Effect\":\"Allow".into(),
    };
    let p = render(&template, &env(), &role).unwrap();
    let v: serde_json::Value = serde_json::from_str(&p.text).unwrap();
    assert_eq!(v["Statement"][0].as_object().unwrap().len(), 1);
}

#[test]
fn unknown_placeholders_are_template_errors() {
    let template = parse_template(r#"{"Statement":[{"Resource":"${Nope}"}]}"#).unwrap();
    let err = render(&template, &env(), &RoleArn::parse(ROLE).unwrap()).unwrap_err();
    assert_eq!(
        err,
        PolicyError::Template("unknown placeholder ${Nope}".into())
    );
}

/// The opt-in template that denies assuming any role (not only the instance's own), evaluated
/// by iam-rs: from inside the instance's network an ordinary call is allowed and assuming
/// another role is denied; the network lock is the built-in one.
#[test]
fn the_no_role_chaining_template_denies_assuming_any_role_from_inside() {
    let text = include_str!("../policy-templates/session-policy-no-role-chaining.json");
    let template = parse_template(text).unwrap();
    let p = render(&template, &env(), &RoleArn::parse(ROLE).unwrap()).unwrap();
    let inside = || From::Ip("203.0.113.10");
    let other_role = "arn:aws:iam::123456789012:role/admin";
    assert_eq!(
        decide(&p, "s3:GetObject", OBJECT, inside()),
        Decision::Allow
    );
    assert_eq!(
        decide(&p, "sts:AssumeRole", other_role, inside()),
        Decision::Deny
    );
    assert_eq!(decide(&p, "sts:AssumeRole", ROLE, inside()), Decision::Deny);
    assert_eq!(
        decide(&p, "s3:GetObject", OBJECT, From::Ip("198.51.100.1")),
        Decision::Deny
    );
    // The built-in template allows chaining to another role from inside (the documented limit).
    let builtin = rendered(&env());
    assert_eq!(
        decide(&builtin, "sts:AssumeRole", other_role, inside()),
        Decision::Allow
    );
}

#[test]
fn no_locked_session_may_assume_another_role_credlock_serves() {
    use crate::evaluate::{PolicyDocument, RequestContext, evaluate};
    let template = parse_template(BUILTIN_TEMPLATE).unwrap();
    let class = RoleArn::parse("arn:aws:iam::123456789012:role/team/worker-s3").unwrap();
    let other_account = RoleArn::parse("arn:aws:iam::999999999999:role/reports").unwrap();
    let rendered = render_denying(
        &template,
        &env(),
        &RoleArn::parse(ROLE).unwrap(),
        &[class, other_account],
    )
    .unwrap();
    let doc = PolicyDocument::parse(&rendered.text).unwrap();
    let from_inside = |resource: &str| {
        evaluate(
            &doc,
            &RequestContext {
                action: "sts:AssumeRole".into(),
                resource: Some(resource.into()),
                source_ip: Some("203.0.113.10".parse().unwrap()),
                via_aws_service: Some(false),
                ..RequestContext::default()
            },
        )
    };
    for denied in [
        "arn:aws:iam::123456789012:role/team/worker-s3",
        // IMDS and the configuration may name the role without its path.
        "arn:aws:iam::123456789012:role/other/path/worker-s3",
        "arn:aws:iam::999999999999:role/reports",
        ROLE,
    ] {
        let e = from_inside(denied);
        assert!(!e.allowed(), "{denied}: {e:?}");
    }
    let e = from_inside("arn:aws:iam::123456789012:role/worker-s3");
    assert!(!e.allowed(), "without the path: {e:?}");
    // The same check by the independent evaluator.
    assert_eq!(
        decide(
            &rendered,
            "sts:AssumeRole",
            "arn:aws:iam::123456789012:role/team/worker-s3",
            From::Ip("203.0.113.10")
        ),
        Decision::Deny
    );
    // Any other role: the template's business, unchanged.
    assert!(from_inside("arn:aws:iam::123456789012:role/unrelated").allowed());
    // Without other roles, render_denying is render.
    assert_eq!(
        render_denying(&template, &env(), &RoleArn::parse(ROLE).unwrap(), &[]).unwrap(),
        rendered_plain(),
    );
}

fn rendered_plain() -> SessionPolicy {
    rendered(&env())
}
