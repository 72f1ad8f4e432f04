//! Egress-IP echo source: the address AWS sees, including NAT gateway and centralised egress
//! addresses IMDS does not know (the public address of a NAT gateway is not in instance metadata:
//! Amazon VPC User Guide, "NAT gateways"). Each URL answers with
//! one IP address as text; anything else is an error. A hint to union with the other sources.

use std::net::IpAddr;

use crate::environment::Environment;

/// An echo answer is one address; a few hundred bytes is already suspicious.
const MAX_ANSWER: usize = 256;

/// Why one echo URL gave no address.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The request did not complete (connection, TLS, timeout): reqwest's own words.
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("answer of {0} bytes is not an address")]
    TooLong(usize),
    /// At most 64 characters of the answer.
    #[error("answer {0:?} is not an IP address")]
    NotAnAddress(String),
}

/// Every echo URL failed (one that answers is enough).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct EchoError(pub Vec<(String, AnswerError)>);

pub async fn discover(http: &reqwest::Client, urls: &[String]) -> Result<Environment, EchoError> {
    let mut env = Environment::default();
    let mut errors = Vec::new();
    for url in urls {
        match ask(http, url).await {
            Ok(ip) => {
                env.add_address(&ip.to_string());
            }
            Err(e) => errors.push((url.clone(), e)),
        }
    }
    if errors.len() == urls.len() {
        return Err(EchoError(errors));
    }
    for (url, e) in errors {
        tracing::warn!(url, error = %e, "an echo URL failed; using the others");
    }
    Ok(env)
}

async fn ask(http: &reqwest::Client, url: &str) -> Result<IpAddr, AnswerError> {
    let transport = |e: reqwest::Error| AnswerError::Transport(e.to_string());
    let response = http.get(url).send().await.map_err(transport)?;
    let status = response.status();
    if !status.is_success() {
        return Err(AnswerError::Status(status));
    }
    let body = response.bytes().await.map_err(transport)?;
    if body.len() > MAX_ANSWER {
        return Err(AnswerError::TooLong(body.len()));
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    text.parse::<IpAddr>()
        .map_err(|_| AnswerError::NotAnAddress(text.chars().take(64).collect()))
}
