use std::collections::HashMap;

use super::*;
use proptest::prelude::*;

/// A fixed NSS: users root 0, www-data 33, alice 1000 (also in workers), bob 1001.
struct FakeDir {
    users: HashMap<String, u32>,
    groups: HashMap<String, u32>,
}

impl FakeDir {
    fn new() -> FakeDir {
        let map =
            |pairs: &[(&str, u32)]| pairs.iter().map(|(n, id)| (n.to_string(), *id)).collect();
        FakeDir {
            users: map(&[
                ("root", 0),
                ("www-data", 33),
                ("alice", 1000),
                ("bob", 1001),
            ]),
            groups: map(&[
                ("root", 0),
                ("www-data", 33),
                ("alice", 1000),
                ("workers", 2000),
            ]),
        }
    }
}

impl Directory for FakeDir {
    fn uid_of(&self, user: &str) -> Option<u32> {
        self.users.get(user).copied()
    }
    fn gid_of(&self, group: &str) -> Option<u32> {
        self.groups.get(group).copied()
    }
    fn groups_of_uid(&self, uid: u32) -> Option<Vec<u32>> {
        match uid {
            1000 => Some(vec![1000, 2000]),
            0 | 33 | 1001 => Some(vec![uid]),
            _ => None,
        }
    }
}

fn rule(name: &str) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        units: vec![],
        users: vec![],
        groups: vec![],
        unidentified: false,
        credentials: None,
        metadata: None,
        require_token: false,
        role: None,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn compile(rules: Vec<RuleConfig>) -> Policy {
    let (policy, warnings) =
        Policy::compile(&AccessConfig { rules }, &FakeDir::new(), true).expect("valid");
    assert!(warnings.is_empty(), "{warnings:?}");
    policy
}

fn compile_err(rules: Vec<RuleConfig>, strict: bool) -> String {
    match Policy::compile(&AccessConfig { rules }, &FakeDir::new(), strict) {
        Ok(_) => panic!("compiled"),
        Err(e) => e.to_string(),
    }
}

fn caller(uid: u32, unit: Option<&str>) -> Identity {
    Identity::Identified(Caller {
        uid,
        unit: unit.map(String::from),
        cgroup: None,
        pid: Some(4242),
    })
}

fn groups_of(uid: u32) -> Vec<u32> {
    FakeDir::new().groups_of_uid(uid).unwrap_or_default()
}

/// `decide` with the caller's groups from the fake NSS.
fn decide(p: &Policy, who: &Identity, ask: Ask<'_>, has_token: bool) -> Decision {
    let groups = match who {
        Identity::Identified(c) => groups_of(c.uid),
        Identity::Unidentified(_) => vec![],
    };
    p.decide(who, &ask, has_token, &groups)
}

fn d(rule: Option<usize>, verdict: Verdict) -> Decision {
    Decision { rule, verdict }
}

const UNIDENTIFIED: Identity = Identity::Unidentified(Unidentified::LookupFailed);
const META: Ask<'static> = Ask::Metadata {
    path: "/latest/meta-data/instance-id",
};
const EVERY_ASK: [Ask<'static>; 5] = [
    Ask::Token,
    Ask::CredentialListing,
    Ask::Credentials,
    Ask::IdentityCredentials,
    META,
];

// ---- configuration ------------------------------------------------------------------------

#[cfg(feature = "daemon")]
const ISSUE_EXAMPLE: &str = r#"
[[access.rule]]
name = "web"                      # short identifier: log field and metric label
units = ["nginx.service", "php-fpm*.service"]   # glob on the systemd unit
users = ["www-data"]              # names or numeric uids; also: groups = [...]
credentials = "deny"              # allow | deny
metadata = ["/latest/meta-data/placement/", "/latest/dynamic/instance-identity/"]  # or "allow" / "deny"

[[access.rule]]
name = "workers"
groups = ["workers"]
require_token = true              # IMDSv2 on the credential routes, even when the instance accepts IMDSv1
role = "arn:aws:iam::123456789012:role/worker-s3"   # optional: this class gets another role, locked the same way

[[access.rule]]
name = "unidentified"
unidentified = true
credentials = "deny"
"#;

#[cfg(feature = "daemon")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    access: AccessConfig,
}

#[cfg(feature = "daemon")]
fn parse(text: &str) -> Result<AccessConfig, String> {
    toml::from_str::<File>(text)
        .map(|f| f.access)
        .map_err(|e| e.message().to_string())
}

#[cfg(feature = "daemon")]
#[test]
fn the_issue_example_parses_and_decides() {
    let cfg = parse(ISSUE_EXAMPLE).expect("parses");
    let mut web = rule("web");
    web.units = strings(&["nginx.service", "php-fpm*.service"]);
    web.users = strings(&["www-data"]);
    web.credentials = Some(Allowance::Deny);
    web.metadata = Some(MetadataAccess::Prefixes(strings(&[
        "/latest/meta-data/placement/",
        "/latest/dynamic/instance-identity/",
    ])));
    let mut workers = rule("workers");
    workers.groups = strings(&["workers"]);
    workers.require_token = true;
    workers.role = Some("arn:aws:iam::123456789012:role/worker-s3".into());
    let mut unidentified = rule("unidentified");
    unidentified.unidentified = true;
    unidentified.credentials = Some(Allowance::Deny);
    assert_eq!(cfg.rules, vec![web, workers, unidentified]);

    let (p, warnings) = Policy::compile(&cfg, &FakeDir::new(), true).expect("valid");
    assert!(warnings.is_empty());
    assert_eq!(p.rule_names(), ["web", "workers", "unidentified"]);

    let php = caller(33, Some("php-fpm8.2.service"));
    assert_eq!(
        decide(&p, &php, Ask::Credentials, true),
        d(Some(0), Verdict::NotFound)
    );
    assert_eq!(
        decide(&p, &php, Ask::CredentialListing, true),
        d(Some(0), Verdict::NotFound)
    );
    assert_eq!(
        decide(&p, &php, Ask::Token, false),
        d(Some(0), Verdict::Allow)
    );
    let az = Ask::Metadata {
        path: "/2021-01-03/meta-data/placement/availability-zone",
    };
    assert_eq!(decide(&p, &php, az, false), d(Some(0), Verdict::Allow));
    assert_eq!(decide(&p, &php, META, false), d(Some(0), Verdict::NotFound));
    // nginx as root is not the web class (every selector must match) nor a worker.
    let root_nginx = caller(0, Some("nginx.service"));
    assert_eq!(
        decide(&p, &root_nginx, Ask::Credentials, false),
        d(None, Verdict::Allow)
    );

    let worker = caller(1000, Some("worker.service"));
    assert_eq!(
        decide(&p, &worker, Ask::Credentials, false),
        d(Some(1), Verdict::TokenRequired)
    );
    assert_eq!(
        decide(&p, &worker, Ask::Credentials, true),
        d(Some(1), Verdict::Allow)
    );
    assert_eq!(decide(&p, &worker, META, false), d(Some(1), Verdict::Allow));

    for why in Unidentified::ALL {
        let who = Identity::Unidentified(why);
        assert_eq!(
            decide(&p, &who, Ask::Credentials, true),
            d(Some(2), Verdict::NotFound)
        );
        assert_eq!(decide(&p, &who, META, false), d(Some(2), Verdict::Allow));
    }
}

#[cfg(feature = "daemon")]
#[test]
fn parse_errors() {
    assert_eq!(parse("").expect("empty"), AccessConfig::default());
    let one = |body: &str| parse(&format!("[[access.rule]]\nname = \"r\"\n{body}\n"));
    let rules = one("metadata = \"deny\"\ncredentials = \"allow\"")
        .expect("parses")
        .rules;
    assert_eq!(rules[0].metadata, Some(MetadataAccess::Deny));
    assert_eq!(rules[0].credentials, Some(Allowance::Allow));
    assert_eq!(
        one("metadata = \"allow\"").expect("parses").rules[0].metadata,
        Some(MetadataAccess::Allow)
    );
    assert_eq!(
        one("metadata = []").expect("parses").rules[0].metadata,
        Some(MetadataAccess::Prefixes(vec![]))
    );
    assert_eq!(
        one("credentials = \"maybe\"").unwrap_err(),
        "unknown variant `maybe`, expected `allow` or `deny`"
    );
    assert_eq!(
        one("metadata = \"some\"").unwrap_err(),
        "\"allow\", \"deny\" or a list of path prefixes"
    );
    assert!(one("metadata = 3").is_err());
    assert!(one("metadata = [3]").is_err());
    assert!(
        one("user = [\"bob\"]")
            .unwrap_err()
            .contains("unknown field `user`")
    );
    assert!(
        parse("[access]\nrules = []")
            .unwrap_err()
            .contains("unknown field `rules`")
    );
    assert!(
        parse("[[access.rule]]\nunits = []")
            .unwrap_err()
            .contains("missing field `name`")
    );
}

#[test]
fn validation_errors_name_the_key_value_and_why() {
    let named = |name: &str| vec![rule(name)];
    for bad in ["", "has space", "dot.ted", "ünï", &"x".repeat(33)] {
        assert_eq!(
            compile_err(named(bad), false),
            format!("access.rule[0].name={bad:?} is not valid: must be 1 to 32 of A-Z a-z 0-9 _ -")
        );
    }
    compile(named(&"x".repeat(32)));
    compile(named("Web_tier-2"));
    assert_eq!(
        compile_err(vec![rule("web"), rule("a"), rule("web")], false),
        r#"access.rule[2].name="web" is not valid: duplicate of access.rule[0].name"#
    );

    for (units, users, groups) in [
        (&["a.service"][..], &[][..], &[][..]),
        (&[], &["0"], &[]),
        (&[], &[], &["0"]),
    ] {
        let mut r = rule("u");
        r.unidentified = true;
        (r.units, r.users, r.groups) = (strings(units), strings(users), strings(groups));
        assert_eq!(
            compile_err(vec![r], false),
            "access.rule[0].unidentified=\"true\" is not valid: cannot be combined with units, \
             users or groups (an unidentified connection has none of them)"
        );
    }

    let with_units = |units: &[&str]| {
        let mut r = rule("r");
        r.units = strings(units);
        vec![rule("first"), r]
    };
    assert_eq!(
        compile_err(with_units(&["a.service", ""]), false),
        r#"access.rule[1].units="" is not valid: empty glob"#
    );
    for bad in [
        "nginx service",
        "a/b.service",
        "[ab].service",
        "é.service",
        "a\n",
    ] {
        assert_eq!(
            compile_err(with_units(&[bad]), false),
            format!(
                r"access.rule[1].units={bad:?} is not valid: only A-Z a-z 0-9 : _ . @ \ - and the wildcards * ?"
            )
        );
    }
    let long = "a".repeat(257);
    assert_eq!(
        compile_err(with_units(&[&long]), false),
        format!("access.rule[1].units={long:?} is not valid: longer than a unit name can be (256)")
    );
    compile(with_units(&[
        r"systemd-fsck@dev-disk-by\x2duuid-1.service",
        "*",
        "user@?*.service",
        "a:b_c.scope",
    ]));

    let mut r = rule("r");
    r.metadata = Some(MetadataAccess::Prefixes(strings(&[
        "/latest/meta-data/",
        "/2021-01-03/meta-data/",
    ])));
    assert_eq!(
        compile_err(vec![r], false),
        "access.rule[0].metadata=\"/2021-01-03/meta-data/\" is not valid: a prefix is written under \
         /latest/ (it matches every version)"
    );
    for bad in ["/latest", "latest/meta-data/", "/LATEST/x"] {
        let mut r = rule("r");
        r.metadata = Some(MetadataAccess::Prefixes(strings(&[bad])));
        assert!(
            compile_err(vec![r], false).starts_with(&format!("access.rule[0].metadata={bad:?}"))
        );
    }
}

#[test]
fn role_arns() {
    let with_role = |arn: &str| {
        let mut r = rule("r");
        r.role = Some(arn.into());
        Policy::compile(&AccessConfig { rules: vec![r] }, &FakeDir::new(), true)
    };
    for good in [
        "arn:aws:iam::123456789012:role/worker-s3",
        "arn:aws-cn:iam::123456789012:role/a",
        "arn:aws-us-gov:iam::123456789012:role/division/sub/Prod+Role=,.@_-1",
        &format!("arn:aws:iam::123456789012:role/{}", "n".repeat(64)),
    ] {
        assert!(with_role(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "worker-s3",
        "arn:aws:iam::12345678901:role/x",
        "arn:aws:iam::1234567890123:role/x",
        "arn:aws:iam::12345678901a:role/x",
        "arn:aws:iam::123456789012:user/x",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:iam::123456789012:role/path/",
        "arn:aws:iam::123456789012:role//x",
        "arn:aws:iam::123456789012:role/x y",
        "arn:aws:sts::123456789012:role/x",
        "arn:AWS:iam::123456789012:role/x",
        "arn:aws:iam:us-east-1:123456789012:role/x",
        &format!("arn:aws:iam::123456789012:role/{}", "n".repeat(65)),
    ] {
        let err = with_role(bad).expect_err(bad).to_string();
        assert_eq!(
            err,
            format!(
                "access.rule[0].role={bad:?} is not valid: not an IAM role ARN \
                 (arn:aws:iam::<12-digit account>:role/<name>)"
            )
        );
    }
}

#[test]
fn unknown_names_are_errors_in_check_mode_and_warnings_at_run_time() {
    let mut r = rule("r");
    r.users = strings(&["alice", "ghost"]);
    assert_eq!(
        compile_err(vec![r.clone()], true),
        r#"access.rule[0].users="ghost" is not valid: no such user"#
    );
    let mut g = rule("g");
    g.groups = strings(&["workers", "phantoms"]);
    assert_eq!(
        compile_err(vec![rule("a"), g.clone()], true),
        r#"access.rule[1].groups="phantoms" is not valid: no such group"#
    );
    // Numeric ids are taken as they are, in both modes.
    let mut n = rule("n");
    (n.users, n.groups) = (strings(&["4242"]), strings(&["4343"]));
    compile(vec![n]);

    let cfg = AccessConfig { rules: vec![r, g] };
    let (p, warnings) = Policy::compile(&cfg, &FakeDir::new(), false).expect("run mode");
    assert_eq!(
        warnings,
        [
            r#"access.rule[0].users="ghost" does not resolve (no such user): the entry matches nothing until it does"#,
            r#"access.rule[1].groups="phantoms" does not resolve (no such group): the entry matches nothing until it does"#,
        ]
    );
    // The resolved entries still work; the unresolved ones match nothing.
    assert_eq!(decide(&p, &caller(1000, None), META, false).rule, Some(0));
    assert_eq!(decide(&p, &caller(1001, None), META, false).rule, None);
}

#[test]
fn refresh_resolves_late_names_and_keeps_lost_ones() {
    let mut r = rule("r");
    r.users = strings(&["carol"]);
    r.credentials = Some(Allowance::Deny);
    let mut g = rule("g");
    g.groups = strings(&["late"]);
    let cfg = AccessConfig { rules: vec![r, g] };
    let mut dir = FakeDir::new();
    let (mut p, warnings) = Policy::compile(&cfg, &dir, false).expect("run mode");
    assert_eq!(warnings.len(), 2);
    let carol = caller(1002, None);
    assert_eq!(
        p.decide(&carol, &Ask::Credentials, true, &[3000]),
        d(None, Verdict::Allow)
    );

    assert_eq!(p.refresh(&dir).len(), 2, "still unresolved");
    dir.users.insert("carol".into(), 1002);
    dir.groups.insert("late".into(), 3000);
    assert!(p.refresh(&dir).is_empty());
    assert_eq!(
        p.decide(&carol, &Ask::Credentials, true, &[]),
        d(Some(0), Verdict::NotFound)
    );
    assert_eq!(
        p.decide(&caller(7, None), &META, false, &[3000]),
        d(Some(1), Verdict::Allow)
    );

    // A transient NSS failure does not change who matches.
    dir.users.clear();
    assert_eq!(
        p.refresh(&dir),
        [
            r#"access.rule[0].users="carol" no longer resolves (no such user): the entry keeps its last id 1002"#
        ]
    );
    assert_eq!(
        p.decide(&carol, &Ask::Credentials, true, &[]),
        d(Some(0), Verdict::NotFound)
    );
    // A renumbered user follows its name.
    dir.users.insert("carol".into(), 1003);
    assert!(p.refresh(&dir).is_empty());
    assert_eq!(
        p.decide(&carol, &Ask::Credentials, true, &[]),
        d(None, Verdict::Allow)
    );
}

#[test]
fn accessors() {
    let empty = compile(vec![]);
    assert!(empty.is_empty());
    assert!(empty.rule_names().is_empty());
    assert!(!empty.needs_groups());
    let mut g = rule("g");
    g.groups = strings(&["0"]);
    let p = compile(vec![rule("a"), g]);
    assert!(!p.is_empty());
    assert_eq!(p.rule_names(), ["a", "g"]);
    assert!(p.needs_groups());
    assert!(!compile(vec![rule("a")]).needs_groups());
    let labels: Vec<_> = Unidentified::ALL.iter().map(|u| u.label()).collect();
    assert_eq!(labels, ["lookup_failed", "socket_gone", "forwarded"]);
}

#[path = "access_decision_tests.rs"]
mod decisions;
#[path = "access_prop_tests.rs"]
mod properties;
