use super::*;
use crate::credentials::{LockedCredentials, rewrite_document};
use std::time::{Duration, SystemTime};

/// The agent's document, byte for byte as its handler test pins it
/// (`credentialsResponseJSON`, ecs-agent/tmds/handlers/credentials_handler_test.go), with
/// realistic values.
const ECS_DOC: &str = r#"{"RoleArn":"arn:aws:iam::111122223333:role/task-a","AccessKeyId":"ASIARAWEAAAAAAAAAAAA","SecretAccessKey":"xxRAWSECRETxx","Token":"RAWTOKENxx","Expiration":"2026-12-02T10:00:00Z"}"#;
const SECRET40: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

fn none() -> HeaderMap {
    HeaderMap::new()
}

fn locked_set() -> LockedCredentials {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    LockedCredentials::new(
        "ASIALOCKED".into(),
        Secret::new("locked-secret"),
        Secret::new("locked-token"),
        t0 + Duration::from_secs(3600),
        t0,
    )
}

fn verdict(status: u16, body: &[u8]) -> Verdict {
    judge(status, &none(), body, &[])
}

#[test]
fn the_documented_document_is_rewritten_in_place_keeping_role_and_order() {
    let Verdict::Document(doc) = verdict(200, ECS_DOC.as_bytes()) else {
        panic!("not judged a document");
    };
    assert_eq!(
        doc.role_arn.as_deref(),
        Some("arn:aws:iam::111122223333:role/task-a")
    );
    let out = rewrite_document(ECS_DOC.as_bytes(), &locked_set()).unwrap();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        r#"{"RoleArn":"arn:aws:iam::111122223333:role/task-a","AccessKeyId":"ASIALOCKED","SecretAccessKey":"locked-secret","Token":"locked-token","Expiration":"2027-01-15T09:00:00Z"}"#
    );
    assert!(servable(&out, &doc.raw_values()));
    assert!(!servable(ECS_DOC.as_bytes(), &doc.raw_values()));
}

#[test]
fn the_agents_own_answers_pass() {
    // Bodies as the agent's handler tests pin them, and gorilla/mux's and tollbooth's.
    for (status, body) in [
        (
            400,
            &br#"{"code":"InvalidIdInRequest","message":"CredentialsV2Request: Credentials not found","HTTPErrorCode":400}"#[..],
        ),
        (
            503,
            br#"{"code":"CredentialsUninitialized","message":"CredentialsV2Request: Credentials uninitialized for ID","HTTPErrorCode":503}"#,
        ),
        (404, b"404 page not found\n"),
        (429, b"You have reached maximum request limit."),
        (301, b""),
        // Task metadata: nested JSON, ARNs, a 64-hex Docker id, UUIDs.
        (
            200,
            br#"{"Cluster":"default","TaskARN":"arn:aws:ecs:us-east-1:111122223333:task/default/158d1c8083dd49d6b527399fd6414f5c","Containers":[{"DockerId":"43481a6ce4842eec8fe72fc28500c6b52edcc0917f105b83379f88cac1ff3946","Labels":{"com.amazonaws.ecs.task-definition-version":"5"}}]}"#,
        ),
    ] {
        assert!(
            matches!(verdict(status, body), Verdict::Pass),
            "{status} {}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn a_200_that_is_not_strict_json_is_refused() {
    let doc = ECS_DOC.trim_end_matches('}');
    for body in [
        format!(r#"{doc},"Note":"\ud800"}}"#).into_bytes(),
        format!(r#"{doc},"N":NaN}}"#).into_bytes(),
        format!("\u{feff}{ECS_DOC}").into_bytes(),
        format!("{ECS_DOC}{ECS_DOC}").into_bytes(),
        format!("{ECS_DOC} trailing").into_bytes(),
        [ECS_DOC.as_bytes(), b"\xff"].concat(),
        ECS_DOC.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        format!("{}{ECS_DOC}{}", "[".repeat(200), "]".repeat(200)).into_bytes(),
    ] {
        assert!(
            !matches!(verdict(200, &body), Verdict::Pass | Verdict::Document(_)),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[test]
fn a_document_with_more_secrets_than_its_own_four_fields_is_refused() {
    let doc = ECS_DOC.trim_end_matches('}');
    for extra in [
        format!(r#","secretAccessKey":"{SECRET40}""#),
        format!(r#","Extra":"{SECRET40}""#),
        r#","Credentials":"x""#.to_string(),
        r#","Note":"xxRAW\u0053ECRETxx""#.to_string(),
        r#","Note":"ASIAABCDEFGHIJKLMNOP""#.to_string(),
        r#","xxRAWSECRETxx":"key""#.to_string(),
        r#","Token":"RAWTOKENxx""#.to_string(),
    ] {
        let body = format!("{doc}{extra}}}");
        assert!(
            matches!(verdict(200, body.as_bytes()), Verdict::Refuse(_)),
            "{body}"
        );
    }
    // Nested values are not the documented shape.
    let nested = format!(r#"{doc},"More":{{"a":"b"}}}}"#);
    assert!(matches!(
        verdict(200, nested.as_bytes()),
        Verdict::Refuse(_)
    ));
    // A harmless extra field passes through.
    let fine = format!(r#"{doc},"AccountId":"111122223333"}}"#);
    assert!(matches!(
        verdict(200, fine.as_bytes()),
        Verdict::Document(_)
    ));
}

#[test]
fn other_answers_carrying_credentials_are_refused() {
    let known = [Secret::new("xxRAWSECRETxx")];
    for (status, body) in [
        (
            500,
            format!(r#"{{"code":"InternalError","message":"failed for {SECRET40}"}}"#),
        ),
        (503, "key ASIAABCDEFGHIJKLMNOP".to_string()),
        (500, "oops xxRAWSECRETxx".to_string()),
        (400, r#"{"m":"xxRAW\u0053ECRETxx"}"#.to_string()),
        (400, r#"{"m":"a","m":"xxRAW\u0053ECRETxx"}"#.to_string()),
        (200, r#"{"creds":{"secretaccesskey":"S"}}"#.to_string()),
        (203, ECS_DOC.to_string()),
        (500, format!("token {}", "AbCd".repeat(30))),
    ] {
        assert!(
            matches!(
                judge(status, &none(), body.as_bytes(), &known),
                Verdict::Refuse(_)
            ),
            "{status} {body}"
        );
    }
}

#[test]
fn headers_partial_and_encoded_answers_are_refused() {
    let mut h = HeaderMap::new();
    h.insert("x-debug", http::HeaderValue::from_static("xxRAWSECRETxx"));
    assert!(matches!(
        judge(400, &h, b"", &[Secret::new("xxRAWSECRETxx")]),
        Verdict::Refuse(_)
    ));
    let mut h = HeaderMap::new();
    h.insert(
        "x-amz-security-token",
        http::HeaderValue::from_static("ASIAABCDEFGHIJKLMNOP"),
    );
    assert!(matches!(
        judge(200, &h, ECS_DOC.as_bytes(), &[]),
        Verdict::Refuse(_)
    ));
    let mut h = HeaderMap::new();
    h.insert("content-encoding", http::HeaderValue::from_static("gzip"));
    assert!(matches!(
        judge(200, &h, b"\x1f\x8b", &[]),
        Verdict::Refuse(_)
    ));
    let mut h = HeaderMap::new();
    h.insert(
        "content-range",
        http::HeaderValue::from_static("bytes 0-9/200"),
    );
    assert!(matches!(judge(200, &h, b"{}", &[]), Verdict::Refuse(_)));
    assert!(matches!(verdict(206, b"{}"), Verdict::Refuse(_)));
    // The agent's own rate-limit headers pass.
    let mut h = HeaderMap::new();
    h.insert(
        "x-rate-limit-limit",
        http::HeaderValue::from_static("40.00"),
    );
    h.insert(
        "x-rate-limit-request-remote-addr",
        http::HeaderValue::from_static("127.0.0.1:41234"),
    );
    assert!(matches!(
        judge(404, &h, b"404 page not found\n", &[]),
        Verdict::Pass
    ));
}

#[test]
fn credential_shapes_are_told_from_ids_digests_and_arns() {
    assert!(suspicious("AKIAIOSFODNN7EXAMPLE", &[]));
    assert!(suspicious(SECRET40, &[]));
    assert!(suspicious(&"AbCd".repeat(30), &[]));
    for fine in [
        "43481a6ce4842eec8fe72fc28500c6b52edcc0917f105b83379f88cac1ff3946",
        "158d1c80-83dd-49d6-b527-399fd6414f5c",
        "arn:aws:iam::111122223333:role/task-a",
        "CredentialsV2Request: Credentials not found",
        "sha256:43481a6ce4842eec8fe72fc28500c6b52edcc0917f105b83379f88cac1ff3946",
    ] {
        assert!(!suspicious(fine, &[]), "{fine}");
    }
}

#[test]
fn every_string_literal_is_decoded_duplicates_and_all() {
    let strings = json_strings(r#"{"a":"x\u0041y","a":"second","b":["c\"d"]}"#).unwrap();
    assert_eq!(strings, ["a", "xAy", "a", "second", "b", "c\"d"]);
    assert!(json_strings(r#"{"a":"unterminated"#).is_none());
    assert!(json_strings(r#"{"a":"bad \q escape"}"#).is_none());
}

#[test]
fn a_raw_secret_in_a_redirects_query_is_found() {
    let mut h = HeaderMap::new();
    h.insert(
        "location",
        http::HeaderValue::from_static(
            "/v2/credentials/x?s=RAWSECRET0BIiK2KWe1gQWi+VKoV39kVk6MTONnK",
        ),
    );
    assert!(matches!(judge(301, &h, b"", &[]), Verdict::Refuse(_)));
}
