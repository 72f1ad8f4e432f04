#!/bin/bash
# netns_pod_identity_test.sh: prove with the real kernel that credlock-firewall's
# CREDLOCK_POD_IDENTITY=on sends EKS Pod Identity traffic (169.254.170.23:80 and
# [fd00:ec2::23]:80) to credlock's [containers.pod_identity] listener on the agent's own
# addresses, from local processes and from pods, over IPv4 and IPv6, and that only credlock
# reaches the agent. Root only.
#
#   tests/root/netns_pod_identity_test.sh [--backend nft|iptables|all]     (default: all)
#
# Topology (namespaces this script creates and deletes; names carry the PID):
#
#   pod ns ──veth── bridge br-pi<PID> ┐ node ns: pod-id-link0 (a link) with 169.254.170.23/32 and
#   10.215.0.2/24     10.215.0.1/24   │ fd00:ec2::23/128, where the Pod Identity Agent stand-in
#   fd00:215::2/64    fd00:215::1/64  ┘ listens on port 80 (the agent's hostNetwork setup: "EKS
#                                       Pod Identity considerations", Amazon EKS User Guide);
#                                       credlock (its own user and cgroup, CAP_NET_BIND_SERVICE as
#                                       credlock.socket would give it the port) on port 923 of
#                                       both; the IMDS emulator and moto (STS) on loopback
#
# The pod's credentials: the agent stand-in answers with a set moto issued (AssumeRole of the
# pod role, session eks-<cluster>-<pod>), so that moto's GetCallerIdentity, which credlock asks
# to learn the role, names the pod role as EKS Auth's session would. Its exact values are the
# raw values that must never reach a client through credlock.
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
    echo "netns_pod_identity_test.sh must run as root (namespaces, users, netfilter)" >&2
    exit 2
fi

ID=$$
NS_I=cl-pi-$ID-node NS_P=cl-pi-$ID-pod
BR=br-pi$ID V_H=pih$ID V_P=pip$ID
CRED_USER=clpi-cred-$ID APP_USER=clpi-app-$ID
POD4=169.254.170.23 POD6=fd00:ec2::23 POD_PORT=923
AGENT_CTL=127.0.0.1:51691
ADMIN=127.0.0.1:9169
IMDS=127.0.0.1:18080 IMDS_CTL=127.0.0.1:18081 MOTO_PORT=15000
POD_ROLE=arn:aws:iam::123456789012:role/pod-role
TMP=$(mktemp -d /tmp/cl-pi-test.XXXXXX)
chmod 755 "$TMP"
at_exit rm -rf "$TMP"
export CREDLOCK_FIREWALL_TEST=1
unset INVOCATION_ID
CG2=$(cgroup2_root)
CG_REL=clpi-$ID/credlock
CG_DIR=$CG2/$CG_REL
CREDLOCK_PID="" CREATED_USERS=() TOKEN="" RAW_KEY="" RAW_SECRET=""

# shellcheck disable=SC2317 # run at exit
teardown() {
    ip netns del "$NS_P" 2>/dev/null
    ip netns del "$NS_I" 2>/dev/null
    for u in "${CREATED_USERS[@]}"; do userdel "$u" 2>/dev/null; done
    if [[ -n $CG2 ]]; then rmdir_wait 2 "$CG_DIR" "$CG2/clpi-$ID"; fi
}
at_exit teardown
# shellcheck disable=SC2317 # run at exit
stop_processes() { stop_pids 5 "$CREDLOCK_PID" "${PIDS[@]}"; }
at_exit stop_processes

in_i() { ip netns exec "$NS_I" "$@"; }
in_p() { ip netns exec "$NS_P" "$@"; }
as_app() { ip netns exec "$NS_I" runuser -u "$APP_USER" -- "$@"; }
as_cred() { ip netns exec "$NS_I" runuser -u "$CRED_USER" -- "$@"; }
as_cred_cg() {
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" \
        nsenter --net="/run/netns/$NS_I" setpriv --reuid "$(id -u "$CRED_USER")" \
        --regid "$(id -g "$CRED_USER")" --clear-groups -- "$@"
}
fw() { nsenter --net="/run/netns/$NS_I" -- "$FW" "$@" --backend "$BACKEND"; }
# fetch WHO URL -> raw (a raw value of the pod's), locked (a 200 credential document without
# one), or "status <code>" / "none".
fetch() {
    local who=$1 url=$2 out
    local cmd=(curl -s --max-time 3 -o - -w '\n%{http_code}' -H "Authorization: $TOKEN" "$url")
    case $who in
    app) out=$(as_app "${cmd[@]}" 2>/dev/null) ;;
    root) out=$(in_i "${cmd[@]}" 2>/dev/null) ;;
    cred) out=$(as_cred "${cmd[@]}" 2>/dev/null) ;;
    cred_cg) out=$(as_cred_cg "${cmd[@]}" 2>/dev/null) ;;
    pod) out=$(in_p "${cmd[@]}" 2>/dev/null) ;;
    esac
    classify "$out"
}
classify() {
    local out=$1 code body
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    if [[ $body == *"$RAW_KEY"* || $body == *"$RAW_SECRET"* ]]; then
        echo raw
    elif [[ $code == 200 && $body == *'"AccessKeyId"'* && $body == *'"AccountId"'* ]]; then
        echo locked
    elif [[ $code == 000 || -z $code ]]; then
        echo none
    else
        echo "status $code"
    fi
}
metric() { # metric RESULT: credlock_task_credentials_total{agent="pod_identity",result=RESULT}
    in_i curl -s --max-time 3 "http://$ADMIN/metrics" |
        sed -n "s/^credlock_task_credentials_total{agent=\"pod_identity\",result=\"$1\"} //p"
}
# The moto-issued set the agent hands out for the pod's token, as "KEY SECRET TOKEN".
pod_set() {
    in_i env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \
        "$VENV/bin/python" -c '
import boto3, sys
sts = boto3.client("sts", endpoint_url=sys.argv[1])
c = sts.assume_role(RoleArn=sys.argv[2], RoleSessionName="eks-credlock-test-demo-pod-1")["Credentials"]
print(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
' "http://127.0.0.1:$MOTO_PORT" "$POD_ROLE"
}

setup() {
    local u set token
    for u in "$CRED_USER" "$APP_USER"; do
        useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$u" || return 1
        CREATED_USERS+=("$u")
    done
    [[ -n $CG2 ]] && { mkdir -p "$CG_DIR" || return 1; }
    ip netns add "$NS_I" && ip netns add "$NS_P" || return 1
    ip -n "$NS_I" link set lo up && ip -n "$NS_P" link set lo up || return 1
    # The agent's link addresses, on an interface of their own (nodad: usable at once). A veth
    # pair stands in for the agent's dummy link (this kernel may have no dummy driver): both ends
    # up, so the link has carrier.
    ip -n "$NS_I" link add pod-id-link0 type veth peer name pod-id-peer0 &&
        ip -n "$NS_I" addr add "$POD4/32" dev pod-id-link0 &&
        ip -n "$NS_I" addr add "$POD6/128" dev pod-id-link0 nodad &&
        ip -n "$NS_I" link set pod-id-peer0 up && ip -n "$NS_I" link set pod-id-link0 up || return 1
    ip -n "$NS_I" link add "$BR" type bridge && ip -n "$NS_I" addr add 10.215.0.1/24 dev "$BR" &&
        ip -n "$NS_I" addr add fd00:215::1/64 dev "$BR" nodad && ip -n "$NS_I" link set "$BR" up || return 1
    ip link add "$V_H" type veth peer name "$V_P" &&
        ip link set "$V_H" netns "$NS_I" && ip link set "$V_P" netns "$NS_P" &&
        ip -n "$NS_I" link set "$V_H" master "$BR" up &&
        ip -n "$NS_P" addr add 10.215.0.2/24 dev "$V_P" &&
        ip -n "$NS_P" addr add fd00:215::2/64 dev "$V_P" nodad && ip -n "$NS_P" link set "$V_P" up &&
        ip -n "$NS_P" route add default via 10.215.0.1 &&
        ip -n "$NS_P" -6 route add default via fd00:215::1 || return 1

    ip netns exec "$NS_I" "$PY" "$ROOT/tests/support/pod_identity_emulator.py" --listen "$POD4:80" \
        --listen "[$POD6]:80" --control "$AGENT_CTL" >"$TMP/agent.out" 2>&1 &
    PIDS+=($!)
    ip netns exec "$NS_I" "$PY" "$ROOT/tests/support/imds_emulator.py" --listen "$IMDS" \
        --control "$IMDS_CTL" >"$TMP/imds.out" 2>&1 &
    PIDS+=($!)
    ip netns exec "$NS_I" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$TMP/moto.out" 2>&1 &
    PIDS+=($!)
    wait_until 15 grep -q '^control ' "$TMP/agent.out"
    wait_until 15 grep -q '^control ' "$TMP/imds.out"
    wait_http "http://127.0.0.1:$MOTO_PORT/moto-api/" any 15 in_i
    set=$(pod_set) || { echo "moto did not issue the pod's set" >&2; return 1; }
    read -r RAW_KEY RAW_SECRET token <<<"$set"
    [[ -n $token ]] || return 1
    TOKEN=$(in_i curl -s --max-time 3 -X POST "http://$AGENT_CTL/tokens" -d "$(printf \
        '{"role_arn": "%s", "document": {"AccessKeyId": "%s", "SecretAccessKey": "%s", "Token": "%s"}}' \
        "$POD_ROLE" "$RAW_KEY" "$RAW_SECRET" "$token")" |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["token"])') || TOKEN=""
    if [[ -z $TOKEN ]]; then
        echo "the Pod Identity agent stand-in did not take the token" >&2
        cat "$TMP/agent.out" >&2
        return 1
    fi
    cat >"$TMP/credlock.toml" <<EOF
[server]
listen = ["127.0.0.1:8169"]
admin_listen = "$ADMIN"
upstream = "http://$IMDS"

[discovery.echo]
enabled = false

[discovery.static]
ipv4 = ["203.0.113.10"]

[containers.pod_identity]
listen = ["$POD4:$POD_PORT", "[$POD6]:$POD_PORT"]
EOF
    chmod 644 "$TMP/credlock.toml"
}

start_credlock() {
    local uid gid
    uid=$(id -u "$CRED_USER") gid=$(id -g "$CRED_USER")
    sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG_DIR" \
        nsenter --net="/run/netns/$NS_I" env -i PATH=/usr/bin:/bin HOME=/ AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" \
        setpriv --reuid "$uid" --regid "$gid" --clear-groups --inh-caps +net_bind_service \
        --ambient-caps +net_bind_service -- \
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

run_checks() {
    local v4=http://$POD4/v1/credentials v6="http://[$POD6]/v1/credentials" before after out
    export CREDLOCK_FIREWALL_CONFIG=/dev/null CREDLOCK_USER=$CRED_USER CREDLOCK_POD_IDENTITY=on
    export CREDLOCK_POD_IDENTITY_PORT=$POD_PORT CREDLOCK_FIREWALL_RUNDIR=$TMP/run
    export CREDLOCK_SERVICE_CGROUP=$CG_REL CREDLOCK_BOOT_EXEMPT_ROOT=no CREDLOCK_FIREWALL_LOCK_WAIT=10
    export CREDLOCK_IPV6=on

    # -- controls: the agent alone hands the pod's raw credentials to whoever has the token.
    expect "control: without credlock's rules an app gets the pod's raw set (IPv4)" raw "$(fetch app "$v4")"
    expect "control: without credlock's rules an app gets it over IPv6 too" raw "$(fetch app "$v6")"
    expect "control: without credlock's rules a pod gets the raw set" raw "$(fetch pod "$v4")"

    out=$(CREDLOCK_IPV6=off fw apply 2>&1)
    expect "CREDLOCK_IPV6=off with CREDLOCK_POD_IDENTITY=on is refused (78): [fd00:ec2::23] would stay open" \
        "78 yes" "$? $([[ $out == *fd00:ec2::23* ]] && echo yes || echo no)"
    expect "control: ... and the agent is still reachable directly, nothing was loaded" raw "$(fetch app "$v6")"

    fw apply >"$TMP/apply.log" 2>&1
    expect "apply with CREDLOCK_POD_IDENTITY=on succeeds" 0 "$?"
    fw status >/dev/null 2>&1
    expect "status: the rules are in place" 0 "$?"
    out=$(fw render 2>&1)
    expect "render names credlock's Pod Identity port on both addresses" yes \
        "$([[ $out == *"$POD4:$POD_PORT"* && $out == *"[$POD6]:$POD_PORT"* ]] && echo yes || echo no)"

    before=$(($(metric locked) + $(metric cached)))
    expect "an app asking 169.254.170.23 gets a locked set, not the raw one" locked "$(fetch app "$v4")"
    expect "an app asking [fd00:ec2::23] gets a locked set" locked "$(fetch app "$v6")"
    expect "root asking 169.254.170.23 gets a locked set" locked "$(fetch root "$v4")"
    expect "a pod asking 169.254.170.23 gets a locked set" locked "$(fetch pod "$v4")"
    expect "a pod asking [fd00:ec2::23] gets a locked set (IPv6 DNAT to the agent's address)" locked \
        "$(fetch pod "$v6")"
    after=$(($(metric locked) + $(metric cached)))
    expect "credlock served those five (its metrics)" 5 "$((after - before))"
    # What the pod got, as STS knows it: the pod role, assumed by credlock for this pod.
    out=$(in_p curl -s --max-time 3 -H "Authorization: $TOKEN" "$v6" | in_i "$VENV/bin/python" -c '
import boto3, json, sys
d = json.load(sys.stdin)
sts = boto3.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id=d["AccessKeyId"], aws_secret_access_key=d["SecretAccessKey"],
                   aws_session_token=d["Token"])
print(sts.get_caller_identity()["Arn"])
' "http://127.0.0.1:$MOTO_PORT" 2>&1)
    expect "moto knows the pod's set as the pod role assumed by credlock for that pod"         "arn:aws:sts::123456789012:assumed-role/pod-role/credlock-eks-eks-credlock-test-demo-pod-1" "$out"
    # The SDKs, as a pod's application reads them: the variables EKS gives a pod ("How EKS Pod
    # Identity works", Amazon EKS User Guide), the token file readable by the app.
    printf '%s' "$TOKEN" >"$TMP/token" && chmod 644 "$TMP/token"
    local kind url want=arn:aws:sts::123456789012:assumed-role/pod-role/credlock-eks-eks-credlock-test-demo-pod-1
    for kind in boto3 awscli rust js; do
        for url in "$v4" "$v6"; do
            expect "$kind with AWS_CONTAINER_CREDENTIALS_FULL_URI=$url gets the pod role's locked set" \
                "$want" "$(sdk_arn as_app "$kind" "AWS_ENDPOINT_URL_STS=http://127.0.0.1:$MOTO_PORT" \
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI=$url" "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=$TMP/token")"
        done
    done
    expect "a request without the token gets the agent's own 400 through credlock" "status 400" \
        "$(TOKEN="" fetch app "$v4")"
    if [[ -n $CG2 ]]; then
        expect "credlock's uid outside its cgroup is redirected like anyone (locked)" locked \
            "$(fetch cred "$v4")"
    fi
    expect "credlock's own uid, in its cgroup, reaches the agent itself (raw)" raw "$(fetch cred_cg "$v4")"
    expect "credlock's own uid, in its cgroup, reaches the agent over IPv6" raw "$(fetch cred_cg "$v6")"

    # Boot order on a node: credlock starts before the agent's DaemonSet adds its addresses.
    stop_credlock
    in_i ip addr del "$POD4/32" dev pod-id-link0 && in_i ip addr del "$POD6/128" dev pod-id-link0
    start_credlock
    expect "credlock starts while the agent's addresses do not exist yet (IP_FREEBIND)" yes \
        "$([[ -n $CREDLOCK_PID ]] && kill -0 "$CREDLOCK_PID" 2>/dev/null && echo yes || echo no)"
    in_i ip addr add "$POD4/32" dev pod-id-link0 && in_i ip addr add "$POD6/128" dev pod-id-link0 nodad
    expect "once the addresses appear, a pod gets a locked set over IPv4" locked "$(fetch pod "$v4")"
    expect "once the addresses appear, a pod gets a locked set over IPv6" locked "$(fetch pod "$v6")"

    stop_credlock
    expect "credlock stopped: an app gets no credentials (fail closed), not the raw ones" none "$(fetch app "$v4")"
    expect "credlock stopped: a pod gets none either (IPv4)" none "$(fetch pod "$v4")"
    expect "credlock stopped: a pod gets none either (IPv6)" none "$(fetch pod "$v6")"
    out=$(as_app "$PY" -c '
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
    print("bound")
except OSError as e:
    print("refused", e.errno)
' "$POD4" "$POD_PORT" 2>&1)
    expect "credlock stopped: an app cannot listen on credlock's port to collect pods' tokens" refused \
        "${out%% *}"

    fw remove >/dev/null 2>&1
    fw status >/dev/null 2>&1
    expect "remove: the rules are gone (status 3)" 3 "$?"
    expect "remove: the agent's own path is back (raw, as before credlock)" raw "$(fetch app "$v4")"
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
