//! The environment locked credentials may be used from: public/egress addresses, VPCs and VPC
//! endpoints: the values of the `aws:SourceIp`, `aws:SourceVpc` and `aws:SourceVpce` condition keys
//! (IAM User Guide, "AWS global condition context keys").

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

    /// Adds one address, as sources that report addresses give them (IMDS's `public-ipv4s`
    /// and `ipv6s`, an echo service, the EC2 API's public IPs). A prefix is refused (false):
    /// one read from such a source would widen the lock silently.
    pub fn add_address(&mut self, text: &str) -> bool {
        match text.trim().parse::<IpAddr>() {
            Ok(ip) => {
                self.add_ip(&ip.to_string());
                true
            }
            Err(_) => false,
        }
    }

    /// Adds an address or a prefix from a source that may give prefixes (static, boot
    /// provider), refusing one wider than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`] unless
    /// `allow_wide`.
    pub fn add_prefix(&mut self, text: &str, allow_wide: bool) -> Result<(), String> {
        let net = parse_net(text).ok_or_else(|| format!("{text} is not an address or CIDR"))?;
        check_width(&net, allow_wide)?;
        self.add_ip(text);
        Ok(())
    }

    /// Adds an address (host route) or a CIDR written as text, whatever its width. Returns
    /// false if it is neither. Sources use [`Environment::add_address`] or
    /// [`Environment::add_prefix`].
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

/// The widest IPv4 prefix a source may give without `discovery.allow_wide_prefixes`: a /16 is
/// already 65,536 addresses, more than any one organisation's egress needs.
pub const MIN_PREFIX_V4: u8 = 16;
/// The widest IPv6 prefix likewise (a /32 is a regional internet registry's allocation to one
/// network).
pub const MIN_PREFIX_V6: u8 = 32;

fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Refuses a prefix wider than the caps unless `allow_wide`.
pub fn check_width(net: &IpNet, allow_wide: bool) -> Result<(), String> {
    let (len, min) = match net {
        IpNet::V4(n) => (n.prefix_len(), MIN_PREFIX_V4),
        IpNet::V6(n) => (n.prefix_len(), MIN_PREFIX_V6),
    };
    if len < min && !allow_wide {
        return Err(format!(
            "{net} is wider than /{min}: set discovery.allow_wide_prefixes = true if it is meant"
        ));
    }
    Ok(())
}

/// [`check_width`] on text (an address is always narrow enough); `Err` names the problem.
pub fn check_prefix_text(text: &str, allow_wide: bool) -> Result<(), String> {
    let net = parse_net(text).ok_or_else(|| format!("{text} is not an address or CIDR"))?;
    check_width(&net, allow_wide)
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
    fn address_sources_take_addresses_only_and_prefixes_are_capped() {
        let mut env = Environment::default();
        assert!(env.add_address("203.0.113.7"));
        assert!(env.add_address(" 2001:db8::7 "));
        for prefix in [
            "203.0.113.0/24",
            "0.0.0.0/0",
            "2001:db8::/64",
            "203.0.113.7/32",
        ] {
            assert!(!env.add_address(prefix), "{prefix}");
        }
        assert_eq!(env.aggregated_ips(), ["203.0.113.7/32", "2001:db8::7/128"]);

        assert!(env.add_prefix("10.1.0.0/16", false).is_ok());
        assert!(env.add_prefix("2001:db8::/32", false).is_ok());
        for wide in ["10.0.0.0/15", "0.0.0.0/0", "2001::/31", "::/0"] {
            let e = env.add_prefix(wide, false).unwrap_err();
            assert!(e.contains("allow_wide_prefixes"), "{e}");
            assert!(env.add_prefix(wide, true).is_ok());
        }
        assert!(env.add_prefix("nonsense", true).is_err());
    }

    #[test]
    fn host_bits_are_truncated_so_equal_ranges_dedupe() {
        let mut env = Environment::default();
        env.add_ip("10.1.2.3/16");
        env.add_ip("10.1.0.0/16");
        assert_eq!(env.ipv4.len(), 1);
    }
}
