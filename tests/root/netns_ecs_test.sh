#!/bin/bash
# netns_ecs_test.sh: prove with the real kernel that credlock-firewall's CREDLOCK_ECS=on sends
# ECS task-credential traffic (169.254.170.2:80) to credlock's [containers.ecs] listener, from
# local processes and from containers, ahead of ecs-init's own rules, and that only credlock
# reaches the ECS agent's port. Root only.
#
#   tests/root/netns_ecs_test.sh [--backend nft|iptables|all]     (default: all)
#
# Topology (namespaces this script creates and deletes; names carry the PID):
#
#   container ns ──veth── bridge br-ce<PID> ┐ instance ns: ecs-init's rules (below), the ECS agent
#   10.214.0.2/24                10.214.0.1 ┘ stand-in 127.0.0.1:51679, credlock (as its own user,
#                                             in its own cgroup) on 127.0.0.1:8169 and :51680,
#                                             the IMDS emulator and moto (STS) on loopback
#
# ecs-init's rules are loaded as the ECS Developer Guide gives them for a manually installed
# agent ("Manually installing the Amazon ECS container agent on an Amazon Linux 2 EC2
# instance": route_localnet=1, PREROUTING DNAT and OUTPUT REDIRECT of 169.254.170.2:80 to
# 127.0.0.1:51679), so the controls show raw task credentials reaching apps and containers
# without credlock's rules, and the checks show credlock's rules taking precedence over them.
# Prints PASS/FAIL per check and "N passed, M failed"; exits 1 on any failure.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=tests/lib.sh
. "$HERE/../lib.sh" # pass, fail, expect*, summary, COMBO, at_exit, PIDS, stop_pids, wait_*, cgroup2_root
FW=${CREDLOCK_FIREWALL_SCRIPT:-$ROOT/systemd/credlock-firewall}
CREDLOCK_BIN=${CREDLOCK_BIN:-$ROOT/target/debug/credlock}
VENV=${CREDLOCK_VENV:-$ROOT/.venv}
PY=/usr/bin/python3
BACKENDS="nft iptables"
while (($# > 0)); do
    case $1 in
    --backend)
        BACKENDS=${2:?--backend needs nft, iptables or all}
        shift 2
        ;;
    *)
        echo "unknown argument: $1" >&2
        exit 2
        ;;
    esac
done
[[ $BACKENDS == all ]] && BACKENDS="nft iptables"
if [[ $(id -u) != 0 ]]; then
    echo "netns_ecs_test.sh must run as root (namespaces, users, netfilter)" >&2
    exit 2
fi

ID=$$
NS_I=cl-ecs-$ID-instance NS_C=cl-ecs-$ID-container
BR=br-ce$ID V_H=ceh$ID V_C=cec$ID
CRED_USER=clecs-cred-$ID APP_USER=clecs-app-$ID
ECS4=169.254.170.2
AGENT=127.0.0.1:51679 AGENT_CTL=127.0.0.1:51690
ECS_PORT=51680 ADMIN=127.0.0.1:9169
IMDS=127.0.0.1:18080 IMDS_CTL=127.0.0.1:18081 MOTO_PORT=15000
TASK_ROLE=arn:aws:iam::123456789012:role/ecs-task-a
TMP=$(mktemp -d /tmp/cl-ecs-test.XXXXXX)
chmod 755 "$TMP"
at_exit rm -rf "$TMP"
export CREDLOCK_FIREWALL_TEST=1
unset INVOCATION_ID
CG2=$(cgroup2_root)
CG_REL=clecs-$ID/credlock
CG_DIR=$CG2/$CG_REL
CREDLOCK_PID="" CREATED_USERS=()

# What setup creates, undone at exit (after the processes in it are stopped).
# shellcheck disable=SC2317 # run at exit
teardown() {
    ip netns del "$NS_C" 2>/dev/null
    ip netns del "$NS_I" 2>/dev/null
    for u in "${CREATED_USERS[@]}"; do userdel "$u" 2>/dev/null; done
    if [[ -n $CG2 ]]; then rmdir_wait 2 "$CG_DIR" "$CG2/clecs-$ID"; fi
}
at_exit teardown
# shellcheck disable=SC2317 # run at exit
stop_processes() { stop_pids 5 "$CREDLOCK_PID" "${PIDS[@]}"; }
at_exit stop_processes

in_i() { ip netns exec "$NS_I" "$@"; }
in_c() { ip netns exec "$NS_C" "$@"; }
as_app() { ip netns exec "$NS_I" runuser -u "$APP_USER" -- "$@"; }
as_cred() { ip netns exec "$NS_I" runuser -u "$CRED_USER" -- "$@"; }
as_cred_cg() {
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" \
        nsenter --net="/run/netns/$NS_I" setpriv --reuid "$(id -u "$CRED_USER")" \
        --regid "$(id -g "$CRED_USER")" --clear-groups -- "$@"
}
fw() { nsenter --net="/run/netns/$NS_I" -- "$FW" "$@" --backend "$BACKEND"; }
probe() { # probe WHO HOST PORT -> "result ms"
    local who=$1
    shift
    case $who in
    app) as_app "$PY" "$HERE/netns_probe.py" tcp "$@" ;;
    root) in_i "$PY" "$HERE/netns_probe.py" tcp "$@" ;;
    cred) as_cred "$PY" "$HERE/netns_probe.py" tcp "$@" ;;
    cred_cg) as_cred_cg "$PY" "$HERE/netns_probe.py" tcp "$@" ;;
    container) in_c "$PY" "$HERE/netns_probe.py" tcp "$@" ;;
    esac
}
CURL=(curl -s --max-time 3 -o - -w '\n%{http_code}')
# fetch WHO URL -> what came back: raw (a raw value of the agent's), locked (a 200 credential
# document without one), or "status <code>" / "none".
fetch() {
    local who=$1 url=$2 out
    case $who in
    app) out=$(as_app "${CURL[@]}" "$url" 2>/dev/null) ;;
    root) out=$(in_i "${CURL[@]}" "$url" 2>/dev/null) ;;
    container) out=$(in_c "${CURL[@]}" "$url" 2>/dev/null) ;;
    esac
    classify "$out"
}
classify() {
    local out=$1 code body
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    if [[ $body == *ASIARAWE* || $body == *RAWSECRET* || $body == *RAWTOKEN* ]]; then
        echo raw
    elif [[ $code == 200 && $body == *'"AccessKeyId"'* && $body == *'"RoleArn"'* ]]; then
        echo locked
    elif [[ $code == 000 || -z $code ]]; then
        echo none
    else
        echo "status $code"
    fi
}
metric() { # metric RESULT: credlock_task_credentials_total{agent="ecs",result=RESULT}
    in_i curl -s --max-time 3 "http://$ADMIN/metrics" |
        sed -n "s/^credlock_task_credentials_total{agent=\"ecs\",result=\"$1\"} //p"
}

# Packets credlock's input rule for the agent's port has dropped.
agent_port_drops() {
    if [[ $BACKEND == nft ]]; then
        in_i nft list chain inet credlock filter_input 2>/dev/null |
            sed -n 's/.*dport 51679 counter packets \([0-9]*\) .*/\1/p'
    else
        in_i iptables -w -L CREDLOCK-INPUT -v -n -x 2>/dev/null | awk '/dpt:51679/ {print $1}'
    fi | awk '{n += $1} END {print n + 0}'
}

setup() {
    local u
    for u in "$CRED_USER" "$APP_USER"; do
        useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$u" || return 1
        CREATED_USERS+=("$u")
    done
    [[ -n $CG2 ]] && { mkdir -p "$CG_DIR" || return 1; }
    ip netns add "$NS_I" && ip netns add "$NS_C" || return 1
    ip -n "$NS_I" link set lo up && ip -n "$NS_C" link set lo up || return 1
    # A route for 169.254.0.0/16, as an instance's primary interface gives it (here on the
    # bridge: local connections are DNATed before they would leave).
    ip -n "$NS_I" link add "$BR" type bridge && ip -n "$NS_I" addr add 10.214.0.1/24 dev "$BR" &&
        ip -n "$NS_I" addr add 169.254.0.2/16 dev "$BR" && ip -n "$NS_I" link set "$BR" up || return 1
    ip link add "$V_H" type veth peer name "$V_C" &&
        ip link set "$V_H" netns "$NS_I" && ip link set "$V_C" netns "$NS_C" &&
        ip -n "$NS_I" link set "$V_H" master "$BR" up &&
        ip -n "$NS_C" addr add 10.214.0.2/24 dev "$V_C" && ip -n "$NS_C" link set "$V_C" up &&
        ip -n "$NS_C" route add default via 10.214.0.1 || return 1
    # ecs-init's host setup (Amazon ECS Developer Guide, "Manually installing the Amazon ECS
    # container agent on an Amazon Linux 2 EC2 instance"): loopback routable from containers,
    # 169.254.170.2:80 to the agent on 127.0.0.1:51679 for containers and for local processes.
    in_i sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.route_localnet=1 || return 1
    in_i iptables -w -t nat -A PREROUTING -d "$ECS4/32" -p tcp --dport 80 -j DNAT --to-destination "$AGENT" &&
        in_i iptables -w -t nat -A OUTPUT -d "$ECS4/32" -p tcp --dport 80 -j REDIRECT --to-ports 51679 || return 1
    # The container also plays attacker for CVE-2020-8558: 127.0.0.0/8 sent to the bridge.
    ip -n "$NS_C" route del local 127.0.0.1 dev lo table local &&
        ip -n "$NS_C" route del local 127.0.0.0/8 dev lo table local &&
        ip -n "$NS_C" route add 127.0.0.0/8 via 10.214.0.1 dev "$V_C" &&
        in_c sysctl -qw net.ipv4.conf.all.route_localnet=1 "net.ipv4.conf.$V_C.route_localnet=1" || return 1

    # `ip netns exec` execs the program, so $! is the program itself (a shell function in the
    # background would be a subshell's PID, and the program would outlive the test).
    ip netns exec "$NS_I" "$PY" "$ROOT/tests/support/ecs_agent_emulator.py" --listen "$AGENT" \
        --control "$AGENT_CTL" >"$TMP/agent.out" 2>&1 &
    PIDS+=($!)
    ip netns exec "$NS_I" "$PY" "$ROOT/tests/support/imds_emulator.py" --listen "$IMDS" \
        --control "$IMDS_CTL" >"$TMP/imds.out" 2>&1 &
    PIDS+=($!)
    ip netns exec "$NS_I" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$TMP/moto.out" 2>&1 &
    PIDS+=($!)
    wait_until 15 grep -q '^control ' "$TMP/agent.out"
    wait_until 15 grep -q '^control ' "$TMP/imds.out"
    wait_http "http://127.0.0.1:$MOTO_PORT/moto-api/" any 15 in_i
    in_i curl -s --max-time 3 -X POST "http://$AGENT_CTL/credentials" \
        -d "{\"id\": \"task-a\", \"role_arn\": \"$TASK_ROLE\"}" | grep -q ASIARAWE || {
        echo "the ECS agent stand-in did not take the task" >&2
        cat "$TMP/agent.out" >&2
        return 1
    }
    cat >"$TMP/credlock.toml" <<EOF
[server]
listen = ["127.0.0.1:8169"]
admin_listen = "$ADMIN"
upstream = "http://$IMDS"

[discovery.echo]
enabled = false

[discovery.static]
ipv4 = ["203.0.113.10"]

[containers.ecs]
listen = ["127.0.0.1:$ECS_PORT"]
agent = "$AGENT"
EOF
    chmod 644 "$TMP/credlock.toml"
}

start_credlock() {
    local uid gid
    uid=$(id -u "$CRED_USER") gid=$(id -g "$CRED_USER")
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" \
        nsenter --net="/run/netns/$NS_I" env -i PATH=/usr/bin:/bin HOME=/ AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" \
        setpriv --reuid "$uid" --regid "$gid" --clear-groups -- \
        "$CREDLOCK_BIN" run --config "$TMP/credlock.toml" >>"$TMP/credlock.log" 2>&1 &
    CREDLOCK_PID=$!
    wait_ready "$CREDLOCK_PID" 20 http_answers 200 "http://$ADMIN/readyz" in_i && return 0
    echo "credlock did not become ready; log:" >&2
    tail -n 30 "$TMP/credlock.log" >&2
    return 1
}

stop_credlock() {
    stop_pids 7 "$CREDLOCK_PID"
    CREDLOCK_PID=""
}

expect_refused() { # NAME WHO HOST PORT: an active refusal, fast
    local name=$1
    shift
    expect_refusal "$name" "$(probe "$@" 2)"
}

run_checks() {
    local url=http://$ECS4/v2/credentials/task-a before after out
    export CREDLOCK_FIREWALL_CONFIG=/dev/null CREDLOCK_USER=$CRED_USER CREDLOCK_ECS=on
    export CREDLOCK_ECS_PORT=$ECS_PORT CREDLOCK_FIREWALL_RUNDIR=$TMP/run CREDLOCK_SERVICE_CGROUP=$CG_REL
    export CREDLOCK_BOOT_EXEMPT_ROOT=no CREDLOCK_FIREWALL_LOCK_WAIT=10

    # -- controls: ecs-init's rules alone hand raw task credentials to everyone.
    expect "control: without credlock's rules an app gets the agent's raw task credentials" raw "$(fetch app "$url")"
    expect "control: without credlock's rules a container gets them too" raw "$(fetch container "$url")"
    expect "control: without credlock's rules an app reaches the agent's port directly" connected \
        "$(probe app 127.0.0.1 51679 2 | cut -d' ' -f1)"

    fw apply >"$TMP/apply.log" 2>&1
    expect "apply with CREDLOCK_ECS=on succeeds" 0 "$?"
    fw status >/dev/null 2>&1
    expect "status: the rules are in place" 0 "$?"
    out=$(fw render 2>&1)
    expect "render names the ECS listener" yes "$([[ $out == *"127.0.0.1:$ECS_PORT"* ]] && echo yes || echo no)"

    before=$(( $(metric locked) + $(metric cached) ))
    expect "an app asking 169.254.170.2 gets a locked set, not the raw one" locked "$(fetch app "$url")"
    expect "root asking 169.254.170.2 gets a locked set" locked "$(fetch root "$url")"
    expect "a container asking 169.254.170.2 gets a locked set (ahead of ecs-init's DNAT)" locked "$(fetch container "$url")"
    after=$(( $(metric locked) + $(metric cached) ))
    expect "credlock served those three (its metrics)" 3 "$((after - before))"
    # The SDKs as a task's application runs them: only AWS_CONTAINER_CREDENTIALS_RELATIVE_URI,
    # as ECS sets it ("Container credential provider", AWS SDKs and Tools Reference Guide: the
    # SDK asks 169.254.170.2 itself).
    local kind want=arn:aws:sts::123456789012:assumed-role/ecs-task-a/credlock-ecs-task-a
    for kind in boto3 awscli rust js; do
        expect "$kind through AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (169.254.170.2) gets the locked set: moto knows it as credlock's session of the task role" \
            "$want" "$(sdk_arn as_app "$kind" "AWS_ENDPOINT_URL_STS=http://127.0.0.1:$MOTO_PORT" \
                AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/task-a)"
    done
    expect "an unknown task id gets the agent's own 400 through credlock" "status 400" \
        "$(fetch app "http://$ECS4/v2/credentials/nope")"

    expect_refused "an app cannot reach the agent's port directly" app 127.0.0.1 51679
    expect_refused "root cannot reach the agent's port directly" root 127.0.0.1 51679
    if [[ -n $CG2 ]]; then
        expect_refused "credlock's uid outside its cgroup cannot reach the agent's port" cred 127.0.0.1 51679
    fi
    expect "credlock's own uid, in its cgroup, reaches the agent" connected \
        "$(probe cred_cg 127.0.0.1 51679 2 | cut -d' ' -f1)"
    # A container addressing the agent's loopback port over the bridge (CVE-2020-8558): this
    # kernel does not complete such a TCP connection even without rules (no control possible),
    # so what is checked is that credlock's input rule is what drops its packets.
    before=$(agent_port_drops)
    out=$(fetch container "http://$AGENT/v2/credentials/task-a")
    after=$(agent_port_drops)
    expect "a container's packets to the agent's port over the bridge are dropped by credlock's rule" \
        "none yes" "$out $( ((after > before)) && echo yes || echo no)"

    stop_credlock
    expect "credlock stopped: an app gets no credentials (fail closed), not the raw ones" none "$(fetch app "$url")"
    expect "credlock stopped: a container gets none either" none "$(fetch container "$url")"

    fw remove >/dev/null 2>&1
    fw status >/dev/null 2>&1
    expect "remove: the rules are gone (status 3)" 3 "$?"
    expect "remove: ecs-init's own path is back (raw, as before credlock)" raw "$(fetch app "$url")"
}

START=$SECONDS
if ! setup; then
    fail "the topology, the stand-ins and moto start"
    summary
fi
for BACKEND in $BACKENDS; do
    COMBO=$BACKEND
    echo "=== backend=$BACKEND"
    if start_credlock; then
        run_checks
    else
        fail "credlock starts as $CRED_USER and becomes ready"
    fi
    stop_credlock
    COMBO=""
done
echo "(took $((SECONDS - START)) s)"
summary
