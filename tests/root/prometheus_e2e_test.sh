#!/bin/bash
# prometheus_e2e_test.sh: prove that credlock's metrics work with a real Prometheus, that the
# shipped alert rules are valid and pass their unit tests, and that no credential ever shows in
# /metrics, /status, credlock's log or anything Prometheus stores.
#
#   tests/root/prometheus_e2e_test.sh
#
# Needs no root (it lives with the system tests), only loopback: the IMDS emulator, moto (STS),
# credlock and Prometheus each listen on a free 127.0.0.1 port. Installs the Debian package
# `prometheus` (for prometheus and promtool) when it is missing; that needs root and the apt
# registry, and is the only step outside the 60 s budget.
#
# Checks, in order:
#   1. credlock becomes ready (/readyz 200) with the emulator as upstream and moto as STS.
#   2. `promtool check metrics` accepts a live scrape of /metrics (exit 0: no lint problem).
#   3. `promtool check rules` and `promtool test rules` pass on ami/monitoring/, and
#      `promtool check config` on the example ami/monitoring/prometheus.yml.
#   4. A real Prometheus (1 s scrape, own storage dir) scrapes credlock: the target is up, and
#      after traffic through credlock (token PUT, metadata GET, credentials GET) it sees
#      credlock_requests_total > 0 for each route used and a successful credential refresh;
#      it loaded credlock-alerts.yml and every rule evaluates without error.
#   5. Neither the credentials credlock served nor the emulator's raw ones (its control API,
#      GET /state) appear in /status, /metrics, credlock's log or Prometheus's label values.
# Prints PASS/FAIL per check and "N passed, M failed"; exits 1 on any failure.
#
# CREDLOCK_BIN overrides target/debug/credlock; CREDLOCK_VENV the venv (moto, Python);
# KEEP_TMP=1 keeps the temporary directory (logs, scrapes) when a check fails.
# shellcheck disable=SC2317 # most functions run through check or wait_until
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CREDLOCK_BIN=${CREDLOCK_BIN:-$ROOT/target/debug/credlock}
VENV=${CREDLOCK_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
MOTO=$VENV/bin/moto_server
EMULATOR=$ROOT/tests/support/imds_emulator.py
MONITORING=$ROOT/ami/monitoring
BUDGET=55 # seconds, from the first process started to the verdict

# shellcheck source=tests/lib.sh
. "$HERE/../lib.sh" # pass, fail, check, summary, at_exit, stop_background, alive, wait_*, http_answers, free_ports
WAIT_INTERVAL=0.2   # wait_until's poll interval (its WAIT_DEADLINE: the end of the budget)

# A JSON value from stdin: json_get PYTHON_EXPRESSION (the document is `d`).
json_get() {
    python3 -c 'import json,sys; d=json.load(sys.stdin); r=eval(sys.argv[1]); print(r if isinstance(r,str) else json.dumps(r))' "$1"
}

# The value of an instant PromQL query as a number ("" when the result is empty).
prom_query() {
    curl -s --max-time 2 --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" |
        python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
r = d.get("data", {}).get("result", [])
if d.get("status") == "success" and r:
    print(r[0]["value"][1])'
}

prom_positive() {
    local v
    v=$(prom_query "$1")
    [[ -n $v ]] && python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)' "$v"
}

# prom_at_least QUERY MIN: the query's value is > 0 and >= MIN.
prom_at_least() {
    local v
    v=$(prom_query "$1")
    [[ -n $v ]] && python3 -c '
import sys
v = float(sys.argv[1])
sys.exit(0 if v > 0 and v >= float(sys.argv[2]) else 1)' "$v" "$2"
}

# scraped_value FILE METRIC LABEL=VALUE...: one sample's value from a text exposition.
scraped_value() {
    python3 - "$@" <<'PY'
import re, sys
path, name, *want = sys.argv[1:]
want = dict(w.split("=", 1) for w in want)
for line in open(path):
    m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
    if not m or m.group(1) != name:
        continue
    labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        print(m.group(3))
        break
PY
}

target_up() {
    curl -s --max-time 2 "http://127.0.0.1:$PROM_PORT/api/v1/targets" | python3 -c '
import json, sys
d = json.load(sys.stdin)
ts = [t for t in d["data"]["activeTargets"] if t["labels"].get("job") == "credlock"]
sys.exit(0 if ts and all(t["health"] == "up" for t in ts) else 1)' 2>/dev/null
}

rules_healthy() {
    curl -s --max-time 2 "http://127.0.0.1:$PROM_PORT/api/v1/rules" | python3 -c '
import json, sys
d = json.load(sys.stdin)
rules = [r for g in d["data"]["groups"] for r in g["rules"]]
bad = [r["name"] for r in rules if r.get("health") != "ok"]
if bad:
    print("unhealthy rules: " + ", ".join(bad), file=sys.stderr)
sys.exit(0 if len(rules) > 0 and not bad else 1)' 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# Tools

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "installing prometheus from apt (not counted in the time budget)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { timeout 300 apt-get update -qq &&
        timeout 300 apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
        fail "install prometheus from apt"
        summary
    fi
fi
for tool in "$CREDLOCK_BIN" "$PY" "$MOTO" promtool prometheus curl python3; do
    if ! command -v "$tool" >/dev/null; then
        fail "required tool present" "$tool"
        summary
    fi
done

START=$SECONDS
WAIT_DEADLINE=$((START + BUDGET))
TMP=$(mktemp -d /tmp/credlock-prom-e2e.XXXXXX)
remove_tmp() { if ((FAILED > 0)) && [[ -n ${KEEP_TMP:-} ]]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi; }
at_exit remove_tmp
at_exit stop_background 3 # PIDS: the emulator, moto, credlock, Prometheus
read -r MOTO_PORT IMDS_PORT ADMIN_PORT PROM_PORT <<<"$(free_ports 4)"

# ---------------------------------------------------------------------------------------------
# Emulator, moto, credlock

"$PY" "$EMULATOR" --listen 127.0.0.1:0 --control 127.0.0.1:0 >"$TMP/emulator.out" 2>"$TMP/emulator.err" &
PIDS+=($!)
"$MOTO" -H 127.0.0.1 -p "$MOTO_PORT" >"$TMP/moto.log" 2>&1 &
PIDS+=($!)

if ! wait_until 10 grep -q '^control ' "$TMP/emulator.out"; then
    fail "IMDS emulator starts" "$(cat "$TMP/emulator.err")"
    summary
fi
UPSTREAM=$(awk '$1 == "listening" { print $2; exit }' "$TMP/emulator.out")
CONTROL=$(awk '$1 == "control" { print $2; exit }' "$TMP/emulator.out")

if ! wait_http "http://127.0.0.1:$MOTO_PORT/moto-api/" any 15; then
    fail "moto starts" "$(tail -5 "$TMP/moto.log")"
    summary
fi

cat >"$TMP/credlock.toml" <<EOF
[server]
listen = ["127.0.0.1:$IMDS_PORT"]
admin_listen = "127.0.0.1:$ADMIN_PORT"
upstream = "http://$UPSTREAM"

[discovery.echo]
enabled = false
EOF

env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
    AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" \
    "$CREDLOCK_BIN" run --config "$TMP/credlock.toml" --log-format plain >"$TMP/credlock.log" 2>&1 &
PIDS+=($!)
CREDLOCK_PID=$!

ADMIN=http://127.0.0.1:$ADMIN_PORT
IMDS=http://127.0.0.1:$IMDS_PORT
if wait_ready "$CREDLOCK_PID" 20 http_answers 200 "$ADMIN/readyz"; then
    pass "credlock ready (/readyz 200)"
else
    alive "$CREDLOCK_PID" || echo "credlock exited early" >>"$TMP/credlock.log"
    fail "credlock ready (/readyz 200)" "$(tail -5 "$TMP/credlock.log" | tr '\n' ' ')"
    summary
fi

# ---------------------------------------------------------------------------------------------
# promtool on a live scrape and on the shipped files

curl -s --max-time 2 "$ADMIN/metrics" >"$TMP/metrics.txt"
if promtool check metrics <"$TMP/metrics.txt" >"$TMP/promtool-metrics.out" 2>&1; then
    pass "promtool check metrics on a live scrape (exit 0)"
else
    fail "promtool check metrics on a live scrape (exit 0)" "$(tr '\n' ' ' <"$TMP/promtool-metrics.out")"
fi

promtool_quiet() { "$@" >"$TMP/promtool.out" 2>&1 || { cat "$TMP/promtool.out" >&2; return 1; }; }
check "promtool check rules credlock-alerts.yml" \
    promtool_quiet promtool check rules "$MONITORING/credlock-alerts.yml"
check "promtool test rules credlock-alerts.test.yml" \
    promtool_quiet promtool test rules "$MONITORING/credlock-alerts.test.yml"
check "promtool check config ami/monitoring/prometheus.yml" \
    promtool_quiet promtool check config "$MONITORING/prometheus.yml"

# ---------------------------------------------------------------------------------------------
# A real Prometheus scraping credlock

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $MONITORING/credlock-alerts.yml
scrape_configs:
  - job_name: credlock
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)

if ! wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 200 15; then
    fail "Prometheus starts" "$(tail -5 "$TMP/prometheus.log")"
    summary
fi

# Traffic through credlock's IMDS listener: what an SDK does.
TOKEN=$(curl -s --max-time 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$IMDS/latest/api/token")
INSTANCE_ID=$(curl -s --max-time 2 -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/instance-id")
ROLE=$(curl -s --max-time 2 -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/iam/security-credentials/")
curl -s --max-time 2 -H "X-aws-ec2-metadata-token: $TOKEN" \
    "$IMDS/latest/meta-data/iam/security-credentials/$ROLE" >"$TMP/served.json"
if [[ -n $TOKEN && $INSTANCE_ID == i-* && -n $ROLE ]] &&
    [[ $(json_get 'd["Code"]' <"$TMP/served.json" 2>/dev/null) == Success ]]; then
    pass "traffic through credlock (token, metadata, role listing, credentials)"
else
    fail "traffic through credlock (token, metadata, role listing, credentials)" \
        "token=${#TOKEN} chars instance-id=$INSTANCE_ID role=$ROLE"
fi

check "Prometheus: target credlock is up (/api/v1/targets)" wait_until 10 target_up
check "Prometheus: up{job=\"credlock\"} == 1" wait_until 10 prom_positive 'up{job="credlock"}'
# What credlock itself counted right after the traffic: Prometheus must catch up with it.
curl -s --max-time 2 "$ADMIN/metrics" >"$TMP/metrics-traffic.txt"
for route in token passthrough role_listing credentials; do
    expected=$(scraped_value "$TMP/metrics-traffic.txt" credlock_requests_total "route=$route" code_class=2xx)
    check "Prometheus: credlock_requests_total{route=\"$route\",code_class=\"2xx\"} > 0 and >= ${expected:-?} (credlock's count after the traffic)" \
        wait_until 10 prom_at_least "credlock_requests_total{job=\"credlock\",route=\"$route\",code_class=\"2xx\"}" "${expected:-1}"
done
check "Prometheus: credlock_credential_refreshes_total{result=\"success\"} > 0" \
    wait_until 10 prom_positive 'credlock_credential_refreshes_total{job="credlock",result="success"}'
check "Prometheus: credlock_ready == 1" wait_until 10 prom_positive 'credlock_ready{job="credlock"}'
check "Prometheus: credlock_locked_credentials_remaining_seconds > 1200" \
    wait_until 10 prom_positive 'credlock_locked_credentials_remaining_seconds{job="credlock"} - 1200'
check "Prometheus: credlock-alerts.yml loaded, every rule healthy (/api/v1/rules)" \
    wait_until 10 rules_healthy
no_alerts() {
    local v
    v=$(prom_query 'count(ALERTS)')
    [[ -z $v ]]
}
check "Prometheus: no credlock alert pending or firing on a healthy instance" no_alerts

# ---------------------------------------------------------------------------------------------
# No secret anywhere

curl -s --max-time 2 "$ADMIN/status" >"$TMP/status.json"
curl -s --max-time 2 "$ADMIN/metrics" >"$TMP/metrics-after.txt"
curl -s --max-time 2 "http://$CONTROL/state" >"$TMP/emulator-state.json"
{
    curl -s --max-time 2 "http://127.0.0.1:$PROM_PORT/api/v1/labels"
    for label in $(curl -s --max-time 2 "http://127.0.0.1:$PROM_PORT/api/v1/labels" | json_get '" ".join(d["data"])'); do
        curl -s --max-time 2 "http://127.0.0.1:$PROM_PORT/api/v1/label/$label/values"
    done
} >"$TMP/prometheus-labels.json"

check "status.json parses and says ready" \
    python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ready"] is True else 1)' "$TMP/status.json"

# secret_values FILE PYTHON_EXPR: one secret per line (AccessKeyId, SecretAccessKey, Token).
secret_values() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for cred in eval(sys.argv[2]):
    for field in ("AccessKeyId", "SecretAccessKey", "Token"):
        print(cred[field])
EOF
}
secret_values "$TMP/served.json" '[d]' >"$TMP/served.secrets"
secret_values "$TMP/emulator-state.json" 'list(d["credentials"].values())' >"$TMP/raw.secrets"
if [[ $(wc -l <"$TMP/served.secrets") -eq 3 && $(wc -l <"$TMP/raw.secrets") -ge 6 ]]; then
    pass "collected served (3) and raw emulator ($(wc -l <"$TMP/raw.secrets")) secret values"
else
    fail "collected served and raw emulator secret values"
fi
if grep -qxFf "$TMP/raw.secrets" "$TMP/served.secrets"; then
    fail "credlock served locked credentials, not the emulator's raw ones"
else
    pass "credlock served locked credentials, not the emulator's raw ones"
fi

# absent NAME SECRETS_FILE TARGET_FILE
absent() {
    local what=$1 secrets=$2 target=$3 hits
    if [[ ! -s $secrets || ! -s $target ]]; then
        fail "no $what in $(basename "$target")" "nothing to compare"
        return
    fi
    hits=$(grep -cFf "$secrets" "$target")
    if [[ $hits == 0 ]]; then
        pass "no $what in $(basename "$target")"
    else
        fail "no $what in $(basename "$target")" "$hits matching lines"
    fi
}
for target in "$TMP/status.json" "$TMP/metrics.txt" "$TMP/metrics-after.txt" \
    "$TMP/credlock.log" "$TMP/prometheus-labels.json"; do
    absent "served credential value" "$TMP/served.secrets" "$target"
    absent "raw emulator credential value" "$TMP/raw.secrets" "$target"
done

if alive "$CREDLOCK_PID"; then
    pass "credlock still running"
else
    fail "credlock still running"
fi
if ((SECONDS < WAIT_DEADLINE)); then
    pass "finished within the ${BUDGET} s budget ($((SECONDS - START)) s)"
else
    fail "finished within the ${BUDGET} s budget ($((SECONDS - START)) s)"
fi
summary
