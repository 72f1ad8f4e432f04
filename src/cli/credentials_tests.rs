use std::os::unix::fs::PermissionsExt;

use super::*;

/// A directory of this test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("credlock-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn set(expiration: SystemTime) -> Set {
    Set {
        access_key_id: "ASIALOCKED".into(),
        secret_access_key: "se'cret".into(),
        session_token: "tok$en".into(),
        expiration: imds_timestamp(expiration),
        role_arn: "arn:aws:iam::123456789012:role/app".into(),
        source: "sts".into(),
    }
}

#[test]
fn the_credential_process_output_is_what_the_sdks_read() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let out: serde_json::Value =
        serde_json::from_str(&render(&set(t), Format::CredentialProcess)).unwrap();
    // "Sourcing credentials with an external process": Version 1, the four fields, RFC 3339.
    assert_eq!(
        out,
        serde_json::json!({
            "Version": 1,
            "AccessKeyId": "ASIALOCKED",
            "SecretAccessKey": "se'cret",
            "SessionToken": "tok$en",
            "Expiration": "2027-01-15T08:00:00Z",
        })
    );
}

#[test]
fn env_lines_survive_a_shell() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let text = render(&set(t), Format::Env);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{text}\nprintf '%s|%s|%s|%s' \"$AWS_ACCESS_KEY_ID\" \"$AWS_SECRET_ACCESS_KEY\" \"$AWS_SESSION_TOKEN\" \"$AWS_CREDENTIAL_EXPIRATION\""
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "ASIALOCKED|se'cret|tok$en|2027-01-15T08:00:00Z"
    );
}

#[test]
fn secrets_stay_out_of_debug() {
    let shown = format!("{:?}", set(SystemTime::UNIX_EPOCH));
    assert!(
        !shown.contains("se'cret") && !shown.contains("tok$en"),
        "{shown}"
    );
}

#[test]
fn the_role_of_an_assumed_role_session() {
    let r = role_of_session("arn:aws:sts::123456789012:assumed-role/app/i-0abc").unwrap();
    assert_eq!(r.to_string(), "arn:aws:iam::123456789012:role/app");
    let r = role_of_session("arn:aws-cn:sts::123456789012:assumed-role/app/s").unwrap();
    assert_eq!(r.partition, "aws-cn");
    for not_a_session in [
        "arn:aws:iam::123456789012:user/alice",
        "arn:aws:sts::123456789012:federated-user/bob",
        "arn:aws:sts::123456789012:assumed-role/app",
        "arn:aws:sts::123456789012:assumed-role//s",
        "arn:aws:sts::123456789012:assumed-role/a/b/c",
        "arn:aws:iam::123456789012:root",
        "",
    ] {
        assert!(role_of_session(not_a_session).is_none(), "{not_a_session}");
    }
}

#[test]
fn the_cache_is_per_role_and_environment_and_honours_the_margin() {
    let dir = TempDir::new("cache");
    let cache = dir.path().join("c");
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
    let other = RoleArn::parse("arn:aws:iam::123456789012:role/other").unwrap();
    let hour = Duration::from_secs(3600);
    let a = cache_file(Some(&cache), &role, "policy-1", hour).unwrap();
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        a,
        cache_file(Some(&cache), &role, "policy-1", hour).unwrap()
    );
    assert_ne!(
        a,
        cache_file(Some(&cache), &role, "policy-2", hour).unwrap()
    );
    assert_ne!(
        a,
        cache_file(Some(&cache), &other, "policy-1", hour).unwrap()
    );

    let now = SystemTime::now();
    let margin = Duration::from_secs(300);
    write_cache(&a, &set(now + Duration::from_secs(1000))).unwrap();
    assert_eq!(
        std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(read_cache(&a, now, margin).is_some());
    // Within the margin: not used.
    assert!(read_cache(&a, now + Duration::from_secs(701), margin).is_none());
    // Readable by others: not used (someone else may have written it).
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(read_cache(&a, now, margin).is_none());
    // Garbage: ignored, and replaced by the next write.
    std::fs::write(&a, b"not json").unwrap();
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(read_cache(&a, now, margin).is_none());
    write_cache(&a, &set(now + Duration::from_secs(1000))).unwrap();
    assert!(read_cache(&a, now, margin).is_some());
}

#[test]
fn a_cache_directory_others_could_write_or_a_symlink_is_refused() {
    let dir = TempDir::new("refused");
    let role = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
    let hour = Duration::from_secs(3600);
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(cache_file(Some(&open), &role, "policy-1", hour).is_err());
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(cache_file(Some(&link), &role, "policy-1", hour).is_err());
    // A symlinked cache file is not read.
    let good = dir.path().join("good");
    let file = cache_file(Some(&good), &role, "policy-1", hour).unwrap();
    let elsewhere = dir.path().join("elsewhere.json");
    write_cache(
        &elsewhere,
        &set(SystemTime::now() + Duration::from_secs(3000)),
    )
    .unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    assert!(read_cache(&file, SystemTime::now(), Duration::from_secs(300)).is_none());
}

#[test]
fn session_names_fit_sts() {
    let name = session_name(&host_id());
    assert!((2..=64).contains(&name.len()), "{name}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)),
        "{name}"
    );
}

#[test]
fn the_listening_sockets_owner_is_read_from_proc_net_tcp() {
    // Two lines of a real /proc/net/tcp (x86-64, little-endian words): 127.0.0.1:9169 held by
    // uid 0 (systemd's credlock.socket), listening; 127.0.0.1:8169 connected, uid 995.
    let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:23D1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 21716 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1FE9 0100007F:C350 01 00000000:00000000 00:00000000 00000000   995        0 21999 1 0000000000000000 20 4 30 10 -1\n";
    let admin: std::net::SocketAddr = "127.0.0.1:9169".parse().unwrap();
    let imds: std::net::SocketAddr = "127.0.0.1:8169".parse().unwrap();
    assert_eq!(listening_uid(table, admin), Some(0));
    assert_eq!(listening_uid(table, imds), None, "not in LISTEN state");
    // This process's own listener, found in the live table with this uid.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let me = nix::unistd::getuid().as_raw();
    assert_eq!(listener_uid(l.local_addr().unwrap()), Some(me));
    let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
    assert_eq!(listener_uid(l6.local_addr().unwrap()), Some(me));
    drop(l);
}
