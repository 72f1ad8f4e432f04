use super::*;
use proptest::prelude::*;

fn get(target: &str) -> Route<'_> {
    classify(&Method::GET, target)
}

#[test]
fn credential_paths_under_every_version_and_slash_form() {
    for version in [
        "latest",
        "2012-01-12",
        "2016-09-02",
        "2024-04-11",
        "1.0",
        "LATEST",
    ] {
        for (kind, extended) in [
            ("security-credentials", false),
            ("security-credentials-extended", true),
        ] {
            for slash in ["", "/"] {
                let listing = format!("/{version}/meta-data/iam/{kind}{slash}");
                assert_eq!(
                    get(&listing),
                    Route::RoleListing {
                        extended,
                        path: &listing
                    },
                    "{listing}"
                );
                let role = format!("/{version}/meta-data/iam/{kind}/my-role{slash}");
                assert_eq!(
                    get(&role),
                    Route::Credentials {
                        role: "my-role",
                        extended,
                        path: &role
                    },
                    "{role}"
                );
                let head = classify(&Method::HEAD, &role);
                assert!(matches!(head, Route::Credentials { .. }), "HEAD {role}");
            }
        }
    }
}

#[test]
fn absolute_form_is_classified_on_its_path() {
    assert_eq!(
        get("http://169.254.169.254/latest/meta-data/iam/security-credentials/r"),
        Route::Credentials {
            role: "r",
            extended: false,
            path: "/latest/meta-data/iam/security-credentials/r"
        }
    );
    assert_eq!(
        get("HTTP://[fd00:ec2::254]/latest/meta-data/instance-id"),
        Route::Passthrough {
            target: "/latest/meta-data/instance-id"
        }
    );
    assert_eq!(
        get("http://169.254.169.254"),
        Route::Passthrough { target: "/" }
    );
    assert_eq!(
        get("https://169.254.169.254/latest/meta-data/"),
        Route::Refused(Refusal::BadTarget)
    );
    assert_eq!(
        get("169.254.169.254:80"),
        Route::Refused(Refusal::BadTarget)
    );
    assert_eq!(get("*"), Route::Refused(Refusal::BadTarget));
}

#[test]
fn the_query_is_dropped_on_credential_routes_and_kept_on_passthrough() {
    let Route::Credentials { path, .. } = get("/latest/meta-data/iam/security-credentials/r?x=1")
    else {
        panic!("not a credential route");
    };
    assert_eq!(path, "/latest/meta-data/iam/security-credentials/r");
    assert_eq!(
        get("/latest/meta-data/tags/instance?a=b&c"),
        Route::Passthrough {
            target: "/latest/meta-data/tags/instance?a=b&c"
        }
    );
}

#[test]
fn token_put_only_on_latest() {
    assert_eq!(classify(&Method::PUT, "/latest/api/token"), Route::Token);
    // IMDS answers a dated token path with 403 itself; it is not a credential path.
    assert_eq!(
        classify(&Method::PUT, "/2021-03-23/api/token"),
        Route::Passthrough {
            target: "/2021-03-23/api/token"
        }
    );
    assert_eq!(
        get("/latest/api/token"),
        Route::Passthrough {
            target: "/latest/api/token"
        }
    );
}

#[test]
fn methods_other_than_get_and_head_never_reach_credentials() {
    for method in [
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
    ] {
        for path in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/role",
            "/latest/meta-data/iam/security-credentials-extended/role/",
        ] {
            assert_eq!(
                classify(&method, path),
                Route::Refused(Refusal::Method),
                "{method} {path}"
            );
        }
    }
    // Elsewhere the upstream answers for itself (405 from IMDS).
    assert_eq!(
        classify(&Method::POST, "/latest/meta-data/"),
        Route::Passthrough {
            target: "/latest/meta-data/"
        }
    );
}

#[test]
fn identity_credentials_pass_through() {
    for path in [
        "/latest/meta-data/identity-credentials/ec2/info",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        "/2018-05-23/meta-data/identity-credentials/ec2/security-credentials/ec2-instance/",
    ] {
        assert_eq!(get(path), Route::Passthrough { target: path }, "{path}");
    }
    assert_eq!(
        get("/latest/meta-data/identity-credentials/ec2/security-credentials/other"),
        Route::Refused(Refusal::UnknownCredentialPath)
    );
}

#[test]
fn odd_spellings_are_refused_not_forwarded() {
    for target in [
        "//latest/meta-data/iam/security-credentials/r",
        "/latest//meta-data/iam/security-credentials/r",
        "/latest/meta-data/iam/security-credentials//r",
        "/latest/meta-data/iam/./security-credentials/r",
        "/latest/meta-data/x/../iam/security-credentials/r",
        "/latest/meta-data/iam/security-credentials/r/..",
        "/latest/meta-data/%69am/security-credentials/r",
        "/latest/meta-data/iam%2Fsecurity-credentials/r",
        "/latest/meta-data/iam\\security-credentials\\r",
        "/latest/meta-data/iam/security-credentials;x/r",
        "/latest/meta-data/iam/security-credentials/r#frag",
        "/latest/meta-data/iam/security-credentials/r\t",
        "/latest/meta-data/\u{0}",
        "/latest/meta-data/instance-id?x=%2e",
        "/latest/meta-data/?/iam/security-credentials/r",
        "/?x=CREDENTIALS",
        "",
        "latest/meta-data/",
    ] {
        assert_eq!(
            get(target),
            Route::Refused(Refusal::BadTarget),
            "{target:?}"
        );
    }
    let long = format!("/latest/meta-data/{}", "a".repeat(MAX_TARGET_LEN));
    assert_eq!(get(&long), Route::Refused(Refusal::BadTarget));
}

#[test]
fn unknown_forms_under_the_credential_subtree_are_refused() {
    for target in [
        "/latest/meta-data/iam/security-credentials/r/extra",
        "/latest/meta-data/iam/security-credentialsX/r",
        "/meta-data/iam/security-credentials/r",
        "/v1/meta-data/iam/security-credentials/r",
        "/latest/iam/security-credentials/r",
        "/latest/meta-data/security-credentials/r",
        "/latest/dynamic/iam/security-credentials/r",
    ] {
        assert_eq!(
            get(target),
            Route::Refused(Refusal::UnknownCredentialPath),
            "{target}"
        );
    }
}

#[test]
fn case_variants_of_the_subtree_are_credentials() {
    assert_eq!(
        get("/latest/Meta-Data/IAM/Security-Credentials/MyRole"),
        Route::Credentials {
            role: "MyRole",
            extended: false,
            path: "/latest/Meta-Data/IAM/Security-Credentials/MyRole"
        }
    );
}

#[test]
fn ordinary_metadata_passes_through_unchanged() {
    for path in [
        "/",
        "/latest",
        "/latest/",
        "/latest/meta-data/",
        "/latest/meta-data/iam/",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/network/interfaces/macs/02:42:ac:11:00:02/vpc-id",
        "/latest/dynamic/instance-identity/document",
        "/latest/user-data",
    ] {
        assert_eq!(get(path), Route::Passthrough { target: path }, "{path}");
    }
}

// ---- property test -------------------------------------------------------------------------
//
// A model of the most lenient server we can imagine: it percent-decodes (repeatedly), treats
// `\` as `/`, drops `;params`, the query and the fragment, collapses `//`, resolves dot
// segments, ignores case and a trailing slash, and accepts any version segment. If that server
// would read a target as a role's credentials, the classifier must not pass it through.

fn lenient_reading(target: &str) -> String {
    let mut t = target.to_string();
    if let Some(rest) = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("HTTP://"))
    {
        t = rest
            .find('/')
            .map(|i| rest[i..].to_string())
            .unwrap_or_default();
    }
    for _ in 0..3 {
        t = percent_decode(&t);
    }
    let t = t.replace('\\', "/").to_ascii_lowercase();
    let t = t.split(['?', '#']).next().unwrap_or("").to_string();
    let mut out: Vec<&str> = Vec::new();
    for seg in t.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg.trim() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn lenient_is_role_credentials(target: &str) -> bool {
    let r = lenient_reading(target);
    let segs: Vec<&str> = r.split('/').collect();
    segs.windows(3)
        .any(|w| w[0] == "iam" && w[1].starts_with("security-credentials") && !w[2].is_empty())
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("latest".to_string()),
        Just("LATEST".to_string()),
        Just("2012-01-12".to_string()),
        Just("meta-data".to_string()),
        Just("Meta-Data".to_string()),
        Just("iam".to_string()),
        Just("IAM".to_string()),
        Just("%69am".to_string()),
        Just("security-credentials".to_string()),
        Just("security-credentials-extended".to_string()),
        Just("Security-Credentials".to_string()),
        Just("security%2Dcredentials".to_string()),
        Just("security-credentials;x".to_string()),
        Just("identity-credentials".to_string()),
        Just("ec2".to_string()),
        Just("ec2-instance".to_string()),
        Just("info".to_string()),
        Just("role".to_string()),
        Just("my.role@x".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("".to_string()),
        Just("%2F".to_string()),
        Just("%2e%2e".to_string()),
        Just("a\\b".to_string()),
        Just("iam\\security-credentials".to_string()),
        "[a-zA-Z0-9._~%;:+=,@-]{0,8}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(""),
            Just("http://169.254.169.254"),
            Just("/"),
            Just("HTTP://h")
        ],
        prop::collection::vec(segment(), 0..7),
        prop_oneof![Just(""), Just("/"), Just("//")],
        prop_oneof![Just(""), Just("?x=1"), Just("?%2F"), Just("#f")],
    )
        .prop_map(|(prefix, segs, trail, query)| {
            format!("{prefix}/{}{trail}{query}", segs.join("/"))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn nothing_a_lenient_server_reads_as_credentials_is_passed_through(
        t in target(),
        head in any::<bool>(),
    ) {
        let method = if head { Method::HEAD } else { Method::GET };
        let route = classify(&method, &t);
        if lenient_is_role_credentials(&t) {
            prop_assert!(
                matches!(route, Route::Credentials { .. } | Route::Refused(_)),
                "{t:?} read as credentials by a lenient server but routed {route:?}"
            );
        }
        match route {
            // Passthrough forwards exactly what was asked (minus an absolute-form authority).
            Route::Passthrough { target } => prop_assert!(t.ends_with(target)),
            // Credentials forward the checked path, a prefix of what was asked.
            Route::Credentials { path, role, .. } => {
                let origin = origin_form(&t).unwrap();
                prop_assert!(origin.starts_with(path));
                prop_assert!(!role.is_empty() && !role.contains('/'));
            }
            _ => {}
        }
    }

    #[test]
    fn arbitrary_strings_never_panic_and_never_passthrough_credentials(
        t in "\\PC{0,80}",
    ) {
        let route = classify(&Method::GET, &t);
        if let Route::Passthrough { target } = route {
            prop_assert!(!lenient_is_role_credentials(target));
        }
    }
}

#[test]
fn segment_rules_hold_at_every_position() {
    // Dot segments are refused wherever they are, a segment that merely holds dots is not.
    for target in [
        "/.",
        "/..",
        "/./",
        "/latest/.",
        "/latest/..?x=1",
        "/latest/meta-data/iam/security-credentials/r/.",
        "/latest/meta-data//",
        "/latest/meta-data/instance-id//?x=1",
    ] {
        assert_eq!(
            get(target),
            Route::Refused(Refusal::BadTarget),
            "{target:?}"
        );
    }
    for target in [
        "/",
        "/?x=1",
        "/latest/...",
        "/latest/.../",
        "/latest/a.b/",
        "/latest/meta-data/instance-id/?x=1",
    ] {
        assert_eq!(get(target), Route::Passthrough { target }, "{target:?}");
    }
    // The marker is looked for inside each segment, in any case, at any offset.
    for target in [
        "/latest/meta-data/xCREDENTIALSy",
        "/latest/meta-data/credentials",
        "/latest/meta-data/a/b/c/d/e/f/g/h/credentialS",
        "/latest/meta-data/cccredentials?x=1",
    ] {
        assert_eq!(
            get(target),
            Route::Refused(Refusal::UnknownCredentialPath),
            "{target:?}"
        );
    }
    // Split across segments it is no credential path.
    let target = "/latest/meta-data/creden/tials";
    assert_eq!(get(target), Route::Passthrough { target });
}
