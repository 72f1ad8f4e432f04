#!/bin/bash
# netns_firewall_test.sh: prove with the real kernel that credlock-firewall makes credlock
# impossible to bypass. Root only. See tests/root/README-firewall.md.
#
#   tests/root/netns_firewall_test.sh [--backend nft|iptables|iptables-legacy|all]
#                                     [--containers refuse|redirect|all]
#
# Default (and "all"): nft and iptables (whatever `iptables` is, iptables-nft on Debian 12) x
# refuse and redirect. iptables-legacy (opt-in) runs the iptables backend with the legacy
# iptables/ip6tables(-restore/-save) binaries first on PATH.
#
# Topology (all in namespaces this script creates and deletes; names carry the PID):
#
#   container ns ──veth── bridge br-cl<PID> ┐ instance ns (ip_forward on)        imds ns
#   10.213.0.2/24                10.213.0.1 │ credlock (as clfw-cred-<PID>) ──veth── IMDS emulator
#   fd00:c1::2/64                fd00:c1::1 ┘ apps (as clfw-app-<PID>, root)       169.254.169.254:80
#                                             169.254.0.2/16, fd00:ec2::2/64       [fd00:ec2::254]:80
#
# For every backend x container mode: start target/debug/credlock as its own user inside a cgroup
# of its own (clfw-<PID>/credlock under the cgroup v2 hierarchy: the stand-in for
# system.slice/credlock.service, named to the script with CREDLOCK_SERVICE_CGROUP), check the
# topology without rules (control), load the boot-mode rules (`apply --boot`: root direct, every
# other process redirected), tighten them to the strict set (`apply`), then assert the properties
# listed in tests/root/README-firewall.md: the exemption (credlock's uid in its cgroup; the same
# uid elsewhere is redirected; a recreated cgroup is re-pinned by `check`), IPv6 segment routing
# refused, the lock (an unprivileged user cannot hold, plant or redirect it), the rules coming
# back after `nft flush ruleset`, a replay of Debian's nftables.service reload/stop/restart and
# an iptables-restore (`watch` running), the state file; stop credlock (fail closed) and remove.
# Prints PASS/FAIL per check and "N passed, M failed"; exits 1 on any failure.
#
# CREDLOCK_BIN overrides target/debug/credlock. CREDLOCK_FW_TEST_STANDIN=1 (development only)
# uses tests/root/netns_standin_proxy.py instead and always records a FAIL. CREDLOCK_FIREWALL_SCRIPT
# overrides systemd/credlock-firewall (mutation testing).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib.sh
. "$HERE/../lib.sh" # pass, fail, expect*, summary, COMBO, at_exit, stop_pids, wait_*, cgroup2_root
FW=${CREDLOCK_FIREWALL_SCRIPT:-$ROOT/systemd/credlock-firewall} # override: mutation tests
FW_DEFAULTS=$ROOT/systemd/credlock-firewall.defaults
EMULATOR=$ROOT/tests/support/imds_emulator.py
CREDLOCK_BIN=${CREDLOCK_BIN:-$ROOT/target/debug/credlock}
VENV=${CREDLOCK_VENV:-$ROOT/.venv}
PY=/usr/bin/python3 # readable by every user (a pyenv interpreter is not)
SITE=$VENV/lib/python3.11/site-packages
STANDIN=${CREDLOCK_FW_TEST_STANDIN:-0}

BACKENDS="nft iptables"
MODES="refuse redirect"
while (($# > 0)); do
    case $1 in
    --backend)
        BACKENDS=${2:?--backend needs nft, iptables or all}
        shift 2
        ;;
    --containers)
        MODES=${2:?--containers needs refuse, redirect or all}
        shift 2
        ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (see --help)" >&2
        exit 2
        ;;
    esac
done
[[ $BACKENDS == all ]] && BACKENDS="nft iptables"
[[ $MODES == all ]] && MODES="refuse redirect"
for b in $BACKENDS; do [[ $b =~ ^(nft|iptables|iptables-legacy)$ ]] || { echo "bad backend $b" >&2 && exit 2; }; done
for m in $MODES; do [[ $m == refuse || $m == redirect ]] || { echo "bad container mode $m" >&2 && exit 2; }; done
if [[ $(id -u) != 0 ]]; then
    echo "netns_firewall_test.sh must run as root (namespaces, users, netfilter)" >&2
    exit 2
fi

# ---- names (unique per run) ------------------------------------------------------------------
ID=$$
P=cl-fw-$ID
NS_I=$P-instance NS_M=$P-imds NS_C=$P-container
V_I=cfi$ID V_M=cfm$ID V_H=cfh$ID V_C=cfc$ID # veth ends (<= 15 chars)
BR=br-cl$ID                                 # matches the default CREDLOCK_CONTAINER_IFACES "br-+"
CRED_USER=clfw-cred-$ID APP_USER=clfw-app-$ID
OK_USER=clfw-ok-$ID V2_USER=clfw-v2-$ID ROLE_USER=clfw-role-$ID # the access policy's other classes (netns_access_checks.sh)
IMDS4=169.254.169.254 IMDS6=fd00:ec2::254
CTL=127.0.0.1:9999 # emulator control, inside the imds namespace
SR_HOP=fd00:ec2::253 # a segment-routing hop in the imds namespace (seg6_enabled): forwards to IMDS
ADMIN=127.0.0.1:9169
IID="i-0123456789abcdef0"
TMP=$(mktemp -d /tmp/cl-fw-test.XXXXXX)
chmod 755 "$TMP"
at_exit rm -rf "$TMP"
EMU_PID="" UDP_PID="" SINK_PID="" CREDLOCK_PID="" WATCH_PID="" HOLDER_PID="" HAMMER_PID="" CREATED_USERS=()
# The harness marker: the script honours its test-only variables (CREDLOCK_FIREWALL_RUNDIR,
# CREDLOCK_SERVICE_CGROUP, ...) only with it, and only outside systemd (no INVOCATION_ID).
export CREDLOCK_FIREWALL_TEST=1
unset INVOCATION_ID
# credlock's stand-in for system.slice/credlock.service: a cgroup two levels down in the cgroup
# v2 hierarchy (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
CG2=$(cgroup2_root)
CG_REL=clfw-$ID/credlock
CG_DIR=$CG2/$CG_REL
WATCH_INTERVAL=1 # CREDLOCK_CHECK_INTERVAL of the `watch` started by the tests
LOCK_WAIT=1      # CREDLOCK_FIREWALL_LOCK_WAIT: how long apply waits for a lock held by root
# The "apply does not wait for a lock a user holds" checks run with a long wait, so that waiting
# (>= AT_ONCE_WAIT s) and not waiting (an apply, well under AT_ONCE_MS even on a loaded 2-core
# machine: 1.6 s was seen there) cannot be confused.
AT_ONCE_WAIT=10
AT_ONCE_MS=5000

# What the run creates, undone at exit (after the processes in it are stopped). Deleting the
# namespaces deletes their veths, bridge and every rule loaded inside them.
# shellcheck disable=SC2317 # run at exit
teardown() {
    local ns u
    for ns in "$NS_C" "$NS_I" "$NS_M"; do
        ip netns del "$ns" 2>/dev/null
    done
    for u in "${CREATED_USERS[@]}"; do
        userdel "$u" 2>/dev/null
    done
    if [[ -n $CG2 ]]; then
        rmdir_wait 2 "$CG_DIR" "$CG2/clfw-$ID"/*.service "$CG2/clfw-$ID"
    fi
}
at_exit teardown
# Background processes are started as `ip netns exec NS [env ...] [setpriv ...] PROGRAM &`: each
# of those execs the next, so $! is the program itself and can be stopped by its PID.
# shellcheck disable=SC2317 # run at exit
stop_processes() {
    if [[ -n $HAMMER_PID ]]; then : >"$TMP/hammer.stop"; fi
    stop_pids 5 "$CREDLOCK_PID" "$SINK_PID" "$UDP_PID" "$EMU_PID" "$WATCH_PID" "$HOLDER_PID" "$HAMMER_PID" "$MOTO_PID"
}
at_exit stop_processes
# shellcheck source=tests/root/netns_access_checks.sh
source "$HERE/netns_access_checks.sh"

in_i() { ip netns exec "$NS_I" "$@"; }
in_m() { ip netns exec "$NS_M" "$@"; }
in_c() { ip netns exec "$NS_C" "$@"; }
as_app() { ip netns exec "$NS_I" runuser -u "$APP_USER" -- "$@"; }
# credlock's uid outside credlock's cgroup (the test's own cgroup): a "same uid elsewhere".
as_cred() { ip netns exec "$NS_I" runuser -u "$CRED_USER" -- "$@"; }
# in_cg COMMAND...: COMMAND joins the test's credlock cgroup first (so do its sockets).
in_cg() { sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" "$@"; }
# credlock's uid inside credlock's cgroup: what credlock itself is.
as_cred_cg() {
    in_cg ip netns exec "$NS_I" setpriv --reuid "$(id -u "$CRED_USER")" --regid "$(id -g "$CRED_USER")" \
        --clear-groups -- "$@"
}
CURL=(curl -sS -g --connect-timeout 3 --max-time 6)

# Sum of credlock_requests_total over all labels (proves a request went through credlock).
credlock_requests() {
    in_i curl -s --max-time 3 "http://$ADMIN/metrics" |
        awk '$1 ~ /^credlock_requests_total(\{|$)/ { s += $NF } END { printf "%d\n", s }'
}
emulator_requests() {
    in_m curl -s --max-time 3 "http://$CTL/requests" | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))'
}
# Requests the upstream got straight from the container's addresses (credlock's come from the
# instance's 169.254.0.2 / fd00:ec2::2; the imds namespace routes back to the container subnets).
emulator_requests_from_container() {
    in_m curl -s --max-time 3 "http://$CTL/requests" | "$PY" -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin) if r["client"][0] in ("10.213.0.2", "fd00:c1::2")))'
}
emulator_clear() { in_m curl -s --max-time 3 -X POST "http://$CTL/requests/clear" >/dev/null; }

# probe WHO tcp|udp HOST PORT -> "result ms"
probe() {
    local who=$1
    shift
    case $who in
    app) as_app "$PY" "$HERE/netns_probe.py" "$@" ;;
    cred) as_cred "$PY" "$HERE/netns_probe.py" "$@" ;;
    cred_cg) as_cred_cg "$PY" "$HERE/netns_probe.py" "$@" ;;
    root) in_i "$PY" "$HERE/netns_probe.py" "$@" ;;
    container) in_c "$PY" "$HERE/netns_probe.py" "$@" ;;
    esac
}
# expect_fast_refusal NAME WHO PROTO HOST PORT: refused/unreachable (an active reject) in < 1 s.
expect_fast_refusal() {
    local name=$1
    shift
    expect_refusal "$name" "$(probe "$@")"
}

# ---- setup -------------------------------------------------------------------------------------
setup_topology() {
    ip netns add "$NS_I" && ip netns add "$NS_M" && ip netns add "$NS_C" || return 1
    ip link add "$V_I" type veth peer name "$V_M" || return 1
    ip link set "$V_I" netns "$NS_I" && ip link set "$V_M" netns "$NS_M" || return 1
    ip -n "$NS_I" link set lo up && ip -n "$NS_M" link set lo up && ip -n "$NS_C" link set lo up || return 1
    ip -n "$NS_I" addr add 169.254.0.2/16 dev "$V_I" &&
        ip -n "$NS_M" addr add "$IMDS4/16" dev "$V_M" &&
        ip -n "$NS_I" -6 addr add fd00:ec2::2/64 dev "$V_I" nodad &&
        ip -n "$NS_M" -6 addr add "$IMDS6/64" dev "$V_M" nodad &&
        ip -n "$NS_I" link set "$V_I" up && ip -n "$NS_M" link set "$V_M" up || return 1
    # A segment-routing hop next to IMDS: it processes an SRH and forwards to the next segment
    # (IMDS), as a router that honours segment routing would (control: it really gets there).
    ip -n "$NS_M" -6 addr add "$SR_HOP/64" dev "$V_M" nodad &&
        in_m sysctl -qw net.ipv6.conf.all.seg6_enabled=1 "net.ipv6.conf.$V_M.seg6_enabled=1" || return 1
    # The container bridge inside "instance", its own subnets, default routes via the bridge.
    ip -n "$NS_I" link add "$BR" type bridge &&
        ip -n "$NS_I" addr add 10.213.0.1/24 dev "$BR" &&
        ip -n "$NS_I" -6 addr add fd00:c1::1/64 dev "$BR" nodad &&
        ip -n "$NS_I" link set "$BR" up || return 1
    ip link add "$V_H" type veth peer name "$V_C" &&
        ip link set "$V_H" netns "$NS_I" && ip link set "$V_C" netns "$NS_C" &&
        ip -n "$NS_I" link set "$V_H" master "$BR" up &&
        ip -n "$NS_C" addr add 10.213.0.2/24 dev "$V_C" &&
        ip -n "$NS_C" -6 addr add fd00:c1::2/64 dev "$V_C" nodad &&
        ip -n "$NS_C" link set "$V_C" up &&
        ip -n "$NS_C" route add default via 10.213.0.1 &&
        ip -n "$NS_C" -6 route add default via fd00:c1::1 || return 1
    in_i sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 || return 1
    # Routes back to the container subnets instead of NAT, so that without credlock's rules a
    # container really does reach the upstream (the control check below).
    ip -n "$NS_M" route add 10.213.0.0/24 via 169.254.0.2 &&
        ip -n "$NS_M" -6 route add fd00:c1::/64 via fd00:ec2::2 || return 1
    # The container plays attacker for CVE-2020-8558: it sends 127.0.0.0/8 to the bridge
    # instead of its own loopback, as a crafted packet from a neighbour would arrive.
    ip -n "$NS_C" route del local 127.0.0.1 dev lo table local &&
        ip -n "$NS_C" route del local 127.0.0.0/8 dev lo table local &&
        ip -n "$NS_C" route add 127.0.0.0/8 via 10.213.0.1 dev "$V_C" &&
        in_c sysctl -qw net.ipv4.conf.all.route_localnet=1 "net.ipv4.conf.$V_C.route_localnet=1" || return 1
}

setup_users() {
    local u
    for u in "$CRED_USER" "$APP_USER" "$OK_USER" "$V2_USER" "$ROLE_USER"; do
        if ! id -u "$u" >/dev/null 2>&1; then
            useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$u" || return 1
            CREATED_USERS+=("$u")
        fi
    done
}

# The UDP echo (imds namespace, :5353) and the loopback sink (instance namespace, :5300) listen.
# shellcheck disable=SC2317 # called through wait_until/wait_ready
udp_servers_bound() {
    ip netns exec "$NS_M" ss -Huln 'sport = :5353' | grep -q . &&
        ip netns exec "$NS_I" ss -Huln 'sport = :5300' | grep -q .
}

start_emulator() {
    ip netns exec "$NS_M" "$PY" "$EMULATOR" --listen "$IMDS4:80" --listen "[$IMDS6]:80" \
        --listen "$IMDS4:8080" --listen "[$IMDS6]:8080" --control "$CTL" \
        >"$TMP/emulator.out" 2>"$TMP/emulator.err" &
    EMU_PID=$!
    # A UDP echo next to it (bounded: exits after an hour without traffic; the suite takes up to
    # ~7 min on a loaded machine, and an earlier 300 s bound let it exit mid-suite).
    ip netns exec "$NS_M" "$PY" -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("169.254.169.254", 5353))
s.settimeout(3600)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
' 2>/dev/null &
    UDP_PID=$!
    # A host-loopback-only UDP service in "instance" that records what reaches it (CVE-2020-8558).
    ip netns exec "$NS_I" "$PY" -u -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 5300))
s.settimeout(3600)
while True:
    data, peer = s.recvfrom(64)
    print(data.decode(errors="replace"), peer[0], flush=True)
' >"$TMP/loopback-sink.log" 2>/dev/null &
    SINK_PID=$!
    wait_until 10 udp_servers_bound
    wait_ready "$EMU_PID" 10 grep -q '^control ' "$TMP/emulator.out" && return 0
    echo "IMDS emulator did not start:" >&2
    cat "$TMP/emulator.out" "$TMP/emulator.err" >&2
    return 1
}

credlock_command() {
    if [[ $STANDIN == 1 ]]; then
        echo "$PY" "$HERE/netns_standin_proxy.py"
    else
        # shellcheck disable=SC2086 # CREDLOCK_EXTRA: extra words (start_credlock splits the line)
        echo "$CREDLOCK_BIN" run --upstream "http://$IMDS4" --admin-listen "$ADMIN" ${CREDLOCK_EXTRA:-}
    fi
}

# credlock answers on its admin listener and accepts on 127.0.0.1:8169 and [::1]:8169.
# shellcheck disable=SC2317 # called through wait_until/wait_ready
credlock_listening() {
    in_i curl -s -o /dev/null --max-time 1 "http://$ADMIN/metrics" &&
        [[ $(probe root tcp 127.0.0.1 8169 1) == connected* ]] &&
        [[ $(probe root tcp ::1 8169 1) == connected* ]]
}

start_credlock() {
    local uid gid cmd
    uid=$(id -u "$CRED_USER") gid=$(id -g "$CRED_USER")
    read -ra cmd <<<"$(credlock_command)"
    # setpriv execs (no fork), so $! is credlock itself, in its cgroup (in_cg). No route to
    # STS/EC2/checkip here: credlock holds no locked credentials, but passthrough (instance-id)
    # works, and only through the exemption (credlock's own requests to IMDS go direct).
    # (sh -c, not the in_cg function: a function in the background would be a subshell's PID.)
    # (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup v2 hierarchy credlock
    # maps its callers' cgroups with; systemd starts credlock with /sys as the host has it.)
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" \
        nsenter --net="/run/netns/$NS_I" env -i PATH=/usr/bin:/bin HOME=/ AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL_STS="${STS_URL:-http://127.0.0.1:9}" AWS_ENDPOINT_URL_EC2=http://127.0.0.1:9 \
        setpriv --reuid "$uid" --regid "$gid" --clear-groups -- "${cmd[@]}" \
        >>"$TMP/credlock.log" 2>&1 &
    CREDLOCK_PID=$!
    wait_ready "$CREDLOCK_PID" 15 credlock_listening && return 0
    echo "credlock did not start listening; log:" >&2
    tail -n 30 "$TMP/credlock.log" >&2
    return 1
}

stop_credlock() {
    stop_pids 7 "$CREDLOCK_PID"
    CREDLOCK_PID=""
}

# container_reaches_host_loopback TAG: a datagram from the container to the bridge, addressed to
# 127.0.0.1:5300, arrives at the instance's loopback-only service.
container_reaches_host_loopback() {
    in_c "$PY" -c 'import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), ("127.0.0.1", 5300))' "$1" 2>/dev/null
    # Up to 2 s for the sink to log it (a loaded machine); a blocked datagram never arrives.
    wait_until 2 grep -q "^$1 " "$TMP/loopback-sink.log"
}

# srh_probe WHO: an HTTP GET for instance-id to [IMDS6]:80 carrying a segment-routing header
# (IPV6_RTHDR, type 4, set by the process itself: no privilege needed) whose first segment is
# SR_HOP, so the packet leaves for SR_HOP and IMDS is only the last segment. Prints
# "answered:<body>|refused|unreachable|timeout|error:NAME <ms>".
SRH_PROBE='
import errno, socket, struct, sys, time
final, hop = sys.argv[1], sys.argv[2]
pack = lambda a: socket.inet_pton(socket.AF_INET6, a)
# segments[0] is replaced by the connect() address (the final destination); the packet is sent
# to segments[segments_left] = hop.
srh = struct.pack("!BBBBBBH", 0, 4, 4, 1, 1, 0, 0) + pack(final) + pack(hop)
start = time.monotonic()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(1.0)
try:
    s.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_RTHDR", 57), srh)
    s.connect((final, 80))
    s.sendall(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: x\r\nX-Clfw-Probe: srh\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    result = "answered:" + (data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip() or "-")
except OSError as err:
    if isinstance(err, socket.timeout):
        result = "timeout"
    elif err.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        result = "refused"
    elif err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
        result = "unreachable"
    else:
        result = "error:" + errno.errorcode.get(err.errno or 0, str(err.errno))
print(result, int((time.monotonic() - start) * 1000))
'
srh_probe() {
    case $1 in
    app) as_app "$PY" -c "$SRH_PROBE" "$IMDS6" "$SR_HOP" ;;
    root) in_i "$PY" -c "$SRH_PROBE" "$IMDS6" "$SR_HOP" ;;
    container) in_c "$PY" -c "$SRH_PROBE" "$IMDS6" "$SR_HOP" ;;
    esac
}
# Requests the upstream got from srh_probe (its X-Clfw-Probe header), from anyone.
emulator_srh_requests() {
    in_m curl -s --max-time 3 "http://$CTL/requests" | "$PY" -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin) if any(h[0].lower() == "x-clfw-probe" for h in r["headers"])))'
}
# expect_srh_blocked NAME WHO: the segment-routed request gets no answer and the upstream sees
# nothing (the sender may see a timeout: the kernel cannot match the ICMP error to its socket).
expect_srh_blocked() {
    local out before after
    before=$(emulator_srh_requests)
    out=$(srh_probe "$2" 2>&1)
    after=$(emulator_srh_requests)
    if [[ $out != answered:* && $before == "$after" ]]; then
        pass "$1 (${out% *}, upstream saw nothing)"
    else
        fail "$1" "got '$out', upstream requests $before -> $after"
    fi
}

# ---- firewall helpers --------------------------------------------------------------------------
# The script runs with nsenter (not `ip netns exec`, which mounts a fresh /sys without
# /sys/fs/cgroup): it needs the cgroup hierarchy to pin credlock's cgroup.
fw() { nsenter --net="/run/netns/$NS_I" -- "$FW" "$@" --backend "${BACKEND%-legacy}"; }
# state_field KEY: a value of the state file written by apply/remove/check.
state_field() { sed -n "s/^$1=//p" "$CREDLOCK_FIREWALL_RUNDIR/state" 2>/dev/null; }
# state_summary: "backend ipv4 ipv6 fresh|stale|none" (fresh: checked within the last 10 s).
state_summary() {
    local checked age
    checked=$(state_field checked)
    if [[ -z $checked ]]; then
        age=none
    elif (($(date +%s) - checked <= 10)); then
        age=fresh
    else
        age=stale
    fi
    echo "$(state_field backend) $(state_field ipv4) $(state_field ipv6) $age"
}
# owner_mode PATH: "uid:octal-mode:type" (type: f regular, d directory, l symlink, - none).
owner_mode() {
    local t=-
    if [[ -L $1 ]]; then t=l; elif [[ -f $1 ]]; then t=f; elif [[ -d $1 ]]; then t=d; fi
    if [[ $t == - ]]; then echo "-"; else echo "$(stat -c %u:%a -- "$1"):$t"; fi
}

# Rules of credlock currently loaded (lines mentioning an IMDS address, plus iptables jumps).
live_rule_count() {
    if [[ $BACKEND == nft ]]; then
        in_i nft list ruleset | grep -cE "169\.254\.169\.254|fd00:ec2::254"
    else
        { in_i iptables-save && in_i ip6tables-save; } | grep -cE '^-A .*CREDLOCK'
    fi
}
# expected_rule_count [--boot]
expected_rule_count() {
    if [[ $BACKEND == nft ]]; then
        fw render "$@" | grep -v '^#' | grep -cE "169\.254\.169\.254|fd00:ec2::254"
    else
        fw render "$@" | grep -cE '^-A |^# jump:'
    fi
}
# status_line [ARGS]: "EXIT first-two-words-of-stdout", e.g. "0 mode: boot".
status_line() {
    local out rc
    out=$(fw status "$@" 2>/dev/null)
    rc=$?
    read -r a b _ <<<"$out"
    echo "$rc $a $b"
}
# One copy of the table / of each jump.
expect_one_copy() {
    if [[ $BACKEND == nft ]]; then
        expect "$1: exactly one 'table inet credlock'" 1 "$(in_i nft list tables | grep -c '^table inet credlock$')"
    else
        expect "$1: each CREDLOCK chain jumped to exactly once (5 per family)" "5 5" \
            "$(in_i iptables-save | grep -c -- '-j CREDLOCK-') $(in_i ip6tables-save | grep -c -- '-j CREDLOCK-')"
    fi
}
add_unrelated_rule() {
    if [[ $BACKEND == nft ]]; then
        in_i nft add table inet clfw_unrelated
    else
        in_i iptables -w -C OUTPUT -d 192.0.2.1/32 -m comment --comment clfw-unrelated -j ACCEPT 2>/dev/null ||
            in_i iptables -w -A OUTPUT -d 192.0.2.1/32 -m comment --comment clfw-unrelated -j ACCEPT
    fi
}
unrelated_rule_present() {
    if [[ $BACKEND == nft ]]; then
        in_i nft list table inet clfw_unrelated >/dev/null 2>&1
    else
        in_i iptables -w -C OUTPUT -d 192.0.2.1/32 -m comment --comment clfw-unrelated -j ACCEPT 2>/dev/null
    fi
}
del_unrelated_rule() {
    if [[ $BACKEND == nft ]]; then
        in_i nft delete table inet clfw_unrelated 2>/dev/null
    else
        in_i iptables -w -D OUTPUT -d 192.0.2.1/32 -m comment --comment clfw-unrelated -j ACCEPT 2>/dev/null
    fi
    return 0
}

# Removing credlock's rules the way routine operations do. The replay of Debian's
# nftables.service: ExecReload= and ExecStart= are `nft -f /etc/nftables.conf` (the default file
# starts with `flush ruleset`), ExecStop= is `nft flush ruleset`. iptables-restore: a full
# restore of the ruleset saved before credlock's rules were loaded (netfilter-persistent start,
# RHEL's iptables.service).
write_debian_nftables_conf() {
    cat >"$TMP/nftables.conf" <<'EOF'
#!/usr/sbin/nft -f

flush ruleset

table inet filter {
	chain input {
		type filter hook input priority filter;
	}
	chain forward {
		type filter hook forward priority filter;
	}
	chain output {
		type filter hook output priority filter;
	}
}
EOF
}
routine_op() {
    case $1 in
    "nft flush ruleset") in_i nft flush ruleset ;;
    "nftables.service reload (nft -f nftables.conf)") in_i nft -f "$TMP/nftables.conf" ;;
    "nftables.service stop (nft flush ruleset)") in_i nft flush ruleset ;;
    "nftables.service restart (stop + start)") in_i nft flush ruleset && in_i nft -f "$TMP/nftables.conf" ;;
    "iptables-restore of a saved ruleset") in_i iptables-restore -w <"$TMP/saved4" && in_i ip6tables-restore -w <"$TMP/saved6" ;;
    esac
}
# Does OP remove this backend's rules? (iptables-nft keeps its tables in nftables; nft's own
# table is not touched by iptables-restore; legacy iptables is not touched by nft.)
op_removes() {
    case $BACKEND/$1 in
    nft/iptables-restore* | iptables-legacy/n*) return 1 ;;
    *) return 0 ;;
    esac
}
# wait_strict SECONDS: poll status until the strict rules are in place; prints the time taken
# ("N ms") or "not within N s".
wait_strict() {
    local start now
    start=$(date +%s%N)
    while :; do
        now=$(date +%s%N)
        if [[ $(status_line --strict | cut -d' ' -f1) == 0 ]]; then
            echo "$(((now - start) / 1000000)) ms"
            return 0
        fi
        if (((now - start) / 1000000000 >= $1)); then
            echo "not within $1 s"
            return 1
        fi
        sleep 0.2
    done
}
start_watch() {
    CREDLOCK_CHECK_INTERVAL=$WATCH_INTERVAL nsenter --net="/run/netns/$NS_I" -- \
        "$FW" watch --backend "${BACKEND%-legacy}" >>"$TMP/watch.log" 2>&1 &
    WATCH_PID=$!
}
stop_watch() {
    [[ -n $WATCH_PID ]] || return 0
    stop_pids 5 "$WATCH_PID"
    WATCH_PID=""
    sleep 0.5 # a check it started may still be finishing (at most one, bounded)
}
warnings_logged() { grep -c "WARNING: credlock's rules are NOT in place" "$TMP/watch.log" 2>/dev/null || true; }

# hold_lock app|root FILE: a process that opens FILE read-only (enough for flock) and holds an
# exclusive lock on it until release_lock (one process: setpriv and python exec, no fork).
hold_lock() {
    local -a who=()
    if [[ $1 == app ]]; then
        who=(setpriv --reuid "$(id -u "$APP_USER")" --regid "$(id -g "$APP_USER")" --clear-groups --)
    fi
    "${who[@]}" "$PY" -c 'import fcntl, sys, time
f = open(sys.argv[1], "rb")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(30)' "$2" >"$TMP/holder.out" 2>&1 &
    HOLDER_PID=$!
    wait_until 3 grep -q held "$TMP/holder.out" && return 0
    fail "the lock holder ($1) holds $2" "$(cat "$TMP/holder.out")"
}
release_lock() {
    stop_pids 5 "$HOLDER_PID"
    HOLDER_PID=""
}

# -- the lock: root's alone; nothing an unprivileged user does can block or redirect apply.
lock_checks() {
    local out rc t0 ms lock=$CREDLOCK_FIREWALL_RUNDIR/lock planted
    expect "run directory root 0755, lock root 0600, state root 0644" \
        "0:755:d 0:600:f 0:644:f" \
        "$(owner_mode "$CREDLOCK_FIREWALL_RUNDIR") $(owner_mode "$lock") $(owner_mode "$CREDLOCK_FIREWALL_RUNDIR/state")"
    if as_app flock -n "$lock" true 2>/dev/null; then
        fail "app user cannot open (and so cannot hold) the lock"
    else
        pass "app user cannot open (and so cannot hold) the lock"
    fi
    if as_app sh -c "ln -s /tmp/x '$CREDLOCK_FIREWALL_RUNDIR/lock.x' || : >'$CREDLOCK_FIREWALL_RUNDIR/lock.y'" 2>/dev/null ||
        [[ -e $CREDLOCK_FIREWALL_RUNDIR/lock.x || -e $CREDLOCK_FIREWALL_RUNDIR/lock.y ]]; then
        fail "app user cannot create a file or symlink in the run directory"
    else
        pass "app user cannot create a file or symlink in the run directory"
    fi
    # The old attack: a lock file in world-writable /run/lock, pre-created and held by a user.
    : >"$TMP/user-lock"
    chown "$APP_USER" "$TMP/user-lock"
    hold_lock app "$TMP/user-lock"
    t0=$(date +%s%N)
    out=$(CREDLOCK_FIREWALL_LOCK_WAIT=$AT_ONCE_WAIT CREDLOCK_FIREWALL_LOCK=$TMP/user-lock fw apply 2>&1)
    rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
    if [[ $rc == 0 && $ms -lt $AT_ONCE_MS && $out == *"CREDLOCK_FIREWALL_LOCK ignored"* ]]; then
        pass "a user holding a pre-created lock at the old path (CREDLOCK_FIREWALL_LOCK) does not delay apply ($ms ms)"
    else
        fail "a user holding a pre-created lock at the old path does not delay apply" "rc=$rc, $ms ms: $out"
    fi
    # Planted in the run directory (only root can: as if by an earlier bug), held by the user:
    # replaced, never followed, never waited for.
    : >"$TMP/victim"
    chown "$APP_USER" "$TMP/victim"
    rm -f "$lock"
    ln -s "$TMP/victim" "$lock"
    t0=$(date +%s%N)
    out=$(CREDLOCK_FIREWALL_LOCK_WAIT=$AT_ONCE_WAIT fw apply 2>&1)
    rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
    expect "a symlink planted as the lock: apply exits 0 at once, the target is untouched, the lock is root's 0600 again" \
        "0 fast 0:600:f $(id -u "$APP_USER"):644:f" \
        "$rc $([[ $ms -lt $AT_ONCE_MS ]] && echo fast || echo "${ms}ms") $(owner_mode "$lock") $(owner_mode "$TMP/victim")"
    release_lock
    rm -f "$lock"
    : >"$lock"
    chown "$APP_USER" "$lock"
    chmod 0644 "$lock"
    hold_lock app "$lock"
    t0=$(date +%s%N)
    out=$(CREDLOCK_FIREWALL_LOCK_WAIT=$AT_ONCE_WAIT fw apply 2>&1)
    rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
    expect "a lock file owned and held by the app user: apply exits 0 at once and replaces it" \
        "0 fast 0:600:f" "$rc $([[ $ms -lt $AT_ONCE_MS ]] && echo fast || echo "${ms}ms") $(owner_mode "$lock")"
    release_lock
    # A whole run directory planted (owned by the app user, no strict marker: a try to get boot
    # mode back, and a held lock): moved aside, and this boot counts as strict.
    planted=$TMP/run-planted
    mkdir -p "$planted"
    chown "$APP_USER" "$planted"
    : >"$planted/lock"
    chown "$APP_USER" "$planted/lock"
    hold_lock app "$planted/lock"
    t0=$(date +%s%N)
    out=$(CREDLOCK_FIREWALL_LOCK_WAIT=$AT_ONCE_WAIT CREDLOCK_FIREWALL_RUNDIR=$planted CREDLOCK_BOOT_EXEMPT_ROOT=yes fw apply --boot 2>&1)
    rc=$? ms=$((($(date +%s%N) - t0) / 1000000))
    expect "a run directory planted by the app user: apply --boot exits 0 at once, loads strict, the directory is root's again" \
        "0 fast 0 0:755:d yes" \
        "$rc $([[ $ms -lt $AT_ONCE_MS ]] && echo fast || echo "${ms}ms") $(status_line --strict | cut -d' ' -f1) $(owner_mode "$planted") $([[ -e $planted/strict-loaded ]] && echo yes || echo no)"
    release_lock
    # Root holding the lock (a hung apply): apply goes on after CREDLOCK_FIREWALL_LOCK_WAIT and
    # the rules are in place; remove fails and removes nothing (fail closed both ways).
    hold_lock root "$lock"
    out=$(fw apply 2>&1)
    rc=$?
    expect "root holding the lock: apply goes on after ${LOCK_WAIT} s (exit 0, strict in place)" "0 0" \
        "$rc $(status_line --strict | cut -d' ' -f1)"
    out=$(fw remove 2>&1)
    rc=$?
    expect "root holding the lock: remove fails (1) and the strict rules stay" "1 0" \
        "$rc $(status_line --strict | cut -d' ' -f1)"
    release_lock
}

# -- routine operations: with `watch` running, each is followed by the rules coming back.
survive_checks() {
    local op ms warned before out
    write_debian_nftables_conf
    : >"$TMP/watch.log"
    start_watch
    sleep 0.5
    for op in "nft flush ruleset" "nftables.service reload (nft -f nftables.conf)" \
        "nftables.service stop (nft flush ruleset)" "nftables.service restart (stop + start)" \
        "iptables-restore of a saved ruleset"; do
        warned=$(warnings_logged)
        # Under the firewall's lock, so that no check runs between the operation and the look
        # at what it did (the watch waits for the lock, at most CREDLOCK_FIREWALL_LOCK_WAIT).
        exec 8>>"$CREDLOCK_FIREWALL_RUNDIR/lock"
        flock 8
        if routine_op "$op" >"$TMP/op.log" 2>&1; then
            out=$(status_line --strict)
        else
            out="the operation failed: $(tr '\n' ' ' <"$TMP/op.log")"
        fi
        flock -u 8
        exec 8>&-
        if op_removes "$op"; then
            expect "$op: removes credlock's rules" "3 mode: none" "$out"
        else
            expect "$op: leaves credlock's rules alone" "0 mode: strict" "$out"
        fi
        if ms=$(wait_strict $((WATCH_INTERVAL + 3))); then
            pass "$op: the strict rules are back within $((WATCH_INTERVAL + 3)) s (check every $WATCH_INTERVAL s): $ms"
        else
            fail "$op: the strict rules are back within $((WATCH_INTERVAL + 3)) s (check every $WATCH_INTERVAL s)" "$ms"
        fi
        if op_removes "$op"; then
            # The watch prints a pass's log when the pass has ended: just after the re-apply.
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                (($(warnings_logged) > warned)) && break
                sleep 0.2
            done
            expect "$op: the check logged a WARNING" 1 "$(($(warnings_logged) - warned))"
        fi
        expect "$op: state file afterwards: strict, fresh" "${BACKEND%-legacy} strict strict fresh" "$(state_summary)"
    done
    before=$(credlock_requests)
    out=$(as_app "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(as_app "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    expect "after all that: the app user is redirected to credlock (v4, v6)" "$IID $IID +2" "$out +$(($(credlock_requests) - before))"
    # remove on purpose: the check reports it (state file "missing", kept fresh), puts nothing back.
    warned=$(warnings_logged)
    fw remove >/dev/null 2>&1
    sleep 1
    before=$(state_field checked)
    sleep $((WATCH_INTERVAL + 1))
    expect "remove with the watch running: the rules stay out (status 3), no re-apply logged" "3 mode: none +0" \
        "$(status_line) +$(($(warnings_logged) - warned))"
    expect "remove with the watch running: the check keeps the state file fresh, saying missing" \
        "${BACKEND%-legacy} missing missing fresh newer" \
        "$(state_summary) $([[ $(state_field checked) -gt $before ]] && echo newer || echo "not rewritten")"
    fw apply >/dev/null 2>&1
    sleep $((WATCH_INTERVAL + 1))
    expect "apply after remove: strict again, state file strict" "0 ${BACKEND%-legacy} strict strict fresh" \
        "$(status_line --strict | cut -d' ' -f1) $(state_summary)"
    stop_watch
    add_unrelated_rule # a flush took it too
}

# -- nftables.service's commands as the drop-in (systemd/nftables-credlock.conf) defines them:
#    the operator's file (or `flush ruleset`) and credlock's table in ONE nft transaction. An
#    unprivileged user asks IMDS for the role's credentials non-stop (a new connection each time,
#    IPv4 and IPv6: every one is a new NAT decision); the raw credentials (the emulator's ASIAV1/
#    ASIAV2 keys) must never arrive. Control: Debian's original commands followed by the
#    re-apply (what credlock-firewall-reapply.service does, ~250 ms later; 1 s here, so that the
#    hammer surely sees the window) do let them through.
write_hammer() {
    cat >"$TMP/hammer.py" <<'EOF'
import json, os, socket, sys, threading, time
stop, role = sys.argv[1], sys.argv[2]
req = ("GET /latest/meta-data/iam/security-credentials/%s HTTP/1.0\r\nHost: x\r\n\r\n" % role).encode()
counts = {"raw": 0, "answer": 0, "refused": 0, "error": 0, "raw_at": []}
lock = threading.Lock()
def one(family, host):
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # Short: a DNATed connection in flight when the last NAT chain goes stalls (nothing
            # translates its packets any more); the hammer must not stall with it.
            s.settimeout(0.5)
            s.connect((host, 80))
            s.sendall(req)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return "raw" if b"ASIAV1" in data or b"ASIAV2" in data or b"ASIAID" in data else "answer"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "error"
def loop(family, host):
    while not os.path.exists(stop):
        r = one(family, host)
        with lock:
            counts[r] += 1
            if r == "raw":
                counts["raw_at"].append("%.3f %s" % (time.time(), host))
ts = [threading.Thread(target=loop, args=a) for a in
      ((socket.AF_INET, "169.254.169.254"), (socket.AF_INET6, "fd00:ec2::254"))]
for t in ts: t.start()
for t in ts: t.join()
counts["raw_at"] = counts["raw_at"][:20]
print(json.dumps(counts), flush=True)
EOF
    chmod 644 "$TMP/hammer.py"
}
# hammer_start: the app user asks IMDS for the role's credentials until hammer_stop.
hammer_start() {
    rm -f "$TMP/hammer.stop" "$TMP/hammer.out"
    as_app "$PY" "$TMP/hammer.py" "$TMP/hammer.stop" credlock-test-role >"$TMP/hammer.out" 2>&1 &
    HAMMER_PID=$!
    sleep 0.5
}
# hammer_stop: sets HAMMER to "RAW ANSWERED REFUSED ERRORS" (counts of the answers it got). Not
# in a command substitution: `wait` works only in the shell that started the hammer.
hammer_stop() {
    : >"$TMP/hammer.stop"
    wait "$HAMMER_PID" 2>/dev/null
    HAMMER_PID=""
    HAMMER=$("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["raw"], c["answer"], c["refused"], c["error"], " ".join(c["raw_at"]))' \
        "$TMP/hammer.out" 2>/dev/null) || HAMMER="? ? ? ? $(head -c 300 "$TMP/hammer.out")"
}
# A stale conntrack entry: credlock's connection to IMDS ends without conntrack seeing it (here:
# its RST is not tracked; in the hammer below an RST from the server did it about once in 25,000
# connections), the entry stays ESTABLISHED with credlock's null NAT binding, and the app user
# binds the freed port and connects with the same tuple. Conntrack "ignores" that SYN and lets
# it pass with the old entry: no DNAT, and `ct state new` does not match.
stale_conntrack_checks() {
    local host port pid out entry
    for host in "$IMDS4" "$IMDS6"; do
        port=$((41000 + RANDOM % 2000))
        rm -f "$TMP/stale.go"
        as_cred_cg "$PY" "$HERE/netns_stale_ct.py" hold "$host" "$port" "$TMP/stale.go" >"$TMP/stale.out" 2>&1 &
        pid=$!
        wait_until 5 grep -q connected "$TMP/stale.out"
        in_i nft -f - <<EOF
table inet clfw_stale_$ID {
    chain out { type filter hook output priority raw; tcp sport $port notrack; }
    chain pre { type filter hook prerouting priority raw; tcp dport $port notrack; }
}
EOF
        touch "$TMP/stale.go"
        wait "$pid"
        in_i nft delete table inet "clfw_stale_$ID"
        # The setup must have worked, or the check below proves nothing.
        entry=$(in_i grep -c "ESTABLISHED .*sport=$port dport=80 " /proc/net/nf_conntrack)
        out=$(as_app "$PY" "$HERE/netns_stale_ct.py" reuse "$host" "$port")
        expect "stale conntrack entry ($host, credlock's closed connection, state ESTABLISHED): the app user reusing its tuple is refused, never answered by IMDS" \
            "connected closed 1 refused" "$(tr '\n' ' ' <"$TMP/stale.out")$entry $out"
    done
}

# The drop-in's commands, run the way systemd runs them for nftables.service.
dropin_op() {
    case $1 in
    reload | start) fw nft-load "$TMP/nftables.conf" ;;
    stop) fw nft-flush ;;
    restart) fw nft-flush && fw nft-load "$TMP/nftables.conf" ;;
    rhel-reload) fw nft-load --flush "$TMP/nftables.conf" ;;
    esac
}
atomic_reload_checks() {
    local op i rounds=8 out bad t0 ms raw answer refused err raw_at win w0
    write_debian_nftables_conf
    write_hammer
    # Without a usable credlock configuration the file still loads (nftables.service must).
    out=$(CREDLOCK_USER=clfw-nosuchuser-$ID fw nft-load "$TMP/nftables.conf" 2>&1)
    expect "drop-in, credlock's configuration unusable: nft-load still loads the operator's file (exit 0, table inet filter present, logged)" \
        "0 yes yes" "$? $(in_i nft list table inet filter >/dev/null 2>&1 && echo yes || echo no) $([[ $out == *"without credlock's table"* ]] && echo yes || echo "no: $out")"
    fw apply >/dev/null 2>&1
    # A file nft refuses: nothing changes, credlock's rules stay, exit 1 (as `nft -f FILE`).
    echo 'table inet clfw_broken { chain c { bogus } }' >"$TMP/broken.conf"
    fw nft-load "$TMP/broken.conf" >/dev/null 2>&1
    expect "drop-in, a file nft refuses: exit 1, nothing changed (strict rules still in place)" "1 0" \
        "$? $(status_line --strict | cut -d' ' -f1)"
    expect "drop-in: nft-load FILE without an absolute path is a usage error (2)" 2 \
        "$(fw nft-load nftables.conf >/dev/null 2>&1; echo $?)"

    # Control first: the original commands + the re-apply leave a window the hammer sees.
    if op_removes "nftables.service reload"; then
        hammer_start
        t0=$(date +%s%N)
        for i in 1 2 3; do
            in_i nft -f "$TMP/nftables.conf"
            sleep 1
            fw apply --boot >/dev/null 2>&1
            sleep 0.2
        done
        ms=$((($(date +%s%N) - t0) / 1000000))
        hammer_stop
        read -r raw answer refused err raw_at <<<"$HAMMER"
        if [[ $raw =~ ^[0-9]+$ ]] && ((raw > 0)); then
            pass "control: Debian's reload (nft -f nftables.conf), re-apply 1 s later, 3 times: the app user got RAW credentials $raw times ($answer via credlock, $refused refused, $err errors in $ms ms)"
        else
            fail "control: Debian's reload, re-apply 1 s later: the hammer sees the window (raw credentials)" \
                "raw=$raw answer=$answer refused=$refused error=$err"
        fi
    fi

    hammer_start
    t0=$(date +%s%N)
    bad=""
    for i in $(seq 1 "$rounds"); do
        for op in reload stop restart rhel-reload; do
            if ! dropin_op "$op" >"$TMP/op.log" 2>&1; then
                bad+=" $op(failed: $(tail -n 1 "$TMP/op.log"))"
            elif [[ $(status_line --strict | cut -d' ' -f1) != 0 ]]; then
                bad+=" $op(not strict afterwards)"
            fi
        done
    done
    ms=$((($(date +%s%N) - t0) / 1000000))
    hammer_stop
    read -r raw answer refused err raw_at <<<"$HAMMER"
    expect "drop-in: $rounds x nftables.service reload, stop, restart, RHEL reload: each exits 0 and leaves the strict rules" "" "$bad"
    # (iptables backend: credlock's nft table only bridges the transaction, then goes.)
    expect "drop-in: the operator's table inet filter loaded; credlock's nft table: $([[ $BACKEND == nft ]] && echo 1 || echo 0)" \
        "yes $([[ $BACKEND == nft ]] && echo 1 || echo 0)" \
        "$(in_i nft list table inet filter >/dev/null 2>&1 && echo yes || echo no) $(in_i nft list tables | grep -c '^table inet credlock$')"
    # No raw answer at all. The rare single raw answers measured earlier (4-5 in 100,000, with or
    # without these operations) were SYNs reusing a stale conntrack entry (stale_conntrack_checks);
    # the rules now refuse those: a few connections of a hammering user are refused (measured
    # 12-20 in 95,000), none is answered by IMDS.
    if [[ $raw =~ ^[0-9]+$ && $answer =~ ^[0-9]+$ && $err == 0 ]] && ((answer > 50 && raw == 0 && refused <= answer / 2000 + 5)); then
        pass "drop-in: an unprivileged user hammering IMDS during $((rounds * 4)) nftables.service operations: 0 raw (Debian's commands: thousands), $answer via credlock, $refused refused (stale conntrack entries), 0 errors in $ms ms"
    else
        fail "drop-in: no raw answer, at most 1 in 2,000 (+5) refused" \
            "raw=$raw answer=$answer refused=$refused error=$err in $ms ms; raw at: $raw_at"
    fi
    if ((${raw:-0} > 0)); then echo "INFO [$COMBO] drop-in: RAW answers at: $raw_at"; fi
    expect_one_copy "after the drop-in's commands"
    expect "after the drop-in's commands: state file strict" "${BACKEND%-legacy} strict strict fresh" "$(state_summary)"

    # iptables backends: netfilter-persistent / RHEL iptables.service (iptables-restore of whole
    # tables) followed at once by the re-apply: the window that remains, measured (information).
    if [[ $BACKEND == iptables* ]]; then
        hammer_start
        t0=$(date +%s%N)
        win=0
        for i in 1 2 3 4 5; do
            w0=$(date +%s%N)
            in_i iptables-restore -w <"$TMP/saved4" && in_i ip6tables-restore -w <"$TMP/saved6"
            fw apply --boot >/dev/null 2>&1
            win=$((win + ($(date +%s%N) - w0) / 1000000))
            sleep 0.3
        done
        ms=$((($(date +%s%N) - t0) / 1000000))
        hammer_stop
        read -r raw answer refused err raw_at <<<"$HAMMER"
        echo "INFO [$COMBO] residual: iptables-restore of a saved ruleset + immediate re-apply (apply --boot), 5 times: about $((win / 5)) ms without credlock's chains each; raw credentials $raw times ($answer via credlock, $refused refused, $err errors in $ms ms)"
        fw apply >/dev/null 2>&1
    fi
    add_unrelated_rule
}

# -- credlock restarts: systemd makes a new cgroup (new id); the exemption follows it.
repin_checks() {
    local out before id1 id2
    id1=$(stat -c %i "$CG_DIR")
    stop_credlock
    rmdir "$CG_DIR" && mkdir "$CG_DIR"
    id2=$(stat -c %i "$CG_DIR")
    expect "the test cgroup was recreated (new id)" yes "$([[ $id1 != "$id2" ]] && echo yes || echo "no ($id1 $id2)")"
    # The loaded exemption names the old cgroup: a process of credlock's uid in the new one is
    # not exempt (redirected, and credlock is down: refused). Fail closed.
    expect_fast_refusal "stale exemption: credlock's uid in the recreated cgroup is not let through" cred_cg tcp "$IMDS4" 80
    expect "stale exemption: status reports the rules as not matching (3)" 3 "$(status_line | cut -d' ' -f1)"
    out=$(fw check 2>&1)
    expect "check re-pins the exemption to the new cgroup (exit 0, logged, strict)" "0 yes 0" \
        "$? $([[ $out == *"cgroup changed"* ]] && echo yes || echo "no: $out") $(status_line --strict | cut -d' ' -f1)"
    out=$(as_cred_cg "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    expect "after re-pinning: credlock's uid in the new cgroup reaches the upstream directly" "$IID" "$out"
    if ! start_credlock; then
        fail "credlock starts again in the recreated cgroup"
        return
    fi
    before=$(credlock_requests)
    out=$(as_app "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    expect "credlock restarted in the new cgroup: the app user gets answers through it" "$IID +1" \
        "$out +$(($(credlock_requests) - before))"
}

# ---- the checks --------------------------------------------------------------------------------
run_combo() {
    BACKEND=$1 MODE=$2 COMBO="$1/$2"
    local out rc before after n1 n2 expected token saved_path=$PATH t
    echo "=== backend=$BACKEND containers=$MODE"
    if [[ $BACKEND == iptables-legacy ]]; then
        mkdir -p "$TMP/legacy"
        for t in iptables ip6tables; do
            ln -sf "$(command -v "$t-legacy")" "$TMP/legacy/$t"
            ln -sf "$(command -v "$t-legacy-restore")" "$TMP/legacy/$t-restore"
            ln -sf "$(command -v "$t-legacy-save")" "$TMP/legacy/$t-save"
        done
        export PATH=$TMP/legacy:$PATH
    fi
    local failed_before=$FAILED
    run_checks
    if ((FAILED > failed_before)); then
        echo "# credlock log (last 20 lines):"
        tail -n 20 "$TMP/credlock.log" 2>/dev/null | sed 's/^/#   /'
    fi
    export PATH=$saved_path
    COMBO=""
}

run_checks() {
    local out rc before after n1 n2 expected token
    export CREDLOCK_FIREWALL_CONFIG=$FW_DEFAULTS CREDLOCK_USER=$CRED_USER CREDLOCK_CONTAINERS=$MODE
    export CREDLOCK_FIREWALL_RUNDIR=$TMP/run CREDLOCK_SERVICE_CGROUP=$CG_REL CREDLOCK_FIREWALL_LOCK_WAIT=$LOCK_WAIT
    if ! start_credlock; then
        fail "credlock starts as $CRED_USER and listens on 127.0.0.1:8169, [::1]:8169, $ADMIN"
        return
    fi

    # -- controls: without the rules the topology really lets everyone reach the upstream.
    emulator_clear
    fw status >/dev/null 2>&1
    expect "status before apply exits 3" 3 "$?"
    out=$(fw render 2>&1)
    rc=$?
    fw status >/dev/null 2>&1
    if [[ $rc == 0 && $out == *"$IMDS4"* && $(live_rule_count) == 0 ]]; then
        pass "render prints the rules and loads nothing"
    else
        fail "render prints the rules and loads nothing" "rc=$rc, $(live_rule_count) rules loaded"
    fi
    before=$(credlock_requests)
    out=$(as_app "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "control: without rules the app user reaches the upstream directly (credlock not involved)" \
        "$IID $before" "$out $after"
    out=$(in_c "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    expect "control: without rules the container reaches the upstream directly (IPv4)" "$IID" "$out"
    out=$(in_c "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    expect "control: without rules the container reaches the upstream directly (IPv6)" "$IID" "$out"
    expect "control: the upstream saw those two from the container's own addresses" 2 "$(emulator_requests_from_container)"
    # IPv6 segment routing: IMDS as the last segment, the packet addressed to a hop that honours
    # it. Without the rules it gets there (for an unprivileged user and a container alike).
    before=$(emulator_srh_requests)
    out=$(srh_probe app 2>&1)
    expect "control: without rules an unprivileged IPV6_RTHDR (segment routing) request reaches the upstream" \
        "answered:$IID +1" "${out% *} +$(($(emulator_srh_requests) - before))"
    out=$(srh_probe container 2>&1)
    expect "control: without rules a segment-routed request from the container reaches the upstream" "answered:$IID" "${out% *}"
    if [[ $MODE == redirect ]]; then
        # What route_localnet=1 alone opens (CVE-2020-8558); apply must close it again.
        in_i sysctl -qw "net.ipv4.conf.$BR.route_localnet=1"
        if container_reaches_host_loopback "control-$ID-$BACKEND"; then
            pass "control: with route_localnet=1 and no guard the container reaches host loopback services"
        else
            fail "control: with route_localnet=1 and no guard the container reaches host loopback services"
        fi
        in_i sysctl -qw "net.ipv4.conf.$BR.route_localnet=0"
    fi

    expect "status before apply prints 'mode: none'" "3 mode: none" "$(status_line)"

    # -- 8. boot mode: what credlock-firewall.service loads at boot (`apply --boot`). Root keeps
    #    direct access to IMDS port 80 (cloud-init reads IMDS as root before credlock runs);
    #    every other uid is redirected from the first moment, containers as always.
    add_unrelated_rule
    # What an iptables-restore of "the saved ruleset" puts back later: everything but credlock's.
    in_i iptables-save >"$TMP/saved4" && in_i ip6tables-save >"$TMP/saved6"
    rm -f "$TMP/run/strict-loaded" # a new boot (/run is empty after a reboot)
    export CREDLOCK_BOOT_EXEMPT_ROOT=yes
    out=$(fw apply --boot 2>&1)
    rc=$?
    expect "apply --boot exits 0" 0 "$rc"
    [[ $rc == 0 ]] || echo "$out"
    n1=$(live_rule_count)
    fw apply --boot >/dev/null 2>&1
    n2=$(live_rule_count)
    expected=$(expected_rule_count --boot)
    expect "apply --boot twice leaves exactly one copy of the boot-mode rules ($expected rules)" "$expected $expected" "$n1 $n2"
    expect_one_copy "boot mode"
    expect "boot mode: status exits 0 and prints 'mode: boot'" "0 mode: boot" "$(status_line)"
    expect "boot mode: status --strict exits 3" 3 "$(status_line --strict | cut -d' ' -f1)"
    emulator_clear
    before=$(credlock_requests)
    out=$(in_i "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(in_i "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "boot mode: root reaches the upstream directly (v4, v6; credlock not involved)" \
        "$IID $IID +0" "$out +$((after - before))"
    token=$(in_i "${CURL[@]}" -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "http://$IMDS4/latest/api/token" 2>&1)
    out=$(in_i "${CURL[@]}" -H "X-aws-ec2-metadata-token: $token" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    expect "boot mode: root IMDSv2 token PUT + GET directly" "$IID +0" "$out +$(($(credlock_requests) - after))"
    expect_fast_refusal "boot mode: root: other IMDS ports stay refused ($IMDS4:8080)" root tcp "$IMDS4" 8080
    expect_fast_refusal "boot mode: root: UDP to IMDS stays refused" root udp "$IMDS4" 5353
    before=$(credlock_requests)
    out=$(as_app "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(as_app "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "boot mode: app user is redirected to credlock (v4, v6)" "$IID $IID +2" "$out +$((after - before))"
    expect_fast_refusal "boot mode: app user: $IMDS4:8080 refused" app tcp "$IMDS4" 8080
    # Container processes run as root in their namespace, but forwarded packets have no local
    # owner: the exemption never applies to them.
    if [[ $MODE == refuse ]]; then
        expect_fast_refusal "boot mode: container (root inside) $IMDS4:80 refused" container tcp "$IMDS4" 80
    else
        before=$(credlock_requests)
        out=$(in_c "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
        after=$(credlock_requests)
        expect "boot mode: container (root inside) $IMDS4:80 answered by credlock" "$IID +1" "$out +$((after - before))"
    fi
    expect_fast_refusal "boot mode: container [$IMDS6]:80 refused" container tcp "$IMDS6" 80
    expect "boot mode: upstream saw no request from the container's own addresses" 0 "$(emulator_requests_from_container)"
    before=$(credlock_requests)
    out=$(as_cred "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    expect "boot mode: credlock's uid outside credlock's cgroup is redirected to credlock" "$IID +1" \
        "$out +$(($(credlock_requests) - before))"
    expect_srh_blocked "boot mode: app user's segment-routed request to IMDS never reaches it" app
    expect_srh_blocked "boot mode: root's segment-routed request never reaches IMDS (root's exemption is port 80 only)" root
    expect "boot mode: state file written by apply" "${BACKEND%-legacy} boot boot fresh" "$(state_summary)"
    # Removed by hand before credlock was ready: check puts back the boot-mode rules (this boot's
    # mode), not strict ones, and not nothing.
    if [[ $BACKEND == nft ]]; then in_i nft flush ruleset; else routine_op "iptables-restore of a saved ruleset"; fi
    out=$(fw check 2>&1)
    expect "boot mode: rules removed by hand, check re-applies boot mode (exit 0, 'mode: boot', state boot)" \
        "0 0 mode: boot ${BACKEND%-legacy} boot boot fresh" "$? $(status_line) $(state_summary)"
    add_unrelated_rule

    # -- 6. apply (strict: what credlock.service's ExecStartPost= loads once credlock is ready),
    #    twice, and count. It replaces the boot-mode set in one transaction.
    out=$(fw apply 2>&1)
    rc=$?
    expect "apply (strict, replacing boot mode) exits 0" 0 "$rc"
    [[ $rc == 0 ]] || echo "$out"
    fw status >/dev/null 2>&1
    expect "status after apply exits 0" 0 "$?"
    n1=$(live_rule_count)
    fw apply >/dev/null 2>&1
    n2=$(live_rule_count)
    expected=$(expected_rule_count)
    expect "apply twice leaves exactly one copy of the strict rules ($expected rules)" "$expected $expected" "$n1 $n2"
    expect_one_copy "strict mode"
    expect "strict mode: status prints 'mode: strict'" "0 mode: strict" "$(status_line)"
    expect "strict mode: status --strict exits 0" 0 "$(status_line --strict | cut -d' ' -f1)"
    # Restarting credlock-firewall.service (or nftables.service) or reloading it runs
    # `apply --boot` again: once strict was loaded in this boot, it stays strict.
    fw apply --boot >/dev/null 2>&1
    expect "after strict, apply --boot keeps the strict rules (status --strict 0, $expected rules)" \
        "0 $expected" "$(status_line --strict | cut -d' ' -f1) $(live_rule_count)"

    # -- 1. the app user and root get answers through credlock (v4, v6, IMDSv2 token flow).
    before=$(credlock_requests)
    out=$(as_app "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "app user: http://$IMDS4/ instance-id answered via credlock" "$IID +1" "$out +$((after - before))"
    before=$after
    out=$(as_app "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "app user: http://[$IMDS6]/ instance-id answered via credlock" "$IID +1" "$out +$((after - before))"
    for addr in "$IMDS4" "[$IMDS6]"; do
        before=$(credlock_requests)
        token=$(as_app "${CURL[@]}" -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
            "http://$addr/latest/api/token" 2>&1)
        out=$(as_app "${CURL[@]}" -H "X-aws-ec2-metadata-token: $token" \
            "http://$addr/latest/meta-data/instance-id" 2>&1)
        after=$(credlock_requests)
        expect "app user: IMDSv2 token PUT + GET on $addr via credlock" "$IID +2" "$out +$((after - before))"
    done
    before=$(credlock_requests)
    out=$(in_i "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "strict mode: root (uid 0) is redirected too" "$IID +1" "$out +$((after - before))"
    before=$(credlock_requests)
    out=$(in_i "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "strict mode: root (uid 0) is redirected too (IPv6)" "$IID +1" "$out +$((after - before))"

    # -- 2. boto3/botocore on its default endpoint (no endpoint env var), as the app user.
    before=$(credlock_requests)
    out=$(as_app env -i PATH=/usr/bin:/bin HOME=/ PYTHONPATH="$SITE" "$PY" "$HERE/netns_boto_imds.py" ipv4 2>&1)
    after=$(credlock_requests)
    expect "boto3 InstanceMetadataFetcher, default endpoint, IMDSv2, via credlock" \
        "http://169.254.169.254/ v2 $IID +2" "$out +$((after - before))"
    before=$after
    out=$(as_app env -i PATH=/usr/bin:/bin HOME=/ PYTHONPATH="$SITE" "$PY" "$HERE/netns_boto_imds.py" ipv6 2>&1)
    after=$(credlock_requests)
    expect "boto3 InstanceMetadataFetcher, IPv6 endpoint mode, IMDSv2, via credlock" \
        "http://[fd00:ec2::254]/ v2 $IID +2" "$out +$((after - before))"

    # -- 3. credlock's own traffic (its uid in its cgroup) reaches the real upstream directly;
    #    the same uid anywhere else (a host-network container whose user has that number) is
    #    redirected like everyone.
    before=$(credlock_requests)
    out=$(as_cred_cg "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(as_cred_cg "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "credlock's uid in credlock's cgroup reaches the upstream directly (v4, v6), not itself" "$IID $IID +0" "$out +$((after - before))"
    out=$(probe cred_cg tcp "$IMDS4" 8080)
    expect "credlock's uid in credlock's cgroup reaches other IMDS ports (8080 is open upstream)" connected "${out%% *}"
    out=$(probe cred_cg udp "$IMDS4" 5353)
    expect "credlock's uid in credlock's cgroup reaches IMDS over UDP (echo on 5353)" reply "${out%% *}"
    before=$(credlock_requests)
    out=$(as_cred "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(as_cred "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "credlock's uid OUTSIDE credlock's cgroup is redirected to credlock (v4, v6)" "$IID $IID +2" "$out +$((after - before))"
    expect_fast_refusal "credlock's uid outside credlock's cgroup: $IMDS4:8080 refused" cred tcp "$IMDS4" 8080
    expect_fast_refusal "credlock's uid outside credlock's cgroup: UDP $IMDS4:5353 refused" cred udp "$IMDS4" 5353

    # -- 3b. IPv6 segment routing (IMDS hidden as the last segment) never reaches the upstream.
    # (root: see boot mode, where root is refused although it is exempt for IMDS port 80)
    expect_srh_blocked "app user: segment-routed request to IMDS never reaches it" app
    expect_srh_blocked "container: forwarded segment-routed request to IMDS never reaches it" container
    stale_conntrack_checks
    expect "strict mode: state file written by apply" "${BACKEND%-legacy} strict strict fresh" "$(state_summary)"

    # -- 4. other ports / protocols from the app user: refused, not dropped.
    expect_fast_refusal "app user: $IMDS4:8080 refused" app tcp "$IMDS4" 8080
    expect_fast_refusal "app user: $IMDS4:443 refused" app tcp "$IMDS4" 443
    expect_fast_refusal "app user: [$IMDS6]:8080 refused" app tcp "$IMDS6" 8080
    expect_fast_refusal "app user: UDP $IMDS4:5353 refused" app udp "$IMDS4" 5353

    # -- 5. containers never reach the upstream directly.
    emulator_clear
    if [[ $MODE == refuse ]]; then
        expect_fast_refusal "container: $IMDS4:80 refused" container tcp "$IMDS4" 80
    else
        before=$(credlock_requests)
        out=$(in_c "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
        after=$(credlock_requests)
        expect "container: $IMDS4:80 answered by credlock (redirect)" "$IID +1" "$out +$((after - before))"
        # The DNAT leaves the bridge able to carry 127.0.0.0/8 (route_localnet): a container must
        # still not reach the host's other loopback services (CVE-2020-8558).
        expect "route_localnet=1 on $BR (needed for the IPv4 redirect)" 1 \
            "$(in_i cat "/proc/sys/net/ipv4/conf/$BR/route_localnet")"
    fi
    if container_reaches_host_loopback "guarded-$ID-$BACKEND-$MODE"; then
        fail "container: host loopback services (127.0.0.1 via the bridge) stay unreachable"
    else
        pass "container: host loopback services (127.0.0.1 via the bridge) stay unreachable"
    fi
    expect_fast_refusal "container: [$IMDS6]:80 refused (no IPv6 redirect to ::1)" container tcp "$IMDS6" 80
    expect_fast_refusal "container: $IMDS4:8080 refused" container tcp "$IMDS4" 8080
    # Whatever the container sent reached the upstream only through credlock, never from its
    # own address (the control above shows that address does get through without the rules).
    in_c "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" >/dev/null 2>&1
    in_c "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" >/dev/null 2>&1
    expect "upstream saw no request from the container's own addresses" 0 "$(emulator_requests_from_container)"

    # -- 9. the lock; 10. routine operations and the watch (independent of the container mode:
    #    once per backend); 11. a credlock restart (new cgroup).
    lock_checks
    if [[ $MODE == refuse || $MODES != *refuse* ]]; then survive_checks && atomic_reload_checks; fi
    repin_checks

    # -- 12. the per-process access policy (netns_access_checks.sh): credlock restarts with rules.
    access_checks

    # -- 7. stopping credlock: the rules stay, connections are refused (fail closed).
    stop_credlock
    emulator_clear
    expect_fast_refusal "credlock stopped: app user gets connection refused on $IMDS4:80" app tcp "$IMDS4" 80
    expect_fast_refusal "credlock stopped: app user gets connection refused on [$IMDS6]:80" app tcp "$IMDS6" 80
    expect_fast_refusal "credlock stopped: root gets connection refused too (strict stays)" root tcp "$IMDS4" 80
    expect "credlock stopped: curl fails with 'Couldn't connect' (exit 7)" 7 "$(
        as_app "${CURL[@]}" -o /dev/null "http://$IMDS4/latest/meta-data/instance-id" >/dev/null 2>&1
        echo $?
    )"
    if [[ $MODE == redirect ]]; then
        expect_fast_refusal "credlock stopped: container gets connection refused on $IMDS4:80" container tcp "$IMDS4" 80
    fi
    expect "credlock stopped: upstream saw no request" 0 "$(emulator_requests)"
    expect "credlock stopped: rules still in place, strict (status --strict 0)" 0 "$(status_line --strict | cut -d' ' -f1)"

    # -- 6 (cont.). remove: only credlock's rules go.
    out=$(fw remove 2>&1)
    expect "remove exits 0" 0 "$?"
    expect "remove leaves no credlock rule" 0 "$(live_rule_count)"
    fw status >/dev/null 2>&1
    expect "status after remove exits 3" 3 "$?"
    if unrelated_rule_present; then pass "remove kept an unrelated rule"; else fail "remove kept an unrelated rule"; fi
    del_unrelated_rule
    if [[ $MODE == redirect ]]; then
        expect "remove restored route_localnet=0 on $BR" 0 "$(in_i cat "/proc/sys/net/ipv4/conf/$BR/route_localnet")"
    fi
    out=$(as_app "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    expect "after remove the app user reaches the upstream again" "$IID" "$out"
    unset CREDLOCK_BOOT_EXEMPT_ROOT
}

# ---- main --------------------------------------------------------------------------------------
START=$SECONDS
if [[ $STANDIN == 1 ]]; then
    fail "real credlock binary used" "CREDLOCK_FW_TEST_STANDIN=1: the Python stand-in replaced credlock"
elif ! "$CREDLOCK_BIN" --help >/dev/null 2>&1; then
    fail "real credlock binary exists and runs" "$CREDLOCK_BIN --help failed (build it: cargo build --bin credlock)"
    summary
fi
for tool in nft iptables ip6tables iptables-restore ip6tables-restore curl ip setpriv runuser useradd; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        fail "tool $tool installed" "apt-get install nftables iptables curl iproute2 util-linux passwd"
        summary
    fi
done
[[ -f $EMULATOR ]] || { fail "IMDS emulator exists" "$EMULATOR missing" && summary; }
[[ -d $SITE/botocore ]] || { fail "venv with botocore" "$SITE missing (tests/setup.sh)" && summary; }

if [[ -z $CG2 ]] || ! mkdir -p "$CG_DIR"; then
    fail "a cgroup v2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified) for credlock's test cgroup" "found '$CG2'"
    summary
fi
if ! setup_users || ! setup_topology || ! start_emulator; then
    fail "test topology (namespaces, users, emulator) set up"
    summary
fi

# Configuration errors are clear and change nothing.
out=$(CREDLOCK_FIREWALL_CONFIG=$FW_DEFAULTS CREDLOCK_USER=clfw-nosuchuser-$ID in_i "$FW" apply 2>&1)
rc=$?
if [[ $rc == 78 && $out == *"clfw-nosuchuser-$ID"*"no such user"* ]] && ! in_i nft list table inet credlock >/dev/null 2>&1; then
    pass "apply with a missing user fails (exit 78) with a clear message and loads nothing"
else
    fail "apply with a missing user fails (exit 78) with a clear message and loads nothing" "rc=$rc: $out"
fi

# CREDLOCK_BOOT_EXEMPT_ROOT decides what `apply --boot` loads (render shows it, loads nothing).
boot_render_mode() {
    CREDLOCK_FIREWALL_CONFIG=$FW_DEFAULTS CREDLOCK_USER=$CRED_USER CREDLOCK_FIREWALL_RUNDIR=$TMP/run-render \
        "$@" "$FW" render --boot --backend nft 2>/dev/null | sed -n 's/^# mode \([a-z]*\).*/\1/p'
}
printf '#!/bin/sh\nexit 0\n' >"$TMP/fake-cloud-init"
chmod 755 "$TMP/fake-cloud-init"
ci_expected=boot
if [[ -e /etc/cloud/cloud-init.disabled || " $(cat /proc/cmdline) " == *" cloud-init=disabled "* ]]; then
    ci_expected=strict # this host disables cloud-init: auto must not exempt root
fi
expect "CREDLOCK_BOOT_EXEMPT_ROOT: auto without cloud-init / auto with cloud-init / yes / no -> apply --boot loads" \
    "strict $ci_expected boot strict" \
    "$(boot_render_mode env CREDLOCK_BOOT_EXEMPT_ROOT=auto CREDLOCK_FIREWALL_CLOUD_INIT="$TMP/no-cloud-init") $(
        boot_render_mode env CREDLOCK_BOOT_EXEMPT_ROOT=auto CREDLOCK_FIREWALL_CLOUD_INIT="$TMP/fake-cloud-init") $(
        boot_render_mode env CREDLOCK_BOOT_EXEMPT_ROOT=yes) $(boot_render_mode env CREDLOCK_BOOT_EXEMPT_ROOT=no)"
out=$(CREDLOCK_FIREWALL_CONFIG=$FW_DEFAULTS CREDLOCK_USER=$CRED_USER CREDLOCK_BOOT_EXEMPT_ROOT=maybe "$FW" render --boot 2>&1)
expect "CREDLOCK_BOOT_EXEMPT_ROOT=maybe is a configuration error (78)" 78 "$?"
out=$("$FW" status --boot 2>&1)
expect "status --boot is a usage error (2)" 2 "$?"

# What marks credlock's own traffic (CREDLOCK_EXEMPT), as render shows it.
exempt_render() {
    CREDLOCK_FIREWALL_CONFIG=$FW_DEFAULTS CREDLOCK_USER=$CRED_USER CREDLOCK_SERVICE_CGROUP=$CG_REL \
        "$@" "$FW" render --backend nft 2>&1
}
cg_nft_path=${CG_DIR#/sys/fs/cgroup/}
out=$(exempt_render env CREDLOCK_EXEMPT=auto)
expect "CREDLOCK_EXEMPT=auto with cgroup v2: uid AND cgroup ($cg_nft_path, level 2, its id in the comment)" yes \
    "$(grep -q "meta skuid $(id -u "$CRED_USER") socket cgroupv2 level 2 \"$cg_nft_path\" counter accept comment \"credlock.service (cgroup id $(stat -c %i "$CG_DIR")): direct\"" <<<"$out" && echo yes || echo "no: $out")"
out=$(exempt_render env CREDLOCK_EXEMPT=uid)
expect "CREDLOCK_EXEMPT=uid: the uid alone" "yes 0" \
    "$(grep -q "meta skuid $(id -u "$CRED_USER") counter accept" <<<"$out" && echo yes || echo no) $(grep -c cgroupv2 <<<"$out")"
out=$(exempt_render env CREDLOCK_EXEMPT=sometimes)
expect "CREDLOCK_EXEMPT=sometimes is a configuration error (78)" 78 "$?"
out=$(exempt_render env CREDLOCK_SERVICE_CGROUP=clfw-$ID/absent)
expect "credlock's cgroup absent (not running, early boot): nothing is exempt" "yes 0" \
    "$(grep -q '^# exempt: nothing' <<<"$out" && echo yes || echo no) $(grep -c 'skuid [0-9]* .*accept' <<<"$out")"

# Test-only variables are honoured only with the harness marker, and never under systemd.
for how in "-u CREDLOCK_FIREWALL_TEST" "INVOCATION_ID=clfw-test"; do
    read -ra how_args <<<"$how"
    out=$(exempt_render env "${how_args[@]}" CREDLOCK_FIREWALL_RUNDIR="$TMP/elsewhere" CREDLOCK_FIREWALL_CLOUD_INIT=/bin/true)
    expect "test-only variables ignored, with warnings ($how)" "yes yes yes" \
        "$([[ $out == *"CREDLOCK_FIREWALL_RUNDIR ignored"* ]] && echo yes || echo no) $([[ $out == *"CREDLOCK_SERVICE_CGROUP ignored"* ]] && echo yes || echo no) $([[ $out == *"# exempt: "*"system.slice/credlock.service"* ]] && echo yes || echo no)"
done
missing=""
for unit in credlock.service credlock-firewall.service credlock-firewall-check.service credlock-firewall-reapply.service; do
    for knob in CREDLOCK_FIREWALL_TEST CREDLOCK_FIREWALL_RUNDIR CREDLOCK_FIREWALL_LOCK CREDLOCK_FIREWALL_CLOUD_INIT \
        CREDLOCK_SERVICE_CGROUP CREDLOCK_FIREWALL_LOCK_WAIT; do
        grep -Eq "^UnsetEnvironment=(.* )?$knob( |$)" "$ROOT/systemd/$unit" || missing+=" $unit:$knob"
    done
done
expect "every unit that runs the firewall script clears its test-only variables (UnsetEnvironment=)" "" "$missing"

for backend in $BACKENDS; do
    for mode in $MODES; do
        run_combo "$backend" "$mode"
        stop_credlock
    done
done

echo "(took $((SECONDS - START)) s)"
summary
