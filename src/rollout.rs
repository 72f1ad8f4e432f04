//! The judge `credlock audit` uses for rollout readiness: would the lock have denied this call
//! of a native instance-profile session? It renders the session policy credlock would inject
//! for the instance's environment and evaluates the call with credlock's own evaluator
//! ([`crate::evaluate`]), so the answer is the lock's, not a guess about it.
//!
//! Environments come from documents in the boot-provider format (`{"ipv4": [...], "ipv6":
//! [...], "vpcs": [...], "vpc_endpoints": [...]}`, the shape `credlock discover` prints as
//! `merged`):
//! - a file named after an instance (`i-0123456789abcdef0.json`) applies to that instance's
//!   calls, added to the fleet-wide ones;
//! - any other file applies to every instance (a fleet's shared NAT gateways, proxies,
//!   endpoints);
//! - a directory holds such files.
//!
//! One fleet-wide document with every instance's own public address would mark each instance's
//! address as inside for every other instance too: per-instance documents keep each address to
//! its instance.
//!
//! What CloudTrail cannot tell, and how it is judged: a call through a VPC endpoint had no
//! `aws:SourceIp`, and its `aws:SourceVpc` (the endpoint's VPC) is not recorded. When the
//! instance's environment has VPCs, the call is taken to come from the first of them (an
//! instance reaches the endpoints of its own VPC); the endpoint id is judged as recorded. The
//! resource is unknown (`evaluate` then never excludes a statement), and the role is the one
//! given, so `DenySelfAssume` judges `sts:AssumeRole` calls only against that role.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::audit::{Call, Judge};
use crate::environment::Environment;
use crate::evaluate::{PolicyDocument, RequestContext, evaluate};
use crate::identity::RoleArn;
use crate::policy;

/// The largest environment document read (the boot provider's limit).
const MAX_DOCUMENT: u64 = 64 * 1024;

/// The fleet-wide environment and each instance's own.
#[derive(Debug, Default, Clone)]
pub struct Environments {
    pub fleet: Environment,
    pub instances: HashMap<String, Environment>,
}

impl Environments {
    /// Reads every document in `paths` (files, or directories of files). An unreadable or
    /// invalid document is an error naming it: a missing address would make every call from it
    /// look like a theft.
    pub fn load(paths: &[PathBuf]) -> Result<Environments, String> {
        let mut envs = Environments::default();
        for path in paths {
            if path.is_dir() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect();
                entries.sort();
                for file in entries {
                    envs.add_file(&file)?;
                }
            } else {
                envs.add_file(path)?;
            }
        }
        Ok(envs)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), String> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_DOCUMENT + 1).read_to_string(&mut text))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_DOCUMENT {
            return Err(format!(
                "{}: larger than {MAX_DOCUMENT} bytes",
                path.display()
            ));
        }
        // Offline analysis of the operator's own documents: wide prefixes are theirs to write.
        let env = crate::discovery::boot_provider::parse_document(text.as_bytes(), true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if is_instance_id(stem) {
            self.instances
                .entry(stem.to_owned())
                .or_default()
                .merge(&env);
        } else {
            self.fleet.merge(&env);
        }
        Ok(())
    }

    /// The environment the lock would have on `instance`.
    pub fn of(&self, instance: &str) -> Environment {
        let mut env = self.fleet.clone();
        if let Some(own) = self.instances.get(instance) {
            env.merge(own);
        }
        env
    }
}

/// `i-` and 8 or 17 lower-case hex digits ("Resource IDs", Amazon EC2 User Guide).
fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// An instance's rendered lock and its environment, or why there is none.
type Rendered = Result<(PolicyDocument, Environment), String>;

/// Renders and evaluates the lock per instance (each instance's policy rendered once).
pub struct LockJudge {
    template: Value,
    role: RoleArn,
    envs: Environments,
    /// Instance id to its rendered policy, or why it cannot be rendered.
    policies: RefCell<HashMap<String, Rendered>>,
}

impl LockJudge {
    pub fn new(template: Value, role: RoleArn, envs: Environments) -> LockJudge {
        LockJudge {
            template,
            role,
            envs,
            policies: RefCell::new(HashMap::new()),
        }
    }

    fn policy_of(&self, instance: &str) -> Rendered {
        let env = self.envs.of(instance);
        let rendered = policy::render(&self.template, &env, &self.role).map_err(|e| {
            format!("no lock can be rendered for {instance}: {e} (give its environment with --environment)")
        })?;
        let document = PolicyDocument::parse(&rendered.text)
            .map_err(|e| format!("the rendered policy cannot be evaluated: {e}"))?;
        Ok((document, env))
    }
}

impl Judge for LockJudge {
    fn would_deny(&self, call: &Call<'_>) -> Option<String> {
        let mut policies = self.policies.borrow_mut();
        let entry = policies
            .entry(call.instance_id.to_owned())
            .or_insert_with(|| self.policy_of(call.instance_id));
        let (document, env) = match entry {
            Ok(found) => found,
            Err(why) => return Some(why.clone()),
        };
        let through_endpoint = call.vpc_endpoint_id.is_some();
        let request = RequestContext {
            action: call.action.clone(),
            resource: None,
            // On the endpoint path the request has no aws:SourceIp ("AWS global condition
            // context keys", IAM User Guide); CloudTrail shows the caller's private address.
            source_ip: if through_endpoint {
                None
            } else {
                call.source_ip
            },
            source_vpc: if through_endpoint {
                env.vpcs.iter().next().cloned()
            } else {
                None
            },
            source_vpce: call.vpc_endpoint_id.map(str::to_owned),
            via_aws_service: Some(call.via_aws_service),
            ..RequestContext::default()
        };
        let evaluation = evaluate(document, &request);
        if evaluation.allowed() {
            return None;
        }
        let instance = call.instance_id;
        Some(match (call.vpc_endpoint_id, call.source_ip) {
            (Some(vpce), _) => format!(
                "{vpce} is not in the environment of {instance}: add it to discovery.static.vpc_endpoints or enable the ec2 source"
            ),
            (None, Some(ip)) => format!(
                "{ip} is not in the environment of {instance}; if it is a NAT gateway or a proxy, enable the ec2 source or add it to discovery.static"
            ),
            (None, None) => format!(
                "denied by {} (no source address recorded)",
                evaluation
                    .statement
                    .map_or_else(|| "no allow".to_string(), |s| s.to_string())
            ),
        })
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
