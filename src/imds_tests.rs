//! credlock's own IMDS client against a fake IMDS on loopback that follows the Amazon EC2 User
//! Guide, "Use the Instance Metadata Service to access instance metadata" (IMDSv2): `PUT
//! /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1 to 21600; otherwise 400)
//! returns a session token; every GET must carry it in `X-aws-ec2-metadata-token`, and a
//! missing, wrong or expired one gets 401; an absent item is 404. The answers are the Guide's
//! own examples ("Instance identity documents", "Retrieve security credentials from instance
//! metadata").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::Upstream;
use crate::upstream::MAX_RESPONSE_BYTES;

/// One request as the fake IMDS saw it, and what it answered.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    token: Option<String>,
    status: u16,
}

/// What the fake answers on a path once the token has been checked.
#[derive(Clone)]
enum Page {
    Status(u16, Vec<u8>),
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct State {
    /// Tokens issued and not expired.
    valid: Vec<String>,
    issued: u32,
    /// Every token is refused (a GET with any token gets 401).
    reject_all: bool,
    /// The token PUT answers this status (403: "the IMDS is turned off").
    token_status: Option<u16>,
    /// The token PUT answers this body instead of a fresh token (which is then not valid).
    token_body: Option<Vec<u8>>,
    pages: HashMap<String, Page>,
    seen: Vec<Seen>,
}

struct FakeImds {
    addr: SocketAddr,
    state: Arc<StdMutex<State>>,
}

const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
const DOCUMENT: &str = "/latest/dynamic/instance-identity/document";
const PARTITION: &str = "/latest/meta-data/services/partition";

/// The Guide's example identity document ("Instance identity documents"), with a 12-digit
/// account id.
const IDENTITY_DOCUMENT: &str = r#"{
    "accountId" : "123456789012",
    "architecture" : "x86_64",
    "availabilityZone" : "us-west-2b",
    "billingProducts" : null,
    "devpayProductCodes" : null,
    "marketplaceProductCodes" : [ "1abc2defghijklm3nopqrs4tu" ],
    "imageId" : "ami-5fb8c835",
    "instanceId" : "i-1234567890abcdef0",
    "instanceType" : "t2.micro",
    "kernelId" : null,
    "pendingTime" : "2016-11-19T16:32:11Z",
    "privateIp" : "10.158.112.84",
    "ramdiskId" : null,
    "region" : "us-west-2",
    "version" : "2017-09-30"
}"#;

impl FakeImds {
    async fn start() -> FakeImds {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(StdMutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        FakeImds { addr, state }
    }

    fn page(&self, path: &str, status: u16, body: impl Into<Vec<u8>>) -> &Self {
        let page = Page::Status(status, body.into());
        self.with(|s| s.pages.insert(path.into(), page));
        self
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Every issued token expires (or IMDS was restarted and forgot them).
    fn expire_tokens(&self) {
        self.with(|s| s.valid.clear());
    }

    fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    fn client(&self, timeout: Duration) -> Imds {
        let authority = self.addr.to_string().parse().unwrap();
        Imds::new(UpstreamClient::new(&Upstream { authority }, timeout))
    }

    fn imds(&self) -> Imds {
        self.client(Duration::from_secs(5))
    }
}

/// Answers each request head on the connection (keep-alive) as the Guide describes IMDSv2.
async fn serve(mut stream: TcpStream, state: Arc<StdMutex<State>>) {
    let mut buf = Vec::new();
    loop {
        let (method, path, token, ttl, len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    header("x-aws-ec2-metadata-token"),
                    header("x-aws-ec2-metadata-token-ttl-seconds"),
                    len,
                );
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..len);
        let answer = {
            let mut s = state.lock().unwrap();
            let answer = answer(&mut s, &method, &path, token.as_deref(), ttl.as_deref());
            let status = match &answer {
                Page::Status(status, _) => *status,
                Page::Hang => 0,
            };
            s.seen.push(Seen {
                method,
                path,
                token,
                status,
            });
            answer
        };
        let Page::Status(status, body) = answer else {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
        {
            return;
        }
    }
}

fn answer(s: &mut State, method: &str, path: &str, token: Option<&str>, ttl: Option<&str>) -> Page {
    if method == "PUT" && path == "/latest/api/token" {
        // "400 - Missing or Invalid Parameters": the TTL must be 1 to 21600 seconds.
        if !ttl
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|t| (1..=21_600).contains(&t))
        {
            return Page::Status(400, b"400 - Missing or Invalid Parameters".to_vec());
        }
        if let Some(status) = s.token_status {
            return Page::Status(status, Vec::new());
        }
        if let Some(body) = &s.token_body {
            return Page::Status(200, body.clone());
        }
        s.issued += 1;
        let token = format!("AQAEAFAKETOKEN{}==", s.issued);
        s.valid.push(token.clone());
        return Page::Status(200, token.into_bytes());
    }
    if method != "GET" {
        return Page::Status(405, Vec::new());
    }
    // IMDSv2 required: no token, a wrong one or an expired one is 401.
    if s.reject_all || !token.is_some_and(|t| s.valid.iter().any(|v| v == t)) {
        return Page::Status(401, Vec::new());
    }
    s.pages
        .get(path)
        .cloned()
        .unwrap_or_else(|| Page::Status(404, b"404 - Not Found".to_vec()))
}

fn methods_and_statuses(seen: &[Seen]) -> Vec<(String, u16)> {
    seen.iter().map(|s| (s.method.clone(), s.status)).collect()
}

fn pairs(list: &[(&str, u16)]) -> Vec<(String, u16)> {
    list.iter().map(|(m, s)| (m.to_string(), *s)).collect()
}

#[tokio::test]
async fn a_token_is_put_before_the_first_get_and_reused_by_later_gets() {
    let imds = FakeImds::start().await;
    imds.page("/latest/meta-data/instance-id", 200, "i-1234567890abcdef0");
    let client = imds.imds();
    for _ in 0..3 {
        assert_eq!(
            client.text("/latest/meta-data/instance-id").await.unwrap(),
            "i-1234567890abcdef0"
        );
    }
    let seen = imds.seen();
    // The fake answers 400 to a PUT without a TTL of 1-21600 s: this PUT had one.
    assert_eq!(
        methods_and_statuses(&seen),
        pairs(&[("PUT", 200), ("GET", 200), ("GET", 200), ("GET", 200)])
    );
    assert_eq!(seen[0].path, "/latest/api/token");
    let token = seen[1].token.clone().expect("the GET carries the token");
    assert_eq!(token, "AQAEAFAKETOKEN1==");
    assert!(seen[1..].iter().all(|s| s.token.as_ref() == Some(&token)));
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_the_get_retried_with_the_new_one() {
    let imds = FakeImds::start().await;
    imds.page("/latest/meta-data/instance-id", 200, "i-1234567890abcdef0");
    let client = imds.imds();
    client.text("/latest/meta-data/instance-id").await.unwrap();
    imds.expire_tokens();
    assert_eq!(
        client.text("/latest/meta-data/instance-id").await.unwrap(),
        "i-1234567890abcdef0"
    );
    let seen = imds.seen();
    assert_eq!(
        methods_and_statuses(&seen),
        pairs(&[
            ("PUT", 200),
            ("GET", 200),
            ("GET", 401),
            ("PUT", 200),
            ("GET", 200)
        ])
    );
    assert_eq!(seen[2].token.as_deref(), Some("AQAEAFAKETOKEN1=="));
    assert_eq!(seen[4].token.as_deref(), Some("AQAEAFAKETOKEN2=="));
    // And the new token is kept for the next request.
    client.text("/latest/meta-data/instance-id").await.unwrap();
    let last = imds.seen().pop().unwrap();
    assert_eq!(
        (last.method.as_str(), last.token.as_deref()),
        ("GET", Some("AQAEAFAKETOKEN2=="))
    );
}

#[tokio::test]
async fn a_401_even_with_a_fresh_token_is_an_error_after_one_renewal_not_a_loop() {
    let imds = FakeImds::start().await;
    imds.page("/latest/meta-data/instance-id", 200, "i-1234567890abcdef0");
    imds.with(|s| s.reject_all = true);
    let err = imds
        .imds()
        .get("/latest/meta-data/instance-id")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImdsError::Status(p, 401) if p == "/latest/meta-data/instance-id"),
        "{err:?}"
    );
    assert_eq!(
        methods_and_statuses(&imds.seen()),
        pairs(&[("PUT", 200), ("GET", 401), ("PUT", 200), ("GET", 401)])
    );
}

#[tokio::test]
async fn a_refused_token_put_is_a_token_error_and_no_get_is_sent() {
    let imds = FakeImds::start().await;
    imds.page("/latest/meta-data/instance-id", 200, "i-1234567890abcdef0");
    // "403 - Forbidden: the request is not allowed or the IMDS is turned off."
    imds.with(|s| s.token_status = Some(403));
    let err = imds
        .imds()
        .text("/latest/meta-data/instance-id")
        .await
        .unwrap_err();
    assert!(matches!(err, ImdsError::Token(403)), "{err:?}");
    assert!(err.to_string().contains("IMDSv2"), "{err}");
    assert_eq!(methods_and_statuses(&imds.seen()), pairs(&[("PUT", 403)]));
}

#[tokio::test]
async fn optional_text_is_none_on_404_the_text_on_200_and_an_error_otherwise() {
    let imds = FakeImds::start().await;
    imds.page(PARTITION, 200, "aws-us-gov")
        .page("/latest/meta-data/broken", 500, "");
    let client = imds.imds();
    assert_eq!(
        client.optional_text(PARTITION).await.unwrap().as_deref(),
        Some("aws-us-gov")
    );
    assert_eq!(
        client
            .optional_text("/latest/meta-data/network/interfaces/macs/x/ipv6s")
            .await
            .unwrap(),
        None
    );
    let err = client
        .optional_text("/latest/meta-data/broken")
        .await
        .unwrap_err();
    assert!(matches!(err, ImdsError::Status(_, 500)), "{err:?}");
    let err = client.text("/latest/meta-data/absent").await.unwrap_err();
    assert!(matches!(err, ImdsError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn the_role_name_is_the_one_line_of_the_security_credentials_listing() {
    for (listing, role) in [
        ("my-role", "my-role"),
        ("my-role\n", "my-role"),
        ("my-role/", "my-role"),
        ("my-role/\n", "my-role"),
        // IAM role names: [\w+=,.@-]{1,64}.
        ("Web+App=1,x.y@z-w_v", "Web+App=1,x.y@z-w_v"),
    ] {
        let imds = FakeImds::start().await;
        imds.page(ROLES, 200, listing);
        assert_eq!(imds.imds().role_name().await.unwrap(), role, "{listing:?}");
    }
}

#[tokio::test]
async fn an_instance_without_a_role_is_told_so_clearly() {
    // Without an instance profile the listing is absent (404), or answered empty.
    for listing in [None, Some(""), Some("\n")] {
        let imds = FakeImds::start().await;
        if let Some(listing) = listing {
            imds.page(ROLES, 200, listing);
        }
        let err = imds.imds().role_name().await.unwrap_err();
        assert!(matches!(err, ImdsError::NoRole), "{listing:?}: {err:?}");
        assert!(err.to_string().contains("no IAM role is attached"), "{err}");
    }
}

#[tokio::test]
async fn a_listing_that_is_not_an_iam_role_name_is_malformed() {
    let too_long = "r".repeat(65);
    for listing in ["two words", "<html>", too_long.as_str(), "role:x"] {
        let imds = FakeImds::start().await;
        imds.page(ROLES, 200, listing);
        let err = imds.imds().role_name().await.unwrap_err();
        assert!(
            matches!(err, ImdsError::Malformed(..)),
            "{listing}: {err:?}"
        );
    }
}

#[tokio::test]
async fn identity_comes_from_the_identity_document_and_the_instance_role() {
    let imds = FakeImds::start().await;
    imds.page(DOCUMENT, 200, IDENTITY_DOCUMENT)
        .page(ROLES, 200, "my-role\n");
    // No services/partition: the commercial partition.
    let identity = imds.imds().identity(None).await.unwrap();
    assert_eq!(
        identity,
        InstanceIdentity {
            instance_id: "i-1234567890abcdef0".into(),
            region: "us-west-2".into(),
            role: RoleArn::parse("arn:aws:iam::123456789012:role/my-role").unwrap(),
            assumed_with: None,
        }
    );
}

#[tokio::test]
async fn the_role_arn_is_in_the_partition_imds_reports() {
    let imds = FakeImds::start().await;
    let document = IDENTITY_DOCUMENT.replace("us-west-2", "cn-north-1");
    imds.page(DOCUMENT, 200, document)
        .page(PARTITION, 200, "aws-cn")
        .page(ROLES, 200, "my-role");
    let identity = imds.imds().identity(None).await.unwrap();
    assert_eq!(identity.region, "cn-north-1");
    assert_eq!(
        identity.role.to_string(),
        "arn:aws-cn:iam::123456789012:role/my-role"
    );
}

#[tokio::test]
async fn a_configured_role_arn_is_kept_only_when_it_names_the_instance_role() {
    let imds = FakeImds::start().await;
    imds.page(DOCUMENT, 200, IDENTITY_DOCUMENT)
        .page(ROLES, 200, "my-role");
    let client = imds.imds();
    // The listing has no path; the configured ARN's path is kept.
    let with_path = RoleArn::parse("arn:aws:iam::123456789012:role/team/my-role").unwrap();
    assert_eq!(
        client.identity(Some(&with_path)).await.unwrap().role,
        with_path
    );
    let other = RoleArn::parse("arn:aws:iam::123456789012:role/other-role").unwrap();
    let err = client.identity(Some(&other)).await.unwrap_err();
    assert!(matches!(err, ImdsError::RoleMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("arn:aws:iam::123456789012:role/other-role") && text.contains("my-role"),
        "{text}"
    );
}

#[tokio::test]
async fn an_identity_document_without_its_documented_fields_is_malformed() {
    let no_region = IDENTITY_DOCUMENT.replace("\"region\"", "\"regio\"");
    for document in ["not json", "[]", no_region.as_str()] {
        let imds = FakeImds::start().await;
        imds.page(DOCUMENT, 200, document).page(ROLES, 200, "r");
        let err = imds.imds().identity(None).await.unwrap_err();
        assert!(
            matches!(&err, ImdsError::Malformed(what, _) if what == DOCUMENT),
            "{document}: {err:?}"
        );
    }
}

#[tokio::test]
async fn deviant_answers_are_errors_not_panics() {
    let imds = FakeImds::start().await;
    imds.page("/latest/meta-data/latin1", 200, b"caf\xe9".to_vec())
        .page(
            "/latest/meta-data/huge",
            200,
            vec![b'a'; MAX_RESPONSE_BYTES + 1],
        )
        .page("/latest/meta-data/failing", 500, "Internal Server Error")
        .page("/latest/meta-data/throttled", 429, "");
    imds.with(|s| {
        s.pages.insert("/latest/meta-data/hang".into(), Page::Hang);
    });
    let client = imds.client(Duration::from_millis(300));
    let err = client.text("/latest/meta-data/latin1").await.unwrap_err();
    assert!(matches!(err, ImdsError::Malformed(..)), "{err:?}");
    let err = client.get("/latest/meta-data/huge").await.unwrap_err();
    assert!(
        matches!(err, ImdsError::Upstream(UpstreamError::Protocol)),
        "{err:?}"
    );
    let err = client.get("/latest/meta-data/failing").await.unwrap_err();
    assert!(matches!(err, ImdsError::Status(_, 500)), "{err:?}");
    let err = client.get("/latest/meta-data/throttled").await.unwrap_err();
    assert!(matches!(err, ImdsError::Status(_, 429)), "{err:?}");
    let err = client.get("/latest/meta-data/hang").await.unwrap_err();
    assert!(
        matches!(err, ImdsError::Upstream(UpstreamError::Timeout(_))),
        "{err:?}"
    );

    // Nothing listens: a connect error.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = closed.local_addr().unwrap().to_string().parse().unwrap();
    drop(closed);
    let nobody = Imds::new(UpstreamClient::new(
        &Upstream { authority },
        Duration::from_secs(2),
    ));
    let err = nobody.get("/latest/meta-data/x").await.unwrap_err();
    assert!(
        matches!(err, ImdsError::Upstream(UpstreamError::Connect)),
        "{err:?}"
    );
}

#[path = "imds_credentials_tests.rs"]
mod credentials;
