use super::*;

/// The documented IMDS body (Amazon EC2 User Guide, "Retrieve security credentials from instance
/// metadata"), plus `AccountId` as the
/// extended path adds it.
const UPSTREAM: &str = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2012-04-26T16:39:16Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIAIOSFODNN7EXAMPLE\",\n  \"SecretAccessKey\" : \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\",\n  \"Token\" : \"token\",\n  \"Expiration\" : \"2017-05-17T15:09:54Z\",\n  \"AccountId\" : \"123456789012\"\n}";

fn locked() -> LockedCredentials {
    LockedCredentials::new(
        "ASIALOCKEDLOCKED0001".into(),
        Secret::new("locked/secret+key"),
        Secret::new("locked-session-token=="),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_996_400),
    )
}

#[test]
fn replaces_the_five_fields_and_keeps_everything_else_byte_for_byte() {
    let out = rewrite(UPSTREAM.as_bytes(), &locked()).unwrap().unwrap();
    let out = String::from_utf8(out).unwrap();
    let expected = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2027-01-15T07:00:00Z\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIALOCKEDLOCKED0001\",\n  \"SecretAccessKey\" : \"locked/secret+key\",\n  \"Token\" : \"locked-session-token==\",\n  \"Expiration\" : \"2027-01-15T08:00:00Z\",\n  \"AccountId\" : \"123456789012\"\n}";
    assert_eq!(out, expected);
    for raw in ["ASIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "\"token\""] {
        assert!(!out.contains(raw), "{raw} leaked");
    }
}

#[test]
fn compact_bodies_and_escaped_keys_are_rewritten_too() {
    let body = r#"{"Code":"Success","AccessKeyId":"RAWKEY","SecretAccessKey":"RAWSECRET","Tok\u0065n":"RAWTOKEN","Expiration":"2017-05-17T15:09:54Z"}"#;
    let out = String::from_utf8(rewrite(body.as_bytes(), &locked()).unwrap().unwrap()).unwrap();
    assert!(!out.contains("RAW"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Token"], "locked-session-token==");
}

#[test]
fn duplicate_keys_cannot_smuggle_the_raw_secret() {
    let body = r#"{"Code":"Success","AccessKeyId":"RAW1","SecretAccessKey":"RAW2","Token":"RAW3","Expiration":"x","SecretAccessKey":"RAW4"}"#;
    let out = String::from_utf8(rewrite(body.as_bytes(), &locked()).unwrap().unwrap()).unwrap();
    assert!(!out.contains("RAW"), "{out}");
}

#[test]
fn error_documents_pass_unchanged() {
    let body = r#"{"Code" : "AssumeRoleUnauthorizedAccess", "Message" : "EC2 cannot assume the role", "LastUpdated" : "2021-01-01T00:00:00Z"}"#;
    assert_eq!(rewrite(body.as_bytes(), &locked()), Ok(None));
}

#[test]
fn success_bodies_that_cannot_be_rewritten_are_errors() {
    let missing = r#"{"Code":"Success","AccessKeyId":"A","SecretAccessKey":"S","Expiration":"E"}"#;
    assert_eq!(
        rewrite(missing.as_bytes(), &locked()),
        Err(RewriteError::MissingField("Token"))
    );
    for bad in [
        "",
        "[]",
        "not json",
        "{\"Code\":\"Success\"",
        "{\"Code\":\"Success\"} trailing",
        "\u{feff}{}",
    ] {
        assert_eq!(
            rewrite(bad.as_bytes(), &locked()),
            Err(RewriteError::NotJson),
            "{bad:?}"
        );
    }
}

#[test]
fn debug_never_shows_secrets() {
    let shown = format!("{:?}", locked());
    assert!(!shown.contains("locked/secret+key") && !shown.contains("locked-session-token"));
    assert!(shown.contains("ASIALOCKEDLOCKED0001"));
}

#[test]
fn the_store_fails_closed_near_expiry() {
    let store = CredentialStore::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_996_400);
    assert!(store.servable(now, Duration::from_secs(300)).is_none());
    store.store(locked());
    assert!(store.servable(now, Duration::from_secs(300)).is_some());
    let late = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 - 300);
    assert!(store.servable(late, Duration::from_secs(300)).is_none());
    assert!(store.peek().is_some());
    store.clear();
    assert!(store.peek().is_none());
}

#[test]
fn timestamps_have_no_fraction() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    assert_eq!(imds_timestamp(t), "2023-11-14T22:13:20Z");
}

// ---- judge: fail closed on anything but the documented shapes --------------------------------

/// The documented body with a token as long as real ones (a raw value as short as "token"
/// would match innocent text, and be refused: fail closed).
fn doc() -> String {
    UPSTREAM.replace(
        "\"Token\" : \"token\"",
        "\"Token\" : \"IQoJb3JpZ2luX2VjEXAMPLERAWTOKEN\"",
    )
}

fn raw_known() -> Vec<Secret> {
    vec![
        Secret::new("ASIAIOSFODNN7EXAMPLE"),
        Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        Secret::new("IQoJb3JpZ2luX2VjEXAMPLERAWTOKEN"),
    ]
}

#[test]
fn judge_locks_the_documented_success_shape_only() {
    let Verdict::Locked(out) = judge(200, doc().as_bytes(), &locked(), &raw_known()) else {
        panic!("the documented body is locked");
    };
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("ASIALOCKEDLOCKED0001") && out.contains("\"AccountId\" : \"123456789012\"")
    );
    // Code not exactly "Success", missing, not a string; a key's value not a string.
    for (from, to) in [
        ("\"Code\" : \"Success\"", "\"Code\" : \"Success \""),
        ("\"Code\" : \"Success\"", "\"Code\" : \"success\""),
        ("\"Code\" : \"Success\",", ""),
        ("\"Code\" : \"Success\"", "\"Code\" : true"),
        (
            "\"Token\" : \"IQoJb3JpZ2luX2VjEXAMPLERAWTOKEN\"",
            "\"Token\" : 7",
        ),
        ("\"Token\" :", "\"token\" :"),
    ] {
        let body = doc().replace(from, to);
        assert_ne!(body, doc());
        let v = judge(200, body.as_bytes(), &locked(), &[]);
        assert!(matches!(v, Verdict::Refuse(_)), "{to}: {v:?}");
    }
}

#[test]
fn judge_refuses_a_raw_secret_anywhere_in_what_it_would_serve() {
    // Under another key, nested, in another case, escaped: the upstream's own values are
    // found wherever they stand.
    for extra in [
        r#""Note" : "ASIAIOSFODNN7EXAMPLE","#,
        r#""Extra" : {"secretaccesskey" : "nested-raw-secret"},"#,
        r#""List" : ["x", {"SessionToken" : "nested-raw-token"}],"#,
        r#""Copy" : "wJalrXUtnFEMI\/K7MDENG\/bPxRfiCYEXAMPLEKEY","#,
    ] {
        let body = doc().replacen("\"Type\"", &format!("{extra}\n  \"Type\""), 1);
        let v = judge(200, body.as_bytes(), &locked(), &[]);
        assert_eq!(v, Verdict::Refuse(AnswerRefusal::RawSecret), "{extra}");
    }
    // A value only credlock knows (from its own read of the role) is caught too.
    let body = doc().replacen(
        "\"Type\"",
        "\"Hint\" : \"x-credlock-known\",\n  \"Type\"",
        1,
    );
    assert!(matches!(
        judge(200, body.as_bytes(), &locked(), &[]),
        Verdict::Locked(_)
    ));
    assert_eq!(
        judge(
            200,
            body.as_bytes(),
            &locked(),
            &[Secret::new("credlock-known")]
        ),
        Verdict::Refuse(AnswerRefusal::RawSecret)
    );
}

#[test]
fn judge_passes_documented_errors_without_secrets_and_refuses_the_rest() {
    let error_doc = r#"{"Code" : "AssumeRoleUnauthorizedAccess", "Message" : "EC2 cannot assume the role", "LastUpdated" : "2021-01-01T00:00:00Z"}"#;
    assert_eq!(
        judge(200, error_doc.as_bytes(), &locked(), &raw_known()),
        Verdict::PassError
    );
    let html = b"<?xml version=\"1.0\"?><html><title>404 - Not Found</title></html>";
    for status in [400, 401, 403, 404, 405, 429, 500, 503] {
        assert_eq!(
            judge(status, html, &locked(), &raw_known()),
            Verdict::PassError,
            "{status}"
        );
        // A documented status carrying credentials (JSON, or a raw value credlock knows).
        let v = judge(status, doc().as_bytes(), &locked(), &[]);
        assert_eq!(v, Verdict::Refuse(AnswerRefusal::RawSecret), "{status}");
        let v = judge(
            status,
            b"oops ASIAIOSFODNN7EXAMPLE",
            &locked(),
            &raw_known(),
        );
        assert_eq!(v, Verdict::Refuse(AnswerRefusal::RawSecret), "{status}");
    }
    for status in [201, 203, 204, 206, 301, 302, 304, 418] {
        let v = judge(status, doc().as_bytes(), &locked(), &raw_known());
        assert_eq!(v, Verdict::Refuse(AnswerRefusal::Status), "{status}");
    }
    // A 200 that is neither shape: not JSON, an error document with a secret key, no Code.
    for body in [
        "not json",
        r#"{"Code":"AssumeRoleUnauthorizedAccess","AccessKeyId":"ASIAX"}"#,
        r#"{"Message":"hi"}"#,
        r#"{"Code":5}"#,
    ] {
        let v = judge(200, body.as_bytes(), &locked(), &[]);
        assert!(matches!(v, Verdict::Refuse(_)), "{body}: {v:?}");
    }
}
