//! IMDS source: every interface's public IPv4s, IPv6s and VPC ID
//! (Amazon EC2 User Guide, "Instance metadata categories": `network/interfaces/macs/`). Needs no
//! AWS permission.

use crate::environment::Environment;
use crate::imds::{Imds, ImdsError};

const MACS: &str = "/latest/meta-data/network/interfaces/macs/";

/// Why the network metadata gave no environment.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error("{MACS} lists {0:?}, not a MAC address")]
    NotAMac(String),
    /// IMDS lists addresses there, never prefixes.
    #[error("{path} holds {value:?}, not a single address")]
    NotAnAddress { path: String, value: String },
    #[error("{path} holds {value:?}, not a VPC ID")]
    NotAVpc { path: String, value: String },
}

pub async fn discover(imds: &Imds) -> Result<Environment, MetadataError> {
    let macs = imds.text(MACS).await?;
    let mut env = Environment::default();
    for mac in macs
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .filter(|l| !l.is_empty())
    {
        if !mac.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(MetadataError::NotAMac(mac.into()));
        }
        for field in ["public-ipv4s", "ipv6s"] {
            let path = format!("{MACS}{mac}/{field}");
            if let Some(list) = imds.optional_text(&path).await? {
                for ip in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    // IMDS lists addresses here, never prefixes: anything else is refused.
                    if !env.add_address(ip) {
                        return Err(MetadataError::NotAnAddress {
                            path,
                            value: ip.into(),
                        });
                    }
                }
            }
        }
        let path = format!("{MACS}{mac}/vpc-id");
        if let Some(vpc) = imds.optional_text(&path).await? {
            let vpc = vpc.trim();
            if !crate::config::is_aws_id(vpc, "vpc-") {
                return Err(MetadataError::NotAVpc {
                    path,
                    value: vpc.into(),
                });
            }
            env.vpcs.insert(vpc.to_string());
        }
    }
    Ok(env)
}
