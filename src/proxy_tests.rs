//! The handler's local decisions, without a listener.

use std::time::SystemTime;

use super::*;
use crate::credentials::Secret;

fn locked(key: &str) -> Arc<LockedCredentials> {
    let now = SystemTime::now();
    Arc::new(LockedCredentials::new(
        key.into(),
        Secret::new(format!("{key}/secret")),
        Secret::new(format!("{key}-token")),
        now + Duration::from_secs(3600),
        now,
    ))
}

fn upstream(code: &str, updated: &str) -> Bytes {
    Bytes::from(format!(
        "{{\n  \"Code\" : \"{code}\",\n  \"LastUpdated\" : \"{updated}\",\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIARAWRAWRAW\",\n  \"SecretAccessKey\" : \"rawSecret\",\n  \"Token\" : \"rawToken\",\n  \"Expiration\" : \"2026-11-30T21:00:00Z\"\n}}"
    ))
}

fn fresh(body: &Bytes, set: &LockedCredentials, known: &[Secret]) -> Judged {
    match credentials::judge(200, body, set, known) {
        Verdict::Locked(b) => Judged::Locked(Bytes::from(b)),
        Verdict::PassError => Judged::PassError,
        Verdict::Refuse(r) => Judged::Refuse(r),
    }
}

/// Whatever came before, the cache answers exactly what a fresh judgement of this upstream
/// body with this locked set and these known values answers: a changed upstream document,
/// a new locked set or new known values are never served the previous answer.
#[test]
fn the_cache_answers_what_a_fresh_judgement_answers() {
    let cache = RewriteCache::default();
    let (a, b) = (locked("ASIALOCKEDA"), locked("ASIALOCKEDB"));
    let none: Arc<Vec<Secret>> = Arc::new(Vec::new());
    // The known raw values include what `one` carries under an unexpected key.
    let known = Arc::new(vec![Secret::new("rawSecret")]);
    let (one, two) = (
        upstream("Success", "2026-11-30T15:00:00Z"),
        upstream("Success", "2026-11-30T16:00:00Z"),
    );
    let error =
        Bytes::from_static(b"{\"Code\":\"AssumeRoleUnauthorizedAccess\",\"Message\":\"no\"}");
    let broken = Bytes::from_static(b"{\"Code\":\"Success\",\"AccessKeyId\":\"ASIARAW\"}");
    let extra = Bytes::from(
        String::from_utf8(upstream("Success", "x").to_vec())
            .unwrap()
            .replace("\"Type\"", "\"Note\" : \"rawSecret\",\n  \"Type\""),
    );
    let steps = [
        (&one, &a, &none),
        (&one, &a, &none),
        (&two, &a, &none),
        (&two, &b, &none),
        (&one, &b, &none),
        (&error, &b, &none),
        (&one, &b, &none),
        (&broken, &b, &none),
        (&extra, &b, &none),
        (&extra, &b, &known),
        (&one, &a, &known),
        (&one, &a, &known),
    ];
    for (i, (body, set, known)) in steps.into_iter().enumerate() {
        assert_eq!(
            cache.judge(StatusCode::OK, body, set, known),
            fresh(body, set, known),
            "step {i}"
        );
    }
    assert_eq!(
        cache.judge(StatusCode::OK, &extra, &b, &known),
        Judged::Refuse(AnswerRefusal::RawSecret)
    );
    assert_eq!(
        cache.judge(StatusCode::OK, &error, &b, &none),
        Judged::PassError
    );
}

#[test]
fn a_class_roles_account_replaces_the_instances_in_the_extended_form() {
    let acct = "999999999999";
    let cases = [
        (
            r#"{"Code":"Success","AccountId":"123456789012"}"#,
            Some(r#"{"Code":"Success","AccountId":"999999999999"}"#),
        ),
        (
            "{\n  \"AccountId\" : \"123456789012\",\n  \"Type\": \"AWS-HMAC\"}",
            Some("{\n  \"AccountId\" : \"999999999999\",\n  \"Type\": \"AWS-HMAC\"}"),
        ),
        (r#"{"Code":"Success","Type":"AWS-HMAC"}"#, None),
        (r#"{"AccountId":"12345"}"#, None),
        (r#"{"AccountId":12345678901}"#, None),
        (r#"{"AccountId":"12345678901x"}"#, None),
        (r#"{"AccountId""#, None),
    ];
    for (body, want) in cases {
        let got = with_account(body.as_bytes(), acct);
        assert_eq!(got.as_deref(), want.map(str::as_bytes), "{body}");
    }
}

#[test]
fn the_same_upstream_body_and_set_reuse_the_last_answer() {
    let cache = RewriteCache::default();
    let set = locked("ASIALOCKEDA");
    let known: Arc<Vec<Secret>> = Arc::new(Vec::new());
    let judge = |set: &Arc<LockedCredentials>| match cache.judge(
        StatusCode::OK,
        &upstream("Success", "x"),
        set,
        &known,
    ) {
        Judged::Locked(b) => b,
        other => panic!("{other:?}"),
    };
    let first = judge(&set);
    // An equal body in another buffer (the next answer on another connection) still hits.
    let again = judge(&set);
    assert_eq!(first.as_ptr(), again.as_ptr());
    let text = std::str::from_utf8(&again).unwrap();
    assert!(text.contains("ASIALOCKEDA/secret") && !text.contains("rawSecret"));
    // The same values in a new set (a refresh) are a new judgement, not the held one.
    let refreshed = judge(&locked("ASIALOCKEDA"));
    assert_ne!(first.as_ptr(), refreshed.as_ptr());
}
