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
# For every backend x container mode: start target/debug/credlock as its own user, check the
# topology without rules (control), load the boot-mode rules (`apply --boot`: root direct, every
# other uid redirected), tighten them to the strict set (`apply`), then assert the properties
# listed in tests/root/README-firewall.md, stop credlock (fail closed) and remove the rules.
# Prints PASS/FAIL per check and "N passed, M failed"; exits 1 on any failure.
#
# CREDLOCK_BIN overrides target/debug/credlock. CREDLOCK_FW_TEST_STANDIN=1 (development only)
# uses tests/root/netns_standin_proxy.py instead and always records a FAIL. CREDLOCK_FIREWALL_SCRIPT
# overrides systemd/credlock-firewall (mutation testing).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
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
IMDS4=169.254.169.254 IMDS6=fd00:ec2::254
CTL=127.0.0.1:9999 # emulator control, inside the imds namespace
ADMIN=127.0.0.1:9169
IID="i-0123456789abcdef0"
TMP=$(mktemp -d /tmp/cl-fw-test.XXXXXX)
chmod 755 "$TMP"
EMU_PID="" UDP_PID="" SINK_PID="" CREDLOCK_PID="" CREATED_USERS=()

PASSED=0 FAILED=0 COMBO=""
pass() {
    PASSED=$((PASSED + 1))
    echo "PASS ${COMBO:+[$COMBO] }$1"
}
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL ${COMBO:+[$COMBO] }$1${2:+: $2}"
}
# expect NAME EXPECTED ACTUAL
expect() { if [[ $3 == "$2" ]]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi; }

# Background processes are started as `ip netns exec NS [env ...] [setpriv ...] PROGRAM &`: each
# of those execs the next, so $! is the program itself and can be stopped by its PID.
cleanup() {
    local pid i
    set +e
    for pid in "$CREDLOCK_PID" "$SINK_PID" "$UDP_PID" "$EMU_PID"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null
    done
    for pid in "$CREDLOCK_PID" "$SINK_PID" "$UDP_PID" "$EMU_PID"; do
        [[ -n $pid ]] || continue
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Deleting the namespaces deletes their veths, bridge and every rule loaded inside them.
    for ns in "$NS_C" "$NS_I" "$NS_M"; do
        ip netns del "$ns" 2>/dev/null
    done
    for u in "${CREATED_USERS[@]}"; do
        userdel "$u" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_i() { ip netns exec "$NS_I" "$@"; }
in_m() { ip netns exec "$NS_M" "$@"; }
in_c() { ip netns exec "$NS_C" "$@"; }
as_app() { ip netns exec "$NS_I" runuser -u "$APP_USER" -- "$@"; }
as_cred() { ip netns exec "$NS_I" runuser -u "$CRED_USER" -- "$@"; }
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
    root) in_i "$PY" "$HERE/netns_probe.py" "$@" ;;
    container) in_c "$PY" "$HERE/netns_probe.py" "$@" ;;
    esac
}
# expect_fast_refusal NAME WHO PROTO HOST PORT: refused/unreachable (an active reject) in < 1 s.
expect_fast_refusal() {
    local name=$1 out result ms
    shift
    out=$(probe "$@")
    read -r result ms <<<"$out"
    if [[ ($result == refused || $result == unreachable) && ${ms:-9999} -lt 1000 ]]; then
        pass "$name ($result in ${ms} ms)"
    else
        fail "$name" "expected a fast refusal, got '$out'"
    fi
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
    for u in "$CRED_USER" "$APP_USER"; do
        if ! id -u "$u" >/dev/null 2>&1; then
            useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$u" || return 1
            CREATED_USERS+=("$u")
        fi
    done
}

start_emulator() {
    local i
    ip netns exec "$NS_M" "$PY" "$EMULATOR" --listen "$IMDS4:80" --listen "[$IMDS6]:80" \
        --listen "$IMDS4:8080" --listen "[$IMDS6]:8080" --control "$CTL" \
        >"$TMP/emulator.out" 2>"$TMP/emulator.err" &
    EMU_PID=$!
    # A UDP echo next to it (bounded: exits after 300 s without traffic).
    ip netns exec "$NS_M" "$PY" -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("169.254.169.254", 5353))
s.settimeout(300)
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
s.settimeout(300)
while True:
    data, peer = s.recvfrom(64)
    print(data.decode(errors="replace"), peer[0], flush=True)
' >"$TMP/loopback-sink.log" 2>/dev/null &
    SINK_PID=$!
    for i in $(seq 1 100); do
        grep -q '^control ' "$TMP/emulator.out" 2>/dev/null && return 0
        kill -0 "$EMU_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "IMDS emulator did not start (after ${i} tries):" >&2
    cat "$TMP/emulator.out" "$TMP/emulator.err" >&2
    return 1
}

credlock_command() {
    if [[ $STANDIN == 1 ]]; then
        echo "$PY" "$HERE/netns_standin_proxy.py"
    else
        echo "$CREDLOCK_BIN" run --upstream "http://$IMDS4" --admin-listen "$ADMIN"
    fi
}

start_credlock() {
    local i uid gid cmd
    uid=$(id -u "$CRED_USER") gid=$(id -g "$CRED_USER")
    read -ra cmd <<<"$(credlock_command)"
    # setpriv execs (no fork), so $! is credlock itself. No route to STS/EC2/checkip here:
    # credlock holds no locked credentials, but passthrough (instance-id) works.
    ip netns exec "$NS_I" env -i PATH=/usr/bin:/bin HOME=/ AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL_STS=http://127.0.0.1:9 AWS_ENDPOINT_URL_EC2=http://127.0.0.1:9 \
        setpriv --reuid "$uid" --regid "$gid" --clear-groups -- "${cmd[@]}" \
        >>"$TMP/credlock.log" 2>&1 &
    CREDLOCK_PID=$!
    for i in $(seq 1 150); do
        if in_i curl -s -o /dev/null --max-time 1 "http://$ADMIN/metrics" &&
            [[ $(probe root tcp 127.0.0.1 8169 1) == connected* ]] &&
            [[ $(probe root tcp ::1 8169 1) == connected* ]]; then
            return 0
        fi
        kill -0 "$CREDLOCK_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "credlock did not start listening (after ${i} tries); log:" >&2
    tail -n 30 "$TMP/credlock.log" >&2
    return 1
}

stop_credlock() {
    local i
    [[ -n $CREDLOCK_PID ]] || return 0
    kill -TERM "$CREDLOCK_PID" 2>/dev/null
    for i in $(seq 1 70); do
        kill -0 "$CREDLOCK_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$CREDLOCK_PID" 2>/dev/null
    wait "$CREDLOCK_PID" 2>/dev/null
    CREDLOCK_PID=""
}

# container_reaches_host_loopback TAG: a datagram from the container to the bridge, addressed to
# 127.0.0.1:5300, arrives at the instance's loopback-only service.
container_reaches_host_loopback() {
    in_c "$PY" -c 'import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), ("127.0.0.1", 5300))' "$1" 2>/dev/null
    sleep 0.3
    grep -q "^$1 " "$TMP/loopback-sink.log"
}

# ---- firewall helpers --------------------------------------------------------------------------
fw() { in_i "$FW" "$@" --backend "${BACKEND%-legacy}"; }

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
    export CREDLOCK_FIREWALL_RUNDIR=$TMP/run CREDLOCK_FIREWALL_LOCK=$TMP/fw.lock
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

    # -- 3. credlock's own user reaches the real upstream directly.
    before=$(credlock_requests)
    out=$(as_cred "${CURL[@]}" "http://$IMDS4/latest/meta-data/instance-id" 2>&1)
    out+=" "$(as_cred "${CURL[@]}" "http://[$IMDS6]/latest/meta-data/instance-id" 2>&1)
    after=$(credlock_requests)
    expect "credlock user reaches the upstream directly (v4, v6), not itself" "$IID $IID +0" "$out +$((after - before))"
    out=$(probe cred tcp "$IMDS4" 8080)
    expect "credlock user reaches other IMDS ports (8080 is open upstream)" connected "${out%% *}"
    out=$(probe cred udp "$IMDS4" 5353)
    expect "credlock user reaches IMDS over UDP (echo on 5353)" reply "${out%% *}"

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
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi
for tool in nft iptables ip6tables iptables-restore ip6tables-restore curl ip setpriv runuser useradd; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        fail "tool $tool installed" "apt-get install nftables iptables curl iproute2 util-linux passwd"
        echo "$PASSED passed, $FAILED failed"
        exit 1
    fi
done
[[ -f $EMULATOR ]] || { fail "IMDS emulator exists" "$EMULATOR missing" && echo "$PASSED passed, $FAILED failed" && exit 1; }
[[ -d $SITE/botocore ]] || { fail "venv with botocore" "$SITE missing (tests/setup.sh)" && echo "$PASSED passed, $FAILED failed" && exit 1; }

if ! setup_users || ! setup_topology || ! start_emulator; then
    fail "test topology (namespaces, users, emulator) set up"
    echo "$PASSED passed, $FAILED failed"
    exit 1
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

for backend in $BACKENDS; do
    for mode in $MODES; do
        run_combo "$backend" "$mode"
        stop_credlock
    done
done

echo "(took $((SECONDS - START)) s)"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
