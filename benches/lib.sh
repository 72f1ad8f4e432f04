# shellcheck shell=bash
# Helpers shared by benches/load.sh, benches/identify.sh and benches/audit.sh (sourced; they need
# PYTHON set). The ones the test suites use too (free_ports, wait_http, at_exit, stop_background ...)
# are tests/lib.sh's, sourced from here.
# shellcheck source=tests/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tests/lib.sh"

# log MESSAGE / die MESSAGE: "[SCRIPT HH:MM:SS] MESSAGE" on stderr; die then exits 1.
log() { printf '[%s %s] %s\n' "${0##*/}" "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# fill TEMPLATE OUT KEY=VALUE...: replace @KEY@ placeholders.
fill() {
    local src=$1 out=$2 kv; shift 2
    cp "$src" "$out"
    for kv in "$@"; do
        sed -i "s|@${kv%%=*}@|${kv#*=}|g" "$out"
    done
}

proc_status() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }   # kB
proc_cpu_ticks() {   # utime + stime, in clock ticks (fields 14 and 15; comm may hold spaces)
    local s f; s=$(<"/proc/$1/stat"); read -ra f <<<"${s##*) }"; echo $((f[11] + f[12]))
}
clk_tck=$(getconf CLK_TCK)
tree_cpu_ticks() {   # a process and its children (nginx workers)
    local total child
    total=$(proc_cpu_ticks "$1" 2>/dev/null || echo 0)
    for child in $(pgrep -P "$1" || true); do
        total=$((total + $(proc_cpu_ticks "$child" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
ticks_to_s() { awk -v t="$1" -v h="$clk_tck" 'BEGIN {printf "%.2f", t / h}'; }
kb_to_mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
fmt_us() { awk -v u="$1" 'BEGIN { if (u >= 1000) printf "%.2fms", u / 1000; else printf "%dus", u }'; }
median() { tr -s ' ' '\n' <<<"$*" | sed '/^$/d' | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else printf "-" }'; }

# write_upstream WORK WORKERS UPSTREAM_PORT PROXY_PORT: the nginx upstream (the static metadata
# tree, with the role's credentials valid for six hours from now) and nginx as a reverse proxy in
# front of it: $WORK/root, $WORK/upstream.conf, $WORK/proxy.conf. Needs $here and $ROLE.
write_upstream() {
    local work=$1 workers=$2 up_port=$3 ngx_port=$4 now_s nginx_user=''
    ((EUID == 0)) && nginx_user="user nobody $(id -gn nobody);"
    mkdir -p "$work/tmp" "$work/root"
    cp -r "${here:?}/upstream/tree/." "$work/root/"
    now_s=$(date -u +%s)
    fill "$here/upstream/credentials.json.in" "$work/root/latest/meta-data/iam/security-credentials/${ROLE:?}" \
        "LAST_UPDATED=$(date -u -d "@$now_s" +%Y-%m-%dT%H:%M:%SZ)" \
        "EXPIRATION=$(date -u -d "@$((now_s + 6 * 3600))" +%Y-%m-%dT%H:%M:%SZ)"
    fill "$here/upstream/nginx-upstream.conf.in" "$work/upstream.conf" "USER=$nginx_user" \
        "WORKERS=$workers" "PREFIX=$work" "ROOT=$work/root" "PORT=$up_port"
    fill "$here/upstream/nginx-proxy.conf.in" "$work/proxy.conf" "USER=$nginx_user" \
        "WORKERS=$workers" "PREFIX=$work" "PORT=$ngx_port" "UPSTREAM_PORT=$up_port"
}
