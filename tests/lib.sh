# shellcheck shell=bash
# Helpers shared by the shell suites: tests/lint.sh, tests/demo.sh, tests/root/netns_*_test.sh,
# tests/root/nspawn_systemd_test.sh, tests/root/prometheus_e2e_test.sh and (through
# benches/lib.sh) the benchmarks. Sourced, relative to the sourcing script's own location:
#
#   # shellcheck source=tests/lib.sh
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"      (from tests/root/; tests/: /lib.sh)
#
# Sourcing it sets the EXIT trap (the at_exit list below) and makes SIGINT/SIGTERM exit 130.
# It defines functions and the variables below and runs nothing else; it works under
# `set -euo pipefail` as well as without -e. It is not copied into the nspawn test's container:
# the tests/root/nspawn_*.sh scripts that run in there stand alone.
#
# Checks      pass NAME | fail NAME [DETAIL] | skip NAME REASON | check NAME COMMAND...
#             expect NAME EXPECTED ACTUAL | expect_refusal NAME PROBE_OUTPUT | summary
# Cleanup     at_exit COMMAND [ARG...] | PIDS, stop_background SECONDS | stop_pids SECONDS PID...
#             alive PID | any_alive PID...
# Waiting     wait_until SECONDS COMMAND... | wait_ready PID SECONDS COMMAND...
#             http_answers CODE URL [RUNNER...] | wait_http URL CODE SECONDS [RUNNER...]
# Ports       free_ports N
# SDKs        sdk_arn RUNNER KIND VAR=VALUE... (ROOT and VENV set by the caller)
# System      cgroup2_root | rmdir_wait SECONDS DIR...
# Colours     BOLD PLAIN: escape sequences when stdout is a terminal, empty otherwise

# ---- checks --------------------------------------------------------------------------------
# "PASS NAME" / "FAIL NAME..." / "SKIP NAME (REASON)" lines (tests/run.sh and CI read them and
# the exit status of summary). COMBO, when set, goes before every name as "[COMBO] ".
# FAIL_DETAIL is how fail shows its DETAIL: colon (default) "FAIL NAME: DETAIL", paren
# "FAIL NAME (DETAIL)", lines: "FAIL NAME" and then each line of DETAIL as "  | LINE".
PASSED=0 FAILED=0 SKIPPED=0
COMBO=${COMBO:-}
FAIL_DETAIL=${FAIL_DETAIL:-colon}

pass() {
    PASSED=$((PASSED + 1))
    printf 'PASS %s%s\n' "${COMBO:+[$COMBO] }" "$1"
}

fail() {
    local name="${COMBO:+[$COMBO] }$1" detail=${2:-}
    FAILED=$((FAILED + 1))
    case $FAIL_DETAIL in
    paren) printf 'FAIL %s%s\n' "$name" "${detail:+ ($detail)}" ;;
    lines)
        printf 'FAIL %s\n' "$name"
        if [[ -n $detail ]]; then printf '%s\n' "$detail" | sed 's/^/  | /'; fi
        ;;
    *) printf 'FAIL %s%s\n' "$name" "${detail:+: $detail}" ;;
    esac
    return 0
}

skip() {
    SKIPPED=$((SKIPPED + 1))
    printf 'SKIP %s%s (%s)\n' "${COMBO:+[$COMBO] }" "$1" "$2"
}

# check NAME COMMAND...: PASS when COMMAND exits 0.
check() {
    local name=$1
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

# expect NAME EXPECTED ACTUAL: PASS when they are equal.
expect() {
    if [[ $3 == "$2" ]]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi
}

# expect_refusal NAME PROBE_OUTPUT: PASS when PROBE_OUTPUT, "RESULT MS" from
# tests/root/netns_probe.py, is an active refusal (refused or unreachable) in under 1 s.
expect_refusal() {
    local result ms
    read -r result ms <<<"$2"
    if [[ ($result == refused || $result == unreachable) && ${ms:-9999} -lt 1000 ]]; then
        pass "$1 ($result in ${ms} ms)"
    else
        fail "$1" "expected a fast refusal, got '$2'"
    fi
}

# summary: print "N passed, M failed" and exit: 0 when nothing failed and something passed, 1
# otherwise. With SUMMARY_SKIPPED=1 the line adds ", K skipped"; with SUMMARY_T0 (a $SECONDS
# value) " (Ts)", the seconds since.
SUMMARY_SKIPPED=${SUMMARY_SKIPPED:-0}
SUMMARY_T0=${SUMMARY_T0:-}
summary() {
    printf '%d passed, %d failed' "$PASSED" "$FAILED"
    if ((SUMMARY_SKIPPED)); then printf ', %d skipped' "$SKIPPED"; fi
    if [[ -n $SUMMARY_T0 ]]; then printf ' (%ds)' "$((SECONDS - SUMMARY_T0))"; fi
    printf '\n'
    if ((FAILED > 0 || PASSED == 0)); then exit 1; fi
    exit 0
}

# ---- cleanup -------------------------------------------------------------------------------
# at_exit COMMAND [ARG...]: run COMMAND when the script exits, however it exits (the words are
# taken as they are now: for what is only known at exit, register a function of the script's
# own). The ones registered last run first, with `set +e`; EXIT_STATUS holds the script's exit
# status meanwhile, and the script still exits with it. Register each step once what it undoes
# exists: `TMP=$(mktemp -d); at_exit rm -rf "$TMP"`.
AT_EXIT=()
EXIT_STATUS=0
at_exit() { AT_EXIT+=("$(printf '%q ' "$@")"); }

# shellcheck disable=SC2317 # run by the EXIT trap
_lib_run_at_exit() {
    EXIT_STATUS=$?
    # Only the script's own shell cleans up: a child forked for `COMMAND &` that is signalled
    # before it execs COMMAND still has these traps, and must not tear the run down.
    [[ $BASHPID == "$$" ]] || return "$EXIT_STATUS"
    set +e
    local i
    for ((i = ${#AT_EXIT[@]} - 1; i >= 0; i--)); do
        eval "${AT_EXIT[i]}"
    done
    return "$EXIT_STATUS"
}
trap _lib_run_at_exit EXIT
trap 'exit 130' INT TERM

# PIDS: the script's background processes (PIDS+=($!)); stop_background SECONDS stops them all
# (stop_pids): `at_exit stop_background 5`.
PIDS=()
stop_background() { stop_pids "$1" "${PIDS[@]}"; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

any_alive() {
    local pid
    for pid in "$@"; do
        if alive "$pid"; then return 0; fi
    done
    return 1
}

# _lib_gone_within TENTHS PID...: 0 once none of the PIDs runs, 1 if one still does after
# TENTHS tenths of a second.
_lib_gone_within() {
    local tenths=$1 i
    shift
    for ((i = 0; i < tenths; i++)); do
        any_alive "$@" || return 0
        sleep 0.1
    done
    ! any_alive "$@"
}

# stop_pids SECONDS PID...: end processes by their pids (never by name): SIGTERM to all, up to
# SECONDS (whole) for them to exit, SIGKILL to those left and up to 5 s more; then reaps those
# that are this shell's children. Empty PIDs are skipped; always returns 0.
stop_pids() {
    local grace=$1 pid pids=()
    shift
    for pid in "$@"; do
        if [[ -n $pid ]]; then pids+=("$pid"); fi
    done
    ((${#pids[@]} > 0)) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! _lib_gone_within $((grace * 10)) "${pids[@]}"; then
        for pid in "${pids[@]}"; do
            if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
        done
        _lib_gone_within 50 "${pids[@]}" || true
    fi
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    return 0
}

# ---- waiting -------------------------------------------------------------------------------
# wait_until SECONDS COMMAND...: run COMMAND (its output discarded) every WAIT_INTERVAL s
# (default 0.1) until it succeeds (0), for SECONDS / WAIT_INTERVAL tries (1 after the last; a
# slow COMMAND stretches the wait). WAIT_DEADLINE, when set, is a $SECONDS value (a suite's time
# budget) after which it gives up at once.
wait_until() { _lib_poll "" "$@"; }

# wait_ready PID SECONDS COMMAND...: wait_until, but 1 as soon as PID has exited (a server that
# died while starting).
wait_ready() { _lib_poll "$@"; }

_lib_poll() {
    local pid=$1 limit=$2 interval=${WAIT_INTERVAL:-0.1} tries i
    shift 2
    tries=$(awk -v l="$limit" -v i="$interval" 'BEGIN { n = int(l / i + 0.5); print (n < 1) ? 1 : n }')
    for ((i = 0; i < tries; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -n $pid ]] && ! alive "$pid"; then return 1; fi
        if [[ -n ${WAIT_DEADLINE:-} ]] && ((SECONDS >= WAIT_DEADLINE)); then return 1; fi
        sleep "$interval"
    done
    return 1
}

# http_answers CODE URL [RUNNER...]: a GET of URL answers CODE ("any": any HTTP answer at all)
# within 1 s. RUNNER, when given, runs curl (ip netns exec NS, a function such as in_i ...).
http_answers() {
    local want=$1 url=$2 code
    shift 2
    code=$("$@" curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null) || true
    [[ $code == "$want" || ($want == any && -n $code && $code != 000) ]]
}

# wait_http URL CODE SECONDS [RUNNER...]: wait_until URL answers CODE (see http_answers).
wait_http() {
    local url=$1 want=$2 limit=$3
    shift 3
    wait_until "$limit" http_answers "$want" "$url" "$@"
}

# ---- ports ---------------------------------------------------------------------------------
# free_ports N: N distinct free TCP ports on 127.0.0.1 (bound all at once, then released), on
# one line. Python: $PYTHON, else python3.
free_ports() {
    "${PYTHON:-python3}" - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# ---- system --------------------------------------------------------------------------------
# cgroup2_root: the cgroup v2 hierarchy (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
# host); prints nothing (and returns 1) when there is none.
cgroup2_root() {
    local d
    for d in /sys/fs/cgroup /sys/fs/cgroup/unified; do
        if [[ $(stat -f -c %T "$d" 2>/dev/null) == cgroup2fs ]]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# rmdir_wait SECONDS DIR...: remove each (empty) DIR, retrying for up to SECONDS while it is
# busy (a cgroup whose last process is still exiting); the others are removed in the order given.
rmdir_wait() {
    local limit=$1 d i
    shift
    for d in "$@"; do
        for ((i = 0; i < limit * 10; i++)); do
            rmdir "$d" 2>/dev/null || true
            [[ -d $d ]] || break
            sleep 0.1
        done
    done
    return 0
}

# ---- colours -------------------------------------------------------------------------------
# shellcheck disable=SC2034 # used by the sourcing scripts
if [[ -t 1 ]]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi

# ---- SDKs ----------------------------------------------------------------------------------
# sdk_arn RUNNER KIND VAR=VALUE...: the caller ARN STS gives for the credentials an SDK's
# default chain resolves in an environment of only VAR=VALUE... (plus a Region, PATH, HOME and
# the venv's site-packages), run through RUNNER (a function that runs a command as some user in
# some namespace). KIND: boto3 and awscli (the AWS CLI v1) call STS themselves; rust runs
# examples/sdk_chain_child (the Rust SDK's chain), which reports its caller ARN; js resolves the
# set with the JS SDK v3's fromHttp (container credentials, relative or full URI) and boto3
# presents it to STS. Prints the last line of output: the ARN, or the error.
sdk_arn() {
    local run=$1 kind=$2
    shift 2
    local env=(env -i PATH=/usr/bin:/bin HOME=/tmp AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
        AWS_EC2_METADATA_DISABLED=true PYTHONPATH="$VENV/lib/python3.11/site-packages" "$@")
    local py=/usr/bin/python3 to_arn='
import boto3, json, sys
d = json.loads(sys.stdin.read())
print(boto3.client("sts", aws_access_key_id=d["accessKeyId"], aws_secret_access_key=d["secretAccessKey"],
      aws_session_token=d["sessionToken"]).get_caller_identity()["Arn"])'
    case $kind in
    boto3) "$run" "${env[@]}" "$py" -c 'import boto3; print(boto3.client("sts").get_caller_identity()["Arn"])' ;;
    awscli) "$run" "${env[@]}" "$py" -m awscli sts get-caller-identity --query Arn --output text ;;
    rust) "$run" "${env[@]}" "$ROOT/target/debug/examples/sdk_chain_child" |
        sed -n 's/^SDK-CHAIN-REPORT //p' | "$py" -c 'import json, sys; print(json.load(sys.stdin)["arn"])' ;;
    js) "$run" "${env[@]}" NODE_PATH="$ROOT/tests/js/node_modules" node -e '
const { fromHttp } = require("@aws-sdk/credential-provider-http");
fromHttp({ timeout: 3000 })().then((c) => console.log(JSON.stringify(c)),
  (e) => { console.error(String(e)); process.exit(1); });' | "$run" "${env[@]}" "$py" -c "$to_arn" ;;
    esac 2>&1 | tail -n 1
}
