//! Who is calling: the process behind a client connection, looked up once per connection.
//!
//! credlock's firewall DNATs every other process's IMDS connection to credlock's listener, so
//! the client's own socket still names IMDS as its peer: `(client address:port -> IMDS:80)`. The
//! accepted socket gives the client's address and port, and `SO_ORIGINAL_DST` (conntrack) gives
//! the destination the client connected to. An exact `inet_diag` request (`sock_diag(7)`) for
//! that tuple returns the client socket's owner uid and, since Linux 5.7, the id of its cgroup v2
//! (`INET_DIAG_CGROUP_ID`), which is the inode number of the cgroup's directory. A connection
//! made straight to the listener (no DNAT) is looked up by its own tuple.
//!
//! Every failure is an explicit [`Unidentified`] reason, never a guess: the socket is gone or is
//! only a TIME_WAIT remnant (which sock_diag reports with uid 0: it must never read as root), the
//! client is not on this host (a container's forwarded connection), the lookup failed, or the
//! cgroup id could not be mapped to a path. The access policy treats all of them alike.
//!
//! The uid and cgroup are the socket's, fixed when it was created: a process that obtains a
//! socket from another process (SCM_RIGHTS) is seen as that process. The pid is not looked up
//! per connection: mapping a socket inode to a pid means reading other users'
//! `/proc/<pid>/fd`, which credlock (no capability) may not. The log lines name the processes
//! of the caller's cgroup instead (`gate.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    ErrorBuffer, NLM_F_REQUEST, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NlasIterator, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::access::{Caller, Identity, Unidentified};

/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h): a u64 in host byte order. netlink-packet-sock-diag
/// 0.5 has no typed attribute for it, so it is read from the raw attribute.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_NOCOOKIE`: an exact lookup by tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// The TCP states (include/net/tcp_states.h) a client socket can be in once its connection was
/// accepted: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. Everything else is
/// not the caller: TIME_WAIT (the kernel reports uid 0 and no cgroup for it), CLOSE,
/// NEW_SYN_RECV, and above all LISTEN: when no connected socket has the tuple, the kernel's
/// lookup falls back to a listener on the source port, whose owner is not the caller.
const CONNECTED_STATES: [u8; 6] = [1, 4, 5, 8, 9, 11];
/// How long one sock_diag answer may take; the kernel answers at once.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(200);
/// After a walk of the cgroup tree, the next starts no sooner than this: a process creating
/// cgroups cannot keep credlock walking. Walks run on the blocking pool, one at a time, never on
/// the thread that serves requests.
const REWALK_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on the cgroup tree walk.
const MAX_CGROUPS: usize = 100_000;
/// How long a cgroup id no walk could name stays unnamed without another walk, and how many
/// such ids are remembered.
const UNNAMED_TTL: Duration = Duration::from_secs(60);
const MAX_UNNAMED: usize = 4096;

/// What a lookup found: the client socket's owner and cgroup id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub cgroup_id: Option<u64>,
}

/// Identifies the process behind accepted connections (one per listener set; cheap to share).
pub struct Identifier {
    root: Option<PathBuf>,
    /// cgroup id (its directory's inode) -> path relative to the cgroup v2 root.
    paths: Mutex<HashMap<u64, String>>,
    /// Held while walking; when the last walk started.
    walk: Mutex<Option<Instant>>,
    /// cgroup ids a walk did not find, and when.
    unnamed: Mutex<HashMap<u64, Instant>>,
    /// The identities handed out, by (uid, cgroup id): a connection from a known caller costs
    /// a lookup and a reference count, not three strings (bounded like `paths`).
    shared: Mutex<HashMap<(u32, u64), Arc<Identity>>>,
}

impl Default for Identifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Identifier {
    /// Finds the cgroup v2 hierarchy from `/proc/self/mountinfo` (`/sys/fs/cgroup` on a unified
    /// host, `/sys/fs/cgroup/unified` on a hybrid one). Without one, callers have no unit.
    pub fn new() -> Self {
        let root = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|text| cgroup2_mount(&text));
        Self::with_cgroup_root(root)
    }

    /// Whether a cgroup v2 hierarchy was found. Without one no caller can be identified (every
    /// connection is unidentified): the caller logs it loudly.
    pub fn has_cgroups(&self) -> bool {
        self.root.is_some()
    }

    /// The cgroup v2 mount point, if found.
    pub fn cgroup_root(&self) -> Option<&std::path::Path> {
        self.root.as_deref()
    }

    /// An identifier that maps cgroup ids under `root` (tests).
    pub fn with_cgroup_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: Mutex::new(HashMap::new()),
            walk: Mutex::new(None),
            unnamed: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
        }
    }

    /// The identity behind `stream` (an accepted connection), all steps in a row (blocking:
    /// may walk the cgroup tree). Never fails: a failure is an [`Identity::Unidentified`].
    pub fn identify(&self, stream: &tokio::net::TcpStream) -> Identity {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
            return Identity::Unidentified(Unidentified::SocketGone);
        };
        match self.owner_of(stream, peer, local) {
            Err(reason) => Identity::Unidentified(reason),
            Ok(owner) => match self.cached(owner) {
                Ok(known) => Identity::clone(&known),
                Err(owner) => self.resolve_blocking(owner),
            },
        }
    }

    /// The fast step (a getsockopt and one sock_diag exchange): the client socket's owner.
    /// `peer` and `local`: the accepted socket's addresses (from accept and the listener, so
    /// no getpeername or getsockname per connection).
    pub fn owner_of(
        &self,
        stream: &tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<SocketOwner, Unidentified> {
        let destination = original_destination(stream, local).unwrap_or(local);
        match lookup(peer, destination) {
            Ok(Some(owner)) => Ok(owner),
            Ok(None) if is_local_address(peer.ip()) => Err(Unidentified::SocketGone),
            Ok(None) => Err(Unidentified::Forwarded),
            Err(e) => {
                tracing::debug!(error = %e, "sock_diag lookup failed");
                Err(Unidentified::LookupFailed)
            }
        }
    }

    /// The identity from what is already known. `Err(owner)`: its cgroup is new, and
    /// [`Identifier::resolve_blocking`] must walk the tree.
    pub fn cached(&self, owner: SocketOwner) -> Result<Arc<Identity>, SocketOwner> {
        let (Some(id), Some(_)) = (owner.cgroup_id, &self.root) else {
            tracing::debug!(uid = owner.uid, "sock_diag answered without a cgroup id");
            return Ok(Arc::new(Identity::Unidentified(Unidentified::LookupFailed)));
        };
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = shared.get(&(owner.uid, id)) {
            return Ok(known.clone());
        }
        let paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        let path = paths.get(&id).ok_or(owner)?;
        let known = Arc::new(caller(owner.uid, path));
        if shared.len() >= MAX_CGROUPS {
            shared.clear();
        }
        shared.insert((owner.uid, id), known.clone());
        Ok(known)
    }

    /// Walks the cgroup tree once (start-up, on a blocking thread), whatever the rate limit.
    pub fn prime(&self) {
        let Some(root) = &self.root else { return };
        let mut last_walk = self.walk.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let found = walk_cgroups(root);
        self.learn(found);
        *last_walk = Some(started);
    }

    /// The slow step, for a blocking thread: names the owner's cgroup by walking the cgroup
    /// tree. Walks are one at a time and at most one per `REWALK_INTERVAL`; a caller waits for
    /// the first walk that starts after it arrived (all callers waiting meanwhile share it), so
    /// a process creating cgroups delays only callers in new cgroups, by about the interval.
    /// What a walk finds is added to what is known. A cgroup such a walk did not find (outside
    /// credlock's cgroup namespace, or gone) is remembered as unnamed for a minute. A cgroup
    /// that cannot be named cannot be matched against `units`: unidentified, so that a fresh
    /// cgroup never slips past a unit rule.
    pub fn resolve_blocking(&self, owner: SocketOwner) -> Identity {
        let arrived = Instant::now();
        let unidentified = Identity::Unidentified(Unidentified::LookupFailed);
        let (Some(root), Some(id)) = (&self.root, owner.cgroup_id) else {
            return unidentified;
        };
        if self.is_unnamed(id) {
            tracing::debug!(cgroup_id = id, "a cgroup no walk could name (remembered)");
            return unidentified;
        }
        let mut last_walk = self.walk.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(known) = self.cached(owner) {
            return Identity::clone(&known);
        }
        if !last_walk.is_some_and(|started| started >= arrived) {
            if let Some(wait) = last_walk.and_then(|t| REWALK_INTERVAL.checked_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            let started = Instant::now();
            let found = walk_cgroups(root);
            self.learn(found);
            *last_walk = Some(started);
        }
        // A walk that started after this connection arrived saw every cgroup that existed then,
        // this one's included, if it is visible at all.
        self.cached(owner)
            .map(|known| Identity::clone(&known))
            .unwrap_or_else(|_| {
                let mut unnamed = self.unnamed.lock().unwrap_or_else(|e| e.into_inner());
                if unnamed.len() >= MAX_UNNAMED {
                    unnamed.clear();
                }
                unnamed.insert(id, Instant::now());
                tracing::debug!(cgroup_id = id, "a walk did not find this cgroup");
                unidentified
            })
    }

    fn learn(&self, found: HashMap<u64, String>) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if paths.len() + found.len() > 2 * MAX_CGROUPS {
            paths.clear();
        }
        paths.extend(found);
    }

    fn is_unnamed(&self, id: u64) -> bool {
        let unnamed = self.unnamed.lock().unwrap_or_else(|e| e.into_inner());
        unnamed
            .get(&id)
            .is_some_and(|at| at.elapsed() < UNNAMED_TTL)
    }
}

fn caller(uid: u32, path: &str) -> Identity {
    Identity::Identified(Caller {
        uid,
        unit: unit_of(path),
        cgroup: Some(path.to_owned()),
        pid: None,
    })
}

/// The destination the client connected to, before the firewall's DNAT. None when conntrack has
/// no entry (no NAT table loaded) or the answer is the listener itself.
fn original_destination(stream: &tokio::net::TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let found = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).ok().map(|sa| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
                u16::from_be(sa.sin_port),
            )
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst).ok().map(|sa| {
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                u16::from_be(sa.sin6_port),
            )
        }),
    };
    found.filter(|d| *d != local)
}

/// Errors of the sock_diag exchange itself (not "no such socket", which is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("sock_diag answer: {0}")]
    Decode(String),
    #[error("sock_diag answered with error {0}")]
    Kernel(i32),
}

/// The owner of the TCP socket whose local end is `source` and remote end is `destination`, by
/// an exact inet_diag request. `Ok(None)`: no such full socket in this network namespace.
pub fn lookup(
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<Option<SocketOwner>, LookupError> {
    let family = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => return Ok(None),
    };
    DIAG.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let socket = Socket::new(NETLINK_SOCK_DIAG)?;
            setsockopt(
                &socket,
                sockopt::ReceiveTimeout,
                &TimeVal::new(0, LOOKUP_TIMEOUT.as_micros() as _),
            )
            .map_err(std::io::Error::from)?;
            *slot = Some((socket, 0, vec![0; ANSWER_BUFFER]));
        }
        let Some((socket, sequence, buf)) = slot.as_mut() else {
            return Err(LookupError::Decode("no netlink socket".into()));
        };
        *sequence = sequence.wrapping_add(1);
        let result = exchange(socket, buf, *sequence, family, source, destination);
        if result.is_err() {
            // A socket that failed or fell out of step is replaced on the next lookup.
            *slot = None;
        }
        result
    })
}

thread_local! {
    /// One sock_diag socket per thread, kept, with its sequence number and receive buffer: a
    /// lookup is then one send and one receive, without an allocation or a buffer to clear.
    static DIAG: std::cell::RefCell<Option<(Socket, u32, Vec<u8>)>> = const { std::cell::RefCell::new(None) };
}

/// Room for one answer: an exact lookup's is a few hundred bytes (one `inet_diag_msg` and its
/// attributes, or an error echoing the request).
const ANSWER_BUFFER: usize = 8192;

/// One request and its answer. An answer to an earlier request that timed out carries another
/// sequence number and is skipped.
fn exchange(
    socket: &Socket,
    buf: &mut [u8],
    sequence: u32,
    family: u8,
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<Option<SocketOwner>, LookupError> {
    let mut request = [0u8; REQUEST_ROOM];
    let len = write_request(&mut request, family, source, destination, sequence)?;
    socket.send(&request[..len], 0)?;
    for _ in 0..4 {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let answered = buf
            .get(8..12)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        if n >= 16 && answered == Some(sequence) {
            return parse_answer(&buf[..n], source, destination);
        }
    }
    Err(LookupError::Decode(
        "no answer carries this request's sequence number".into(),
    ))
}

/// The request: NLM_F_REQUEST without NLM_F_DUMP is an exact lookup (`inet_diag_find_one_icsk`).
pub fn request_bytes(
    family: u8,
    source: SocketAddr,
    destination: SocketAddr,
    sequence: u32,
) -> Vec<u8> {
    let mut buf = [0u8; REQUEST_ROOM];
    let len = write_request(&mut buf, family, source, destination, sequence).unwrap_or(0);
    buf[..len].to_vec()
}

/// Room for one request (a netlink header and an `inet_diag_req_v2`: 72 bytes).
const REQUEST_ROOM: usize = 128;

/// [`request_bytes`] into `buf`, without allocating; the request's length.
fn write_request(
    buf: &mut [u8; REQUEST_ROOM],
    family: u8,
    source: SocketAddr,
    destination: SocketAddr,
    sequence: u32,
) -> Result<usize, LookupError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: source.port(),
                destination_port: destination.port(),
                source_address: source.ip(),
                destination_address: destination.ip(),
                interface_id: 0,
                cookie: NO_COOKIE,
            },
        })
        .into(),
    );
    packet.finalize();
    let len = packet.buffer_len();
    let Some(room) = buf.get_mut(..len) else {
        return Err(LookupError::Decode(format!("a request of {len} bytes")));
    };
    packet.serialize(room);
    Ok(len)
}

/// Reads the kernel's answer to [`request_bytes`] for the tuple `source -> destination`: one
/// `InetResponse`, or an error message (`ENOENT`: no such socket). Anything else is a decode
/// error. The answer counts only for a connected socket with exactly that tuple; anything else
/// (a listener the kernel fell back to, a TIME_WAIT remnant reported with uid 0) is `None`.
pub fn parse_answer(
    bytes: &[u8],
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<Option<SocketOwner>, LookupError> {
    // The crates' buffer views (no allocation on the per-connection path), not the owned
    // message types.
    let decode = |e: netlink_packet_core::DecodeError| LookupError::Decode(e.to_string());
    let message = NetlinkBuffer::new_checked(bytes).map_err(decode)?;
    let payload = message.payload();
    match message.message_type() {
        SOCK_DIAG_BY_FAMILY => {
            let header = InetResponseHeader::parse(payload).map_err(decode)?;
            let id = &header.socket_id;
            // A dual-stack client (an AF_INET6 socket connected to `::ffff:169.254.169.254`,
            // Java's default) sends IPv4 and is looked up as IPv4; the kernel answers in the
            // socket's own family, with IPv4-mapped addresses: compare canonical forms.
            let same_tuple = id.source_address.to_canonical() == source.ip().to_canonical()
                && id.source_port == source.port()
                && id.destination_address.to_canonical() == destination.ip().to_canonical()
                && id.destination_port == destination.port();
            // No inode: no process holds the socket any more. A TIME_WAIT mini-socket is
            // reported in its substate (FIN_WAIT2 among them) with uid 0, inode 0 and no
            // cgroup; an orphan (closed by its process, still sending) has inode 0 too. Either
            // way the caller is gone, not unknown.
            if !same_tuple || !CONNECTED_STATES.contains(&header.state) || header.inode == 0 {
                return Ok(None);
            }
            let mut cgroup_id = None;
            for nla in NlasIterator::new(payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default()) {
                let nla = nla.map_err(decode)?;
                if nla.kind() == INET_DIAG_CGROUP_ID
                    && let Ok(value) = <[u8; 8]>::try_from(nla.value())
                {
                    cgroup_id = Some(u64::from_ne_bytes(value));
                }
            }
            Ok(Some(SocketOwner {
                uid: header.uid,
                cgroup_id,
            }))
        }
        NLMSG_ERROR => match ErrorBuffer::new_checked(payload).map_err(decode)?.code() {
            Some(code) if code.get() == -libc::ENOENT => Ok(None),
            Some(code) => Err(LookupError::Kernel(code.get())),
            None => Err(LookupError::Decode(
                "an acknowledgement instead of an answer".into(),
            )),
        },
        other => Err(LookupError::Decode(format!(
            "unexpected message type {other}"
        ))),
    }
}

/// `struct inet_diag_msg` (linux/inet_diag.h): its attributes follow it.
const INET_DIAG_MSG_LEN: usize = 72;

/// Whether `ip` is assigned to one of this host's interfaces (a DNATed local client) rather than
/// a forwarded container's address.
fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs.into_iter().any(|a| {
        a.address.is_some_and(|sa| {
            sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())) == Some(ip)
                || sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())) == Some(ip)
        })
    })
}

/// Every cgroup directory under `root` by inode, as "/a/b" paths ("/" for the root).
fn walk_cgroups(root: &Path) -> HashMap<u64, String> {
    let mut paths = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::from("/"))];
    while let Some((dir, rel)) = stack.pop() {
        if paths.len() >= MAX_CGROUPS {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        paths.insert(meta.ino(), rel.clone());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if rel == "/" {
                    format!("/{name}")
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((entry.path(), child));
            }
        }
    }
    paths
}

/// The cgroup v2 mount point named in mountinfo (`- cgroup2` filesystem type).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The system manager's unit a cgroup path belongs to: its outermost `.service` or `.scope`
/// component (`/system.slice/nginx.service` -> `nginx.service`; a user manager's children ->
/// `user@1000.service`; a login session -> `session-3.scope`). None for slices and the root.
pub fn unit_of(path: &str) -> Option<String> {
    path.split('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

#[path = "peer_groups.rs"]
mod groups;
pub use groups::{GroupCache, SystemDirectory};

#[cfg(test)]
#[path = "peer_tests.rs"]
mod tests;
