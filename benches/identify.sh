#!/usr/bin/env bash
# What the access policy's per-connection identification costs (issue 15), on loopback.
#   * nginx serving the metadata tree stands in for IMDS; moto is STS;
#   * three proxies pinned to one CPU (wrk on another), as in load.sh:
#       off    credlock without [[access.rule]]s (nothing identified, today's path)
#       on     credlock with one rule that allows everyone: every connection is identified
#              (SO_ORIGINAL_DST + an exact sock_diag request + the cgroup path) and every request
#              decided, the whole cost of the policy
#       nginx  nginx as a reverse proxy
#   * two cells, each in rounds (the order rotates each round; medians over rounds):
#       keep-alive passthrough GET, 64 connections      target: on >= 0.95x off
#       a new connection per request (Connection: close, as short-lived CLI processes
#       connect), 16 connections                          target: on >= 0.90x off; and vs nginx
#
# Usage: benches/identify.sh [--rounds N] [--seconds S]   (default 5 rounds of 2 s per cell)
# Environment: CREDLOCK_BIN (default /work/target-release/release/credlock), PYTHON, MOTO_SERVER;
# CREDLOCK_BENCH_KEEP=1 keeps the work directory (configs, logs) for a look afterwards.
# Exit: 0 measured (a target may MISS), 1 something could not be measured, 2 usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
CREDLOCK_BIN=${CREDLOCK_BIN:-/work/target-release/release/credlock}
PYTHON=${PYTHON:-$repo/.venv/bin/python}
MOTO_SERVER=${MOTO_SERVER:-$repo/.venv/bin/moto_server}
ROLE=credlock-bench-role
PASS_PATH=/latest/meta-data/instance-id
rounds=5 secs=2
while (($# > 0)); do
    case $1 in
        --rounds) rounds=${2:?}; shift 2 ;;
        --seconds) secs=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=benches/lib.sh
source "$here/lib.sh"   # log, die, free_ports, wait_http, at_exit, stop_background ...
for tool in wrk nginx taskset curl; do command -v "$tool" >/dev/null || die "$tool is not installed (tests/setup.sh)"; done
[[ -x $CREDLOCK_BIN ]] || die "no credlock at $CREDLOCK_BIN (cargo build --release)"

work=$(mktemp -d /tmp/credlock-identify.XXXXXX)
chmod 755 "$work"
remove_work() { if [[ -n ${CREDLOCK_BENCH_KEEP:-} ]]; then log "kept $work (CREDLOCK_BENCH_KEEP)"; else rm -rf "$work"; fi; }
at_exit remove_work
at_exit stop_background 1 # PIDS: everything started below

read -r up_port off_port off_admin on_port on_admin ngx_port moto_port <<<"$(free_ports 7)"
write_upstream "$work" "1" "$up_port" "$ngx_port"
for which in off on; do
    port_var=${which}_port admin_var=${which}_admin
    cat >"$work/$which.toml" <<TOML
[server]
listen = ["127.0.0.1:${!port_var}"]
admin_listen = "127.0.0.1:${!admin_var}"
upstream = "http://127.0.0.1:$up_port"
[lock]
sts_endpoint = "http://127.0.0.1:$moto_port"
[discovery.echo]
enabled = false
TOML
done
cat >>"$work/on.toml" <<'TOML'
[[access.rule]]
name = "everyone"
TOML

server_cpu=(taskset -c 1) load_cpu=(taskset -c 0)
"${server_cpu[@]}" nginx -p "$work" -c "$work/upstream.conf" -e "$work/upstream-error.log" -g 'daemon off;' >/dev/null 2>&1 &
PIDS+=($!)
"${server_cpu[@]}" "$MOTO_SERVER" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$up_port$PASS_PATH" 200 10 || die "the nginx upstream did not start"
wait_http "http://127.0.0.1:$moto_port/" any 30 || die "moto did not start"
for which in off on; do
    "${server_cpu[@]}" "$CREDLOCK_BIN" run --config "$work/$which.toml" >"$work/$which.log" 2>&1 &
    PIDS+=($!)
done
"${server_cpu[@]}" nginx -p "$work" -c "$work/proxy.conf" -e "$work/proxy-error.log" -g 'daemon off;' >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$off_admin/readyz" 200 30 || die "credlock (off) never became ready"
wait_http "http://127.0.0.1:$on_admin/readyz" 200 30 || die "credlock (on) never became ready ($work/on.log)"
wait_http "http://127.0.0.1:$ngx_port$PASS_PATH" 200 10 || die "the nginx proxy did not start"

targets=(off on nginx)
declare -A port_of=([off]=$off_port [on]=$on_port [nginx]=$ngx_port)
# wrk's own summary: "Requests/sec: N"; any socket error or non-2xx answer fails the run.
measure() { # measure TARGET CONNS CLOSE(0|1) -> req/s
    local out args=(-t2 -c"$2" -d"${secs}s" --timeout 2s)
    (($2 == 1)) && args=(-t1 -c1 -d"${secs}s" --timeout 2s)
    (($3)) && args+=(-H "Connection: close")
    out=$(timeout $((secs + 20)) "${load_cpu[@]}" wrk "${args[@]}" "http://127.0.0.1:${port_of[$1]}$PASS_PATH" 2>&1) || true
    if grep -qE 'Socket errors|Non-2xx' <<<"$out" || ! grep -q '^Requests/sec:' <<<"$out"; then
        printf '%s\n' "$out" >>"$work/failed.log"
        echo 0
        return
    fi
    awk '/^Requests\/sec:/ {print $2}' <<<"$out"
}

declare -A results
for cell in "keepalive 64 0" "close 16 1"; do
    read -r name conns close <<<"$cell"
    for round in $(seq "$rounds"); do
        shift_by=$(((round - 1) % ${#targets[@]}))
        for t in "${targets[@]:$shift_by}" "${targets[@]:0:$shift_by}"; do
            r=$(measure "$t" "$conns" "$close")
            [[ $r != 0 ]] || die "$t $name round $round: errors or no measurement (see the wrk output above in $work/failed.log)"
            results[$t|$name]+=" $r"
            log "$(printf '%-6s %-10s c=%-3s round %d/%d %10s req/s' "$t" "$name" "$conns" "$round" "$rounds" "$r")"
        done
    done
done
metrics=$(curl -s "http://127.0.0.1:$on_admin/metrics")
count() { awk -v k="credlock_connections_identified_total{result=\"$1\"}" '$1 == k {print $2}' <<<"$metrics"; }
identified=$(count identified)
# socket_gone: wrk closing its connections at the end of a round, before they were looked up.
unidentified=$(($(count lookup_failed) + $(count forwarded)))

printf '\n%-24s %12s %12s %12s %10s %10s\n' cell "off req/s" "on req/s" "nginx req/s" "on/off" "on/nginx"
for name in keepalive close; do
    off=$(median "${results[off|$name]}") on=$(median "${results[on|$name]}") ngx=$(median "${results[nginx|$name]}")
    printf '%-24s %12s %12s %12s %10s %10s\n' "$name" "$off" "$on" "$ngx" "$(ratio "$on" "$off")" "$(ratio "$on" "$ngx")"
    declare "ratio_$name=$(ratio "$on" "$off")"
done
printf '\nconnections identified by "on": %s (socket gone first: %s; lookup failed: %s; forwarded: %s)\n' \
    "${identified:-0}" "$(count socket_gone)" "$(count lookup_failed)" "$(count forwarded)"
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r + 0 >= t) ? "PASS" : "MISS" }'; }
# shellcheck disable=SC2154 # ratio_keepalive, ratio_close: declared in the loop above
printf 'target keep-alive on >= 0.95x off: %s (%s)\n' "$(verdict "$ratio_keepalive" 0.95)" "$ratio_keepalive"
# shellcheck disable=SC2154
printf 'target connection-per-request on >= 0.90x off: %s (%s)\n' "$(verdict "$ratio_close" 0.90)" "$ratio_close"
((unidentified == 0)) || die "the policy run left $unidentified connections unidentified: identification failed"
