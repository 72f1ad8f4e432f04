//! Locked credentials for ECS tasks and EKS pods: credlock in front of the ECS container
//! agent's task-credential endpoint, or of the EKS Pod Identity Agent.
//!
//! On an EC2 container instance, ecs-init sends containers' traffic for `169.254.170.2:80` to
//! the agent on `127.0.0.1:51679`, and the agent answers `GET /v2/credentials/<id>` with the
//! task role's credentials ("IAM roles for tasks", Amazon ECS Developer Guide; "Using IAM roles
//! with Amazon ECS tasks", Amazon ECS Best Practices Guide). With `[containers.ecs]`, the
//! firewall sends that traffic to credlock instead, and credlock forwards every request to the
//! agent unchanged: the agent, not credlock, decides which caller may have which task's
//! credentials, as IMDS does for the instance.
//!
//! What credlock changes is the answer. A credential document (decided by its content, never by
//! the request's path: [`judge_document`]) gets `AccessKeyId`, `SecretAccessKey`, `Token` and
//! `Expiration` replaced by a locked set; every other byte (`RoleArn`, key order) is kept. The
//! locked set comes from `sts:AssumeRole` on the document's `RoleArn`, signed with the task's
//! own credentials from that document, with the same session policy as the instance's lock
//! (the discovered environment; re-assuming the role denied). The task role must therefore
//! trust itself (README, "ECS tasks"). Session name `credlock-ecs-<credential id>`, so
//! CloudTrail shows which task assumed it; SourceIdentity `credlock-<instance id>` as for the
//! instance's own sessions.
//!
//! EKS Pod Identity ([`AgentKind::PodIdentity`]) is the same proxy in front of the Pod Identity
//! Agent (169.254.170.23 / [fd00:ec2::23], port 80: "EKS Pod Identity considerations", Amazon
//! EKS User Guide). The pod's request carries its service-account token in `Authorization`,
//! which the agent validates and exchanges with EKS Auth (`AssumeRoleForPodIdentity`); credlock
//! forwards it, never reads it. The answer is the same document without `RoleArn`, so the role
//! is found from the pod's own credentials: `sts:GetCallerIdentity` (which needs no permission)
//! names the session `assumed-role/<role name>/<session>`, without the role's path; a role
//! listed in `[containers.pod_identity] roles` is assumed at that ARN, any other at
//! `role/<name>`. The lookup is made once per raw set and kept with it; the agent's Host check
//! needs the link-local Host, which credlock sends as it asks the agent at that address. Session
//! name `credlock-eks-<the pod's session name>` (a digest when that does not fit).
//!
//! Invariants:
//! - No raw value reaches a client: what an answer must be to pass is
//!   [`crate::container_judge`]'s (a document only rewritten and only in the documented shape,
//!   checked again after the rewrite; anything else only without a secret key, a raw value
//!   seen in the last 6 hours or a credential-shaped string, in the body or the headers), and
//!   only allow-listed request headers reach the agent, so the bytes judged are the bytes
//!   served.
//! - Sets are held per raw task credential (its `AccessKeyId`): an answer for task A can only
//!   ever be served the set assumed with A's own credentials. A rotation by the agent (new raw
//!   keys) is a new set; a set unused until it expires is dropped, and an agent error for a
//!   credential id drops that id's sets.
//! - Fail closed: no environment yet, no role, an STS error or an exhausted STS budget answer
//!   502 or 503 with no credentials. The agent's own answers pass unchanged.
//! - A task that cannot be locked costs nothing shared: it is answered 502 at once during its
//!   back-off, and tried again on a budget of its own; no request waits on another's
//!   AssumeRole for longer than [`LOCK_WAIT`].
//!
//! Cost: one AssumeRole per task per locked session (`lock.session_duration_seconds`, less the
//! serving margin), and one per rotation of the task's credentials by the agent, whichever
//! comes first; a host's rate is capped by `assume_rate` (a token bucket, burst twice the rate).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use aws_credential_types::Credentials;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::container_judge::{RawDocument, Verdict, judge, servable};
use crate::credentials::{LockedCredentials, Secret, rewrite_document};
use crate::environment::Environment;
use crate::identity::RoleArn;
use crate::metrics::Metrics;
use crate::policy;
use crate::proxy::local_text as local;
use crate::sts::{AssumeRequest, AwsIssuer, Issued, StsError, StsErrorCode};
use crate::upstream::{UpstreamClient, strip_hop_by_hop};

/// The longest an AssumeRole for a task may take before the request fails (the SDKs' container
/// provider gives up after a few seconds anyway).
const ASSUME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for the STS budget before it is answered 503.
const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// How long a request waits for another request of the same task that is locking it (an
/// AssumeRole in flight) before it is answered 503: a connection slot is never held for the
/// length of a slow STS call per waiting request.
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// After a failed lock, a task's requests are answered 502 at once, without STS or waiting,
/// for this long, doubling per consecutive failure up to [`FAILED_MAX`]: a task whose role
/// refuses cannot hold connection slots or spend the STS budget of the others.
const FAILED_FIRST: Duration = Duration::from_secs(5);
const FAILED_MAX: Duration = Duration::from_secs(60);
/// How long the raw values of a set no longer held are still checked for in answers (the
/// agent's task credentials live 6 hours: "IAM roles for tasks", Amazon ECS Developer Guide).
const RETIRED_FOR: Duration = Duration::from_secs(6 * 3600);
/// How long a role that refused the SourceIdentity marker is called unmarked before the marked
/// call is tried again (a fixed trust policy heals within this).
const UNMARKED_FOR: Duration = Duration::from_secs(3600);
/// Session names carry the credential id when it fits STS's rules (`[\w+=,.@-]`, 2-64
/// characters, "AssumeRole", AWS STS API Reference) after the prefix.
/// Both prefixes ([`AgentKind::session_prefix`]) are this long.
const SESSION_PREFIX_LEN: usize = "credlock-ecs-".len();
const MAX_ID_IN_NAME: usize = 64 - SESSION_PREFIX_LEN;

/// Which agent a container proxy stands in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// The ECS container agent (`[containers.ecs]`): answers name the role (`RoleArn`).
    Ecs,
    /// The EKS Pod Identity Agent (`[containers.pod_identity]`): answers name no role.
    PodIdentity,
}

impl AgentKind {
    /// The `agent` label of the task metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ecs => "ecs",
            Self::PodIdentity => "pod_identity",
        }
    }

    /// The configuration table under `[containers]`.
    pub fn section(self) -> &'static str {
        match self {
            Self::Ecs => "ecs",
            Self::PodIdentity => "pod_identity",
        }
    }

    fn session_prefix(self) -> &'static str {
        match self {
            Self::Ecs => "credlock-ecs-",
            Self::PodIdentity => "credlock-eks-",
        }
    }
}

#[path = "container_locks.rs"]
mod locks;
use locks::*;
pub use locks::{LockContext, TaskLockConfig, TaskLocks};

/// What a task-credential answer was (the `result` label of `credlock_task_credentials_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskResult {
    Locked,
    Cached,
    Passed,
    Refused,
    Failed,
}

impl TaskResult {
    pub const ALL: [TaskResult; 5] = [
        Self::Locked,
        Self::Cached,
        Self::Passed,
        Self::Refused,
        Self::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Locked => "locked",
            Self::Cached => "cached",
            Self::Passed => "passed",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// STS calls signed with a task's (or pod's) own credentials.
pub trait TaskIssuer: Send + Sync + 'static {
    fn assume_as<'a>(
        &'a self,
        source: Credentials,
        request: &'a AssumeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, StsError>> + Send + 'a>>;

    /// The caller's ARN (`sts:GetCallerIdentity`).
    fn caller_as(
        &self,
        source: Credentials,
    ) -> Pin<Box<dyn Future<Output = Result<String, StsError>> + Send + '_>>;
}

impl TaskIssuer for AwsIssuer {
    fn assume_as<'a>(
        &'a self,
        source: Credentials,
        request: &'a AssumeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, StsError>> + Send + 'a>> {
        Box::pin(AwsIssuer::assume_as(self, source, request))
    }

    fn caller_as(
        &self,
        source: Credentials,
    ) -> Pin<Box<dyn Future<Output = Result<String, StsError>> + Send + '_>> {
        Box::pin(AwsIssuer::caller_as(self, source))
    }
}

/// The credential id of a task-credential request target (`/v2/credentials/<id>`, or the
/// older `/v1/credentials?id=<id>`), for naming and forgetting only: whether an answer holds
/// credentials is never decided from it.
fn credential_id(target: &str) -> Option<&str> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(id) = path.strip_prefix("/v2/credentials/") {
        return (!id.is_empty()).then_some(id);
    }
    if path == "/v1/credentials" {
        return query
            .split('&')
            .find_map(|p| p.strip_prefix("id="))
            .filter(|id| !id.is_empty());
    }
    None
}

/// Handles one request on the ECS listener; never fails.
pub async fn handle(locks: Arc<TaskLocks>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let head = parts.method == Method::HEAD;
    // The agent reads no request body; one that is announced is refused before anything is
    // forwarded, as on the IMDS listener (no client byte after a head reaches the agent).
    if parts.headers.contains_key(header::TRANSFER_ENCODING) || !body.is_end_stream() {
        let mut response = local(
            StatusCode::BAD_REQUEST,
            "credlock: task credential requests carry no body\n",
            head,
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        locks.count(TaskResult::Refused);
        return response;
    }
    drop(body);
    let Some(target) = parts
        .uri
        .path_and_query()
        .filter(|_| parts.uri.scheme().is_none())
        .map(|pq| pq.as_str().to_string())
    else {
        locks.count(TaskResult::Refused);
        return local(
            StatusCode::BAD_REQUEST,
            "credlock: request target refused: not origin-form\n",
            head,
        );
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let answer = match locks
        .agent
        .send_only(parts.method, &target, &headers, forwarded_header)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, agent = locks.config.kind.label(), "the agent did not answer");
            locks.count(TaskResult::Failed);
            let text = match locks.config.kind {
                AgentKind::Ecs => "credlock: the ECS agent did not answer\n",
                AgentKind::PodIdentity => "credlock: the EKS Pod Identity agent did not answer\n",
            };
            return local(e.status(), text, head);
        }
    };
    let known = locks.known.load();
    match judge(
        answer.status.as_u16(),
        &answer.headers,
        &answer.body,
        &known,
    ) {
        Verdict::Pass => {
            // 400 InvalidIdInRequest / NoIdInRequest: the agent does not know the id (any
            // more); other errors (429, 503 pending) say nothing about it.
            if locks.config.kind == AgentKind::Ecs
                && matches!(answer.status.as_u16(), 400 | 404)
                && let Some(id) = credential_id(&target)
            {
                locks.forget(id);
            }
            locks.count(TaskResult::Passed);
            upstream(answer.status, answer.headers, answer.body, head)
        }
        Verdict::Refuse(reason) => {
            tracing::warn!(
                reason = reason.label(),
                status = answer.status.as_u16(),
                agent = locks.config.kind.label(),
                "an agent answer was refused: it would have carried raw credentials"
            );
            locks.count(TaskResult::Refused);
            local(
                StatusCode::BAD_GATEWAY,
                "credlock: the agent's answer was refused\n",
                head,
            )
        }
        Verdict::Document(raw) => match locks.locked_for(&raw, credential_id(&target)).await {
            Ok((locked, cached)) => {
                let mut raw_values = raw.raw_values().to_vec();
                raw_values.extend(known.iter().cloned());
                let served = rewrite_document(&answer.body, &locked)
                    .ok()
                    .filter(|out| servable(out, &raw_values));
                match served {
                    Some(out) => {
                        locks.count(if cached {
                            TaskResult::Cached
                        } else {
                            TaskResult::Locked
                        });
                        upstream(answer.status, answer.headers, Bytes::from(out), head)
                    }
                    None => {
                        locks.count(TaskResult::Refused);
                        local(
                            StatusCode::BAD_GATEWAY,
                            "credlock: the agent's answer was refused\n",
                            head,
                        )
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no locked task credentials: failing closed");
                locks.count(TaskResult::Failed);
                let text = match e {
                    Failure::NotReady => {
                        "credlock: no locked task credentials yet (the instance's environment is not known)\n"
                    }
                    Failure::Budget => {
                        "credlock: too many task credential locks at once; retry shortly\n"
                    }
                    _ => "credlock: no locked task credentials could be had\n",
                };
                local(e.status(), text, head)
            }
        },
    }
}

impl TaskLocks {
    fn count(&self, result: TaskResult) {
        self.metrics
            .task_credentials
            .with_label_values(&[self.config.kind.label(), result.label()])
            .inc();
    }
}

/// The request headers forwarded to the agent: what an SDK's container provider sends and the
/// agent may read. Nothing that changes the answer's encoding or asks for part of it
/// (`Accept-Encoding`, `Range`, `If-*`): its bytes must be the ones judged.
fn forwarded_header(name: &http::HeaderName) -> bool {
    matches!(name.as_str(), "user-agent" | "accept" | "authorization")
}

fn upstream(
    status: StatusCode,
    mut headers: http::HeaderMap,
    body: Bytes,
    head: bool,
) -> Response<Full<Bytes>> {
    strip_hop_by_hop(&mut headers);
    if !head {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut response = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
#[path = "container_pod_tests.rs"]
mod pod_tests;
#[cfg(test)]
#[path = "container_tests.rs"]
mod tests;
