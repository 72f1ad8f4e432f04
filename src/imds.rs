//! credlock's own IMDS client: IMDSv2 only (its own session token, refreshed before expiry),
//! used to learn the instance's identity, its role's source credentials and its network. The
//! caller-facing proxy never uses this token.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::credentials::{KnownRaw, Secret};
use crate::identity::{IdentityDocument, InstanceIdentity, RoleArn, is_role_name};
use crate::upstream::{UpstreamClient, UpstreamError};

const TOKEN_TTL_SECONDS: u64 = 21_600;
/// Fetch a new token this long before the old one expires.
const TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("IMDS refused credlock a session token (HTTP {0}); credlock uses IMDSv2 only")]
    Token(u16),
    #[error("IMDS has no {0} (404)")]
    NotFound(String),
    #[error("IMDS answered {1} for {0}")]
    Status(String, u16),
    #[error("IMDS answered {0} with something credlock cannot use: {1}")]
    Malformed(String, String),
    #[error("no IAM role is attached to this instance (iam/security-credentials/ is empty or 404)")]
    NoRole,
    #[error("lock.role_arn names role {configured} but the instance role is {actual}")]
    RoleMismatch { configured: String, actual: String },
}

/// The instance role's own credentials, read from IMDS: the source for `sts:AssumeRole`.
#[derive(Clone)]
pub struct SourceCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub token: Secret,
    pub expiration: SystemTime,
}

impl std::fmt::Debug for SourceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("token", &self.token)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument {
    code: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    token: Option<String>,
    expiration: Option<String>,
}

/// credlock's own IMDS client. It gets an [`UpstreamClient`] (a connection pool) of its own,
/// never the proxy's: no client's exchange can ever share a connection with credlock's
/// discovery, token or source-credential requests.
pub struct Imds {
    upstream: UpstreamClient,
    token: Mutex<Option<(HeaderValue, Instant)>>,
    known_raw: Option<Arc<KnownRaw>>,
}

impl Imds {
    pub fn new(upstream: UpstreamClient) -> Self {
        Imds {
            upstream,
            token: Mutex::new(None),
            known_raw: None,
        }
    }

    /// Every source credential set read is remembered in `known`, so the proxy can make sure
    /// none of its values ever reaches a client.
    pub fn remembering(mut self, known: Arc<KnownRaw>) -> Self {
        self.known_raw = Some(known);
        self
    }

    /// A valid session token; one fetch at a time (the mutex is the single flight).
    async fn token(&self, renew: bool) -> Result<HeaderValue, ImdsError> {
        let mut slot = self.token.lock().await;
        if !renew
            && let Some((token, expires)) = slot.as_ref()
            && Instant::now() + TOKEN_REFRESH_BEFORE < *expires
        {
            return Ok(token.clone());
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            crate::route::TOKEN_TTL_HEADER,
            HeaderValue::from(TOKEN_TTL_SECONDS),
        );
        let response = self
            .upstream
            .send(Method::PUT, crate::route::TOKEN_PATH, headers)
            .await?;
        if response.status != StatusCode::OK {
            return Err(ImdsError::Token(response.status.as_u16()));
        }
        let mut token = HeaderValue::from_maybe_shared(response.body)
            .map_err(|_| ImdsError::Malformed("the token".into(), "not a header value".into()))?;
        token.set_sensitive(true);
        *slot = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL_SECONDS),
        ));
        Ok(token)
    }

    /// GETs `path` with credlock's token: the body of a 200. A 401 renews the token once.
    pub async fn get(&self, path: &str) -> Result<Bytes, ImdsError> {
        for renew in [false, true] {
            let mut headers = HeaderMap::new();
            headers.insert(crate::route::TOKEN_HEADER, self.token(renew).await?);
            let response = self.upstream.send(Method::GET, path, headers).await?;
            match response.status {
                StatusCode::OK => return Ok(response.body),
                StatusCode::UNAUTHORIZED if !renew => continue,
                StatusCode::NOT_FOUND => return Err(ImdsError::NotFound(path.to_string())),
                s => return Err(ImdsError::Status(path.to_string(), s.as_u16())),
            }
        }
        Err(ImdsError::Status(path.to_string(), 401))
    }

    pub async fn text(&self, path: &str) -> Result<String, ImdsError> {
        let body = self.get(path).await?;
        String::from_utf8(body.to_vec())
            .map_err(|_| ImdsError::Malformed(path.to_string(), "not UTF-8".into()))
    }

    /// Like [`Imds::text`], with 404 as `None` (fields an interface may not have).
    pub async fn optional_text(&self, path: &str) -> Result<Option<String>, ImdsError> {
        match self.text(path).await {
            Ok(t) => Ok(Some(t)),
            Err(ImdsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The instance role's name: the first line of the listing.
    pub async fn role_name(&self) -> Result<String, ImdsError> {
        let listing = match self
            .text("/latest/meta-data/iam/security-credentials/")
            .await
        {
            Err(ImdsError::NotFound(_)) => return Err(ImdsError::NoRole),
            other => other?,
        };
        let name = listing
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .trim_end_matches('/');
        if name.is_empty() {
            return Err(ImdsError::NoRole);
        }
        if !is_role_name(name) {
            return Err(ImdsError::Malformed(
                "iam/security-credentials/".into(),
                "not a role name".into(),
            ));
        }
        Ok(name.to_string())
    }

    /// Account, region, instance id (identity document), partition and role.
    pub async fn identity(
        &self,
        configured: Option<&RoleArn>,
    ) -> Result<InstanceIdentity, ImdsError> {
        const DOC: &str = "/latest/dynamic/instance-identity/document";
        let doc: IdentityDocument = serde_json::from_slice(&self.get(DOC).await?)
            .map_err(|e| ImdsError::Malformed(DOC.into(), e.to_string()))?;
        let partition = self
            .optional_text("/latest/meta-data/services/partition")
            .await?
            .unwrap_or_else(|| "aws".to_string());
        let name = self.role_name().await?;
        let role = match configured {
            Some(arn) if arn.name != name => {
                return Err(ImdsError::RoleMismatch {
                    configured: arn.to_string(),
                    actual: name,
                });
            }
            Some(arn) => arn.clone(),
            None => RoleArn::derived(partition.trim(), &doc.account_id, &name),
        };
        Ok(InstanceIdentity {
            instance_id: doc.instance_id,
            region: doc.region,
            role,
            assumed_with: None,
        })
    }

    /// The role's raw credentials from IMDS: only ever used to call STS and EC2.
    pub async fn source_credentials(&self, role: &str) -> Result<SourceCredentials, ImdsError> {
        let path = format!("/latest/meta-data/iam/security-credentials/{role}");
        let doc: CredentialDocument = serde_json::from_slice(&self.get(&path).await?)
            .map_err(|_| ImdsError::Malformed(path.clone(), "not a credential document".into()))?;
        if !doc
            .code
            .as_deref()
            .unwrap_or("Success")
            .eq_ignore_ascii_case("success")
        {
            // The code (e.g. AssumeRoleUnauthorizedAccess) is not secret; the message may
            // be long, so only the code is kept.
            return Err(ImdsError::Malformed(
                path,
                format!("Code {}", doc.code.unwrap_or_default()),
            ));
        }
        let (Some(key), Some(secret), Some(token), Some(exp)) = (
            doc.access_key_id,
            doc.secret_access_key,
            doc.token,
            doc.expiration,
        ) else {
            return Err(ImdsError::Malformed(
                path,
                "a credential field is missing".into(),
            ));
        };
        let (secret, token) = (Secret::new(secret), Secret::new(token));
        if let Some(known) = &self.known_raw {
            known.remember(&key, &secret, &token);
        }
        let expiration = humantime::parse_rfc3339_weak(&exp)
            .map_err(|_| ImdsError::Malformed(path, "Expiration is not a timestamp".into()))?;
        Ok(SourceCredentials {
            access_key_id: key,
            secret_access_key: secret,
            token,
            expiration,
        })
    }
}

#[cfg(test)]
#[path = "imds_tests.rs"]
mod tests;
