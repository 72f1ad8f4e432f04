#!/usr/bin/env bash
# Throughput and memory of `credlock audit`'s engine (src/audit.rs) on large CloudTrail corpora.
#   1. throughput: tests/support/cloudtrail_corpus.py writes at least --size-mb MB (10^6 bytes,
#      default 1100, over 1 GiB) of uncompressed CloudTrail JSON as gzipped S3 delivery files,
#      5,000 events per file, plus its few malformed and other-format files; examples/
#      audit_bench.rs runs the engine over it (--runs times) with the generator's environment as
#      the judge, under /usr/bin/time -v, and checks both lists and every counter against the
#      generator's answers. Target: peak RSS ("Maximum resident set size") under 100 MB.
#   2. groups: --groups-mb MB (default 700; 0 skips it) where almost every event is a denial or
#      a would-be denial from an address never seen before, so both lists overflow the default
#      cap of 50,000 groups and evict; the counters and "kept + dropped = events" are checked
#      (the lists cannot be predicted once groups are evicted). Reports the peak RSS at a full
#      cap: the engine's documented worst case (about 0.75 KB per group, 75 MB).
# Every corpus lives in a temporary directory under /tmp, deleted on exit (--keep keeps it).
#
# Usage: benches/audit.sh [--size-mb N] [--runs N] [--groups-mb N] [--keep]
# Build the driver first (fat LTO; the first release build takes many minutes on 2 cores):
#   CARGO_TARGET_DIR=/work/target-release cargo build --release --example audit_bench
# Environment: AUDIT_BENCH_BIN (default /work/target-release/release/examples/audit_bench),
# PYTHON (default python3; the generator needs only the standard library).
# Bounds: each generation and each run at most 30 minutes; refuses to start with less than 3 GB
# free under /tmp.
# Exit: 0 measured and the answers matched (the RSS target may MISS), 1 otherwise, 2 usage.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
BIN=${AUDIT_BENCH_BIN:-/work/target-release/release/examples/audit_bench}
PYTHON=${PYTHON:-python3}
TARGET_RSS_MB=100
size_mb=1100 runs=1 groups_mb=700 keep=0
while (($# > 0)); do
    case $1 in
        --size-mb) size_mb=${2:?}; shift 2 ;;
        --runs) runs=${2:?}; shift 2 ;;
        --groups-mb) groups_mb=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[[ $size_mb =~ ^[0-9]+$ && $groups_mb =~ ^[0-9]+$ && $runs =~ ^[0-9]+$ && $runs -ge 1 ]] || { echo "--size-mb, --groups-mb and --runs take integers" >&2; exit 2; }
# shellcheck source=benches/lib.sh
source "$here/lib.sh"   # log, die, at_exit ...

[[ -x $BIN ]] || die "no driver at $BIN (CARGO_TARGET_DIR=/work/target-release cargo build --release --example audit_bench)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is not installed (apt-get install time)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
free_kb=$(df -Pk /tmp | awk 'NR == 2 { print $4 }')
((free_kb > 3000000)) || die "less than 3 GB free under /tmp"

work=$(mktemp -d /tmp/credlock-audit-bench.XXXXXX)
remove_work() { if ((keep == 0)); then rm -rf "$work"; else log "kept $work"; fi; }
at_exit remove_work

# generate NAME MB [ARGS...]: a corpus in $work/NAME; sets records, uncompressed_mb, compressed_mb,
# files, gen_secs.
generate() {
    local name=$1 mb=$2
    shift 2
    log "generating at least $mb MB of uncompressed CloudTrail JSON in $work/$name"
    local start
    start=$(date +%s)
    timeout 1800 "$PYTHON" "$repo/tests/support/cloudtrail_corpus.py" --out "$work/$name" \
        --answers "$work/$name.answers.json" --size-mb "$mb" --events-per-file 5000 "$@" \
        2>"$work/generate.txt" || die "generator: $(cat "$work/generate.txt")"
    gen_secs=$(($(date +%s) - start))
    uncompressed_mb=$(sed -n 's/.*records, \([0-9.]*\) MB uncompressed.*/\1/p' "$work/generate.txt")
    records=$(sed -n 's/.*files, \([0-9]*\) records.*/\1/p' "$work/generate.txt")
    compressed_mb=$(du -sm "$work/$name" | cut -f1)
    files=$(find "$work/$name" -type f | wc -l)
    log "$(cat "$work/generate.txt") (${gen_secs}s)"
}

# measure NAME LABEL TARGET: one run of the driver over $work/NAME; TARGET 1 judges the RSS target.
measure() {
    local name=$1 label=$2 target=$3 rss_kb cpu secs
    if ! timeout 1800 /usr/bin/time -v "$BIN" --answers "$work/$name.answers.json" "$work/$name" \
        >"$work/run.txt" 2>"$work/time.txt"; then
        status=1
    fi
    rss_kb=$(sed -n 's/.*Maximum resident set size (kbytes): \([0-9]*\).*/\1/p' "$work/time.txt")
    cpu=$(sed -n 's/.*Percent of CPU this job got: \(.*\)/\1/p' "$work/time.txt")
    [[ -n $rss_kb ]] || die "no /usr/bin/time output: $(cat "$work/time.txt")"
    secs=$(sed -n 's/^elapsed *\([0-9.]*\) s/\1/p' "$work/run.txt")
    echo
    echo "$label"
    sed 's/^/  /' "$work/run.txt"
    awk -v mb="$uncompressed_mb" -v s="$secs" -v kb="$rss_kb" -v cpu="$cpu" -v t="$TARGET_RSS_MB" -v judge="$target" 'BEGIN {
        printf "  uncompressed MB/s   %.1f\n", mb / s
        printf "  peak RSS            %.1f MB (%d kB; /usr/bin/time -v \"Maximum resident set size\")\n", kb / 1024, kb
        printf "  CPU                 %s\n", cpu
        if (judge) printf "  target              peak RSS < %d MB: %s\n", t, (kb / 1024 < t ? "PASS" : "MISS")
    }'
}

echo "credlock audit engine benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $(uname -r))"
echo "driver      $BIN ($(stat -c %y "$BIN" | cut -d. -f1))"
status=0

generate throughput "$size_mb" --seed 7
echo
echo "1. throughput corpus: $records records, $uncompressed_mb MB uncompressed JSON, $compressed_mb MB gzipped, $files files"
echo "   (5,000 events per delivery file; generated in ${gen_secs}s)"
for ((run = 1; run <= runs; run++)); do
    measure throughput "run $run" 1
done
((keep)) || rm -rf "$work/throughput"

if ((groups_mb > 0)); then
    generate groups "$groups_mb" --seed 8 --distinct-sources
    echo
    echo "2. groups corpus: $records records, $uncompressed_mb MB uncompressed JSON, $compressed_mb MB gzipped, $files files"
    echo "   (almost every event a denial from a new address; default cap: 50,000 groups per list)"
    measure groups "run 1" 0
fi
((status == 0)) || die "the report differs from the generator's answers (see the run output above)"
