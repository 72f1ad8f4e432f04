//! `sts:AssumeRole` on the instance's own role with the session policy
//! (AWS STS API Reference, "AssumeRole"; IAM User Guide, "Session policies"). The source
//! credentials are the instance role's own,
//! read from IMDS by [`ImdsSourceProvider`], never the locked ones.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};

use crate::clock::Clock;
use crate::credentials::{LockedCredentials, Secret};
use crate::imds::Imds;

/// One AssumeRole call's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRequest {
    pub role_arn: String,
    pub session_name: String,
    pub policy: String,
    pub duration: Duration,
    pub source_identity: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// A locked set and what STS said about its policy.
#[derive(Debug, Clone)]
pub struct Issued {
    pub credentials: LockedCredentials,
    pub packed_policy_percent: Option<i32>,
}

/// The closed set of STS error codes credlock counts and explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsErrorCode {
    AccessDenied,
    MalformedPolicy,
    PackedPolicyTooLarge,
    RegionDisabled,
    Throttling,
    ExpiredToken,
    Validation,
    Timeout,
    Unreachable,
    Other,
}

impl StsErrorCode {
    pub const ALL: [StsErrorCode; 10] = [
        Self::AccessDenied,
        Self::MalformedPolicy,
        Self::PackedPolicyTooLarge,
        Self::RegionDisabled,
        Self::Throttling,
        Self::ExpiredToken,
        Self::Validation,
        Self::Timeout,
        Self::Unreachable,
        Self::Other,
    ];

    pub fn from_aws(code: &str) -> Self {
        match code {
            "AccessDenied" | "AccessDeniedException" => Self::AccessDenied,
            "MalformedPolicyDocument" | "MalformedPolicyDocumentException" => Self::MalformedPolicy,
            "PackedPolicyTooLarge" | "PackedPolicyTooLargeException" => Self::PackedPolicyTooLarge,
            "RegionDisabledException" | "RegionDisabled" => Self::RegionDisabled,
            "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException" => Self::Throttling,
            "ExpiredToken" | "ExpiredTokenException" => Self::ExpiredToken,
            "ValidationError" | "ValidationException" => Self::Validation,
            _ => Self::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::AccessDenied => "access_denied",
            Self::MalformedPolicy => "malformed_policy",
            Self::PackedPolicyTooLarge => "packed_policy_too_large",
            Self::RegionDisabled => "region_disabled",
            Self::Throttling => "throttling",
            Self::ExpiredToken => "expired_token",
            Self::Validation => "validation",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
        }
    }

    /// What an operator should do about it.
    pub fn advice(self) -> &'static str {
        match self {
            Self::AccessDenied => {
                "the role's trust policy must name the role itself (policy-templates/trust-policy.json), with sts:SetSourceIdentity/sts:TagSession when those are configured; check SCPs and permission boundaries"
            }
            Self::MalformedPolicy => {
                "the rendered session policy was rejected: check the template (credlock policy prints it)"
            }
            Self::PackedPolicyTooLarge => {
                "the packed policy plus session tags is too large: merge addresses into CIDRs, narrow discovery, or drop session tags"
            }
            Self::RegionDisabled => {
                "regional STS is deactivated for this account in this region: activate it in IAM account settings"
            }
            Self::Throttling => {
                "STS is throttling this account: credlock backs off; reduce other STS callers"
            }
            Self::ExpiredToken => {
                "the instance role credentials from IMDS had expired: credlock re-reads them"
            }
            Self::Validation => {
                "STS rejected a parameter (session duration must be at most 3600 s for a chained role; session name and tags must match STS patterns)"
            }
            Self::Timeout => {
                "STS did not answer in time: check the route or VPC endpoint to the regional STS endpoint"
            }
            Self::Unreachable => {
                "cannot connect to STS: check DNS, routes, proxies and security groups for the regional STS endpoint (or lock.sts_endpoint)"
            }
            Self::Other => "unexpected STS failure: see the message",
        }
    }
}

/// A failed AssumeRole. The message is AWS's (it carries no secret) or the transport's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("sts:AssumeRole failed ({}): {message}; {}", code.label(), code.advice())]
pub struct StsError {
    pub code: StsErrorCode,
    pub message: String,
}

/// Something that can assume the role. The real one is [`AwsIssuer`]; tests script failures.
pub trait Issuer: Send + Sync + 'static {
    fn assume(
        &self,
        request: &AssumeRequest,
    ) -> impl Future<Output = Result<Issued, StsError>> + Send;
}

/// Reads the instance role's credentials from IMDS for the AWS SDK (it caches them until
/// close to their expiry, so IMDS's rotation is followed).
#[derive(Clone)]
pub struct ImdsSourceProvider {
    imds: Arc<Imds>,
}

impl ImdsSourceProvider {
    pub fn new(imds: Arc<Imds>) -> Self {
        ImdsSourceProvider { imds }
    }

    async fn fetch(&self) -> Result<Credentials, CredentialsError> {
        let role = self
            .imds
            .role_name()
            .await
            .map_err(CredentialsError::provider_error)?;
        let source = self
            .imds
            .source_credentials(&role)
            .await
            .map_err(CredentialsError::provider_error)?;
        Ok(Credentials::new(
            source.access_key_id,
            source.secret_access_key.expose(),
            Some(source.token.expose().to_string()),
            Some(source.expiration),
            "credlock-imds",
        ))
    }
}

impl std::fmt::Debug for ImdsSourceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImdsSourceProvider")
    }
}

impl ProvideCredentials for ImdsSourceProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.fetch())
    }
}

/// AssumeRole through aws-sdk-sts: regional endpoint, `AWS_ENDPOINT_URL_STS` honoured.
pub struct AwsIssuer {
    client: aws_sdk_sts::Client,
    /// When a set was issued (its `LastUpdated`): the injected clock, like every other time.
    clock: Arc<dyn Clock>,
}

impl AwsIssuer {
    pub async fn new(
        region: &str,
        source: ImdsSourceProvider,
        endpoint: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_source(region, source, endpoint, clock).await
    }

    async fn with_source(
        region: &str,
        source: impl ProvideCredentials + 'static,
        endpoint: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        // No SDK retries. The latest behavior version retries in "standard" mode, three
        // attempts with a backoff of its own ("Retry behavior", AWS SDKs and Tools Reference
        // Guide), so a throttled call would silently become three and a throttled fleet would
        // triple its load on the account's STS quota. The lock loop's full-jitter backoff
        // (`refresh.rs`, "Fleet budget") is the only retry: one failed call is one count in
        // `credlock_sts_errors_total`, one step of the backoff.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .credentials_provider(source)
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(url) = endpoint {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        AwsIssuer {
            client: aws_sdk_sts::Client::new(&config),
            clock,
        }
    }
}

impl AwsIssuer {
    /// An issuer on a loaded SDK configuration (its credentials and Region: `credlock
    /// credentials` uses the SDK's default chain), with SDK retries off as for the lock loop.
    pub fn from_sdk_config(
        sdk: &aws_config::SdkConfig,
        endpoint: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut config = aws_sdk_sts::config::Builder::from(sdk)
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(url) = endpoint {
            config = config.endpoint_url(url);
        }
        AwsIssuer {
            client: aws_sdk_sts::Client::from_conf(config.build()),
            clock,
        }
    }

    /// The caller's ARN (`sts:GetCallerIdentity`, which needs no permission).
    pub async fn caller_arn(&self) -> Result<String, StsError> {
        caller_on(&self.client).await
    }

    /// GetCallerIdentity signed with `source` (a pod's own credentials, whose answer names no
    /// role: "GetCallerIdentity", AWS STS API Reference; it needs no permission).
    pub async fn caller_as(&self, source: Credentials) -> Result<String, StsError> {
        caller_on(&self.client_as(source)).await
    }

    /// A client of its own for one call signed with `source`: the same Region, endpoint, retry
    /// and time-out settings.
    fn client_as(&self, source: Credentials) -> aws_sdk_sts::Client {
        let config = self
            .client
            .config()
            .to_builder()
            .credentials_provider(source)
            .build();
        aws_sdk_sts::Client::from_conf(config)
    }

    /// AssumeRole signed with `source` instead of the instance role's credentials (a task's or
    /// a pod's own, for its locked set): the same Region, endpoint, retry and time-out
    /// settings, a client of its own for the one call.
    pub async fn assume_as(
        &self,
        source: Credentials,
        request: &AssumeRequest,
    ) -> Result<Issued, StsError> {
        assume_on(&self.client_as(source), &*self.clock, request).await
    }
}

async fn caller_on(client: &aws_sdk_sts::Client) -> Result<String, StsError> {
    let out = client
        .get_caller_identity()
        .send()
        .await
        .map_err(classify)?;
    out.arn.ok_or_else(|| StsError {
        code: StsErrorCode::Other,
        message: "GetCallerIdentity answered without an Arn".into(),
    })
}

impl Issuer for AwsIssuer {
    async fn assume(&self, request: &AssumeRequest) -> Result<Issued, StsError> {
        assume_on(&self.client, &*self.clock, request).await
    }
}

async fn assume_on(
    client: &aws_sdk_sts::Client,
    clock: &dyn Clock,
    request: &AssumeRequest,
) -> Result<Issued, StsError> {
    let mut call = client
        .assume_role()
        .role_arn(&request.role_arn)
        .role_session_name(&request.session_name)
        .policy(&request.policy)
        .duration_seconds(request.duration.as_secs() as i32);
    if let Some(id) = &request.source_identity {
        call = call.source_identity(id);
    }
    for (k, v) in &request.tags {
        let tag = aws_sdk_sts::types::Tag::builder()
            .key(k)
            .value(v)
            .build()
            .map_err(|e| StsError {
                code: StsErrorCode::Validation,
                message: e.to_string(),
            })?;
        call = call.tags(tag);
    }
    let output = call.send().await.map_err(classify)?;
    let creds = output.credentials.ok_or_else(|| StsError {
        code: StsErrorCode::Other,
        message: "the answer has no Credentials".into(),
    })?;
    let expiration = SystemTime::try_from(creds.expiration).map_err(|_| StsError {
        code: StsErrorCode::Other,
        message: "the answer's Expiration is out of range".into(),
    })?;
    Ok(Issued {
        credentials: LockedCredentials::new(
            creds.access_key_id,
            Secret::new(creds.secret_access_key),
            Secret::new(creds.session_token),
            expiration,
            clock.now(),
        ),
        packed_policy_percent: output.packed_policy_size,
    })
}

fn classify<E, R>(err: SdkError<E, R>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::TimeoutError(_) => StsError {
            code: StsErrorCode::Timeout,
            message: "no answer in time".into(),
        },
        SdkError::DispatchFailure(d) if d.is_timeout() => StsError {
            code: StsErrorCode::Timeout,
            message: "connection timed out".into(),
        },
        // A connection that could not be made or broke (refused, reset, DNS, TLS handshake):
        // the endpoint is unreachable, and the advice says where to look.
        SdkError::DispatchFailure(d) => StsError {
            code: if d.is_io() {
                StsErrorCode::Unreachable
            } else {
                StsErrorCode::Other
            },
            message: format!(
                "cannot reach STS: {:?}",
                d.as_connector_error().map(|e| e.to_string())
            ),
        },
        SdkError::ServiceError(service) => {
            let e = service.err();
            StsError {
                code: e.code().map_or(StsErrorCode::Other, StsErrorCode::from_aws),
                message: format!(
                    "{}: {}",
                    e.code().unwrap_or("Unknown"),
                    e.message().unwrap_or("no message")
                ),
            }
        }
        other => StsError {
            code: StsErrorCode::Other,
            message: format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(other)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_failure_is_unreachable_and_a_timeout_is_a_timeout() {
        use aws_sdk_sts::config::http::HttpResponse as Response;
        use aws_sdk_sts::error::ConnectorError;
        use aws_sdk_sts::operation::assume_role::AssumeRoleError;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err: SdkError<AssumeRoleError, Response> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        assert_eq!(classify(err).code, StsErrorCode::Unreachable);
        let slow = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let err: SdkError<AssumeRoleError, Response> =
            SdkError::dispatch_failure(ConnectorError::timeout(Box::new(slow)));
        assert_eq!(classify(err).code, StsErrorCode::Timeout);
    }

    /// STS's answer to a throttled call: HTTP 400 with the Query protocol's `ErrorResponse`
    /// carrying code `Throttling` ("Common Errors", AWS STS API Reference).
    const THROTTLED: &str = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: 229\r\nConnection: close\r\n\r\n<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>c2b3f0a8-1d2e-4f50-8a6b-7c8d9e0f1a2b</RequestId></ErrorResponse>";

    /// Reads one request (head, then `Content-Length` bytes of body); false if the peer left.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut wanted = None;
        for _ in 0..1000 {
            if let Some(total) = wanted
                && buf.len() >= total
            {
                return true;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if wanted.is_none()
                && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
            {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = (head.lines())
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                wanted = Some(end + 4 + length);
            }
        }
        false
    }

    #[tokio::test]
    async fn a_throttled_call_is_sent_once_the_lock_loop_is_the_only_retry() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        assert_eq!(
            THROTTLED.split("\r\n\r\n").nth(1).unwrap().len(),
            229,
            "Content-Length matches the body"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    if read_request(&mut sock).await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let _ = sock.write_all(THROTTLED.as_bytes()).await;
                        let _ = sock.shutdown().await;
                    }
                });
            }
        });
        let issuer = AwsIssuer::with_source(
            "us-east-1",
            Credentials::new("AKIDEXAMPLE", "example-secret", None, None, "test"),
            Some(&url),
            Arc::new(crate::clock::SystemClock),
        )
        .await;
        let request = AssumeRequest {
            role_arn: "arn:aws:iam::123456789012:role/app-role".into(),
            session_name: "i-0123456789abcdef0".into(),
            policy: r#"{"Version":"2012-10-17","Statement":[]}"#.into(),
            duration: Duration::from_secs(3600),
            source_identity: None,
            tags: Vec::new(),
        };
        // With the SDK's standard retries this takes up to a few seconds and three requests.
        let result = tokio::time::timeout(Duration::from_secs(30), issuer.assume(&request))
            .await
            .expect("an answer within 30 s");
        let err = result.expect_err("throttled");
        assert_eq!(err.code, StsErrorCode::Throttling, "{err}");
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "the SDK retried a throttled call behind the lock loop's back"
        );
        server.abort();
    }

    #[test]
    fn aws_codes_map_to_the_closed_label_set() {
        for (code, label) in [
            ("AccessDenied", "access_denied"),
            ("MalformedPolicyDocument", "malformed_policy"),
            ("PackedPolicyTooLarge", "packed_policy_too_large"),
            ("RegionDisabledException", "region_disabled"),
            ("Throttling", "throttling"),
            ("ExpiredTokenException", "expired_token"),
            ("ValidationError", "validation"),
            ("SomethingNew", "other"),
        ] {
            assert_eq!(StsErrorCode::from_aws(code).label(), label, "{code}");
        }
    }
}
