//! credlock: an EC2 instance metadata (IMDS) proxy that passes every request through unchanged
//! except the instance role's credentials, which it replaces with credentials from
//! `sts:AssumeRole` on the same role carrying a session policy that only works from the
//! instance's own network.
//!
//! Modules in reading order:
//! - [`config`]: TOML and flags, validated before any socket is bound.
//! - [`route`]: the pure classification of every request (the security core).
//! - [`upstream`]: the pooled client to the real IMDS.
//! - [`proxy`]: the request handler: passthrough, forward-then-replace, refusals.
//! - [`credentials`]: the locked set, its store, and the credential-body rewrite.
//! - [`server`]: listeners, limits, graceful drain.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod discovery;
pub mod environment;
pub mod identity;
pub mod imds;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod route;
pub mod server;
pub mod sts;
pub mod upstream;
