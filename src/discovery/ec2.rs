//! EC2 API source (Amazon EC2 API Reference: DescribeVpcs, DescribeVpcEndpoints,
//! DescribeAddresses, DescribeNatGateways): VPCs, VPC endpoints, Elastic IPs
//! and NAT gateway addresses, paginated and filtered by the configured scope. Called with the
//! instance role's own credentials (never the locked ones), and less often than the cheap
//! sources.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::Filter;

use crate::config::Ec2Scope;
use crate::environment::Environment;
use crate::imds::Imds;

/// Results per page of the paginated calls (the API maximum is 1000).
pub const PAGE_SIZE: i32 = 500;

/// Endpoint states that can still carry traffic.
const LIVE_ENDPOINT_STATES: [&str; 3] = ["available", "pending", "pendingAcceptance"];

fn filter(name: &str, values: &[String]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

fn err(call: &str, e: impl std::error::Error + 'static) -> String {
    format!(
        "ec2:{call}: {}",
        aws_smithy_types::error::display::DisplayErrorContext(e)
    )
}

pub async fn discover(
    client: &Client,
    scope: &Ec2Scope,
    imds: &Imds,
) -> Result<Environment, String> {
    discover_paged(client, scope, imds, PAGE_SIZE).await
}

/// [`discover`] with a page size (tests use a small one to exercise pagination).
pub async fn discover_paged(
    client: &Client,
    scope: &Ec2Scope,
    imds: &Imds,
    page_size: i32,
) -> Result<Environment, String> {
    let mut env = Environment::default();

    // 1. Which VPCs are in scope.
    let mut vpcs = client.describe_vpcs().max_results(page_size.max(5));
    match scope {
        Ec2Scope::Vpc => {
            let own = super::imds::discover(imds).await?.vpcs;
            if own.is_empty() {
                return Err("IMDS shows no VPC for this instance".into());
            }
            vpcs = vpcs.filters(filter("vpc-id", &own.into_iter().collect::<Vec<_>>()));
        }
        Ec2Scope::Region => {}
        Ec2Scope::Tagged { key, value } => {
            vpcs = vpcs.filters(match value {
                Some(v) => filter(&format!("tag:{key}"), std::slice::from_ref(v)),
                None => filter("tag-key", std::slice::from_ref(key)),
            });
        }
    }
    let pages = vpcs
        .into_paginator()
        .send()
        .try_collect()
        .await
        .map_err(|e| err("DescribeVpcs", e))?;
    for page in pages {
        env.vpcs.extend(
            page.vpcs()
                .iter()
                .filter_map(|v| v.vpc_id().map(str::to_string)),
        );
    }
    if env.vpcs.is_empty() {
        return Err(format!("no VPC matches the {scope:?} scope"));
    }
    let vpc_ids: Vec<String> = env.vpcs.iter().cloned().collect();
    let scoped = !matches!(scope, Ec2Scope::Region);

    // 2. Their VPC endpoints.
    let mut endpoints = client.describe_vpc_endpoints().max_results(page_size);
    if scoped {
        endpoints = endpoints.filters(filter("vpc-id", &vpc_ids));
    }
    let pages = endpoints
        .into_paginator()
        .send()
        .try_collect()
        .await
        .map_err(|e| err("DescribeVpcEndpoints", e))?;
    for page in pages {
        for ep in page.vpc_endpoints() {
            let live = ep.state().is_none_or(|s| {
                LIVE_ENDPOINT_STATES
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(s.as_str()))
            });
            if let (true, Some(id)) = (live, ep.vpc_endpoint_id()) {
                env.vpc_endpoints.insert(id.to_string());
            }
        }
    }

    // 3. NAT gateway egress addresses (every address of a multi-address or regional gateway).
    let mut nats = client
        .describe_nat_gateways()
        .max_results(page_size.max(5))
        .filter(filter("state", &["available".to_string()]));
    if scoped {
        nats = nats.filter(filter("vpc-id", &vpc_ids));
    }
    let pages = nats
        .into_paginator()
        .send()
        .try_collect()
        .await
        .map_err(|e| err("DescribeNatGateways", e))?;
    for page in pages {
        for nat in page.nat_gateways() {
            for address in nat.nat_gateway_addresses() {
                if let Some(ip) = address.public_ip()
                    && !env.add_address(ip)
                {
                    return Err(format!(
                        "DescribeNatGateways gave {ip:?}, not a single address"
                    ));
                }
            }
        }
    }

    // 4. Elastic IPs: this instance's (vpc scope), or the account's in the region.
    let mut addresses = client.describe_addresses();
    match scope {
        Ec2Scope::Vpc => {
            let id = imds
                .text("/latest/meta-data/instance-id")
                .await
                .map_err(|e| e.to_string())?;
            addresses = addresses.filters(filter("instance-id", &[id.trim().to_string()]));
        }
        Ec2Scope::Region => {}
        Ec2Scope::Tagged { key, value } => {
            addresses = addresses.filters(match value {
                Some(v) => filter(&format!("tag:{key}"), std::slice::from_ref(v)),
                None => filter("tag-key", std::slice::from_ref(key)),
            });
        }
    }
    let out = addresses
        .send()
        .await
        .map_err(|e| err("DescribeAddresses", e))?;
    for address in out.addresses() {
        if let Some(ip) = address.public_ip()
            && !env.add_address(ip)
        {
            return Err(format!(
                "DescribeAddresses gave {ip:?}, not a single address"
            ));
        }
    }
    Ok(env)
}
