//! Who this instance is: account, region, partition, instance id and role, as IMDS tells it
//! (Amazon EC2 User Guide, "Instance identity documents" and "Instance metadata categories":
//! `iam/info`).

use serde::Deserialize;

/// An IAM role ARN, `arn:<partition>:iam::<account>:role/[path/]name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    pub partition: String,
    pub account: String,
    /// `/` or `/path/.../`.
    pub path: String,
    pub name: String,
}

impl RoleArn {
    pub fn parse(arn: &str) -> Option<RoleArn> {
        let mut parts = arn.splitn(6, ':');
        let (arn_lit, partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let valid_account = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
        if arn_lit != "arn"
            || !partition.starts_with("aws")
            || service != "iam"
            || !region.is_empty()
            || !valid_account
        {
            return None;
        }
        let rest = resource.strip_prefix("role/")?;
        let (path, name) = match rest.rfind('/') {
            Some(i) => (format!("/{}/", &rest[..i]), &rest[i + 1..]),
            None => ("/".to_string(), rest),
        };
        if !is_role_name(name) || path.contains("//") {
            return None;
        }
        Some(RoleArn {
            partition: partition.to_string(),
            account: account.to_string(),
            path,
            name: name.to_string(),
        })
    }

    /// The ARN of a role without a path (what credlock derives when config gives none).
    pub fn derived(partition: &str, account: &str, name: &str) -> RoleArn {
        RoleArn {
            partition: partition.to_string(),
            account: account.to_string(),
            path: "/".to_string(),
            name: name.to_string(),
        }
    }
}

/// Serialized as its ARN text (as `/status` shows it).
impl serde::Serialize for RoleArn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for RoleArn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "arn:{}:iam::{}:role{}{}",
            self.partition, self.account, self.path, self.name
        )
    }
}

/// IAM role names: 1-64 of `[\w+=,.@-]`.
pub fn is_role_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

/// The fields of `dynamic/instance-identity/document` credlock uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    pub account_id: String,
    pub region: String,
    pub instance_id: String,
}

/// Everything credlock needs to know about itself before it can lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub region: String,
    /// The role to lock.
    pub role: RoleArn,
    /// For an access rule's role: the instance role, whose credentials assume `role` (`None`:
    /// `role` is the instance role itself).
    pub assumed_with: Option<RoleArn>,
}

/// An STS assumed-role session ARN, split: `arn:<partition>:sts::<account>:assumed-role/<role>/
/// <session>` (what `sts:GetCallerIdentity` and CloudTrail's `userIdentity.arn` show; the role's
/// path is not in it). `None` for any other ARN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssumedRoleArn<'a> {
    pub partition: &'a str,
    pub account: &'a str,
    pub role: &'a str,
    pub session: &'a str,
}

impl<'a> AssumedRoleArn<'a> {
    pub fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("sts"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let rest = resource.strip_prefix("assumed-role/")?;
        let (role, session) = rest.rsplit_once('/')?;
        (!role.is_empty() && !session.is_empty()).then_some(AssumedRoleArn {
            partition,
            account,
            role,
            session,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_with_and_without_path() {
        let a = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
        assert_eq!((a.path.as_str(), a.name.as_str()), ("/", "app"));
        assert_eq!(a.to_string(), "arn:aws:iam::123456789012:role/app");
        let b = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/x/app").unwrap();
        assert_eq!((b.path.as_str(), b.name.as_str()), ("/team/x/", "app"));
        assert_eq!(
            b.to_string(),
            "arn:aws-cn:iam::123456789012:role/team/x/app"
        );
        for bad in [
            "arn:aws:iam::12345678901:role/app",
            "arn:aws:sts::123456789012:role/app",
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "arn:aws:iam:us-east-1:123456789012:role/app",
            "arn:aws:iam::123456789012:role/p//app",
        ] {
            assert_eq!(RoleArn::parse(bad), None, "{bad}");
        }
    }
}
