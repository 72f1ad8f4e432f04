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

// ---- decisions ----------------------------------------------------------------------------

#[test]
fn no_rules_allow_everyone_everything() {
    let p = compile(vec![]);
    for who in [
        caller(33, Some("nginx.service")),
        caller(0, None),
        UNIDENTIFIED,
    ] {
        for ask in EVERY_ASK {
            for has_token in [false, true] {
                assert_eq!(decide(&p, &who, ask, has_token), d(None, Verdict::Allow));
            }
        }
    }
}

#[test]
fn unidentified_callers_get_only_the_token_without_an_unidentified_rule() {
    let mut deny_web = rule("web");
    deny_web.users = strings(&["www-data"]);
    let p = compile(vec![deny_web, rule("everyone")]);
    for why in Unidentified::ALL {
        let who = Identity::Unidentified(why);
        assert_eq!(decide(&p, &who, Ask::Token, false), d(None, Verdict::Allow));
        for ask in &EVERY_ASK[1..] {
            assert_eq!(
                decide(&p, &who, *ask, true),
                d(None, Verdict::NotFound),
                "{ask:?}"
            );
        }
    }
}

#[test]
fn unidentified_rules_match_only_unidentified_callers() {
    let mut u = rule("u");
    u.unidentified = true;
    u.metadata = Some(MetadataAccess::Deny);
    let p = compile(vec![u, rule("rest")]);
    for why in Unidentified::ALL {
        let who = Identity::Unidentified(why);
        assert_eq!(
            decide(&p, &who, Ask::Credentials, false),
            d(Some(0), Verdict::Allow)
        );
        assert_eq!(decide(&p, &who, META, false), d(Some(0), Verdict::NotFound));
    }
    assert_eq!(
        decide(&p, &caller(0, None), META, false),
        d(Some(1), Verdict::Allow)
    );
    // Alone, an unidentified rule leaves identified callers to the default (allow).
    let mut u = rule("u");
    u.unidentified = true;
    u.credentials = Some(Allowance::Deny);
    let p = compile(vec![u]);
    assert_eq!(
        decide(&p, &caller(0, None), Ask::Credentials, false),
        d(None, Verdict::Allow)
    );
}

#[test]
fn every_selector_must_match() {
    let mut r = rule("r");
    r.units = strings(&["app-*.service"]);
    r.users = strings(&["alice", "1001"]);
    r.groups = strings(&["workers", "33"]);
    let p = compile(vec![r]);
    let rule_of = |uid, unit: Option<&str>, groups: &[u32]| {
        p.decide(&caller(uid, unit), &META, false, groups).rule
    };
    assert_eq!(rule_of(1000, Some("app-a.service"), &[1000, 2000]), Some(0));
    assert_eq!(
        rule_of(1001, Some("app-b.service"), &[33]),
        Some(0),
        "numeric uid, any gid"
    );
    assert_eq!(rule_of(1000, Some("app-a.service"), &[1000]), None, "group");
    assert_eq!(rule_of(0, Some("app-a.service"), &[2000]), None, "user");
    assert_eq!(rule_of(1000, Some("web.service"), &[2000]), None, "unit");
    assert_eq!(
        rule_of(1000, None, &[2000]),
        None,
        "a caller without a unit never matches units"
    );
}

#[test]
fn a_rule_without_selectors_matches_every_identified_caller_and_first_match_wins() {
    let mut web = rule("web");
    web.units = strings(&["nginx.service"]);
    web.credentials = Some(Allowance::Deny);
    let mut rest = rule("rest");
    rest.metadata = Some(MetadataAccess::Deny);
    let mut never = rule("never");
    never.users = strings(&["0"]);
    let p = compile(vec![web, rest, never]);
    let nginx = caller(0, Some("nginx.service"));
    assert_eq!(
        decide(&p, &nginx, Ask::Credentials, true),
        d(Some(0), Verdict::NotFound)
    );
    assert_eq!(decide(&p, &nginx, META, true), d(Some(0), Verdict::Allow));
    for who in [
        caller(0, None),
        caller(1000, Some("session-3.scope")),
        caller(u32::MAX, None),
    ] {
        assert_eq!(decide(&p, &who, META, true), d(Some(1), Verdict::NotFound));
        assert_eq!(
            decide(&p, &who, Ask::Credentials, false),
            d(Some(1), Verdict::Allow)
        );
    }
    // An identified caller matching no rule keeps today's behaviour.
    let mut only = rule("only");
    only.users = strings(&["www-data"]);
    only.credentials = Some(Allowance::Deny);
    let p = compile(vec![only]);
    for ask in EVERY_ASK {
        assert_eq!(
            decide(&p, &caller(1000, None), ask, false),
            d(None, Verdict::Allow)
        );
    }
}

#[test]
fn credential_verdicts() {
    let mut deny = rule("deny");
    deny.credentials = Some(Allowance::Deny);
    deny.require_token = true;
    let p = compile(vec![deny]);
    for ask in [
        Ask::CredentialListing,
        Ask::Credentials,
        Ask::IdentityCredentials,
    ] {
        for has_token in [false, true] {
            assert_eq!(
                decide(&p, &caller(0, None), ask, has_token).verdict,
                Verdict::NotFound
            );
        }
    }
    assert_eq!(
        decide(&p, &caller(0, None), Ask::Token, false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, &caller(0, None), META, false).verdict,
        Verdict::Allow,
        "metadata default"
    );

    let mut v2 = rule("v2");
    v2.require_token = true;
    v2.metadata = Some(MetadataAccess::Allow);
    v2.credentials = Some(Allowance::Allow);
    let p = compile(vec![v2]);
    let who = caller(0, None);
    for ask in [Ask::CredentialListing, Ask::Credentials] {
        assert_eq!(decide(&p, &who, ask, false).verdict, Verdict::TokenRequired);
        assert_eq!(decide(&p, &who, ask, true).verdict, Verdict::Allow);
    }
    assert_eq!(
        decide(&p, &who, Ask::IdentityCredentials, false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, &who, META, false).verdict,
        Verdict::Allow,
        "require_token is for credentials only"
    );
    assert_eq!(decide(&p, &who, Ask::Token, false).verdict, Verdict::Allow);
}

#[test]
fn metadata_prefixes_match_under_every_version() {
    let mut r = rule("r");
    r.metadata = Some(MetadataAccess::Prefixes(strings(&[
        "/latest/meta-data/placement/",
        "/latest/user-data",
    ])));
    let p = compile(vec![r]);
    let verdict = |path: &str| decide(&p, &caller(0, None), Ask::Metadata { path }, true).verdict;
    for path in [
        "/latest/meta-data/placement/availability-zone",
        "/1.0/meta-data/placement/",
        "/2021-01-03/meta-data/placement/region",
        "/9999-99-99/user-data",
        "/latest/user-data",
    ] {
        assert_eq!(verdict(path), Verdict::Allow, "{path}");
    }
    for path in [
        "/latest/meta-data/placement",
        "/latest/meta-data/instance-id",
        "/latest/",
        "/latest",
        "/",
        "",
        "latest/user-data",
        "/meta-data/placement/",
        "/x/meta-data/placement/a",
        "/LATEST/meta-data/placement/a",
        "/2.0/meta-data/placement/a",
        "/2021-1-03/meta-data/placement/a",
        "/2021-01-033/meta-data/placement/a",
        "/2021_01_03/meta-data/placement/a",
        "/latest/META-DATA/placement/a",
    ] {
        assert_eq!(verdict(path), Verdict::NotFound, "{path}");
    }
    let mut none = rule("none");
    none.metadata = Some(MetadataAccess::Prefixes(vec![]));
    let p = compile(vec![none]);
    assert_eq!(
        decide(&p, &caller(0, None), META, true).verdict,
        Verdict::NotFound
    );
    let mut deny = rule("deny");
    deny.metadata = Some(MetadataAccess::Deny);
    let p = compile(vec![deny]);
    assert_eq!(
        decide(&p, &caller(0, None), META, true).verdict,
        Verdict::NotFound
    );
    assert_eq!(
        decide(&p, &caller(0, None), Ask::Credentials, false).verdict,
        Verdict::Allow
    );
}

#[test]
fn globs() {
    for (glob, name, expected) in [
        ("nginx.service", "nginx.service", true),
        ("nginx.service", "nginx.service2", false),
        ("nginx.service", "xnginx.service", false),
        ("php-fpm*.service", "php-fpm.service", true),
        ("php-fpm*.service", "php-fpm8.2.service", true),
        ("php-fpm*.service", "php-fpm8.2.socket", false),
        ("*", "", true),
        ("*", "anything.scope", true),
        ("?", "", false),
        ("?", "é", true),
        ("session-?.scope", "session-3.scope", true),
        ("session-?.scope", "session-13.scope", false),
        ("*a*b*", "xxaxxbxx", true),
        ("*a*b", "ab_ab_a", false),
        ("a**b", "ab", true),
        ("user@*.service", "user@1000.service", true),
        ("N*", "nginx.service", false),
        ("", "", true),
        ("", "a", false),
    ] {
        assert_eq!(glob_matches(glob, name), expected, "{glob:?} {name:?}");
    }
}

// ---- properties ---------------------------------------------------------------------------

/// The reference glob: recursive, over characters.
fn ref_glob(pat: &[char], name: &[char]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some(('*', rest)) => (0..=name.len()).any(|k| ref_glob(rest, &name[k..])),
        Some(('?', rest)) => !name.is_empty() && ref_glob(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && ref_glob(rest, &name[1..]),
    }
}

fn ref_id(name: &str, lookup: impl Fn(&str) -> Option<u32>) -> Option<u32> {
    name.parse().ok().or_else(|| lookup(name))
}

fn ref_matches(r: &RuleConfig, who: &Identity, groups: &[u32]) -> bool {
    let dir = FakeDir::new();
    match who {
        Identity::Unidentified(_) => r.unidentified,
        Identity::Identified(c) => {
            if r.unidentified {
                return false;
            }
            let chars = |s: &str| s.chars().collect::<Vec<_>>();
            let unit = r.units.is_empty()
                || r.units.iter().any(|g| {
                    c.unit
                        .as_ref()
                        .is_some_and(|u| ref_glob(&chars(g), &chars(u)))
                });
            let user = r.users.is_empty()
                || r.users
                    .iter()
                    .any(|u| ref_id(u, |n| dir.uid_of(n)) == Some(c.uid));
            let group = r.groups.is_empty()
                || r.groups
                    .iter()
                    .any(|g| ref_id(g, |n| dir.gid_of(n)).is_some_and(|gid| groups.contains(&gid)));
            unit && user && group
        }
    }
}

fn ref_verdict(r: &RuleConfig, ask: &Ask<'_>, has_token: bool) -> Verdict {
    let credentials_denied = r.credentials == Some(Allowance::Deny);
    match *ask {
        Ask::Token => Verdict::Allow,
        Ask::IdentityCredentials if credentials_denied => Verdict::NotFound,
        Ask::IdentityCredentials => Verdict::Allow,
        Ask::CredentialListing | Ask::Credentials if credentials_denied => Verdict::NotFound,
        Ask::CredentialListing | Ask::Credentials if r.require_token && !has_token => {
            Verdict::TokenRequired
        }
        Ask::CredentialListing | Ask::Credentials => Verdict::Allow,
        Ask::Metadata { path } => match &r.metadata {
            None | Some(MetadataAccess::Allow) => Verdict::Allow,
            Some(MetadataAccess::Deny) => Verdict::NotFound,
            Some(MetadataAccess::Prefixes(prefixes)) => {
                let mut segments: Vec<&str> = path.split('/').collect();
                let versioned = segments.len() >= 2
                    && segments[0].is_empty()
                    && (segments[1] == "latest"
                        || segments[1] == "1.0"
                        || (segments[1].len() == 10
                            && segments[1].split('-').map(str::len).collect::<Vec<_>>()
                                == [4, 2, 2]
                            && segments[1].chars().all(|c| c == '-' || c.is_ascii_digit())));
                if versioned {
                    segments[1] = "latest";
                }
                let normal = segments.join("/");
                if versioned && prefixes.iter().any(|p| normal.starts_with(p.as_str())) {
                    Verdict::Allow
                } else {
                    Verdict::NotFound
                }
            }
        },
    }
}

fn ref_decide(
    cfg: &AccessConfig,
    who: &Identity,
    ask: &Ask<'_>,
    has_token: bool,
    groups: &[u32],
) -> Decision {
    if cfg.rules.is_empty() {
        return d(None, Verdict::Allow);
    }
    for (i, r) in cfg.rules.iter().enumerate() {
        if ref_matches(r, who, groups) {
            return d(Some(i), ref_verdict(r, ask, has_token));
        }
    }
    match (who, ask) {
        (Identity::Identified(_), _) | (_, Ask::Token) => d(None, Verdict::Allow),
        (Identity::Unidentified(_), _) => d(None, Verdict::NotFound),
    }
}

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

fn names(vocab: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(pick(vocab).prop_map(String::from), 0..3)
}

fn arb_rule() -> impl Strategy<Value = RuleConfig> {
    let units = names(&[
        "nginx.service",
        "php-fpm*.service",
        "*.service",
        "session-?.scope",
        "*",
        "user@1000.service",
    ]);
    let users = names(&["www-data", "alice", "ghost", "0", "1001", "4242"]);
    let groups = names(&["workers", "alice", "ghost", "33", "5000"]);
    let allowance = prop::option::of(pick(&[Allowance::Allow, Allowance::Deny]));
    let prefixes = prop::collection::vec(
        pick(&[
            "/latest/meta-data/placement/",
            "/latest/dynamic/",
            "/latest/meta-data/",
            "/latest/user",
        ])
        .prop_map(String::from),
        0..3,
    );
    let metadata = prop::option::of(prop_oneof![
        Just(MetadataAccess::Allow),
        Just(MetadataAccess::Deny),
        prefixes.prop_map(MetadataAccess::Prefixes),
    ]);
    (
        prop::bool::weighted(0.2),
        units,
        users,
        groups,
        allowance,
        metadata,
        any::<bool>(),
    )
        .prop_map(
            |(unidentified, units, users, groups, credentials, metadata, require_token)| {
                let mut r = rule("r");
                r.unidentified = unidentified;
                if !unidentified {
                    (r.units, r.users, r.groups) = (units, users, groups);
                }
                (r.credentials, r.metadata, r.require_token) =
                    (credentials, metadata, require_token);
                r
            },
        )
}

fn arb_config() -> impl Strategy<Value = AccessConfig> {
    prop::collection::vec(arb_rule(), 0..6).prop_map(|mut rules| {
        for (i, r) in rules.iter_mut().enumerate() {
            r.name = format!("r{i}");
        }
        AccessConfig { rules }
    })
}

fn arb_identity() -> impl Strategy<Value = (Identity, Vec<u32>)> {
    let unit = prop::option::of(pick(&[
        "nginx.service",
        "php-fpm8.2.service",
        "user@1000.service",
        "session-3.scope",
        "cron.service",
    ]));
    let identified = (
        pick(&[0u32, 33, 1000, 1001, 4242]),
        unit,
        prop::collection::vec(pick(&[0u32, 33, 1000, 2000, 5000]), 0..3),
    )
        .prop_map(|(uid, unit, groups)| (caller(uid, unit), groups));
    let unidentified =
        pick(&Unidentified::ALL).prop_map(|why| (Identity::Unidentified(why), vec![]));
    prop_oneof![4 => identified, 1 => unidentified]
}

fn arb_ask() -> impl Strategy<Value = Ask<'static>> {
    prop_oneof![
        Just(Ask::Token),
        Just(Ask::CredentialListing),
        Just(Ask::Credentials),
        Just(Ask::IdentityCredentials),
        pick(&[
            "/latest/meta-data/placement/availability-zone",
            "/2021-01-03/meta-data/placement/region",
            "/1.0/dynamic/instance-identity/document",
            "/latest/user-data",
            "/latest",
            "/foo/meta-data/placement/",
            "/2021-01-03/meta-data/instance-id",
        ])
        .prop_map(|path| Ask::Metadata { path }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// (2) First match: the decision is the first matching rule's, as the reference computes it.
    #[test]
    fn first_match_as_the_reference(
        cfg in arb_config(), (who, groups) in arb_identity(), ask in arb_ask(), has_token in any::<bool>()
    ) {
        let (p, _) = Policy::compile(&cfg, &FakeDir::new(), false).expect("generated rules are valid");
        prop_assert_eq!(p.decide(&who, &ask, has_token, &groups), ref_decide(&cfg, &who, &ask, has_token, &groups));
    }

    /// (1) An unidentified caller gets exactly what the unidentified rules alone give it (or the
    /// deny default), whatever the named classes may do.
    #[test]
    fn unidentified_never_inherits_a_named_class(
        cfg in arb_config(), why in pick(&Unidentified::ALL), ask in arb_ask(), has_token in any::<bool>()
    ) {
        let dir = FakeDir::new();
        let (p, _) = Policy::compile(&cfg, &dir, false).expect("valid");
        let kept: Vec<usize> = (0..cfg.rules.len()).filter(|&i| cfg.rules[i].unidentified).collect();
        let only = AccessConfig { rules: kept.iter().map(|&i| cfg.rules[i].clone()).collect() };
        let (q, _) = Policy::compile(&only, &dir, false).expect("valid");
        let who = Identity::Unidentified(why);
        let got = p.decide(&who, &ask, has_token, &[]);
        let expected = if kept.is_empty() && !cfg.rules.is_empty() {
            d(None, if ask == Ask::Token { Verdict::Allow } else { Verdict::NotFound })
        } else {
            let alone = q.decide(&who, &ask, has_token, &[]);
            d(alone.rule.map(|i| kept[i]), alone.verdict)
        };
        prop_assert_eq!(got, expected);
    }

    /// (3) No rules: everything is allowed to everyone.
    #[test]
    fn no_rules_allow_everything((who, groups) in arb_identity(), ask in arb_ask(), has_token in any::<bool>()) {
        let p = compile(vec![]);
        prop_assert_eq!(p.decide(&who, &ask, has_token, &groups), d(None, Verdict::Allow));
    }

    #[test]
    fn glob_as_the_reference(glob in "[ab*?.]{0,8}", name in "[abé.]{0,10}") {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        prop_assert_eq!(glob_matches(&glob, &name), ref_glob(&chars(&glob), &chars(&name)));
    }

    /// Arbitrary strings anywhere in a rule are accepted or rejected, never a panic.
    #[test]
    fn arbitrary_rules_compile_or_fail(
        name in ".{0,40}", unit in ".{0,20}", user in ".{0,10}", prefix in ".{0,20}", role in ".{0,80}",
        path in ".{0,40}", strict in any::<bool>()
    ) {
        let mut r = rule(&name);
        (r.units, r.users, r.groups) = (vec![unit.clone()], vec![user.clone()], vec![user]);
        r.metadata = Some(MetadataAccess::Prefixes(vec![prefix]));
        r.role = Some(role);
        if let Ok((p, _)) = Policy::compile(&AccessConfig { rules: vec![r] }, &FakeDir::new(), strict) {
            let _ = p.decide(&caller(0, Some(&unit)), &Ask::Metadata { path: &path }, false, &[0]);
        }
    }
}
