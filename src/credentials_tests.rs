use super::*;

/// The documented IMDS body (`reference/aws-imds-sts-iam.md` §1.7), plus `AccountId` as the
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
