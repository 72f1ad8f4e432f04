#!/usr/bin/env bash
# credlock's main job, locally: the IMDS emulator as the instance metadata service, moto as
# STS, credlock in front. Shows the raw credentials an attacker would steal, the locked ones
# credlock serves instead, the policy that locks them, and a real SDK (boto3) using them.
# Usage: tests/demo.sh [--keep]   (--keep: leave credlock serving until Ctrl-C)
# It fails (exit 1, with the last lines of credlock's log) when credlock does not become ready.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=tests/lib.sh
. "$root/tests/lib.sh" # at_exit, stop_background, free_ports, wait_until, wait_http, BOLD/PLAIN (a terminal only)

tests/setup.sh --minimal
printf '%s== Building credlock (debug). The first build compiles the AWS SDK: several minutes on 2 cores (about 16 on a fresh 2-core machine); later runs take seconds.%s\n' "$BOLD" "$PLAIN"
# --examples: the examples use the dev-dependencies, so cargo resolves the crate features the
# test suite's build uses and tests/run.sh afterwards compiles only credlock's own test targets.
cargo build --bin credlock --examples
bin=$root/target/debug/credlock
py=$root/.venv/bin/python

work=$(mktemp -d)
at_exit rm -rf "$work"
at_exit stop_background 5 # PIDS: the emulator, moto, credlock
step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$PLAIN"; }
# abort MESSAGE: the demo failed: MESSAGE and the last lines of the logs, exit 1.
abort() {
    printf '\n%sdemo FAILED: %s%s\n' "$BOLD" "$*" "$PLAIN" >&2
    for log in credlock.log emu.err moto.log; do
        [[ -s $work/$log ]] && { printf -- '--- last lines of %s:\n' "$log" >&2; tail -n 30 "$work/$log" >&2; }
    done
    exit 1
}

"$py" tests/support/imds_emulator.py --listen 127.0.0.1:0 --control 127.0.0.1:0 >"$work/emu" 2>"$work/emu.err" &
PIDS+=($!)
moto_port=$(free_ports 1)
.venv/bin/moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
PIDS+=($!)
wait_until 5 grep -q '^control' "$work/emu" || abort "the IMDS emulator did not start"
imds=$(awk '/^listening/{print $2; exit}' "$work/emu")
[[ -n $imds ]] || abort "the IMDS emulator did not start"
# CREDLOCK_DEMO_IMDS=HOST:PORT points credlock elsewhere (a port where nothing listens shows how
# the demo fails when credlock cannot become ready).
imds=${CREDLOCK_DEMO_IMDS:-$imds}
wait_http "http://127.0.0.1:$moto_port/" any 20 || abort "moto (the local STS) did not start"

read -r port admin <<<"$(free_ports 2)"
cat >"$work/credlock.toml" <<TOML
[server]
listen = ["127.0.0.1:$port"]
admin_listen = "127.0.0.1:$admin"
upstream = "http://$imds"
[lock]
sts_endpoint = "http://127.0.0.1:$moto_port"
[discovery.echo]
enabled = false
[discovery.static]
ipv4 = ["198.51.100.0/24"]
TOML

step "Starting credlock (IMDS emulator at $imds, moto STS at 127.0.0.1:$moto_port)"
"$bin" run --config "$work/credlock.toml" 2>"$work/credlock.log" &
PIDS+=($!)
wait_http "http://127.0.0.1:$admin/readyz" 200 15 || abort "credlock did not become ready within 15 s ($(curl -s "http://127.0.0.1:$admin/readyz" || echo 'its admin listener does not answer'))"
curl -s "http://127.0.0.1:$admin/readyz"

role=credlock-test-role
tok() { curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$1/latest/api/token"; }

step "Without credlock: the instance role's raw credentials (usable from anywhere)"
raw=$(curl -s -H "X-aws-ec2-metadata-token: $(tok "http://$imds")" "http://$imds/latest/meta-data/iam/security-credentials/$role")
printf '%s\n' "$raw"

step "Through credlock: the same request answers with locked credentials from sts:AssumeRole"
locked=$(curl -s -H "X-aws-ec2-metadata-token: $(tok "http://127.0.0.1:$port")" "http://127.0.0.1:$port/latest/meta-data/iam/security-credentials/$role")
printf '%s\n' "$locked"
"$py" - "$raw" "$locked" <<'PY' || abort "credlock did not serve a locked set in place of the raw one"
import json, sys
from datetime import datetime
raw, locked = (json.loads(a) for a in sys.argv[1:3])
if raw["AccessKeyId"] == locked["AccessKeyId"] or locked.get("Code") != "Success":
    sys.exit(1)
life = lambda d: (datetime.fromisoformat(d["Expiration"].replace("Z", "+00:00"))
                  - datetime.fromisoformat(d["LastUpdated"].replace("Z", "+00:00")))
print(f"What differs: another key ({raw['AccessKeyId']} -> {locked['AccessKeyId']}), "
      f"another secret and token, and a life of {life(locked)} instead of {life(raw)}; "
      f"the format and every other field ({', '.join(k for k in raw if k not in ('AccessKeyId', 'SecretAccessKey', 'Token', 'Expiration', 'LastUpdated'))}) are the same.")
PY

step "Everything else passes through unchanged"
curl -s "http://127.0.0.1:$port/latest/meta-data/instance-id"; echo

step "The session policy that locks them (credlock policy)"
"$bin" policy --config "$work/credlock.toml" 2>&1 | "$py" -c 'import json,sys; lines=sys.stdin.read().splitlines(); print(json.dumps(json.loads(lines[0]), indent=2)); print(*lines[1:], sep="\n")'

step "A real SDK (boto3) on the IMDS endpoint gets the locked set and calls STS with it"
AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$port" AWS_CONFIG_FILE=/dev/null \
AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_ACCESS_KEY_ID='' AWS_SECRET_ACCESS_KEY='' \
  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
  "$py" - "http://127.0.0.1:$moto_port" <<'PY'
import sys, boto3
session = boto3.Session(region_name="us-east-1")
creds = session.get_credentials().get_frozen_credentials()
print("boto3 resolved access key:", creds.access_key, "(method: %s)" % session.get_credentials().method)
who = session.client("sts", endpoint_url=sys.argv[1]).get_caller_identity()
print("sts:GetCallerIdentity ->", who["Arn"])
PY

step "Status (admin listener, no secrets; the whole document: curl http://127.0.0.1:$admin/status)"
curl -s "http://127.0.0.1:$admin/status" | "$py" -c '
import json, sys
s = json.load(sys.stdin)
print("ready:", s["ready"], "| credentials held until", s["credentials"]["expiration"], "| upstream token mode:", s["upstream_token_mode"])
for src in s["discovery"]:
    env = src.get("environment") or {}
    found = ", ".join(str(k) + " " + str(v) for k, v in env.items() if v)
    print("discovery", src["source"] + ": last success", src.get("last_success"), "|", found)'
step "What the lock denies (credlock explain: the same policy, evaluated by credlock's own IAM evaluator)"
own_ip=$(curl -s "http://127.0.0.1:$admin/status" | "$py" -c 'import json, sys; s = json.load(sys.stdin); print(next(d for d in s["discovery"] if d["source"] == "imds")["environment"]["ipv4"][0].split("/")[0])')
explain() { "$bin" explain --config "$work/credlock.toml" --action s3:GetObject --resource arn:aws:s3:::example-bucket/report.csv "$@"; }
echo "A thief calls S3 with the stolen set from 192.0.2.77:"
if out=$(explain --source-ip 192.0.2.77 2>&1); then abort "explain allowed a call from outside the environment: $out"; fi
printf '%s\n' "$out" | sed -n '1p;/aws:SourceIp/p' | sed 's/^ */  /'
echo "The application on the instance calls S3 from the instance's own address ($own_ip):"
out=$(explain --source-ip "$own_ip" 2>&1) || abort "explain denied the instance's own call: $out"
printf '%s\n' "$out" | sed -n 1p | sed 's/^/  /'
echo "(moto, the local STS, does not evaluate session policies; credlock's evaluator agrees with the"
echo "independent iam-rs on 59,616 generated cases: cargo test --lib evaluate.)"
step "A few metrics"
curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^credlock_(requests_total\{route="credentials"|credential_refreshes_total|locked_credentials_remaining|policy_characters|ready)'

if [[ "${1:-}" == "--keep" ]]; then
  step "credlock serves on 127.0.0.1:$port (admin 127.0.0.1:$admin); Ctrl-C to stop"
  wait "${PIDS[2]}"
fi
