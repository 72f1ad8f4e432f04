//! Properties over generated rule sets and identities, against a separate reference.

use super::*;

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
