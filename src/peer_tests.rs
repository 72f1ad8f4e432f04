use super::*;

#[test]
fn the_unit_is_the_outermost_service_or_scope() {
    assert_eq!(
        unit_of("/system.slice/nginx.service").as_deref(),
        Some("nginx.service")
    );
    assert_eq!(
        unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service").as_deref(),
        Some("user@1000.service")
    );
    assert_eq!(
        unit_of("/user.slice/user-1000.slice/session-3.scope").as_deref(),
        Some("session-3.scope")
    );
    assert_eq!(
        unit_of("/system.slice/docker-0123.scope").as_deref(),
        Some("docker-0123.scope")
    );
    assert_eq!(unit_of("/system.slice"), None);
    assert_eq!(unit_of("/"), None);
    // A component that only contains the suffix is not a unit.
    assert_eq!(unit_of("/system.slice/my.service.d"), None);
}

#[test]
fn the_cgroup2_mount_is_found_in_mountinfo() {
    // Hybrid host (proc(5) mountinfo format: field 5 is the mount point).
    let hybrid = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n\
                  27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
    assert_eq!(
        cgroup2_mount(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
    assert_eq!(
        cgroup2_mount(unified),
        Some(PathBuf::from("/sys/fs/cgroup"))
    );
    assert_eq!(
        cgroup2_mount("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
        None
    );
    assert_eq!(cgroup2_mount("garbage\n\n - \n"), None);
}

/// The request against `struct inet_diag_req_v2` (linux/inet_diag.h): nlmsghdr (16 bytes), then
/// family, protocol, ext, pad, states (u32), then `struct inet_diag_sockid`: sport, dport (big
/// endian), src[4], dst[4] (u32 words, addresses in network order), if (u32), cookie[2].
#[test]
fn the_request_is_an_exact_inet_diag_req_v2() {
    let source: SocketAddr = "169.254.0.2:41000".parse().unwrap();
    let destination: SocketAddr = "169.254.169.254:80".parse().unwrap();
    let b = request_bytes(AF_INET, source, destination, 7);
    assert_eq!(b.len(), 16 + 56);
    assert_eq!(
        u32::from_ne_bytes(b[0..4].try_into().unwrap()),
        72,
        "nlmsg_len"
    );
    assert_eq!(
        u16::from_ne_bytes(b[4..6].try_into().unwrap()),
        20,
        "SOCK_DIAG_BY_FAMILY"
    );
    let flags = u16::from_ne_bytes(b[6..8].try_into().unwrap());
    assert_eq!(
        u32::from_ne_bytes(b[8..12].try_into().unwrap()),
        7,
        "nlmsg_seq"
    );
    assert_eq!(flags, 1, "NLM_F_REQUEST only: no NLM_F_DUMP (0x300)");
    let r = &b[16..];
    assert_eq!((r[0], r[1]), (2, 6), "AF_INET, IPPROTO_TCP");
    assert_eq!(&r[8..10], &41000u16.to_be_bytes());
    assert_eq!(&r[10..12], &80u16.to_be_bytes());
    assert_eq!(&r[12..16], &[169, 254, 0, 2]);
    assert_eq!(&r[28..32], &[169, 254, 169, 254]);
    assert_eq!(&r[48..56], &[0xff; 8], "INET_DIAG_NOCOOKIE");

    let b6 = request_bytes(
        AF_INET6,
        "[fd00:ec2::2]:41000".parse().unwrap(),
        "[fd00:ec2::254]:80".parse().unwrap(),
        1,
    );
    let r6 = &b6[16..];
    assert_eq!(r6[0], 10, "AF_INET6");
    assert_eq!(
        &r6[12..28],
        &"fd00:ec2::2".parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(
        &r6[28..44],
        &"fd00:ec2::254".parse::<Ipv6Addr>().unwrap().octets()
    );
}

/// A `struct inet_diag_msg` answer built by hand as the kernel lays it out, with attributes.
const SRC: &str = "169.254.0.2:41000";
const DST: &str = "169.254.169.254:80";
const ESTABLISHED: u8 = 1;
const LISTEN: u8 = 10;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `struct inet_diag_sockid`: ports big endian, addresses in network order (IPv4 in the first
/// 4 of 16 bytes), interface, cookie.
fn sockid(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let octets = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            o
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut id = Vec::new();
    id.extend_from_slice(&source.port().to_be_bytes());
    id.extend_from_slice(&destination.port().to_be_bytes());
    id.extend_from_slice(&octets(source));
    id.extend_from_slice(&octets(destination));
    id.extend_from_slice(&0u32.to_ne_bytes());
    id.extend_from_slice(&[0xff; 8]);
    id
}

/// A `struct inet_diag_msg` answer built by hand as the kernel lays it out, with attributes.
fn answer(state: u8, uid: u32, cgroup: Option<u64>) -> Vec<u8> {
    answer_for(state, uid, cgroup, addr(SRC), addr(DST))
}

const FIN_WAIT2: u8 = 5;

fn answer_for(
    state: u8,
    uid: u32,
    cgroup: Option<u64>,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let mut msg = vec![2u8, state, 0, 0]; // family, state, timer, retrans
    msg.extend_from_slice(&sockid(source, destination));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // expires
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rqueue
    msg.extend_from_slice(&0u32.to_ne_bytes()); // wqueue
    msg.extend_from_slice(&uid.to_ne_bytes());
    msg.extend_from_slice(&12345u32.to_ne_bytes()); // inode
    // INET_DIAG_SHUTDOWN (8), one byte, padded to 4.
    msg.extend_from_slice(&5u16.to_ne_bytes());
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&[0, 0, 0, 0]);
    if let Some(id) = cgroup {
        msg.extend_from_slice(&12u16.to_ne_bytes());
        msg.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        msg.extend_from_slice(&id.to_ne_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(&((16 + msg.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&20u16.to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&msg);
    out
}

fn parse(bytes: &[u8]) -> Result<Option<SocketOwner>, LookupError> {
    parse_answer(bytes, addr(SRC), addr(DST))
}

#[test]
fn an_answer_gives_the_owner_and_the_raw_cgroup_attribute() {
    let owner = parse(&answer(ESTABLISHED, 1000, Some(0x1122_3344_5566))).unwrap();
    assert_eq!(
        owner,
        Some(SocketOwner {
            uid: 1000,
            cgroup_id: Some(0x1122_3344_5566)
        })
    );
    // Older kernels: no cgroup attribute (the caller is then unidentified, see `cached`).
    assert_eq!(
        parse(&answer(ESTABLISHED, 7, None)).unwrap(),
        Some(SocketOwner {
            uid: 7,
            cgroup_id: None
        })
    );
    // A client that half-closed (FIN_WAIT1/2), or that credlock answered and closed.
    for state in [4, 5, 8, 9, 11] {
        assert!(
            parse(&answer(state, 7, Some(1))).unwrap().is_some(),
            "state {state}"
        );
    }
}

#[test]
fn a_dual_stack_socket_answers_with_mapped_addresses_and_is_the_caller() {
    let mapped = |a: &str| {
        let v4: SocketAddr = addr(a);
        let IpAddr::V4(ip) = v4.ip() else {
            unreachable!()
        };
        SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), v4.port())
    };
    let mut answer = answer_for(ESTABLISHED, 1000, Some(9), mapped(SRC), mapped(DST));
    answer[16] = 10; // AF_INET6: the socket's own family
    assert_eq!(
        parse(&answer).unwrap(),
        Some(SocketOwner {
            uid: 1000,
            cgroup_id: Some(9)
        })
    );
}

#[test]
fn only_a_connected_socket_with_exactly_that_tuple_is_the_caller() {
    // TIME_WAIT (reported with uid 0: never root), CLOSE, SYN_SENT/RECV, NEW_SYN_RECV.
    for state in [2, 3, 6, 7, 12] {
        assert_eq!(
            parse(&answer(state, 0, None)).unwrap(),
            None,
            "state {state}"
        );
    }
    // A TIME_WAIT mini-socket in its FIN_WAIT2 substate, or an orphan: connected state, but no
    // inode (and, for the mini-socket, uid 0 and no cgroup). No process holds it: gone.
    for cgroup in [None, Some(9)] {
        let mut orphan = answer(FIN_WAIT2, 0, cgroup);
        let inode_at = 16 + 4 + 48 + 16;
        assert_eq!(&orphan[inode_at..inode_at + 4], &12345u32.to_ne_bytes());
        orphan[inode_at..inode_at + 4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse(&orphan).unwrap(), None, "inode 0, cgroup {cgroup:?}");
    }
    // The kernel's lookup falls back to a listener on the source port when no connection has
    // the tuple: a forwarded container choosing that port must not become the listener's owner.
    let listener = answer_for(LISTEN, 0, Some(9), addr("0.0.0.0:41000"), addr("0.0.0.0:0"));
    assert_eq!(parse(&listener).unwrap(), None);
    assert_eq!(
        parse(&answer(LISTEN, 0, Some(9))).unwrap(),
        None,
        "LISTEN even with the tuple"
    );
    for (source, destination) in [
        ("169.254.0.2:41001", DST),
        ("169.254.0.3:41000", DST),
        (SRC, "169.254.169.254:81"),
        (SRC, "169.254.169.253:80"),
    ] {
        let other = answer_for(ESTABLISHED, 1000, Some(9), addr(source), addr(destination));
        assert_eq!(parse(&other).unwrap(), None, "{source} -> {destination}");
    }
}

#[test]
fn an_enoent_error_is_no_socket_other_errors_and_garbage_are_errors() {
    let error = |code: i32| {
        let mut out = Vec::new();
        out.extend_from_slice(&36u32.to_ne_bytes());
        out.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&code.to_ne_bytes());
        out.extend_from_slice(&[0u8; 16]); // the request's header
        out
    };
    assert!(matches!(parse(&error(-libc::ENOENT)), Ok(None)));
    assert!(
        matches!(parse(&error(-libc::EPERM)), Err(LookupError::Kernel(c)) if c == -libc::EPERM)
    );
    assert!(parse(&[1, 2, 3]).is_err());
    assert!(parse(&[]).is_err());
    let mut cut = answer(ESTABLISHED, 1, Some(9));
    cut.truncate(40);
    assert!(parse(&cut).is_err());
}

#[tokio::test]
async fn the_kernel_finds_this_process_socket() {
    let Some(root) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|t| cgroup2_mount(&t))
    else {
        panic!("no cgroup v2 hierarchy on this host: the test needs one (TESTING.md)");
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned();
    let ino = std::fs::metadata(root.join(rel.trim_start_matches('/')))
        .unwrap()
        .ino();
    let uid = nix::unistd::getuid().as_raw();
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let found = lookup(client.local_addr().unwrap(), listener.local_addr().unwrap()).unwrap();
        assert_eq!(
            found,
            Some(SocketOwner {
                uid,
                cgroup_id: Some(ino)
            }),
            "{listen}"
        );
        let identity = Identifier::with_cgroup_root(Some(root.clone())).identify(&accepted);
        let Identity::Identified(caller) = identity else {
            panic!("{listen}: {identity:?}")
        };
        assert_eq!(
            (caller.uid, caller.cgroup.as_deref()),
            (uid, Some(rel.as_str()))
        );
        // The tuple reversed is the accepted socket: it exists too, and is ours as well.
        assert!(
            lookup(
                accepted.local_addr().unwrap(),
                accepted.peer_addr().unwrap()
            )
            .unwrap()
            .is_some()
        );
        drop(client);
    }
    // A dual-stack client: an AF_INET6 socket connected to an IPv4-mapped address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = std::net::TcpStream::connect(format!("[::ffff:127.0.0.1]:{port}")).unwrap();
    assert!(
        client.local_addr().unwrap().is_ipv6(),
        "the client socket is AF_INET6"
    );
    let (accepted, peer) = listener.accept().await.unwrap();
    assert!(peer.is_ipv4());
    let found = lookup(peer, accepted.local_addr().unwrap()).unwrap();
    assert_eq!(
        found.map(|o| o.uid),
        Some(uid),
        "a dual-stack client is found"
    );
    drop(client);
    // A tuple nobody has: no owner.
    let nobody = lookup(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    )
    .unwrap();
    assert_eq!(nobody, None);
    // A listener on the source port of a tuple nobody has (the kernel's fallback): no owner.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let source = format!("127.0.0.1:{port}").parse().unwrap();
    let fallback = lookup(source, "169.254.169.254:80".parse().unwrap()).unwrap();
    assert_eq!(fallback, None, "a listener is never the caller");
}

/// The cgroup map against a directory tree standing in for the cgroup v2 hierarchy (a cgroup's
/// id is its directory's inode).
#[test]
fn new_cgroups_are_named_by_one_shared_walk_and_unnamed_ones_are_not_walked_for_again() {
    let root = std::env::temp_dir().join(format!("credlock-peer-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("system.slice/a.service")).unwrap();
    let ino = |rel: &str| std::fs::metadata(root.join(rel)).unwrap().ino();
    let owner = |id| SocketOwner {
        uid: 7,
        cgroup_id: Some(id),
    };
    let identifier = Identifier::with_cgroup_root(Some(root.clone()));
    identifier.prime();
    let a = owner(ino("system.slice/a.service"));
    let Ok(known) = identifier.cached(a) else {
        panic!("primed: a.service is known")
    };
    let Identity::Identified(c) = &*known else {
        panic!("{known:?}")
    };
    assert_eq!((c.uid, c.unit.as_deref()), (7, Some("a.service")));
    assert!(
        Arc::ptr_eq(&known, &identifier.cached(a).unwrap()),
        "the same caller shares one identity"
    );

    // A service started after the walk: unknown to the cache, named by the next walk, which
    // waits for the rate limit instead of giving up.
    std::fs::create_dir_all(root.join("system.slice/b.service")).unwrap();
    let b = owner(ino("system.slice/b.service"));
    assert!(identifier.cached(b).is_err());
    let started = Instant::now();
    let Identity::Identified(c) = identifier.resolve_blocking(b) else {
        panic!("b.service is named")
    };
    assert_eq!(c.unit.as_deref(), Some("b.service"));
    assert!(
        started.elapsed() >= REWALK_INTERVAL / 2,
        "the walk waited for the interval"
    );

    // An id no walk can name (outside the hierarchy credlock sees): unidentified, then
    // remembered as such, without another walk.
    let invisible = owner(u64::MAX - 1);
    assert_eq!(
        identifier.resolve_blocking(invisible),
        Identity::Unidentified(Unidentified::LookupFailed)
    );
    let again = Instant::now();
    assert_eq!(
        identifier.resolve_blocking(invisible),
        Identity::Unidentified(Unidentified::LookupFailed)
    );
    assert!(
        again.elapsed() < REWALK_INTERVAL / 2,
        "no second walk for an unnamed id"
    );
    // No cgroup attribute at all: unidentified.
    let none = SocketOwner {
        uid: 7,
        cgroup_id: None,
    };
    assert_eq!(
        identifier.cached(none).map(|i| Identity::clone(&i)),
        Ok(Identity::Unidentified(Unidentified::LookupFailed))
    );
    std::fs::remove_dir_all(&root).unwrap();
}

proptest::proptest! {
    /// Whatever the kernel (or anything on the netlink socket) answers, parsing never panics:
    /// arbitrary bytes, and every truncation and single-byte change of a real answer.
    #[test]
    fn any_answer_parses_or_is_an_error_never_a_panic(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        cut in 0usize..200,
        at in 0usize..200,
        byte in proptest::prelude::any::<u8>(),
    ) {
        let _ = parse(&bytes);
        let mut real = answer(ESTABLISHED, 1000, Some(9));
        let _ = parse(&real[..cut.min(real.len())]);
        let i = at % real.len();
        real[i] = byte;
        let _ = parse(&real);
    }
}
