#!/usr/bin/env bash
# credlock load benchmark (issue 7), in one go on loopback:
#   * nginx serving a static metadata tree is the fast upstream standing in for IMDS;
#   * wrk against (1) that upstream directly, (2) credlock, (3) nginx as a reverse proxy,
#     (4) haproxy, for a passthrough GET, the token PUT and the credential GET, at 1 and 64
#     connections; one table of req/s, p50, p99 and ratios to (1) and (3), plus credlock's
#     peak RSS and CPU time;
#   * startup: process start to /readyz 200 with moto (STS) and the IMDS emulator, median of N;
#   * soak: >= 1,000,000 mixed requests through credlock, RSS at start and end, errors;
#   * the targets of issue 7 as PASS/MISS lines.
# Everything it starts listens on 127.0.0.1 (free ports) and is stopped on exit.
#
# Usage: benches/load.sh [--quick] [--soak] [--strict] [--duration SECS] [--rounds N] [--no-pin]
#                        [--soak-requests N] [--soak-seconds SECS] [--startup-runs N] [--keep]
#   (default)   full run: 10 s per target and cell in 5 rounds of 2 s (targets alternate within
#               each round; medians over rounds), warm-up, full soak; about 6 minutes
#   --quick     CI smoke: 1 s per target and cell in 1 round, short bounded soak; under a minute
#   --duration  seconds per target and cell, split over the rounds
#   --rounds    rounds per cell
#   --soak      the full soak (1M requests) even with --quick
#   --strict    exit 3 when a target is missed (otherwise MISS is information)
#   --no-pin    do not pin wrk and the servers to CPUs
#   --keep      keep the work directory (logs, generated configs)
# Environment: CREDLOCK_BIN (default /work/target-release/release/credlock), PYTHON (the venv's
# python, runs the IMDS emulator), MOTO_SERVER, CRITERION_DIR (criterion results to report).
# Exit: 0 measured (targets may MISS), 1 something could not be measured or a run was broken
# (errors, raw credentials served), 2 usage, 3 --strict and a target missed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

CREDLOCK_BIN=${CREDLOCK_BIN:-/work/target-release/release/credlock}
PYTHON=${PYTHON:-$repo/.venv/bin/python}
MOTO_SERVER=${MOTO_SERVER:-$repo/.venv/bin/moto_server}
CRITERION_DIR=${CRITERION_DIR:-${CARGO_TARGET_DIR:-$repo/target}/criterion}
ROLE=credlock-bench-role
PASS_PATH=/latest/meta-data/instance-id
CRED_PATH=/latest/meta-data/iam/security-credentials/$ROLE

quick=0 soak_full=0 strict=0 pin=1 keep=0
duration='' rounds='' soak_requests='' soak_seconds='' startup_runs=5

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --quick) quick=1 ;;
        --soak) soak_full=1 ;;
        --strict) strict=1 ;;
        --no-pin) pin=0 ;;
        --keep) keep=1 ;;
        --duration) duration=${2:?}; shift ;;
        --rounds) rounds=${2:?}; shift ;;
        --soak-requests) soak_requests=${2:?}; shift ;;
        --soak-seconds) soak_seconds=${2:?}; shift ;;
        --startup-runs) startup_runs=${2:?}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "load.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
for n in "$duration" "$rounds" "$soak_requests" "$soak_seconds" "$startup_runs"; do
    [[ -z $n || $n =~ ^[1-9][0-9]*$ ]] || { echo "load.sh: $n is not a positive integer" >&2; exit 2; }
done

if ((quick)); then
    duration=${duration:-1}; rounds=${rounds:-1}; warmup=0
    ((soak_full)) || { soak_requests=${soak_requests:-30000}; soak_seconds=${soak_seconds:-4}; }
else
    duration=${duration:-10}; rounds=${rounds:-5}; warmup=1
fi
((duration % rounds == 0)) || { echo "load.sh: --duration $duration is not a multiple of --rounds $rounds" >&2; exit 2; }
round_secs=$((duration / rounds))
soak_requests=${soak_requests:-1000000}
soak_seconds=${soak_seconds:-150}

# shellcheck source=benches/lib.sh
source "$here/lib.sh"   # log, die, free_ports, wait_http, at_exit, stop_background ...

for tool in nginx haproxy wrk curl timeout; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install nginx haproxy wrk curl)"
done
[[ -x $CREDLOCK_BIN ]] || die "no credlock binary at $CREDLOCK_BIN (set CREDLOCK_BIN)"
[[ -x $PYTHON ]] || die "no python at $PYTHON (tests/setup.sh creates the venv)"
[[ -x $MOTO_SERVER ]] || die "no moto_server at $MOTO_SERVER"
if ((pin)) && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
    log "fewer than 2 CPUs or no taskset: not pinning"
    pin=0
fi

# CPU placement. wrk (the load) gets CPU 0 to itself; every server (upstream, proxy under test,
# moto) shares CPU 1, so a proxy's cost per request shows directly in its throughput and each
# proxy gets the same single core (nginx: 1 worker, haproxy: 1 thread; credlock runs its
# single-threaded runtime, like an nginx worker).
if ((pin)); then
    load_cpu=(taskset -c 0) server_cpu=(taskset -c 1) workers=1
else
    load_cpu=() server_cpu=() workers=$(nproc)
fi

work=$(mktemp -d /tmp/credlock-bench.XXXXXX)
chmod 755 "$work"   # nginx workers run as nobody when started by root
remove_work() { if ((keep || EXIT_STATUS == 1)); then log "logs and configs kept in $work"; else rm -rf "$work"; fi; }
at_exit remove_work
at_exit stop_background 6 # PIDS: everything started below

ports=$(free_ports 7)
read -r up_port cl_port cl_admin ngx_port hap_port moto_port emu_port <<<"$ports"

log "work directory $work; pinning: $( ((pin)) && echo 'wrk on CPU 0, servers on CPU 1' || echo none)"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- fast upstream: nginx serving the metadata tree ---------------------------------------
write_upstream "$work" "$workers" "$up_port" "$ngx_port"
fill "$here/upstream/haproxy.cfg.in" "$work/haproxy.cfg" "WORKERS=$workers" "PREFIX=$work" \
    "PORT=$hap_port" "UPSTREAM_PORT=$up_port"
cat >"$work/credlock.toml" <<TOML
[server]
listen = ["127.0.0.1:$cl_port"]
admin_listen = "127.0.0.1:$cl_admin"
upstream = "http://127.0.0.1:$up_port"
[lock]
sts_endpoint = "http://127.0.0.1:$moto_port"
[discovery.echo]
enabled = false
TOML

"${server_cpu[@]}" nginx -p "$work" -c "$work/upstream.conf" -e "$work/upstream-error.log" -g 'daemon off;' \
    >"$work/upstream.out" 2>&1 &
upstream_pid=$!
PIDS+=("$upstream_pid")
"${server_cpu[@]}" "$MOTO_SERVER" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$up_port$PASS_PATH" 200 10 || die "the nginx upstream did not start ($work/upstream-error.log)"
wait_http "http://127.0.0.1:$moto_port/" any 30 || die "moto did not start ($work/moto.log)"

# ---- the proxies ---------------------------------------------------------------------------
"${server_cpu[@]}" "$CREDLOCK_BIN" run --config "$work/credlock.toml" >"$work/credlock.log" 2>&1 &
credlock_pid=$!
PIDS+=("$credlock_pid")
"${server_cpu[@]}" nginx -p "$work" -c "$work/proxy.conf" -e "$work/proxy-error.log" -g 'daemon off;' \
    >"$work/proxy.out" 2>&1 &
nginx_pid=$!
PIDS+=("$nginx_pid")
haproxy -c -q -f "$work/haproxy.cfg" || die "haproxy rejects $work/haproxy.cfg"
"${server_cpu[@]}" haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
PIDS+=("$haproxy_pid")
wait_http "http://127.0.0.1:$cl_admin/readyz" 200 30 || { tail -20 "$work/credlock.log" >&2; die "credlock never became ready"; }
wait_http "http://127.0.0.1:$ngx_port$PASS_PATH" 200 10 || die "the nginx proxy did not start"
wait_http "http://127.0.0.1:$hap_port$PASS_PATH" 200 10 || die "haproxy did not start"

targets=(upstream credlock nginx haproxy)
declare -A port_of=([upstream]=$up_port [credlock]=$cl_port [nginx]=$ngx_port [haproxy]=$hap_port)
declare -A pid_of=([upstream]=$upstream_pid [credlock]=$credlock_pid [nginx]=$nginx_pid [haproxy]=$haproxy_pid)
paths=(passthrough token credentials)

# Every target answers every path correctly before anything is timed; credlock must serve
# locked credentials, never the upstream's raw set.
for t in "${targets[@]}"; do
    base="http://127.0.0.1:${port_of[$t]}"
    code=$(curl -s -o "$work/check" -w '%{http_code}' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$base/latest/api/token")
    [[ $code == 200 && -s $work/check ]] || die "$t: token PUT answered $code"
    code=$(curl -s -o "$work/check" -w '%{http_code}' "$base$PASS_PATH")
    [[ $code == 200 && $(<"$work/check") == i-0123456789abcdef0 ]] || die "$t: passthrough answered $code"
    code=$(curl -s -o "$work/check" -w '%{http_code}' "$base$CRED_PATH")
    if [[ $code != 200 ]] || ! grep -q '"AccessKeyId"' "$work/check"; then die "$t: credentials answered $code"; fi
    if [[ $t == credlock ]]; then
        ! grep -q BENCHUPSTREAMRAW "$work/check" || die "credlock served the upstream's raw credentials"
    fi
done
log "all four targets answer; credlock serves locked credentials"

# ---- startup: process start to /readyz 200 (IMDS emulator + moto) --------------------------
# credlock and the emulator unpinned, like a real boot (moto stays on the servers' CPU).
# Resolution: one curl probe every ~10 ms.
"$PYTHON" "$repo/tests/support/imds_emulator.py" --listen "127.0.0.1:$emu_port" \
    >"$work/emulator.out" 2>"$work/emulator.err" &
PIDS+=($!)
wait_until 10 grep -q '^listening' "$work/emulator.out" || die "the IMDS emulator did not start"
startup_ms=()
for run in $(seq "$startup_runs"); do
    read -r s_port s_admin <<<"$(free_ports 2)"
    cat >"$work/startup.toml" <<TOML
[server]
listen = ["127.0.0.1:$s_port"]
admin_listen = "127.0.0.1:$s_admin"
upstream = "http://127.0.0.1:$emu_port"
[lock]
sts_endpoint = "http://127.0.0.1:$moto_port"
[discovery.echo]
enabled = false
TOML
    t0=$(date +%s%N)
    "$CREDLOCK_BIN" run --config "$work/startup.toml" >"$work/startup-$run.log" 2>&1 &
    spid=$!
    PIDS+=("$spid")
    ready=0
    while (($(date +%s%N) - t0 < 10000000000)); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$s_admin/readyz" || true) == 200 ]]; then
            ready=1
            break
        fi
        sleep 0.005
    done
    t1=$(date +%s%N)
    kill -TERM "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    ((ready)) || { tail -20 "$work/startup-$run.log" >&2; die "startup run $run: not ready within 10 s"; }
    startup_ms+=($(((t1 - t0) / 1000000)))
done
startup_median=$(median "${startup_ms[@]}")
log "startup to READY (ms): ${startup_ms[*]}; median $startup_median"

# ---- load matrix ---------------------------------------------------------------------------
declare -A rps p50 p99 reqs errs cpu_us
failures=()

# run_wrk THREADS CONNS SECONDS URL LUA ARGS...: prints wrk's RESULT line (full output in wrk.log).
run_wrk() {
    local threads=$1 conns=$2 secs=$3 url=$4 script=$5; shift 5
    timeout $((secs + 30)) "${load_cpu[@]}" wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 2s --latency \
        -s "$script" "$url" -- "$@" 2>&1 | tee -a "$work/wrk.log" | grep '^RESULT ' || true
}
field() { sed -n "s/.* $2=\([0-9.]*\).*/\1/p" <<<" $1"; }

if ((warmup)); then
    log "warm-up: 1 s per target"
    for t in "${targets[@]}"; do
        run_wrk 2 64 1 "http://127.0.0.1:${port_of[$t]}" "$here/upstream/bench.lua" get "$PASS_PATH" >/dev/null
    done
fi

cpu0=$(proc_cpu_ticks "$credlock_pid")
wall0=$SECONDS
# Each cell is measured in $rounds rounds of $round_secs s; within a round every target runs once,
# back to back, and the order rotates from round to round. The drift of this VM's speed over
# tens of seconds (5-10 %) then falls on every target alike instead of on whichever ran last.
# Reported: the median over rounds of req/s, p50 and p99; requests, errors and CPU are summed.
declare -A r_rps r_p50 r_p99 r_ticks
for path in "${paths[@]}"; do
    case $path in
        passthrough) args=(get "$PASS_PATH") ;;
        token) args=(put) ;;
        credentials) args=(get "$CRED_PATH") ;;
    esac
    for conns in 1 64; do
        threads=$((conns == 1 ? 1 : 2))
        for round in $(seq "$rounds"); do
            order=("${targets[@]:$(((round - 1) % ${#targets[@]}))}" "${targets[@]:0:$(((round - 1) % ${#targets[@]}))}")
            for t in "${order[@]}"; do
                key="$t|$path|$conns"
                ticks0=$(tree_cpu_ticks "${pid_of[$t]}")
                line=$(run_wrk "$threads" "$conns" "$round_secs" "http://127.0.0.1:${port_of[$t]}" "$here/upstream/bench.lua" "${args[@]}")
                ticks=$(($(tree_cpu_ticks "${pid_of[$t]}") - ticks0))
                n=$(field "$line" requests)
                if [[ -z $line || -z $n || $n == 0 ]]; then
                    failures+=("$key round $round: no measurement (see $work/wrk.log)")
                    continue
                fi
                reqs[$key]=$((${reqs[$key]:-0} + n))
                r_ticks[$key]=$((${r_ticks[$key]:-0} + ticks))
                r_rps[$key]+=" $(field "$line" rps)"
                r_p50[$key]+=" $(field "$line" p50_us)"
                r_p99[$key]+=" $(field "$line" p99_us)"
                e=0
                for f in err_connect err_read err_write err_timeout err_status; do
                    e=$((e + $(field "$line" "$f")))
                done
                errs[$key]=$((${errs[$key]:-0} + e))
                log "$(printf '%-9s %-12s c=%-3s round %d/%d %10s req/s  p50 %-8s p99 %s' "$t" "$path" "$conns" "$round" "$rounds" "$(field "$line" rps)" "$(fmt_us "$(field "$line" p50_us)")" "$(fmt_us "$(field "$line" p99_us)")")"
            done
        done
        for t in "${targets[@]}"; do
            key="$t|$path|$conns"
            [[ -n ${r_rps[$key]:-} ]] || continue
            # A cell with a failed round has no median of $rounds: it is reported as failed.
            (($(wc -w <<<"${r_rps[$key]}") == rounds)) || continue
            rps[$key]=$(median "${r_rps[$key]}")
            p50[$key]=$(median "${r_p50[$key]}")
            p99[$key]=$(median "${r_p99[$key]}")
            cpu_us[$key]=$(awk -v t="${r_ticks[$key]}" -v h="$clk_tck" -v n="${reqs[$key]}" 'BEGIN {printf "%.1f", t / h * 1e6 / n}')
            ((errs[$key] == 0)) || failures+=("$key: ${errs[$key]} errors (socket errors or HTTP >= 400)")
        done
    done
done
load_wall=$((SECONDS - wall0))
load_cpu_ticks=$(($(proc_cpu_ticks "$credlock_pid") - cpu0))
load_hwm=$(proc_status "$credlock_pid" VmHWM)
credlock_reqs=0
for path in "${paths[@]}"; do for conns in 1 64; do
    credlock_reqs=$((credlock_reqs + ${reqs[credlock|$path|$conns]:-0}))
done; done

# ---- soak ----------------------------------------------------------------------------------
metric_sum() {   # metric_sum REGEX: sum of credlock_requests_total samples whose labels match
    curl -s "http://127.0.0.1:$cl_admin/metrics" | awk -v re="$1" '/^credlock_requests_total\{/ && $0 ~ re {s += $NF} END {printf "%d", s}'
}
soak_threads=2 soak_conns=32
log "soak: up to $soak_requests mixed requests or $soak_seconds s through credlock ($soak_conns connections)"
soak_rss0=$(proc_status "$credlock_pid" VmRSS)
soak_cpu0=$(proc_cpu_ticks "$credlock_pid")
soak_ok0=$(metric_sum 'code_class="2xx"')
soak_all0=$(metric_sum '.')
# Each wrk thread stops at its share and leaves a marker; wrk itself would sit out the whole -d,
# so it is interrupted (SIGINT: it still reports, with the real elapsed time) once all are done.
"${load_cpu[@]}" wrk -t"$soak_threads" -c"$soak_conns" -d"${soak_seconds}s" --timeout 2s --latency \
    -s "$here/upstream/mix.lua" "http://127.0.0.1:$cl_port" -- \
    "$ROLE" $(((soak_requests + soak_threads - 1) / soak_threads)) "$work/soak-done" >"$work/soak.log" 2>&1 &
wrk_pid=$!
PIDS+=("$wrk_pid")
soak_deadline=$((SECONDS + soak_seconds + 30))
while kill -0 "$wrk_pid" 2>/dev/null; do
    markers=("$work"/soak-done.*)
    if [[ -e ${markers[0]} && ${#markers[@]} -ge $soak_threads ]] || ((SECONDS > soak_deadline)); then
        kill -INT "$wrk_pid" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
wait "$wrk_pid" 2>/dev/null || true
cat "$work/soak.log" >>"$work/wrk.log"
soak_line=$(grep '^RESULT ' "$work/soak.log" || true)
soak_rss1=$(proc_status "$credlock_pid" VmRSS)
soak_hwm=$(proc_status "$credlock_pid" VmHWM)
soak_cpu=$(($(proc_cpu_ticks "$credlock_pid") - soak_cpu0))
soak_ok=$(($(metric_sum 'code_class="2xx"') - soak_ok0))
soak_all=$(($(metric_sum '.') - soak_all0))
soak_n=$(field "$soak_line" requests)
if [[ -z $soak_n || $soak_n == 0 ]]; then
    failures+=("soak: no measurement (see $work/wrk.log)")
    soak_n=0 soak_errs=0 soak_non2xx=0 soak_leaks=0 soak_secs=0 soak_rps=0
else
    soak_errs=0
    for e in err_connect err_read err_write err_timeout; do soak_errs=$((soak_errs + $(field "$soak_line" "$e"))); done
    soak_non2xx=$(field "$soak_line" non2xx)
    soak_leaks=$(field "$soak_line" leaks)
    soak_secs=$(awk -v d="$(field "$soak_line" duration_us)" 'BEGIN {printf "%.1f", d / 1e6}')
    soak_rps=$(field "$soak_line" rps)
    ((soak_leaks == 0)) || failures+=("soak: $soak_leaks answers carried the upstream's raw credentials")
fi
credlock_alive=1
kill -0 "$credlock_pid" 2>/dev/null || { credlock_alive=0; failures+=("credlock exited during the run"); }

# ---- report --------------------------------------------------------------------------------
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo
echo "## credlock load benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $( ((quick)) && echo quick || echo full) mode)"
echo
echo "- machine: $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), Linux $(uname -r); load average before $load_before, after $load_after"
echo "- credlock: $CREDLOCK_BIN ($("$CREDLOCK_BIN" --version 2>/dev/null || echo '?')); $(nginx -v 2>&1 | sed 's/.*: //'); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "- wrk ${duration} s per target and cell in $rounds round(s) of ${round_secs} s, targets in rotating order within each round; req/s, p50 and p99 are medians over the rounds (-t1 at 1 connection, -t2 at 64), keep-alive; placement: $( ((pin)) && echo 'wrk on CPU 0; upstream, proxies and moto on CPU 1 (nginx 1 worker, haproxy 1 thread)' || echo "unpinned (nginx $workers workers, haproxy $workers threads)")"
echo "- paths: passthrough GET $PASS_PATH, token PUT /latest/api/token, credentials GET $CRED_PATH"
echo "- CPU us/req: user+system CPU of the target's own processes (the proxy alone; for upstream, the nginx upstream) per request, from /proc (10 ms ticks)"
echo
echo "| target | path | conns | req/s | p50 | p99 | x upstream | x nginx | CPU us/req |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for path in "${paths[@]}"; do for conns in 1 64; do for t in "${targets[@]}"; do
    key="$t|$path|$conns"
    if [[ -z ${rps[$key]:-} ]]; then
        echo "| $t | $path | $conns | FAILED | | | | | |"
        continue
    fi
    mark=''
    ((${errs[$key]} == 0)) || mark=" (${errs[$key]} errors)"
    echo "| $t | $path | $conns | ${rps[$key]%.*}$mark | $(fmt_us "${p50[$key]}") | $(fmt_us "${p99[$key]}") | $(ratio "${rps[$key]}" "${rps[upstream|$path|$conns]:-0}") | $(ratio "${rps[$key]}" "${rps[nginx|$path|$conns]:-0}") | ${cpu_us[$key]} |"
done; done; done
echo
cpu_us_per_req=$(awk -v t="$load_cpu_ticks" -v h="$clk_tck" -v n="$credlock_reqs" 'BEGIN { if (n > 0) printf "%.1f", t / h * 1e6 / n; else print "-" }')
echo "credlock over the load matrix: peak RSS $(kb_to_mib "$load_hwm") MiB (VmHWM), CPU $(ticks_to_s "$load_cpu_ticks") s user+system in ${load_wall} s wall, ${credlock_reqs} requests served by credlock (${cpu_us_per_req} us CPU per request, includes idle time of the other cells)"
echo
echo "Startup (process start to /readyz 200, IMDS emulator + moto on loopback): ${startup_ms[*]} ms; median ${startup_median} ms"
echo
echo "Soak (mixed passthrough / token / credentials, ${soak_conns} connections, bounded by $soak_requests requests or ${soak_seconds} s): $soak_n requests in ${soak_secs} s (${soak_rps%.*} req/s); socket errors $soak_errs, non-2xx $soak_non2xx, raw credentials served $soak_leaks; credlock counted ${soak_all} requests, ${soak_ok} 2xx; RSS $(kb_to_mib "$soak_rss0") MiB at start, $(kb_to_mib "$soak_rss1") MiB at end, peak $(kb_to_mib "$soak_hwm") MiB; CPU $(ticks_to_s "$soak_cpu") s"
echo

# ---- targets of issue 7 --------------------------------------------------------------------
misses=0
verdict() {   # verdict OK TEXT
    if [[ $1 == 1 ]]; then echo "PASS  $2"; else echo "MISS  $2"; misses=$((misses + 1)); fi
}
ge() { awk -v a="$1" -v b="$2" 'BEGIN {print (a >= b) ? 1 : 0}'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN {print (a < b) ? 1 : 0}'; }
echo "### Targets (issue 7)"
echo
# round_ratios A B: A's figure over B's, round by round (the two ran back to back in each round).
round_ratios() {
    local -a a b
    read -ra a <<<"$1"; read -ra b <<<"$2"
    local i out=''
    for i in "${!a[@]}"; do out+="$(ratio "${a[i]}" "${b[i]:-0}") "; done
    echo "${out% }"
}
for conns in 1 64; do
    c="credlock|passthrough|$conns" n="nginx|passthrough|$conns"
    if [[ -n ${rps[$c]:-} && -n ${rps[$n]:-} ]]; then
        verdict "$(ge "${rps[$c]}" "${rps[$n]}")" "passthrough throughput at $conns conn: credlock ${rps[$c]%.*} req/s = $(ratio "${rps[$c]}" "${rps[$n]}")x nginx (${rps[$n]%.*}); target >= 1.0x; by round: $(round_ratios "${r_rps[$c]}" "${r_rps[$n]}")"
        verdict "$(ge "${p99[$n]}" "${p99[$c]}")" "passthrough p99 at $conns conn: credlock $(fmt_us "${p99[$c]}") vs nginx $(fmt_us "${p99[$n]}") ($(ratio "${p99[$c]}" "${p99[$n]}")x); target <= nginx; by round: $(round_ratios "${r_p99[$c]}" "${r_p99[$n]}")"
    fi
    k="credlock|credentials|$conns"
    if [[ -n ${rps[$k]:-} && -n ${rps[$c]:-} ]]; then
        verdict "$(ge "${rps[$k]}" "$(awk -v r="${rps[$c]}" 'BEGIN {print 0.9 * r}')")" "credential route at $conns conn: ${rps[$k]%.*} req/s = $(ratio "${rps[$k]}" "${rps[$c]}")x credlock passthrough; target >= 0.9x"
    fi
done
peak=$(kb_to_mib "$soak_hwm")
verdict "$(lt $((soak_hwm * 1024)) 20000000)" "peak RSS through the soak: $peak MiB = $(awk -v k="$soak_hwm" 'BEGIN {printf "%.1f", k * 1024 / 1e6}') MB (VmHWM); target < 20 MB"
verdict "$(lt "$startup_median" 500)" "READY after start: median ${startup_median} ms of ${startup_runs}; target < 500 ms"
growth=$((soak_rss1 - soak_rss0))
soak_clean=$(( soak_n >= soak_requests && soak_errs == 0 && soak_non2xx == 0 && soak_leaks == 0 && growth <= 1024 ? 1 : 0 ))
verdict "$soak_clean" "soak: $soak_n requests (target >= $soak_requests), errors $((soak_errs + soak_non2xx)), RSS growth $((growth / 1024)) MiB ($growth kB; noise allowance 1 MiB)"

# Criterion medians, when `cargo bench --bench request_path` has run (not run by this script).
crit_median() { [[ -f $CRITERION_DIR/$1/new/estimates.json ]] && "$PYTHON" -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["median"]["point_estimate"])' "$CRITERION_DIR/$1/new/estimates.json"; }
crit_note="criterion results in $CRITERION_DIR"
# The results' own time: the directory's changes only when a new benchmark first appears.
crit_stamp=$CRITERION_DIR/classify/credentials/new/estimates.json
[[ -f $crit_stamp ]] && crit_note+=" from $(date -u -r "$crit_stamp" +%Y-%m-%dT%H:%MZ)"
for b in classify/passthrough classify/credentials classify/token classify/refused; do
    if m=$(crit_median "$b"); then
        verdict "$(lt "$m" 200)" "classification ($b): ${m} ns median; target < 200 ns ($crit_note)"
    else
        echo "----  classification ($b): not measured here; run cargo bench --bench request_path"
    fi
done
if m=$(crit_median rewrite); then
    verdict "$(lt "$m" 2000)" "credential rewrite: ${m} ns median; target < 2 us ($crit_note)"
else
    echo "----  credential rewrite: not measured here; run cargo bench --bench request_path"
fi

echo
if ((${#failures[@]})); then
    printf 'FAILED: %s\n' "${failures[@]}"
    exit 1
fi
((credlock_alive)) || exit 1
if ((strict && misses)); then
    echo "--strict: $misses target(s) missed"
    exit 3
fi
echo "load.sh: every measurement completed ($misses target(s) missed)"
