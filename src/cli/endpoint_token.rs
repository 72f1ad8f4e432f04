//! `credlock endpoint-token`: a token for the loopback container-credentials endpoint
//! (`crate::endpoint`), made by root for one user: the token in a 0400 file the user owns, its
//! SHA-256 in the digests file the endpoint trusts. `--revoke` takes both away.
//!
//! Root only: only root can give a file to another user, and the digests file decides who gets
//! credentials. Both files must sit in directories no other user can change, checked from `/`
//! down ([`trusted_directory`]): a token under a user's home is refused, since that user could
//! swap a directory on the path for a symlink while root writes. Within them, files are never
//! written through a symlink: the token file is created with O_EXCL|O_NOFOLLOW (an existing
//! regular file is removed first, anything else refused), the digests file read through
//! O_NOFOLLOW and replaced by rename from a new file beside it, under an exclusive lock so two
//! runs cannot undo each other, and the directory synced so a crash cannot either.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::config::DEFAULT_ENDPOINT_TOKENS;
use crate::endpoint::{digest_hex, trusted_directory};

/// Where a user's token goes unless `--file` says otherwise.
pub const DEFAULT_TOKEN_DIR: &str = "/etc/credlock/endpoint";

#[derive(Args)]
pub struct EndpointTokenArgs {
    /// The user the token is for (owns the 0400 token file)
    #[arg(long, value_name = "USER")]
    pub user: String,
    /// The token file [default: /etc/credlock/endpoint/USER.token]
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The digests file the endpoint trusts (`[containers.endpoint] tokens`)
    #[arg(long, value_name = "FILE", default_value = DEFAULT_ENDPOINT_TOKENS)]
    pub tokens: PathBuf,
    /// Take the user's token away: its line and its file
    #[arg(long)]
    pub revoke: bool,
}

pub fn endpoint_token(args: EndpointTokenArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("credlock: {e}");
        ExitCode::FAILURE
    };
    if !valid_user_name(&args.user) {
        eprintln!("credlock: --user {:?} is not a user name", args.user);
        return ExitCode::from(2);
    }
    if !nix::unistd::geteuid().is_root() {
        return fail("endpoint-token must run as root (it gives a file to another user)".into());
    }
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| Path::new(DEFAULT_TOKEN_DIR).join(format!("{}.token", args.user)));
    for path in [&file, &args.tokens] {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if let Err(e) = trusted_directory(dir, 0) {
            return fail(format!(
                "{}: {e}: put it in a directory only root can change (e.g. {DEFAULT_TOKEN_DIR})",
                path.display()
            ));
        }
    }
    let result = if args.revoke {
        revoke(&args, &file)
    } else {
        issue(&args, &file)
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// POSIX portable user names (and `$` for machine accounts), as useradd accepts them.
fn valid_user_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn issue(args: &EndpointTokenArgs, file: &Path) -> Result<String, String> {
    let user = nix::unistd::User::from_name(&args.user)
        .map_err(|e| format!("looking up {}: {e}", args.user))?
        .ok_or_else(|| format!("no user {}", args.user))?;
    let mut raw = [0u8; 32];
    rand::fill(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    remove_regular(file)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    std::os::unix::fs::fchown(&out, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .map_err(|e| format!("{}: chown: {e}", file.display()))?;
    // No newline: SDKs send the file's content as the header value, and refuse a line break.
    out.write_all(token.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| format!("{}: {e}", file.display()))?;
    rewrite_digests(
        &args.tokens,
        &args.user,
        Some(&digest_hex(token.as_bytes())),
    )?;
    Ok(format!("{}: {}", args.user, file.display()))
}

fn revoke(args: &EndpointTokenArgs, file: &Path) -> Result<String, String> {
    rewrite_digests(&args.tokens, &args.user, None)?;
    remove_regular(file)?;
    Ok(format!("{}: revoked", args.user))
}

/// Removes `path` if it is a regular file; absent is fine; anything else is refused.
fn remove_regular(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {
            std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        Ok(_) => Err(format!(
            "{} exists and is not a regular file (a symlink?): refusing to write there",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The digests file with `user`'s line replaced by `digest` (or removed), written to a new
/// 0644 file beside it and renamed over it, under an exclusive lock on `<file>.lock`.
fn rewrite_digests(path: &Path, user: &str, digest: Option<&str>) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| err(&lock_path, e))?;
    lock.lock().map_err(|e| err(&lock_path, e))?;
    let old = read_digests(path)?;
    let mut text: String = old
        .lines()
        .filter(|line| {
            let mut words = line.split_whitespace();
            !(words.next().is_some_and(|w| w.len() == 64) && words.next() == Some(user))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if let Some(d) = digest {
        text.push_str(&format!("{d} {user}\n"));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut suffix = [0u8; 8];
    rand::fill(&mut suffix);
    let temp = dir.join(format!(
        ".{}.new-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokens"),
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .map_err(|e| err(&temp, e))?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| err(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        err(path, e)
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, e))?;
    drop(lock);
    Ok(())
}

/// The digests file's text through O_NOFOLLOW (a symlink is refused); absent is empty. It must
/// be root's regular file with one link.
fn read_digests(path: &Path) -> Result<String, String> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!("{} is a symlink: refusing it", path.display()));
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let m = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !m.file_type().is_file() || m.uid() != 0 || m.nlink() != 1 {
        return Err(format!(
            "{} is not a regular file of root's with one link: fix or remove it first",
            path.display()
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::valid_user_name;

    #[test]
    fn user_names_are_portable_names_only() {
        for ok in ["app", "nobody", "svc_1", "a.b-c", "_x"] {
            assert!(valid_user_name(ok), "{ok}");
        }
        for bad in ["", "../etc", "a/b", "-x", "1abc", "a b", &"x".repeat(33)] {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }
}
