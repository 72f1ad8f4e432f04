//! S3 source: the environment document `credlock publish-environment` wrote once for the
//! account and Region (`document.rs`), read by every instance. A fleet then costs S3 reads,
//! which S3 serves by the thousand per second per prefix, instead of EC2 Describe calls, which
//! an account gets 20 a second of ("Request throttling for the Amazon EC2 API", EC2 API
//! Reference).
//!
//! Every poll is a conditional GET: `If-None-Match` with the ETag of the last document read, so
//! an unchanged document costs a `304 Not Modified` and no body (Amazon S3 API Reference,
//! "GetObject": `If-None-Match`). Every GET carries `x-amz-expected-bucket-owner`, so a bucket of
//! the same name in another account is refused by S3 itself (Amazon S3 User Guide, "Verifying
//! bucket ownership with bucket owner condition").
//!
//! A document that fails validation, a missing object, a refusal or a timeout is an error: the
//! scheduler then keeps the source's last good environment (`mod.rs`), the failure shows in
//! `/status` and `credlock_discovery_runs_total{source="s3",result="failure"}`, and the lock is
//! neither widened nor emptied. A document with no entries at all is refused too: an empty lock
//! would fail every request, and publishing one is more likely a broken publisher than intent.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::config::S3Config;
use crate::environment::Environment;
use crate::identity::InstanceIdentity;
use crate::imds::Imds;

use super::document::{self, Checksum, MAX_DOCUMENT};

/// One conditional GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    pub bucket: String,
    pub key: String,
    pub expected_bucket_owner: String,
    /// The ETag of the document last read, if any.
    pub if_none_match: Option<String>,
}

/// What S3 answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// 304: the object still has the ETag sent.
    NotModified,
    /// 200: the object, at most [`MAX_DOCUMENT`] + 1 bytes of it (a longer body is cut there
    /// and refused as too long, never read whole).
    Object { etag: Option<String>, body: Vec<u8> },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The source's transport: the AWS SDK in production (`app.rs`), a counting stand-in with S3's
/// request-rate quota in the fleet simulation (benches/fleet_sim.rs).
pub trait ObjectStore: Send + Sync + 'static {
    /// An error is one line naming the cause (`NoSuchKey`, `AccessDenied`, a timeout, ...).
    fn get<'a>(&'a self, request: &'a GetRequest) -> BoxFuture<'a, Result<Fetched, String>>;
}

struct Last {
    etag: String,
    environment: Environment,
}

/// Which document the source serves from, for `/status`: an operator checks that every
/// instance holds the checksum the publisher last wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DocumentInfo {
    pub key: String,
    pub etag: Option<String>,
    #[serde(flatten)]
    pub metadata: document::Metadata,
}

pub struct S3Source {
    pub store: Arc<dyn ObjectStore>,
    pub config: S3Config,
    pub allow_wide: bool,
    /// The last good document, kept to answer a 304 and to send its ETag.
    last: Mutex<Option<Last>>,
    /// The key with its placeholders filled, once known.
    key: Mutex<Option<String>>,
    /// The last good document's metadata.
    info: Mutex<Option<DocumentInfo>>,
}

impl S3Source {
    pub fn new(store: Arc<dyn ObjectStore>, config: S3Config, allow_wide: bool) -> Self {
        S3Source {
            store,
            config,
            allow_wide,
            last: Mutex::new(None),
            key: Mutex::new(None),
            info: Mutex::new(None),
        }
    }

    /// The last good document's key, ETag and metadata (`None` before the first).
    pub fn info(&self) -> Option<DocumentInfo> {
        lock(&self.info).clone()
    }

    pub async fn discover(
        &self,
        identity: &InstanceIdentity,
        imds: &Imds,
    ) -> Result<Environment, S3Error> {
        let key = self.key(identity, imds).await?;
        let if_none_match = lock(&self.last).as_ref().map(|l| l.etag.clone());
        let request = GetRequest {
            bucket: self.config.bucket.clone(),
            key,
            expected_bucket_owner: self.config.expected_bucket_owner.clone(),
            if_none_match,
        };
        let at = |problem| S3Error::Object {
            url: format!("s3://{}/{}", request.bucket, request.key),
            problem,
        };
        match self
            .store
            .get(&request)
            .await
            .map_err(|e| at(ObjectProblem::Get(e)))?
        {
            Fetched::NotModified => match lock(&self.last).as_ref() {
                Some(last) => Ok(last.environment.clone()),
                None => Err(at(ObjectProblem::UnaskedNotModified)),
            },
            Fetched::Object { etag, body } => {
                if body.len() > MAX_DOCUMENT {
                    return Err(at(ObjectProblem::TooLarge));
                }
                let (environment, metadata) =
                    document::parse(&body, self.allow_wide, Checksum::Required)
                        .map_err(|e| at(ObjectProblem::Document(e)))?;
                if environment.is_empty() {
                    return Err(at(ObjectProblem::Empty));
                }
                *lock(&self.info) = Some(DocumentInfo {
                    key: request.key.clone(),
                    etag: etag.clone(),
                    metadata,
                });
                // Without an ETag the next GET is unconditional (a full read), never wrong.
                *lock(&self.last) = etag.map(|etag| Last {
                    etag,
                    environment: environment.clone(),
                });
                Ok(environment)
            }
        }
    }

    /// The key with `{account}`, `{region}` and `{vpc}` filled in.
    async fn key(&self, identity: &InstanceIdentity, imds: &Imds) -> Result<String, S3Error> {
        if let Some(k) = lock(&self.key).as_ref() {
            return Ok(k.clone());
        }
        let mut key = self
            .config
            .key
            .replace("{account}", &identity.role.account)
            .replace("{region}", &identity.region);
        if key.contains("{vpc}") {
            key = key.replace("{vpc}", &primary_vpc(imds).await?);
        }
        *lock(&self.key) = Some(key.clone());
        Ok(key)
    }
}

/// The VPC of the instance's primary interface (IMDS `mac`, then
/// `network/interfaces/macs/<mac>/vpc-id`; Amazon EC2 User Guide, "Instance metadata
/// categories").
async fn primary_vpc(imds: &Imds) -> Result<String, S3Error> {
    let mac = imds.text("/latest/meta-data/mac").await?;
    let mac = mac.trim();
    if !mac.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
        return Err(S3Error::NotAMac(mac.into()));
    }
    let vpc = imds
        .text(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/vpc-id"
        ))
        .await?;
    let vpc = vpc.trim();
    if !crate::config::is_aws_id(vpc, "vpc-") {
        return Err(S3Error::NotAVpc(vpc.into()));
    }
    Ok(vpc.to_string())
}

/// Why the `s3` source gave no environment.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The key names `{vpc}` and IMDS could not say which.
    #[error("the key names {{vpc}}: {0}")]
    Imds(#[from] crate::imds::ImdsError),
    #[error("IMDS mac is {0:?}, not a MAC address")]
    NotAMac(String),
    #[error("IMDS vpc-id is {0:?}, not a VPC ID")]
    NotAVpc(String),
    #[error("{url}: {problem}")]
    Object { url: String, problem: ObjectProblem },
}

/// What was wrong with the object (or the GET for it).
#[derive(Debug, thiserror::Error)]
pub enum ObjectProblem {
    /// The store's own words (S3's error code and message, or the transport's).
    #[error("{0}")]
    Get(String),
    /// Only possible if S3 (or something in the way) answers 304 to a GET that sent no
    /// If-None-Match.
    #[error("304 Not Modified to an unconditional GET")]
    UnaskedNotModified,
    #[error("the object is larger than the {MAX_DOCUMENT} bytes a document may have")]
    TooLarge,
    #[error("{0}")]
    Document(#[from] super::document::DocumentError),
    #[error("the document lists no address, VPC or endpoint; refusing to lock to nothing")]
    Empty,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::RoleArn;
    use crate::upstream::{Upstream, UpstreamClient};
    use std::time::Duration;

    /// Answers like S3 (Amazon S3 API Reference, "GetObject"): 304 when If-None-Match names the
    /// current ETag, else 200 with the object; records every request.
    struct FakeS3 {
        object: Mutex<Option<(String, Vec<u8>)>>,
        seen: Mutex<Vec<GetRequest>>,
    }

    impl ObjectStore for FakeS3 {
        fn get<'a>(&'a self, request: &'a GetRequest) -> BoxFuture<'a, Result<Fetched, String>> {
            Box::pin(async move {
                lock(&self.seen).push(request.clone());
                match lock(&self.object).clone() {
                    None => Err("NoSuchKey: The specified key does not exist.".into()),
                    Some((etag, _)) if request.if_none_match.as_deref() == Some(&etag) => {
                        Ok(Fetched::NotModified)
                    }
                    Some((etag, body)) => Ok(Fetched::Object {
                        etag: Some(etag),
                        body,
                    }),
                }
            })
        }
    }

    fn identity() -> InstanceIdentity {
        InstanceIdentity {
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            role: RoleArn::parse("arn:aws:iam::111122223333:role/app").unwrap(),
            assumed_with: None,
        }
    }

    fn imds() -> Imds {
        // Never called: the keys below name no {vpc}.
        let upstream = Upstream {
            authority: "127.0.0.1:9".parse().unwrap(),
        };
        Imds::new(UpstreamClient::new(&upstream, Duration::from_millis(100)))
    }

    fn source(store: Arc<FakeS3>) -> S3Source {
        S3Source::new(
            store,
            S3Config {
                bucket: "fleet-environments".into(),
                key: "credlock/{account}/{region}/environment.json".into(),
                expected_bucket_owner: "444455556666".into(),
                region: None,
                endpoint: None,
                interval: Duration::from_secs(300),
            },
            false,
        )
    }

    fn env(ip: &str) -> Environment {
        let mut e = Environment::default();
        e.add_ip(ip);
        e
    }

    #[tokio::test]
    async fn polls_are_conditional_and_name_the_owner_and_the_filled_key() {
        let store = Arc::new(FakeS3 {
            object: Mutex::new(Some((
                "\"v1\"".into(),
                document::render(&env("203.0.113.10"), "t", "p"),
            ))),
            seen: Mutex::new(Vec::new()),
        });
        let s3 = source(store.clone());
        let (imds, id) = (imds(), identity());
        assert_eq!(s3.discover(&id, &imds).await.unwrap(), env("203.0.113.10"));
        assert_eq!(s3.discover(&id, &imds).await.unwrap(), env("203.0.113.10"));
        *lock(&store.object) = Some((
            "\"v2\"".into(),
            document::render(&env("198.51.100.7"), "t", "p"),
        ));
        assert_eq!(s3.discover(&id, &imds).await.unwrap(), env("198.51.100.7"));
        let info = s3.info().unwrap();
        assert_eq!(info.etag.as_deref(), Some("\"v2\""));
        assert_eq!(info.metadata.generated_by.as_deref(), Some("p"));
        assert_eq!(
            info.metadata.checksum,
            Some(document::checksum(&env("198.51.100.7")))
        );
        let seen = lock(&store.seen).clone();
        let tags: Vec<_> = seen.iter().map(|r| r.if_none_match.clone()).collect();
        assert_eq!(tags, [None, Some("\"v1\"".into()), Some("\"v1\"".into())]);
        for r in &seen {
            assert_eq!(r.key, "credlock/111122223333/eu-west-1/environment.json");
            assert_eq!(r.expected_bucket_owner, "444455556666");
            assert_eq!(r.bucket, "fleet-environments");
        }
    }

    #[tokio::test]
    async fn a_bad_document_is_an_error_and_the_last_good_etag_is_kept() {
        let good = document::render(&env("203.0.113.10"), "t", "p");
        let store = Arc::new(FakeS3 {
            object: Mutex::new(Some(("\"v1\"".into(), good.clone()))),
            seen: Mutex::new(Vec::new()),
        });
        let s3 = source(store.clone());
        let (imds, id) = (imds(), identity());
        s3.discover(&id, &imds).await.unwrap();
        let bad: &[(&[u8], &str)] = &[
            (b"{\"ipv4\":[\"203.0.113.10\"", "EOF"),
            (br#"{"ipv4":["203.0.113.10"]}"#, "no checksum"),
            (br#"{"ipv4":["0.0.0.0/0"],"checksum":"sha256:00"}"#, "wider"),
        ];
        for (body, want) in bad {
            *lock(&store.object) = Some(("\"bad\"".into(), body.to_vec()));
            let err = s3.discover(&id, &imds).await.unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(
                err.starts_with("s3://fleet-environments/credlock/"),
                "{err}"
            );
        }
        // An empty (but well-formed, checksummed) document is refused too.
        *lock(&store.object) = Some((
            "\"empty\"".into(),
            document::render(&Environment::default(), "t", "p"),
        ));
        let err = s3.discover(&id, &imds).await.unwrap_err().to_string();
        assert!(err.contains("refusing to lock to nothing"), "{err}");
        // Too large: refused before parsing.
        *lock(&store.object) = Some(("\"big\"".into(), vec![b' '; MAX_DOCUMENT + 1]));
        assert!(
            s3.discover(&id, &imds)
                .await
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
        // A missing object is an error naming S3's code.
        *lock(&store.object) = None;
        assert!(
            s3.discover(&id, &imds)
                .await
                .unwrap_err()
                .to_string()
                .contains("NoSuchKey")
        );
        // The last good ETag is still the one sent: the good document back is a 304.
        *lock(&store.object) = Some(("\"v1\"".into(), good));
        assert_eq!(s3.discover(&id, &imds).await.unwrap(), env("203.0.113.10"));
        assert_eq!(
            lock(&store.seen).last().unwrap().if_none_match.as_deref(),
            Some("\"v1\"")
        );
    }

    #[tokio::test]
    async fn a_304_without_a_document_is_an_error() {
        struct Always304;
        impl ObjectStore for Always304 {
            fn get<'a>(&'a self, _: &'a GetRequest) -> BoxFuture<'a, Result<Fetched, String>> {
                Box::pin(async { Ok(Fetched::NotModified) })
            }
        }
        let s3 = S3Source::new(
            Arc::new(Always304),
            source(Arc::new(FakeS3 {
                object: Mutex::new(None),
                seen: Mutex::new(Vec::new()),
            }))
            .config
            .clone(),
            false,
        );
        let err = s3
            .discover(&identity(), &imds())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("unconditional"), "{err}");
    }
}
