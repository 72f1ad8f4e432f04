# shellcheck shell=bash
# The per-process access policy (issue 15), sourced by netns_firewall_test.sh: its namespaces,
# users, IMDS emulator and firewall rules, and its helpers (in_i, as_app, start_credlock...) and
# tests/lib.sh's (pass, fail, expect, wait_http...).
#
# credlock restarts with [[access.rule]]s and moto as STS (so it holds locked credentials), and
# real clients ask IMDS through the firewall as different users over IPv4 and IPv6:
#   web          the app user: no credentials, metadata only under placement/
#   v2only       a second user: IMDSv2 required on the credential routes
#   unit         root inside a cgroup named like a systemd service: matched by its unit
#   allowed      a third user: locked credentials (boto3's own credential provider)
#   worker-role  a fourth user: another role's locked set (access.rule.role), its name listed
#   unidentified a container's forwarded connection (redirect mode): no credentials
#   default-deny everyone else (root outside the unit): no credentials

ACCESS_MOTO=127.0.0.1:5055
ACCESS_UNIT=clfw-unit-$ID.service
ACCESS_ROLE=credlock-worker-s3 # the worker-role class's role (moto assumes any role ARN)
MOTO_PID=""

# start_moto: moto_server (STS) inside the instance namespace, once per run.
start_moto() {
    alive "$MOTO_PID" && return 0
    # `ip netns exec` execs moto, so $! is moto itself (in_i in the background would be a
    # subshell's PID, and stopping that at exit left moto running).
    ip netns exec "$NS_I" "$VENV/bin/moto_server" -H "${ACCESS_MOTO%:*}" -p "${ACCESS_MOTO#*:}" >"$TMP/moto.log" 2>&1 &
    MOTO_PID=$!
    wait_http "http://$ACCESS_MOTO/moto-api/data.json" any 10 in_i
}

write_access_config() {
    cat >"$TMP/access.toml" <<EOF
[discovery.echo]
enabled = false

[firewall]
required = false

[[access.rule]]
name = "web"
users = ["$APP_USER"]
credentials = "deny"
metadata = ["/latest/meta-data/placement/"]

[[access.rule]]
name = "v2only"
users = ["$V2_USER"]
require_token = true

[[access.rule]]
name = "unit"
units = ["clfw-unit-*.service"]

[[access.rule]]
name = "allowed"
users = ["$OK_USER"]

[[access.rule]]
name = "worker-role"
users = ["$ROLE_USER"]
role = "arn:aws:iam::123456789012:role/$ACCESS_ROLE"

[[access.rule]]
name = "unidentified"
unidentified = true
credentials = "deny"
metadata = "deny"

[[access.rule]]
name = "default-deny"
credentials = "deny"
EOF
    chmod 644 "$TMP/access.toml"
}

# imds WHO HOST PATH [v1]: "STATUS KIND" for a GET of PATH (IMDSv2: token PUT first, unless v1),
# KIND raw | locked | text | none. WHO: app | v2 | ok | role | root | unit | container.
# shellcheck disable=SC2016 # unit: $$ and $1 belong to the inner sh
imds() {
    local who=$1 host=$2 path=$3 mode=${4:-v2} url run=() token="" out code body
    url="http://$host"
    [[ $host == *:* ]] && url="http://[$host]"
    case $who in
    app) run=(ip netns exec "$NS_I" runuser -u "$APP_USER" --) ;;
    v2) run=(ip netns exec "$NS_I" runuser -u "$V2_USER" --) ;;
    ok) run=(ip netns exec "$NS_I" runuser -u "$OK_USER" --) ;;
    role) run=(ip netns exec "$NS_I" runuser -u "$ROLE_USER" --) ;;
    root) run=(ip netns exec "$NS_I") ;;
    unit) run=(sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG2/clfw-$ID/$ACCESS_UNIT" ip netns exec "$NS_I") ;;
    container) run=(ip netns exec "$NS_C") ;;
    esac
    if [[ $mode == v2 ]]; then
        token=$("${run[@]}" curl -sS -g --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$url/latest/api/token" 2>/dev/null)
    fi
    out=$("${run[@]}" curl -sS -g --max-time 5 -w '\n%{http_code}' ${token:+-H "X-aws-ec2-metadata-token: $token"} "$url$path" 2>/dev/null)
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    if [[ $body == *ASIAV1* || $body == *ASIAV2* || $body == *ASIAID* ]]; then
        echo "$code raw"
    elif [[ $body == *'"AccessKeyId"'* ]]; then
        echo "$code locked"
    elif [[ -n $body ]]; then
        echo "$code text"
    else
        echo "$code none"
    fi
}

access_decisions() {
    in_i curl -s --max-time 3 "http://$ADMIN/metrics" |
        awk -v r="$1" -v d="$2" '$1 == "credlock_access_decisions_total{decision=\"" d "\",rule=\"" r "\"}" { print $2; f=1 } END { if (!f) print 0 }'
}

access_checks() {
    local host url who out creds="/latest/meta-data/iam/security-credentials/credlock-test-role" ready=0 before after
    if ! start_moto; then
        fail "access policy: moto (STS) starts in the instance namespace" "$(tail -n 5 "$TMP/moto.log")"
        return
    fi
    write_access_config
    local log_start
    log_start=$(wc -l <"$TMP/credlock.log")
    mkdir -p "$CG2/clfw-$ID/$ACCESS_UNIT"
    stop_credlock
    CREDLOCK_EXTRA="--config $TMP/access.toml" STS_URL="http://$ACCESS_MOTO" start_credlock || {
        fail "access policy: credlock starts with [[access.rule]]s"
        return
    }
    if wait_http "http://$ADMIN/readyz" 200 10 in_i; then ready=1; fi
    expect "access policy: credlock ready with locked credentials (moto as STS)" 1 "$ready"

    # The log names the caller's processes (its cgroup's): here the unit's cgroup holds only
    # the client, so the served line names its pid.
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner sh
    out=$(sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$CG2/clfw-$ID/$ACCESS_UNIT" ip netns exec "$NS_I" "$PY" -c '
import os, sys, urllib.request
print(os.getpid(), flush=True)
put = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
t = urllib.request.urlopen(put, timeout=5).read().decode()
get = urllib.request.Request("http://169.254.169.254" + sys.argv[1], headers={"X-aws-ec2-metadata-token": t})
body = urllib.request.urlopen(get, timeout=5).read()
print("locked" if b"AccessKeyId" in body and b"ASIAV" not in body else "other")' "$creds" 2>&1 | tr '\n' ' ')
    out=${out% }
    local client_pid=${out%% *}
    expect "unit class: a client alone in $ACCESS_UNIT gets the locked set" locked "${out#* }"
    expect "log: the served line names the unit's one process (pids=$client_pid)" 1 \
        "$(tail -n "+$((log_start + 1))" "$TMP/credlock.log" | sed 's/\x1b\[[0-9;]*m//g' |
            grep "locked credentials served to a caller" | grep -c "pids=$client_pid ")"
    for host in "$IMDS4" "$IMDS6"; do
        expect "web class ($host): credentials 404, listing 404" "404 text 404 text" \
            "$(imds app "$host" "$creds") $(imds app "$host" /latest/meta-data/iam/security-credentials/)"
        expect "web class ($host): placement/ allowed (a dated version too), instance-id 404, token PUT works" \
            "200 text 200 text 404 text" \
            "$(imds app "$host" /latest/meta-data/placement/availability-zone) $(imds app "$host" /2021-01-03/meta-data/placement/region) $(imds app "$host" /latest/meta-data/instance-id)"
        expect "v2only class ($host): tokenless credential GET 401, IMDSv2 gets the locked set" "401 text 200 locked" \
            "$(imds v2 "$host" "$creds" v1) $(imds v2 "$host" "$creds")"
        expect "unit class ($host): root in $ACCESS_UNIT gets the locked set" "200 locked" "$(imds unit "$host" "$creds")"
        expect "default-deny ($host): root outside the unit gets 404, metadata still works" "404 text 200 text" \
            "$(imds root "$host" "$creds") $(imds root "$host" /latest/meta-data/instance-id)"
    done
    # boto3's own credential chain (IMDSv2, the instance-metadata provider), as the allowed user.
    for host in ipv4 ipv6; do
        out=$(ip netns exec "$NS_I" runuser -u "$OK_USER" -- env -i PATH=/usr/bin:/bin HOME=/ PYTHONPATH="$SITE" "$PY" -c '
import sys
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher
config = {"ec2_metadata_service_endpoint_mode": "ipv6"} if sys.argv[1] == "ipv6" else {}
creds = InstanceMetadataProvider(iam_role_fetcher=InstanceMetadataFetcher(timeout=3, num_attempts=1, config=config)).load()
print("none" if creds is None else ("raw" if creds.access_key.startswith(("ASIAV1", "ASIAV2", "ASIAID")) else "locked"))
' "$host" 2>&1 | tail -n 1)
        expect "allowed class ($host): boto3's instance-metadata provider gets the locked set" locked "$out"
        out=$(ip netns exec "$NS_I" runuser -u "$APP_USER" -- env -i PATH=/usr/bin:/bin HOME=/ PYTHONPATH="$SITE" "$PY" -c '
import sys
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher
config = {"ec2_metadata_service_endpoint_mode": "ipv6"} if sys.argv[1] == "ipv6" else {}
creds = InstanceMetadataProvider(iam_role_fetcher=InstanceMetadataFetcher(timeout=3, num_attempts=1, config=config)).load()
print("none" if creds is None else "got")
' "$host" 2>&1 | tail -n 1)
        expect "web class ($host): boto3's provider finds no credentials (graceful, no exception)" none "$out"
    done
    # A per-class role, as an SDK meets it: boto3's instance-metadata provider (IMDSv2: the
    # listing, then the listed name) as the worker-role user, and moto's GetCallerIdentity with
    # what it got: the class role, assumed by this instance. The allowed user still gets the
    # instance role. The class never sees the instance role's name or set.
    for host in ipv4 ipv6; do
        for who in "$ROLE_USER" "$OK_USER"; do
            out=$(ip netns exec "$NS_I" runuser -u "$who" -- env -i PATH=/usr/bin:/bin HOME=/ PYTHONPATH="$SITE" \
                AWS_ENDPOINT_URL_STS="http://$ACCESS_MOTO" "$PY" -c '
import sys
import boto3
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher
config = {"ec2_metadata_service_endpoint_mode": "ipv6"} if sys.argv[1] == "ipv6" else {}
creds = InstanceMetadataProvider(iam_role_fetcher=InstanceMetadataFetcher(timeout=3, num_attempts=1, config=config)).load()
if creds is None:
    print("none")
    sys.exit()
kind = "raw" if creds.access_key.startswith(("ASIAV1", "ASIAV2", "ASIAID")) else "locked"
sts = boto3.client("sts", region_name="us-east-1", aws_access_key_id=creds.access_key,
                   aws_secret_access_key=creds.secret_key, aws_session_token=creds.token)
print(kind, sts.get_caller_identity()["Arn"])
' "$host" 2>&1 | tail -n 1)
            if [[ $who == "$ROLE_USER" ]]; then
                expect "worker-role class ($host): boto3 gets the class role's locked set (moto: assumed-role/$ACCESS_ROLE)" \
                    "locked arn:aws:sts::123456789012:assumed-role/$ACCESS_ROLE/$IID" "$out"
            else
                expect "allowed class ($host): still the instance role's locked set next to a class role" \
                    "locked arn:aws:sts::123456789012:assumed-role/credlock-test-role/$IID" "$out"
            fi
        done
    done
    for host in "$IMDS4" "$IMDS6"; do
        url="http://$host"
        [[ $host == *:* ]] && url="http://[$host]"
        # shellcheck disable=SC2016 # $1 and $2 belong to the inner sh
        out=$(ip netns exec "$NS_I" runuser -u "$ROLE_USER" -- sh -c '
t=$(curl -sS -g --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$1/latest/api/token")
curl -sS -g --max-time 5 -H "X-aws-ec2-metadata-token: $t" -w " %{http_code}" "$1/latest/meta-data/iam/security-credentials/"
echo
curl -sS -g --max-time 5 -w " %{http_code}" -o /dev/null "$1/latest/meta-data/iam/security-credentials/"
echo
curl -sS -g --max-time 5 -H "X-aws-ec2-metadata-token: bogus" -w " %{http_code}" -o /dev/null "$1/latest/meta-data/iam/security-credentials/$2"' \
            sh "$url" "$ACCESS_ROLE" 2>&1 | tr '\n' ' ')
        expect "worker-role class ($host): the listing names its role; tokenless and a bad token are still judged by IMDS" \
            "$ACCESS_ROLE 200  200  401" "$out"
        expect "worker-role class ($host): the instance role's name is 404 for this class; another class still gets it" \
            "404 text 200 locked" "$(imds role "$host" "$creds") $(imds ok "$host" "$creds")"
    done
    out=$(in_i curl -s --max-time 3 "http://$ADMIN/status" | "$PY" -c '
import json, sys
roles = json.load(sys.stdin)["class_roles"]
print(" ".join(f"{r['"'"'role_arn'"'"']} {r['"'"'rules'"'"']} {r['"'"'held'"'"']} {r['"'"'lock'"'"']['"'"'consecutive_failures'"'"']}" for r in roles))' 2>&1)
    expect "/status: the class role, its rule, held, no failures" \
        "arn:aws:iam::123456789012:role/$ACCESS_ROLE ['worker-role'] True 0" "$out"
    out=$(in_i curl -s --max-time 3 "http://$ADMIN/metrics" | awk -v r="arn:aws:iam::123456789012:role/$ACCESS_ROLE" '
        $1 == "credlock_class_role_refreshes_total{result=\"success\",role=\"" r "\"}" { ok = $2 }
        $1 == "credlock_class_role_remaining_seconds{role=\"" r "\"}" { left = $2 }
        END { print (ok >= 1 ? "refreshed" : "not refreshed"), (left > 600 ? "remaining" : "expired") }')
    expect "metrics: the class role's own lock series" "refreshed remaining" "$out"
    out=$(tail -n "+$((log_start + 1))" "$TMP/credlock.log" | sed 's/\x1b\[[0-9;]*m//g' |
        grep "locked credentials served to a caller" | grep "uid=$(id -u "$ROLE_USER") " | grep -cE "role=\"?arn:aws:iam::123456789012:role/$ACCESS_ROLE")
    expect "log: the class role's set logged once for its caller, with the role" 1 "$out"
    # A dual-stack client (an AF_INET6 socket to ::ffff:169.254.169.254, Java's default) sends
    # IPv4; the kernel reports its socket with IPv4-mapped addresses. It is still the allowed user.
    out=$(ip netns exec "$NS_I" runuser -u "$OK_USER" -- "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(("::ffff:169.254.169.254", 80))
s.sendall(("GET " + sys.argv[1] + " HTTP/1.0\r\nHost: x\r\n\r\n").encode())
data = b""
while chunk := s.recv(4096):
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(head.split()[1].decode(), "raw" if b"ASIAV" in body else ("locked" if b"AccessKeyId" in body else "text"))' "$creds" 2>&1)
    expect "allowed class, dual-stack socket (AF_INET6 to ::ffff:169.254.169.254): identified, locked set" "200 locked" "$out"
    if [[ ${MODE:?} == redirect ]]; then
        before=$(in_i curl -s --max-time 3 "http://$ADMIN/metrics" | awk '$1 == "credlock_connections_identified_total{result=\"forwarded\"}" { print $2 }')
        expect "unidentified: a container's forwarded connection gets no credentials, no metadata" "404 text 404 text" \
            "$(imds container "$IMDS4" "$creds" v1) $(imds container "$IMDS4" /latest/meta-data/instance-id v1)"
        after=$(in_i curl -s --max-time 3 "http://$ADMIN/metrics" | awk '$1 == "credlock_connections_identified_total{result=\"forwarded\"}" { print $2 }')
        expect "unidentified: counted as forwarded (credlock_connections_identified_total)" 2 "$((${after:-0} - ${before:-0}))"
        # The kernel's socket lookup falls back to a listener on the source port when no
        # connection has the tuple: a container choosing the port of an allowed user's listener
        # must stay unidentified, not become that user.
        ip netns exec "$NS_I" runuser -u "$OK_USER" -- "$PY" -c '
import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 9100)); s.listen(); time.sleep(20)' &
        local listener_pid=$!
        sleep 0.5
        out=$(in_c curl -sS -g --max-time 5 --local-port 9100 -w ' %{http_code}' -o /dev/null "http://$IMDS4$creds" 2>&1)
        stop_pids 5 "$listener_pid"
        expect "unidentified: a container using the source port of the allowed user's listener is not that user (404)" " 404" "$out"
    fi
    expect "metrics: denials and allowances counted per rule" "yes yes yes yes" \
        "$( (($(access_decisions web denied) >= 6)) && echo yes || echo no) $( (($(access_decisions web allowed) >= 4)) && echo yes || echo no) $( (($(access_decisions v2only token_required) >= 2)) && echo yes || echo no) $( (($(access_decisions allowed allowed) >= 2)) && echo yes || echo no)"
    out=$(in_i curl -s --max-time 3 "http://$ADMIN/status" | "$PY" -c '
import json, sys
rules = json.load(sys.stdin)["access"]
web = next(r for r in rules if r["rule"] == "web")
print(" ".join(r["rule"] for r in rules), web["denied"] >= 6, web["allowed"] >= 4)' 2>&1)
    expect "/status lists the rules in order (and the fallbacks) with their counts" \
        "web v2only unit allowed worker-role unidentified default-deny (none) (unidentified) True True" "$out"
    out=$(tail -n "+$((log_start + 1))" "$TMP/credlock.log" | sed 's/\x1b\[[0-9;]*m//g' |
        grep "locked credentials served to a caller" | grep -c "uid=$(id -u "$OK_USER") ")
    expect "log: the allowed user's locked set logged once (uid, access key id; never a secret)" "1 0" \
        "$out $(grep -c 'SecretAccessKey\|secret_access_key' "$TMP/credlock.log")"
    rmdir "$CG2/clfw-$ID/$ACCESS_UNIT" 2>/dev/null
}
