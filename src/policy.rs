//! The session policy: rendered from `policy-templates/session-policy.json` by JSON-aware
//! substitution (values are inserted as JSON values, never spliced into text), minified, and
//! checked against the 2,048-character limit of `sts:AssumeRole`
//! (AWS STS API Reference, "AssumeRole": `Policy`, and the packed-size limit).
//!
//! Placeholders: a string that is exactly `${SourceIps}`, `${SourceVpcs}` or `${SourceVpces}`
//! becomes an array; `${Partition}`, `${AccountId}`, `${RoleName}` and `${RolePath}` are replaced
//! inside strings. A condition key whose list is empty is dropped (and its operator block if it
//! empties): for a Deny with negated operators that only widens the Deny, never the access.

use serde_json::{Map, Value};

use crate::environment::Environment;
use crate::identity::RoleArn;

/// The plaintext limit for inline session policies.
pub const MAX_POLICY_CHARS: usize = 2048;

/// The template compiled into the binary; used when the configured file is absent.
pub const BUILTIN_TEMPLATE: &str = include_str!("../policy-templates/session-policy.json");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the session policy template is not valid: {0}")]
    Template(String),
    #[error(
        "refusing to lock with an empty environment: no source has found an address, VPC or VPC endpoint"
    )]
    EmptyEnvironment,
    #[error(
        "the session policy is {characters} characters, over the {MAX_POLICY_CHARS}-character STS limit \
         ({ips} address ranges, {vpcs} VPCs, {vpces} VPC endpoints); cut at least {excess} characters: \
         list covering CIDRs instead of single addresses in discovery.static, narrow discovery.ec2.scope, \
         or drop VPC endpoints that the VPC ID already covers"
    )]
    TooLarge {
        characters: usize,
        excess: usize,
        ips: usize,
        vpcs: usize,
        vpces: usize,
    },
}

/// A rendered, minified policy ready for `AssumeRole`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPolicy {
    pub text: String,
    pub characters: usize,
}

/// Parses a template once; rendering then works on the parsed tree.
pub fn parse_template(text: &str) -> Result<Value, PolicyError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| PolicyError::Template(e.to_string()))?;
    if !value.is_object() {
        return Err(PolicyError::Template(
            "the top level must be an object".into(),
        ));
    }
    Ok(value)
}

pub fn render(
    template: &Value,
    env: &Environment,
    role: &RoleArn,
) -> Result<SessionPolicy, PolicyError> {
    render_denying(template, env, role, &[])
}

/// [`render`], plus a statement denying `sts:AssumeRole` on `others` (each under any path: IMDS
/// and the configuration may name a role without its path): the other roles
/// credlock serves. Their trust policies admit the instance role, so a locked session that
/// could assume one would get a session without the lock. Added to whatever the template says,
/// so a custom template cannot forget it.
pub fn render_denying(
    template: &Value,
    env: &Environment,
    role: &RoleArn,
    others: &[RoleArn],
) -> Result<SessionPolicy, PolicyError> {
    if env.is_empty() {
        return Err(PolicyError::EmptyEnvironment);
    }
    let ips = env.aggregated_ips();
    let lists = Lists {
        ips: &ips,
        vpcs: &env.vpcs.iter().cloned().collect::<Vec<_>>(),
        vpces: &env.vpc_endpoints.iter().cloned().collect::<Vec<_>>(),
        role,
    };
    let mut rendered = substitute(template, &lists)?
        .ok_or_else(|| PolicyError::Template("the template rendered to nothing".into()))?;
    if !others.is_empty() {
        deny_assuming(&mut rendered, others)?;
    }
    let text =
        serde_json::to_string(&rendered).map_err(|e| PolicyError::Template(e.to_string()))?;
    let characters = text.chars().count();
    if characters > MAX_POLICY_CHARS {
        return Err(PolicyError::TooLarge {
            characters,
            excess: characters - MAX_POLICY_CHARS,
            ips: ips.len(),
            vpcs: env.vpcs.len(),
            vpces: env.vpc_endpoints.len(),
        });
    }
    Ok(SessionPolicy { text, characters })
}

/// Appends `DenyAssumingOtherCredlockRoles` to the policy's statements.
fn deny_assuming(policy: &mut Value, others: &[RoleArn]) -> Result<(), PolicyError> {
    let mut resources: Vec<Value> = Vec::new();
    for r in others {
        // Role names are unique in an account whatever the path: deny the name under any path.
        for arn in [
            r.to_string(),
            format!("arn:{}:iam::{}:role/{}", r.partition, r.account, r.name),
            format!("arn:{}:iam::{}:role/*/{}", r.partition, r.account, r.name),
        ] {
            let arn = Value::String(arn);
            if !resources.contains(&arn) {
                resources.push(arn);
            }
        }
    }
    let statement = serde_json::json!({
        "Sid": "DenyAssumingOtherCredlockRoles",
        "Effect": "Deny",
        "Action": "sts:AssumeRole",
        "Resource": resources,
    });
    let Some(statements) = policy.get_mut("Statement") else {
        return Err(PolicyError::Template(
            "the template has no Statement".into(),
        ));
    };
    match statements {
        Value::Array(list) => list.push(statement),
        Value::Object(_) => {
            let single = statements.take();
            *statements = Value::Array(vec![single, statement]);
        }
        _ => {
            return Err(PolicyError::Template(
                "Statement is neither a list nor an object".into(),
            ));
        }
    }
    Ok(())
}

struct Lists<'a> {
    ips: &'a [String],
    vpcs: &'a [String],
    vpces: &'a [String],
    role: &'a RoleArn,
}

/// `Ok(None)`: remove this value from its parent (an empty list or an emptied object).
fn substitute(value: &Value, lists: &Lists) -> Result<Option<Value>, PolicyError> {
    Ok(match value {
        Value::String(s) => {
            let list = match s.as_str() {
                "${SourceIps}" => Some(lists.ips),
                "${SourceVpcs}" => Some(lists.vpcs),
                "${SourceVpces}" => Some(lists.vpces),
                _ => None,
            };
            match list {
                Some([]) => None,
                Some(items) => Some(Value::Array(
                    items.iter().cloned().map(Value::String).collect(),
                )),
                None => Some(Value::String(scalars(s, lists.role)?)),
            }
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(v) = substitute(item, lists)? {
                    out.push(v);
                }
            }
            Some(Value::Array(out))
        }
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map {
                if let Some(v) = substitute(v, lists)? {
                    out.insert(k.clone(), v);
                }
            }
            if out.is_empty() && !map.is_empty() {
                None
            } else {
                Some(Value::Object(out))
            }
        }
        other => Some(other.clone()),
    })
}

fn scalars(s: &str, role: &RoleArn) -> Result<String, PolicyError> {
    if !s.contains("${") {
        return Ok(s.to_string());
    }
    let out = s
        .replace("${Partition}", &role.partition)
        .replace("${AccountId}", &role.account)
        .replace("${RoleName}", &role.name)
        .replace("${RolePath}", &role.path);
    if let Some(i) = out.find("${") {
        let name: String = out[i..].chars().take_while(|c| *c != '}').collect();
        return Err(PolicyError::Template(format!(
            "unknown placeholder {name}}}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
