//! The environment locked credentials may be used from: public/egress addresses, VPCs and VPC
//! endpoints (`reference/aws-imds-sts-iam.md` §4.3, §6).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Environment {
    pub ipv4: BTreeSet<Ipv4Net>,
    pub ipv6: BTreeSet<Ipv6Net>,
    pub vpcs: BTreeSet<String>,
    pub vpc_endpoints: BTreeSet<String>,
}

impl Environment {
    pub fn is_empty(&self) -> bool {
        self.ipv4.is_empty()
            && self.ipv6.is_empty()
            && self.vpcs.is_empty()
            && self.vpc_endpoints.is_empty()
    }

    /// Adds an address (host route) or a CIDR written as text. Returns false if it is neither.
    pub fn add_ip(&mut self, text: &str) -> bool {
        let text = text.trim();
        let net = text
            .parse::<IpNet>()
            .ok()
            .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
        match net.map(|n| n.trunc()) {
            Some(IpNet::V4(n)) => self.ipv4.insert(n),
            Some(IpNet::V6(n)) => self.ipv6.insert(n),
            None => return false,
        };
        true
    }

    pub fn merge(&mut self, other: &Environment) {
        self.ipv4.extend(other.ipv4.iter().copied());
        self.ipv6.extend(other.ipv6.iter().copied());
        self.vpcs.extend(other.vpcs.iter().cloned());
        self.vpc_endpoints
            .extend(other.vpc_endpoints.iter().cloned());
    }

    /// The addresses as the fewest CIDRs covering exactly the same set (adjacent and
    /// overlapping ranges merged), IPv4 first.
    pub fn aggregated_ips(&self) -> Vec<String> {
        let v4: Vec<Ipv4Net> = self.ipv4.iter().copied().collect();
        let v6: Vec<Ipv6Net> = self.ipv6.iter().copied().collect();
        Ipv4Net::aggregate(&v4)
            .iter()
            .map(ToString::to_string)
            .chain(Ipv6Net::aggregate(&v6).iter().map(ToString::to_string))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_addresses_merge_into_exact_cidrs() {
        let mut env = Environment::default();
        for ip in [
            "203.0.113.0",
            "203.0.113.1",
            "203.0.113.2",
            "203.0.113.3",
            "203.0.113.5",
            "198.51.100.7/32",
        ] {
            assert!(env.add_ip(ip));
        }
        assert!(env.add_ip("2001:db8::1"));
        assert!(env.add_ip("2001:db8::/127"));
        assert!(!env.add_ip("not-an-ip"));
        assert_eq!(
            env.aggregated_ips(),
            [
                "198.51.100.7/32",
                "203.0.113.0/30",
                "203.0.113.5/32",
                "2001:db8::/127"
            ]
        );
    }

    #[test]
    fn host_bits_are_truncated_so_equal_ranges_dedupe() {
        let mut env = Environment::default();
        env.add_ip("10.1.2.3/16");
        env.add_ip("10.1.0.0/16");
        assert_eq!(env.ipv4.len(), 1);
    }
}
