//! Egress-IP echo source: the address AWS sees, including NAT gateway and centralised egress
//! addresses IMDS does not know (the public address of a NAT gateway is not in instance metadata:
//! Amazon VPC User Guide, "NAT gateways"). Each URL answers with
//! one IP address as text; anything else is an error. A hint to union with the other sources.

use std::net::IpAddr;

use crate::environment::Environment;

/// An echo answer is one address; a few hundred bytes is already suspicious.
const MAX_ANSWER: usize = 256;

pub async fn discover(http: &reqwest::Client, urls: &[String]) -> Result<Environment, String> {
    let mut env = Environment::default();
    let mut errors = Vec::new();
    for url in urls {
        match ask(http, url).await {
            Ok(ip) => {
                env.add_address(&ip.to_string());
            }
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    if errors.len() == urls.len() {
        return Err(errors.join("; "));
    }
    for e in errors {
        tracing::warn!(error = %e, "an echo URL failed; using the others");
    }
    Ok(env)
}

async fn ask(http: &reqwest::Client, url: &str) -> Result<IpAddr, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if body.len() > MAX_ANSWER {
        return Err(format!("answer of {} bytes is not an address", body.len()));
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    text.parse::<IpAddr>().map_err(|_| {
        format!(
            "answer {:?} is not an IP address",
            text.chars().take(64).collect::<String>()
        )
    })
}
