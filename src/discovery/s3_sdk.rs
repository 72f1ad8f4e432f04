//! The `s3` source's transport in production: the AWS SDK's S3 client behind
//! [`ObjectStore`](crate::discovery::s3::ObjectStore), and the same bounded read for
//! `credlock publish-environment`.
//!
//! One poll is one `GetObject` (Amazon S3 API Reference, "GetObject") with
//! `x-amz-expected-bucket-owner` and, after the first document, `If-None-Match`: S3 answers an
//! unchanged object with `304 Not Modified` and no body, which the SDK reports as an error
//! carrying that status, and which this maps to [`Fetched::NotModified`].
//!
//! The client makes exactly one attempt per poll (the SDK's retries are off): the discovery
//! scheduler already retries a failed source with jittered backoff, and hidden retries under it
//! would multiply a fleet's calls when S3 is slow or refusing. Each poll is bounded in time
//! ([`TIMEOUT`], body included) and in size (at most [`MAX_DOCUMENT`] + 1 bytes are read, so a
//! huge object is refused without being read whole).

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;

use crate::discovery::document::MAX_DOCUMENT;
use crate::discovery::s3::{BoxFuture, Fetched, GetRequest, ObjectStore};

/// The longest one poll may take, connection, answer and body together: a slow S3 is an
/// error (and the last good document stays), not a hung discovery.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Connecting to S3 (or its gateway endpoint) is quick or not happening.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a GET failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetError {
    /// 404 `NoSuchKey`: no object at that key (the publisher then writes the first one).
    NoSuchKey,
    /// Anything else, in one line naming the cause.
    Other(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::NoSuchKey => f.write_str("NoSuchKey: no object at this key"),
            GetError::Other(e) => f.write_str(e),
        }
    }
}

/// An S3 client from `sdk` (Region and credentials already chosen), with an endpoint URL for
/// tests and S3-compatible stores (path-style addressing then, since such an endpoint serves
/// no per-bucket host names), and the SDK's retries on (`retries`, the publisher) or off (the
/// instances' polls).
pub fn client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>, retries: bool) -> Client {
    let mut conf = aws_sdk_s3::config::Builder::from(sdk).timeout_config(
        aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(TIMEOUT)
            .build(),
    );
    if !retries {
        conf = conf.retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
    }
    if let Some(url) = endpoint {
        conf = conf.endpoint_url(url).force_path_style(true);
    }
    Client::from_conf(conf.build())
}

/// One conditional GET, its body read up to [`MAX_DOCUMENT`] + 1 bytes, all within [`TIMEOUT`].
pub async fn get(client: &Client, request: &GetRequest) -> Result<Fetched, GetError> {
    match tokio::time::timeout(TIMEOUT, get_unbounded_in_time(client, request)).await {
        Ok(result) => result,
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> GetError {
    GetError::Other(format!(
        "s3:GetObject: timed out after {} s",
        TIMEOUT.as_secs()
    ))
}

async fn get_unbounded_in_time(client: &Client, request: &GetRequest) -> Result<Fetched, GetError> {
    let answer = client
        .get_object()
        .bucket(&request.bucket)
        .key(&request.key)
        .expected_bucket_owner(&request.expected_bucket_owner)
        .set_if_none_match(request.if_none_match.clone())
        .send()
        .await;
    let mut output = match answer {
        Ok(output) => output,
        Err(e) => {
            if e.raw_response().map(|r| r.status().as_u16()) == Some(304) {
                return Ok(Fetched::NotModified);
            }
            if matches!(e, SdkError::TimeoutError(_)) {
                return Err(timed_out());
            }
            if matches!(e.as_service_error(), Some(GetObjectError::NoSuchKey(_))) {
                return Err(GetError::NoSuchKey);
            }
            return Err(GetError::Other(describe("s3:GetObject", &e)));
        }
    };
    let etag = output.e_tag().map(str::to_string);
    let mut body = Vec::new();
    // Stop once past the limit: the caller refuses a body this long without it ever being
    // held whole.
    while body.len() <= MAX_DOCUMENT {
        match output.body.next().await {
            Some(Ok(chunk)) => {
                let room = MAX_DOCUMENT + 1 - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Some(Err(e)) => {
                return Err(GetError::Other(one_line(format!(
                    "s3:GetObject: reading the body: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(e)
                ))));
            }
            None => break,
        }
    }
    Ok(Fetched::Object { etag, body })
}

/// One line naming the cause: the service's error code and HTTP status for an answer
/// (`AccessDenied (HTTP 403): ...`), or the SDK's account of a timeout or connection failure.
/// Any AWS SDK call's error (S3's, STS's, EC2's) fits: they share these types.
pub fn describe<E>(call: &str, e: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let text = match e {
        SdkError::TimeoutError(_) => "timed out".to_string(),
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            let err = context.err();
            match (err.code(), err.message()) {
                (Some(code), Some(message)) => format!("{code} (HTTP {status}): {message}"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                // No error document (a proxy's answer, or one S3 sends without a body).
                (None, _) => format!("HTTP {status} with no error code"),
            }
        }
        other => aws_smithy_types::error::display::DisplayErrorContext(other).to_string(),
    };
    one_line(format!("{call}: {text}"))
}

/// Error texts from a peer may hold line breaks; a log line and `/status` want one line.
fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r'])
            .filter(|p| !p.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        s
    }
}

/// [`ObjectStore`] over the SDK's S3 client.
pub struct SdkObjectStore {
    pub client: Client,
}

impl ObjectStore for SdkObjectStore {
    fn get<'a>(&'a self, request: &'a GetRequest) -> BoxFuture<'a, Result<Fetched, String>> {
        Box::pin(async move { get(&self.client, request).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_are_one_line() {
        assert_eq!(one_line("a\r\nb\n\nc".into()), "a b c");
        assert_eq!(one_line("plain".into()), "plain");
    }
}
