//! credlock: an EC2 instance metadata (IMDS) proxy that passes every request through unchanged
//! except the instance role's credentials, which it replaces with credentials from
//! `sts:AssumeRole` on the same role carrying a session policy that only works from the
//! instance's own network.
//!
//! Modules in reading order:
//! - [`config`]: TOML and flags, validated before any socket is bound.
//! - [`route`]: the pure classification of every request (the security core).
//! - [`upstream`]: the pooled client to the real IMDS; [`http1`]: its response codec (pure).
//! - [`proxy`]: the request handler: passthrough, forward-then-replace, refusals.
//! - [`credentials`]: the locked set, its store, and the credential-body rewrite.
//! - [`server`]: listeners, limits, graceful drain.
//! - [`metrics`], [`admin`]: Prometheus metrics and the admin listener.
//! - [`access`]: who may get what (the per-process access policy, pure); [`peer`]: who is
//!   calling (socket lookup through sock_diag).
#![forbid(unsafe_code)]

pub mod access;
#[cfg(feature = "daemon")]
pub mod admin;
#[cfg(feature = "daemon")]
pub mod app;
pub mod clock;
#[cfg(feature = "daemon")]
pub mod config;
pub mod credentials;
#[cfg(feature = "daemon")]
pub mod discovery;
pub mod environment;
#[cfg(feature = "proxy")]
pub mod firewall;
#[cfg(feature = "proxy")]
pub mod gate;
pub mod http1;
pub mod identity;
#[cfg(feature = "daemon")]
pub mod imds;
#[cfg(feature = "proxy")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod peer;
pub mod policy;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(feature = "daemon")]
pub mod refresh;
pub mod route;
#[cfg(feature = "proxy")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod sts;
#[cfg(feature = "proxy")]
pub mod upstream;
