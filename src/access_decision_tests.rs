//! The decision rules, one by one (helpers in access_tests.rs).

use super::*;

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
