//! Group lists and names through NSS (`/etc/passwd`, `/etc/group`, LDAP, ...), for the access
//! policy's user and group rules.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Users and groups as NSS reports them (`/etc/passwd`, `/etc/group`, LDAP, ...).
pub struct SystemDirectory;

impl crate::access::Directory for SystemDirectory {
    fn uid_of(&self, user: &str) -> Option<u32> {
        nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn gid_of(&self, group: &str) -> Option<u32> {
        nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
    fn groups_of_uid(&self, uid: u32) -> Option<Vec<u32>> {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()?;
        let name = std::ffi::CString::new(user.name).ok()?;
        let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
        Some(groups.into_iter().map(|g| g.as_raw()).collect())
    }
}

/// Group lists by uid, looked up through NSS at most once a minute per uid (a caller's groups
/// change rarely; NSS may be slow). Bounded: at most 4096 uids remembered.
#[derive(Default)]
pub struct GroupCache {
    entries: Mutex<HashMap<u32, (Vec<u32>, Instant)>>,
}

impl GroupCache {
    const TTL: Duration = Duration::from_secs(60);
    const CAPACITY: usize = 4096;

    pub fn groups_of(&self, uid: u32) -> Vec<u32> {
        use crate::access::Directory as _;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((groups, at)) = entries.get(&uid)
            && at.elapsed() < Self::TTL
        {
            return groups.clone();
        }
        // A failed lookup (NSS down, a uid without a passwd entry) is not remembered: the next
        // request asks again.
        let Some(groups) = SystemDirectory.groups_of_uid(uid) else {
            return Vec::new();
        };
        if entries.len() >= Self::CAPACITY {
            entries.clear();
        }
        entries.insert(uid, (groups.clone(), Instant::now()));
        groups
    }
}
