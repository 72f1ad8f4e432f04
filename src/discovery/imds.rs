//! IMDS source: every interface's public IPv4s, IPv6s and VPC ID
//! (Amazon EC2 User Guide, "Instance metadata categories": `network/interfaces/macs/`). Needs no
//! AWS permission.

use crate::environment::Environment;
use crate::imds::Imds;

const MACS: &str = "/latest/meta-data/network/interfaces/macs/";

pub async fn discover(imds: &Imds) -> Result<Environment, String> {
    let macs = imds.text(MACS).await.map_err(|e| e.to_string())?;
    let mut env = Environment::default();
    for mac in macs
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .filter(|l| !l.is_empty())
    {
        if !mac.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(format!("{MACS} lists {mac:?}, not a MAC address"));
        }
        for field in ["public-ipv4s", "ipv6s"] {
            let path = format!("{MACS}{mac}/{field}");
            if let Some(list) = imds.optional_text(&path).await.map_err(|e| e.to_string())? {
                for ip in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    // IMDS lists addresses here, never prefixes: anything else is refused.
                    if !env.add_address(ip) {
                        return Err(format!("{path} holds {ip:?}, not a single address"));
                    }
                }
            }
        }
        let path = format!("{MACS}{mac}/vpc-id");
        if let Some(vpc) = imds.optional_text(&path).await.map_err(|e| e.to_string())? {
            let vpc = vpc.trim();
            if !crate::config::is_aws_id(vpc, "vpc-") {
                return Err(format!("{path} holds {vpc:?}, not a VPC ID"));
            }
            env.vpcs.insert(vpc.to_string());
        }
    }
    Ok(env)
}
