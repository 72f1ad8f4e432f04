#!/bin/bash
# Static checks for the non-Rust parts of credlock: systemd units, the default config, shell
# scripts and the AMI build files. Runs on a build machine (no root, no installed credlock).
#
#   tests/lint.sh
#
# Checks: `systemd-analyze verify` of both units and of an application unit using the
# app-after-credlock.conf drop-in (copied to a temporary directory with the not-yet-installed
# executables replaced by /bin/true); `systemd-analyze security --offline=yes` exposure of
# credlock.service <= 2.0; shellcheck on every *.sh and systemd/credlock-firewall; the default
# credlock.toml parses (and passes `credlock check-config` when target/debug/credlock exists);
# ami/credlock.pkr.hcl parses with python-hcl2 and keeps the IMDSv2 settings; the Image Builder
# component parses as YAML with build/validate/test phases; benches/summarize.py judges the
# committed load.sh runs (its first ratio equals the one computed here from the raw table), marks
# a run cut short as a miss and rejects a file that is not a load.sh output.
# Prints PASS/FAIL/SKIP per check and a summary; exits 1 if any check failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CREDLOCK_VENV:-$REPO/.venv}
MAX_EXPOSURE=2.0
# shellcheck source=tests/lib.sh
. "$REPO/tests/lib.sh" # pass, fail, skip, summary, at_exit
FAIL_DETAIL=lines      # a failure's detail: its lines under it, as "  | LINE"
SUMMARY_SKIPPED=1      # "N passed, M failed, K skipped"

TMP=$(mktemp -d)
at_exit rm -rf "$TMP"

# ---------------------------------------------------------------------------------------------
# systemd units

stage_units() {
    local u
    mkdir -p "$TMP/units/credlock-lint-app.service.d"
    for u in "$REPO"/systemd/*.service "$REPO"/systemd/*.socket "$REPO"/systemd/*.timer; do
        [[ -e $u ]] || continue
        # The executables are installed by ami/provision.sh, not present on a build machine.
        sed -E 's#^(Exec[A-Za-z]*=)[-@:+!]*(/usr/bin/credlock|/usr/libexec/credlock/credlock-firewall)( [^ ]*)*#\1/bin/true#' \
            "$u" >"$TMP/units/${u##*/}"
    done
    cat >"$TMP/units/credlock-lint-app.service" <<'EOF'
[Unit]
Description=an application using the app-after-credlock.conf drop-in

[Service]
Type=oneshot
ExecStart=/bin/true
DynamicUser=yes

[Install]
WantedBy=multi-user.target
EOF
    cp "$REPO/systemd/app-after-credlock.conf" "$TMP/units/credlock-lint-app.service.d/"
}

check_verify() {
    local out rc
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        fail "systemd-analyze verify" "systemd-analyze is not installed"
        return
    fi
    # SYSTEMD_UNIT_PATH ending in ':' = the temporary directory first, then the normal paths.
    local units=() f
    for f in "$TMP"/units/*.service "$TMP"/units/*.socket "$TMP"/units/*.timer; do
        [[ -e $f ]] && units+=("${f##*/}")
    done
    out=$(cd "$TMP/units" && SYSTEMD_UNIT_PATH="$TMP/units:" systemd-analyze verify "${units[@]}" 2>&1)
    rc=$?
    # Only complaints about our units count (the host's own units may have warnings).
    out=$(grep -E 'credlock|lint-app|app-after' <<<"$out")
    if [[ $rc == 0 && -z $out ]]; then
        pass "systemd-analyze verify ${units[*]} (+ app drop-in)"
    else
        fail "systemd-analyze verify (exit $rc)" "$out"
    fi
}

check_dropin_effect() {
    local out
    out=$(grep -E '^(After|Wants|Requires)=' "$REPO/systemd/app-after-credlock.conf")
    if grep -qx 'After=credlock.service' <<<"$out" && grep -qE '^(Wants|Requires)=credlock.service$' <<<"$out"; then
        pass "app-after-credlock.conf: After= plus Wants=/Requires= credlock.service"
    else
        fail "app-after-credlock.conf: After= plus Wants=/Requires= credlock.service" "$out"
    fi
}

check_security() {
    local out level u
    out=$(systemd-analyze security --offline=yes --threshold=20 "$TMP/units/credlock.service" 2>&1)
    level=$(sed -n 's/.*Overall exposure level for credlock\.service: \([0-9.]*\).*/\1/p' <<<"$out")
    if [[ -z $level ]]; then
        fail "systemd-analyze security credlock.service" "$(tail -n 5 <<<"$out")"
    elif awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l <= m) }'; then
        pass "systemd-analyze security credlock.service: exposure $level <= $MAX_EXPOSURE"
    else
        fail "systemd-analyze security credlock.service: exposure $level > $MAX_EXPOSURE" \
            "$(grep '✗' <<<"$out")"
    fi
    # For information: the firewall unit runs as root with CAP_NET_ADMIN by necessity.
    u=$(systemd-analyze security --offline=yes "$TMP/units/credlock-firewall.service" 2>&1 |
        sed -n 's/.*Overall exposure level for credlock-firewall\.service: \([0-9.]*\).*/\1/p')
    printf 'INFO credlock-firewall.service exposure %s (root + CAP_NET_ADMIN by design)\n' "${u:-?}"
}

# ---------------------------------------------------------------------------------------------
# Shell

check_shellcheck() {
    local files=() f out
    if ! command -v shellcheck >/dev/null 2>&1; then
        fail "shellcheck" "shellcheck is not installed (apt-get install shellcheck)"
        return
    fi
    while IFS= read -r -d '' f; do files+=("$f"); done < <(
        find "$REPO" \( -path "$REPO/.git" -o -path "$REPO/target" -o -path "$REPO/.venv" \
            -o -name node_modules \) -prune -o -type f -name '*.sh' -print0 | sort -z)
    if [[ -f $REPO/systemd/credlock-firewall ]]; then
        files+=("$REPO/systemd/credlock-firewall")
    else
        fail "shellcheck systemd/credlock-firewall" "missing file"
    fi
    for f in "${files[@]}"; do
        if out=$(shellcheck -x "$f" 2>&1); then
            pass "shellcheck ${f#"$REPO"/}"
        else
            fail "shellcheck ${f#"$REPO"/}" "$out"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# Configuration and AMI files

check_config() {
    local out bin=$REPO/target/debug/credlock conf=$TMP/credlock.toml
    if out=$(python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' \
        "$REPO/systemd/credlock.toml" 2>&1); then
        pass "systemd/credlock.toml is valid TOML"
    else
        fail "systemd/credlock.toml is valid TOML" "$out"
        return
    fi
    if [[ ! -x $bin ]] || ! "$bin" --help >/dev/null 2>&1; then
        skip "credlock check-config systemd/credlock.toml" "no working $bin"
        return
    fi
    # The template path as installed does not exist here: point it at the repository's copy.
    sed "s|^#template = .*|template = \"$REPO/policy-templates/session-policy.json\"|" \
        "$REPO/systemd/credlock.toml" >"$conf"
    if out=$("$bin" check-config --config "$conf" 2>&1); then
        pass "credlock check-config systemd/credlock.toml"
    else
        fail "credlock check-config systemd/credlock.toml" "$out"
    fi
}

venv_python() {
    if [[ -x $VENV/bin/python ]]; then
        printf '%s\n' "$VENV/bin/python"
    else
        return 1
    fi
}

check_packer() {
    local py out
    if ! py=$(venv_python) || ! "$py" -c 'import hcl2' 2>/dev/null; then
        fail "ami/credlock.pkr.hcl parses (python-hcl2)" \
            "no python-hcl2 in $VENV: $VENV/bin/pip install python-hcl2"
        return
    fi
    if out=$("$py" - "$REPO/ami/credlock.pkr.hcl" <<'EOF' 2>&1
import sys
import hcl2

def unquote(v):
    return v.strip('"') if isinstance(v, str) else v

def norm(v):
    """python-hcl2 7.x keeps the quotes of block labels and strings: drop them."""
    if isinstance(v, dict):
        return {unquote(k): norm(x) for k, x in v.items() if not k.startswith("__")}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return unquote(v)

with open(sys.argv[1]) as f:
    doc = norm(hcl2.load(f))

problems = []
sources = [s for block in doc.get("source", []) for s in block.get("amazon-ebs", {}).values()]
if not sources:
    problems.append("no source \"amazon-ebs\" block")
for src in sources:
    mo = src.get("metadata_options")
    mo = mo[0] if isinstance(mo, list) and mo else mo or {}
    if unquote(mo.get("http_tokens")) != "required":
        problems.append("metadata_options.http_tokens must be \"required\"")
    if str(mo.get("http_put_response_hop_limit")) != "1":
        problems.append("metadata_options.http_put_response_hop_limit must be 1")
    if unquote(src.get("imds_support")) != "v2.0":
        problems.append("imds_support must be \"v2.0\" (AMI launches with IMDSv2 required)")
builds = doc.get("build", [])
provs = [p for b in builds for p in b.get("provisioner", [])]
shell = [p["shell"] for p in provs if "shell" in p]
if not any("provision.sh" in str(s) for s in shell):
    problems.append("no shell provisioner running ami/provision.sh")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{len(sources)} source(s), {len(provs)} provisioner(s)")
EOF
    ); then
        pass "ami/credlock.pkr.hcl parses and keeps IMDSv2 settings ($out)"
    else
        fail "ami/credlock.pkr.hcl parses and keeps IMDSv2 settings" "$out"
    fi
}

check_image_builder() {
    local py out
    if ! py=$(venv_python) || ! "$py" -c 'import yaml' 2>/dev/null; then
        skip "ami/image-builder-component.yml" "no PyYAML in $VENV"
        return
    fi
    if out=$("$py" - "$REPO/ami/image-builder-component.yml" <<'EOF' 2>&1
import sys
import yaml

with open(sys.argv[1]) as f:
    doc = yaml.safe_load(f)
problems = []
if str(doc.get("schemaVersion")) != "1.0":
    problems.append("schemaVersion must be 1.0")
phases = {p.get("name"): p for p in doc.get("phases", [])}
for name in ("build", "validate", "test"):
    if name not in phases or not phases[name].get("steps"):
        problems.append(f"phase {name} missing or empty")
for p in phases.values():
    for s in p.get("steps", []):
        if not s.get("name") or not s.get("action"):
            problems.append(f"step without name/action in phase {p.get('name')}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(", ".join(f"{n}: {len(p['steps'])} steps" for n, p in phases.items()))
EOF
    ); then
        pass "ami/image-builder-component.yml is a valid component document ($out)"
    else
        fail "ami/image-builder-component.yml is a valid component document" "$out"
    fi
}

# ---------------------------------------------------------------------------------------------
# Benchmark summary

check_bench_summary() {
    local results=("$REPO"/benches/results/*/run*.txt) out want got cut
    if [[ ! -f ${results[0]} ]]; then
        fail "benches/summarize.py" "no committed load.sh runs under benches/results"
        return
    fi
    if ! out=$(python3 "$REPO/benches/summarize.py" "${results[@]}" 2>&1); then
        fail "benches/summarize.py on the committed runs" "$out"
        return
    fi
    # credlock / nginx passthrough req/s at 1 connection in the first run, from its raw table.
    want=$(awk -F'|' '$3 ~ /passthrough/ && $4 ~ / 1 / {gsub(/ /, "", $2); r[$2] = $5} END {printf "%.3f", r["credlock"] / r["nginx"]}' "${results[0]}")
    got=$(awk -F'|' '$2 ~ /passthrough req\/s >= 1.0x nginx, 1 conn/ {gsub(/ /, "", $3); print $3}' <<<"$out")
    if [[ $(grep -cE '\| (PASS|MISS) \|$' <<<"$out") -ne 9 || $got != "$want" ]]; then
        fail "benches/summarize.py on the committed runs" "expected 9 verdicts and a first ratio of $want, got $got:"$'\n'"$out"
        return
    fi
    cut="$TMP/cut-short.txt"
    sed '/^Startup/,$d' "${results[0]}" >"$cut"   # the table, without startup, soak and targets
    if ! grep -q '^| peak RSS < 20 MB.* | MISS |$' <<<"$(python3 "$REPO/benches/summarize.py" "$cut" 2>&1)"; then
        fail "benches/summarize.py marks a run cut short as a miss"
        return
    fi
    if python3 "$REPO/benches/summarize.py" "$REPO/README.md" >/dev/null 2>&1; then
        fail "benches/summarize.py rejects a file that is not a load.sh output"
        return
    fi
    pass "benches/summarize.py: ${#results[@]} committed runs, 9 verdicts, first ratio $got as in the raw table; a cut run misses; other files rejected"
}

stage_units
check_verify
check_dropin_effect
check_security
check_shellcheck
check_config
check_packer
check_image_builder
check_bench_summary
summary
