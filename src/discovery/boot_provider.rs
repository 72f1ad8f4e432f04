//! Boot-provider source: a central service tells each instance its environment, so a fleet does
//! not call the EC2 API from every instance (the design Netflix published). credlock POSTs who
//! it is and receives an environment document:
//!
//! request  `{"account_id": "...", "region": "...", "instance_id": "...", "role_arn": "...",
//!            "identity_document": "<the raw instance identity document>"}`
//!          off an instance (`credlock credentials` on a CI runner or an on-premises host),
//!          what is known instead: `{"account_id", "region", "role_arn", "host": "<hostname>"}`
//!          (no instance id, no identity document: there is none to prove anything with, and
//!          the provider decides what a host without one may be told)
//! response `{"ipv4": ["203.0.113.0/24"], "ipv6": [], "vpcs": ["vpc-..."], "vpc_endpoints": []}`
//! (the same schema as `[discovery.static]`, plus the optional metadata of `document.rs`;
//! unknown fields are rejected).

use serde::Serialize;

use crate::environment::Environment;
use crate::identity::InstanceIdentity;
use crate::imds::{Imds, ImdsError};

use super::document::{self, DocumentError, MAX_DOCUMENT};

/// Why the boot provider gave no environment.
#[derive(Debug, thiserror::Error)]
pub enum BootProviderError {
    #[error("reading the instance identity document: {0}")]
    Identity(#[from] ImdsError),
    /// The request did not complete (connection, TLS, timeout): reqwest's own words.
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("environment document of {0} bytes is too large")]
    TooLarge(usize),
    #[error("environment document: {0}")]
    Document(#[from] DocumentError),
}

#[derive(Serialize)]
struct WhoAmI<'a> {
    account_id: &'a str,
    region: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_id: Option<&'a str>,
    role_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_document: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
}

/// Where the request comes from.
pub enum Asker<'a> {
    /// An instance: its identity document goes with the request.
    Instance(&'a Imds),
    /// A host that is no instance (`credlock credentials` off EC2), by its name.
    Host(&'a str),
}

pub async fn discover(
    http: &reqwest::Client,
    url: &str,
    identity: &InstanceIdentity,
    asker: Asker<'_>,
    allow_wide: bool,
) -> Result<Environment, BootProviderError> {
    let (instance_id, identity_document, host) = match asker {
        Asker::Instance(imds) => {
            let document = imds
                .text("/latest/dynamic/instance-identity/document")
                .await?;
            (Some(identity.instance_id.as_str()), Some(document), None)
        }
        Asker::Host(host) => (None, None, Some(host)),
    };
    let who = WhoAmI {
        account_id: &identity.role.account,
        region: &identity.region,
        instance_id,
        role_arn: identity.role.to_string(),
        identity_document,
        host,
    };
    let response = http
        .post(url)
        .json(&who)
        .send()
        .await
        .map_err(|e| BootProviderError::Transport(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(BootProviderError::Status(status));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| BootProviderError::Transport(e.to_string()))?;
    if body.len() > MAX_DOCUMENT {
        return Err(BootProviderError::TooLarge(body.len()));
    }
    Ok(parse_document(&body, allow_wide)?)
}

/// An environment document (the boot provider's answer; also what `credlock audit
/// --environment` reads), validated as `document::parse` does; its checksum, when it carries
/// one, must match.
pub fn parse_document(bytes: &[u8], allow_wide: bool) -> Result<Environment, DocumentError> {
    document::parse(bytes, allow_wide, document::Checksum::IfPresent).map(|(env, _)| env)
}
