//! EC2 API source (Amazon EC2 API Reference: DescribeVpcs, DescribeVpcEndpoints,
//! DescribeAddresses, DescribeNatGateways): VPCs, VPC endpoints, Elastic IPs
//! and NAT gateway addresses, paginated and filtered by the configured scope. Called with the
//! instance role's own credentials (never the locked ones), and less often than the cheap
//! sources. `credlock publish-environment` (`publish.rs`) runs the same code on a management
//! host, with its VPCs given ([`Ec2Scope::Vpcs`]) instead of read from IMDS.

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

/// Why the EC2 API source gave no environment.
#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    /// A call failed: its name and the SDK's error with its causes (throttling, access denied,
    /// the transport).
    #[error("ec2:{call}: {message}")]
    Api { call: &'static str, message: String },
    #[error("the vpc scope reads the instance's own VPC from IMDS; off an instance, name the VPCs")]
    OffInstance,
    #[error(transparent)]
    Metadata(#[from] super::imds::MetadataError),
    #[error(transparent)]
    Imds(#[from] crate::imds::ImdsError),
    #[error("IMDS shows no VPC for this instance")]
    NoOwnVpc,
    #[error("no VPC named")]
    NoVpcNamed,
    #[error("no VPC matches the {0} scope")]
    NoVpcInScope(String),
    #[error("{call} gave {value:?}, not a single address")]
    NotAnAddress { call: &'static str, value: String },
}

fn err(call: &'static str, e: impl std::error::Error + 'static) -> Ec2Error {
    Ec2Error::Api {
        call,
        message: aws_smithy_types::error::display::DisplayErrorContext(e).to_string(),
    }
}

/// The EC2 source's transport: the SDK client in production, a counting stand-in in the fleet
/// simulation (benches/fleet_sim.rs), which must see the same calls' rate the fleet would.
pub trait Ec2Api: Send + Sync + 'static {
    fn discover<'a>(
        &'a self,
        scope: &'a Ec2Scope,
        imds: &'a Imds,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Environment, Ec2Error>> + Send + 'a>,
    >;
}

impl Ec2Api for Client {
    fn discover<'a>(
        &'a self,
        scope: &'a Ec2Scope,
        imds: &'a Imds,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Environment, Ec2Error>> + Send + 'a>,
    > {
        Box::pin(discover(self, scope, imds))
    }
}

pub async fn discover(
    client: &Client,
    scope: &Ec2Scope,
    imds: &Imds,
) -> Result<Environment, Ec2Error> {
    discover_paged(client, scope, imds, PAGE_SIZE).await
}

/// [`discover`] with a page size (tests use a small one to exercise pagination).
pub async fn discover_paged(
    client: &Client,
    scope: &Ec2Scope,
    imds: &Imds,
    page_size: i32,
) -> Result<Environment, Ec2Error> {
    discover_scoped(client, scope, Some(imds), page_size).await
}

/// [`discover_paged`] off an instance (`imds` is `None`): every scope but
/// [`Ec2Scope::Vpc`], which reads the instance's own VPC and instance ID from IMDS.
pub async fn discover_scoped(
    client: &Client,
    scope: &Ec2Scope,
    imds: Option<&Imds>,
    page_size: i32,
) -> Result<Environment, Ec2Error> {
    let mut env = Environment::default();
    let need_imds = || imds.ok_or(Ec2Error::OffInstance);

    // 1. Which VPCs are in scope.
    let mut vpcs = client.describe_vpcs().max_results(page_size.max(5));
    match scope {
        Ec2Scope::Vpc => {
            let own = super::imds::discover(need_imds()?).await?.vpcs;
            if own.is_empty() {
                return Err(Ec2Error::NoOwnVpc);
            }
            vpcs = vpcs.filters(filter("vpc-id", &own.into_iter().collect::<Vec<_>>()));
        }
        Ec2Scope::Vpcs(ids) => {
            if ids.is_empty() {
                return Err(Ec2Error::NoVpcNamed);
            }
            vpcs = vpcs.filters(filter("vpc-id", ids));
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
        return Err(Ec2Error::NoVpcInScope(format!("{scope:?}")));
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
                    return Err(Ec2Error::NotAnAddress {
                        call: "DescribeNatGateways",
                        value: ip.into(),
                    });
                }
            }
        }
    }

    // 4. Elastic IPs: this instance's (vpc scope), those on network interfaces in the named
    // VPCs (vpcs scope), the tagged ones, or the account's in the region.
    let mut addresses = client.describe_addresses();
    match scope {
        Ec2Scope::Vpc => {
            let id = need_imds()?.text("/latest/meta-data/instance-id").await?;
            addresses = addresses.filters(filter("instance-id", &[id.trim().to_string()]));
        }
        Ec2Scope::Region | Ec2Scope::Vpcs(_) => {}
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
    // DescribeAddresses has no VPC filter: an address is in a VPC through its network
    // interface, so the vpcs scope asks which of the addresses' interfaces are in them.
    let in_scope = match scope {
        Ec2Scope::Vpcs(_) => Some(
            interfaces_in(
                client,
                out.addresses()
                    .iter()
                    .filter_map(|a| a.network_interface_id().map(str::to_string))
                    .collect(),
                &vpc_ids,
            )
            .await?,
        ),
        _ => None,
    };
    for address in out.addresses() {
        if let Some(in_scope) = &in_scope
            && !address
                .network_interface_id()
                .is_some_and(|eni| in_scope.contains(eni))
        {
            continue;
        }
        if let Some(ip) = address.public_ip()
            && !env.add_address(ip)
        {
            return Err(Ec2Error::NotAnAddress {
                call: "DescribeAddresses",
                value: ip.into(),
            });
        }
    }
    Ok(env)
}

/// Interface IDs per request, well under the number of values EC2 accepts in one filter; an
/// account's Elastic IPs are few, so this is almost always one call.
const FILTER_VALUES: usize = 200;

/// Which of `enis` are network interfaces in `vpcs` (DescribeNetworkInterfaces, filtered by
/// interface ID and VPC).
async fn interfaces_in(
    client: &Client,
    enis: Vec<String>,
    vpcs: &[String],
) -> Result<std::collections::BTreeSet<String>, Ec2Error> {
    let mut found = std::collections::BTreeSet::new();
    for chunk in enis.chunks(FILTER_VALUES) {
        let pages = client
            .describe_network_interfaces()
            .filters(filter("network-interface-id", chunk))
            .filters(filter("vpc-id", vpcs))
            .max_results(PAGE_SIZE.max(5))
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| err("DescribeNetworkInterfaces", e))?;
        for page in pages {
            found.extend(
                page.network_interfaces()
                    .iter()
                    .filter_map(|n| n.network_interface_id().map(str::to_string)),
            );
        }
    }
    Ok(found)
}
