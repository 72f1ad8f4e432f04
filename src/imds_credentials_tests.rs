//! The instance role's own credentials read from IMDS: the documented document, remembered
//! raw values, and errors that never show a value (the fake IMDS is in `imds_tests.rs`).

use super::*;

/// The Guide's example credential document ("Retrieve security credentials from instance
/// metadata").
fn credential_document(key: &str, secret: &str, token: &str, expiration: &str) -> String {
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2012-04-26T16:39:16Z\",\n  \
         \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"{key}\",\n  \"SecretAccessKey\" : \
         \"{secret}\",\n  \"Token\" : \"{token}\",\n  \"Expiration\" : \"{expiration}\"\n}}"
    )
}

#[tokio::test]
async fn source_credentials_are_read_from_the_documented_document_and_remembered() {
    let imds = FakeImds::start().await;
    imds.page(
        &format!("{ROLES}my-role"),
        200,
        credential_document(
            "ASIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "MARKTOKEN-example",
            "2017-05-17T15:09:54Z",
        ),
    );
    let known = Arc::new(KnownRaw::default());
    let client = imds.imds().remembering(known.clone());
    let creds = client.source_credentials("my-role").await.unwrap();
    assert_eq!(creds.access_key_id, "ASIAIOSFODNN7EXAMPLE");
    assert_eq!(
        creds.secret_access_key.expose(),
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    );
    assert_eq!(creds.token.expose(), "MARKTOKEN-example");
    // 2017-05-17T15:09:54Z
    assert_eq!(
        creds.expiration,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_495_033_794)
    );
    let remembered: Vec<String> = known.load().iter().map(|s| s.expose().into()).collect();
    for value in [
        "ASIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "MARKTOKEN-example",
    ] {
        assert!(remembered.iter().any(|r| r == value), "{value} remembered");
    }
    let debug = format!("{creds:?}");
    assert!(
        !debug.contains("EXAMPLEKEY") && !debug.contains("MARKTOKEN"),
        "{debug}"
    );
}

/// Credential-shaped answers credlock cannot use: each error names the path and the problem,
/// never a value of the answer.
#[tokio::test]
async fn credential_errors_never_show_a_credential_value() {
    const KEY: &str = "ASIAMARKKEY0000000001";
    const SECRET: &str = "MARKSECRET/abcdefghijklmnopqrstuvwxyz";
    const TOKEN: &str = "MARKTOKEN/IQoJb3JpZ2luX2VjEXAMPLE";
    let good = credential_document(KEY, SECRET, TOKEN, "2027-01-15T09:00:00Z");
    let bodies = [
        // Expiration not a timestamp.
        credential_document(KEY, SECRET, TOKEN, "soon"),
        // Token missing.
        good.replace("\"Token\"", "\"Tokens\""),
        // Not the success code.
        good.replace("\"Success\"", "\"AssumeRoleUnauthorizedAccess\""),
        // A field of the wrong type.
        good.replace(&format!("\"{TOKEN}\""), "42"),
        // Not JSON at all, cut in the middle of the secret.
        good[..good.find("abcdef").unwrap()].to_string(),
        format!("{SECRET} {TOKEN}"),
    ];
    for body in bodies {
        let imds = FakeImds::start().await;
        imds.page(&format!("{ROLES}my-role"), 200, body.clone());
        let err = imds.imds().source_credentials("my-role").await.unwrap_err();
        assert!(matches!(err, ImdsError::Malformed(..)), "{body}: {err:?}");
        for shown in [err.to_string(), format!("{err:?}")] {
            for mark in [KEY, SECRET, TOKEN, "MARK"] {
                assert!(!shown.contains(mark), "{body}: {shown}");
            }
        }
    }

    // An error status whose body carries the values.
    let imds = FakeImds::start().await;
    imds.page(&format!("{ROLES}my-role"), 500, good.clone());
    let err = imds.imds().source_credentials("my-role").await.unwrap_err();
    assert!(matches!(err, ImdsError::Status(_, 500)), "{err:?}");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("MARK"), "{shown}");
    }

    // A session token that is not a header value is not sent, and not shown.
    let imds = FakeImds::start().await;
    imds.page(&format!("{ROLES}my-role"), 200, good);
    imds.with(|s| s.token_body = Some(b"MARKSESSION\n\x01token".to_vec()));
    let err = imds.imds().source_credentials("my-role").await.unwrap_err();
    assert!(matches!(err, ImdsError::Malformed(..)), "{err:?}");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("MARKSESSION"), "{shown}");
    }
    assert_eq!(methods_and_statuses(&imds.seen()), pairs(&[("PUT", 200)]));
}
