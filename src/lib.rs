//! credlock: an EC2 instance metadata (IMDS) proxy that passes every request through unchanged
//! except the instance role's credentials, which it replaces with credentials from
//! `sts:AssumeRole` on the same role carrying a session policy that only works from the
//! instance's own network.
//!
//! The module map, in reading order.
//!
//! Start-up: [`config`] (TOML and flags, validated before any socket is bound), [`app`] (the
//! wiring: listeners, state, background tasks) and `main.rs` (the command line, logging, the
//! runtime, signals and systemd notification).
//!
//! The request path, per connection and request:
//! - [`server`]: listeners, connection limits and eviction, idle timeouts, graceful drain;
//! - [`peer`]: who is calling (the client socket's uid and cgroup through sock_diag), once per
//!   connection, only when an access policy is set;
//! - [`route`]: the pure classification of every request (the security core);
//! - [`gate`] and [`access`]: the per-process access policy on the request path, and its pure
//!   first-match decision; [`class_role`]: the roles some classes get instead of the instance
//!   role's;
//! - [`proxy`]: the handler: passthrough, forward-then-replace, local refusals;
//! - [`upstream`] and [`http1`]: the pooled client to the real IMDS and its response codec
//!   (pure);
//! - [`credentials`]: the locked set, its store, the judgement and rewrite of an IMDS
//!   credential answer (and of a container credential endpoint's);
//! - [`container`]: the ECS task-credential proxy (`[containers.ecs]`): the agent's answers,
//!   their sets locked per task with the task's own credentials;
//! - [`endpoint`]: the opt-in loopback container-credentials endpoint
//!   (`[containers.endpoint]`): the locked set for holders of a token.
//!
//! The background path, which keeps a locked set ready:
//! - [`identity`] and [`imds`]: who this instance is, read from IMDS with credlock's own
//!   IMDSv2 client;
//! - [`discovery`] and [`environment`]: the networks the lock allows (IMDS, echo, EC2 API,
//!   boot provider, static), merged;
//! - [`policy`]: the session policy rendered from a template, within STS's size limit;
//! - [`sts`] and [`refresh`]: `sts:AssumeRole` and the lock loop (refresh, retry, backoff);
//! - [`clock`]: the injected clock.
//!
//! Commands beyond the daemon, in [`cli`]: `check-config`, `policy` and `discover`
//! ([`cli::discover`]), `explain`, `audit`, `publish-environment` ([`cli::publish`], over
//! [`publish`]), `credentials` ([`cli::credentials`]) and `endpoint-token`
//! ([`cli::endpoint_token`]).
//! [`lambda`]: the Lambda layer's external extension (`lambda-extension`, [`cli::lambda`]; its
//! Extensions API client in `lambda_api.rs`).
//!
//! Observing it: [`metrics`] (Prometheus), [`admin`] (`/healthz`, `/readyz`, `/status`,
//! `/metrics`), [`firewall`] (the state the firewall units report).
#![forbid(unsafe_code)]

pub mod access;
#[cfg(feature = "daemon")]
pub mod admin;
#[cfg(feature = "daemon")]
pub mod app;
#[cfg(feature = "daemon")]
pub mod audit;
#[cfg(feature = "proxy")]
pub mod class_role;
#[cfg(feature = "daemon")]
pub mod cli;
pub mod clock;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod container;
#[cfg(feature = "daemon")]
pub mod container_judge;
pub mod credentials;
#[cfg(feature = "daemon")]
pub mod discovery;
#[cfg(feature = "daemon")]
pub mod endpoint;
pub mod environment;
pub mod evaluate;
#[cfg(feature = "proxy")]
pub mod firewall;
#[cfg(feature = "proxy")]
pub mod gate;
pub mod http1;
pub mod identity;
#[cfg(feature = "daemon")]
pub mod imds;
#[cfg(feature = "daemon")]
pub mod lambda;
#[cfg(feature = "proxy")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod peer;
pub mod policy;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "daemon")]
pub mod publish;
#[cfg(feature = "daemon")]
pub mod refresh;
#[cfg(feature = "daemon")]
pub mod rollout;
pub mod route;
#[cfg(feature = "proxy")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod sts;
#[cfg(feature = "proxy")]
pub mod upstream;
