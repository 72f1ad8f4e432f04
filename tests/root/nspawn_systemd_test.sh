#!/bin/bash
# credlock under a real systemd: boot a Debian bookworm container (systemd-nspawn) in its own
# network namespace, install credlock with ami/provision.sh, and check the units for real:
# boot ordering, socket activation, Type=notify readiness, the firewall redirect, locked
# credentials for an application, the watchdog, fail-closed on stop, and a clean uninstall.
# Root only.
#
# cloud-init is simulated: a fake /usr/bin/cloud-init (tests/root/nspawn_fake_cloud_init.sh) run
# by units with the names and ordering of Debian's cloud-init-local, cloud-init and cloud-final
# units. The container boots twice: first a control boot with CREDLOCK_BOOT_EXEMPT_ROOT=no (the
# strict rules from the start: cloud-init's early stages are refused as root, the first-boot
# problem boot mode solves), then the real boot with the shipped defaults (auto: the boot-mode
# rules let cloud-init's early stages read IMDS directly as root; credlock's ExecStartPost=
# loads the strict rules once it is READY, so cloud-final and root get locked credentials).
#
# Issues 14 and 20 (local attackers and busy operators), in the real boot:
#  - an unprivileged user's process (test-lock-holder.service, tests/root/nspawn_lock_holder.sh)
#    takes or plants every firewall lock it can before credlock starts: the instance must still
#    leave boot mode (strict rules from credlock's ExecStartPost=, no restart);
#  - Debian's nftables.service is enabled; `systemctl reload/restart/stop/start nftables` (its
#    /etc/nftables.conf starts with `flush ruleset`) must leave credlock's table in place, and
#    the app user asking IMDS for credentials non-stop meanwhile (tests/root/nspawn_imds_probe.sh)
#    must never get raw ones (the same probe runs through the kill -9 below);
#  - rules deleted by hand come back (the firewall's periodic check), and removed ones show in
#    credlock's firewall metrics and /readyz, and fire the shipped alert rule (promtool);
#  - kill -9 credlock while the app user tries non-stop to bind 127.0.0.1:8169, [::1]:8169 and
#    127.0.0.1:9169 (tests/root/nspawn_squatter.sh: plain, SO_REUSEADDR, SO_REUSEPORT,
#    v4-mapped): every bind fails (credlock.socket holds them), credlock comes back and serves;
#  - processes with credlock's uid outside credlock.service (setpriv from another cgroup,
#    systemd-run --scope) are redirected like everyone: locked, not raw, credentials.
#
# Issue 15 (per-process access policy), in the real boot: credlock.toml has a rule "reporting"
# matching credlock-test-denied.service by unit name (User= the app user,
# tests/root/nspawn_denied_app.sh): it gets 404 for credentials and still reads metadata, while
# the example app (same user, another unit) gets locked credentials; /metrics and the journal
# name the rule and the unit.
#
#   sudo tests/root/nspawn_systemd_test.sh
#
# Topology (nothing touches the host's network):
#   netns credlock-nsp-inst (the container)          netns credlock-nsp-imds
#     veth clnsp-i 169.254.0.2/16, fd00:ec2::2/64  <->  veth clnsp-m 169.254.169.254/16,
#     credlock-firewall rules, credlock, apps            fd00:ec2::254/64, 169.254.0.1/16
#                                                       IMDS emulator :80 (tokens required),
#                                                       moto_server 169.254.0.1:5000 (STS/EC2)
#
# Needs: target/debug/credlock (or CREDLOCK_BIN), tests/support/imds_emulator.py,
# systemd/credlock-firewall, the venv's moto_server (CREDLOCK_VENV, default .venv). A missing
# piece is a FAIL, never a skip. Installs debootstrap and systemd-container if missing; the
# rootfs is cached by tests/root/nspawn_rootfs.sh. Everything it creates is removed on exit,
# and leftovers of an interrupted run are removed at the start. Set CREDLOCK_NSPAWN_KEEP=1 to
# keep the work directory (rootfs, logs) for debugging.
#
# Prints PASS/FAIL per check and "N passed, M failed"; exits 1 if anything failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${CREDLOCK_BIN:-$REPO/target/debug/credlock}
VENV=${CREDLOCK_VENV:-$REPO/.venv}
EMULATOR=$REPO/tests/support/imds_emulator.py
HERE=$REPO/tests/root
# shellcheck source=tests/lib.sh
. "$HERE/../lib.sh" # pass, fail, check, summary, at_exit, stop_pids, alive, wait_until, wait_http
FAIL_DETAIL=paren   # "FAIL NAME (DETAIL)"
WAIT_INTERVAL=0.5   # wait_until polls every 0.5 s

readonly MACHINE=credlock-nspawn-test
readonly NS_INST=credlock-nsp-inst NS_IMDS=credlock-nsp-imds
readonly VETH_I=clnsp-i VETH_M=clnsp-m
readonly IMDS4=169.254.169.254 IMDS6=fd00:ec2::254 MOTO_ADDR=169.254.0.1 MOTO_PORT=5000
readonly STATE=/run/credlock-nspawn-test
readonly SRC_IN=/root/credlock-src # the repo files inside the container
readonly APP_USER=credlock-app
readonly WATCHDOG_SEC=30 RESTART_SEC=1
readonly IID=i-0123456789abcdef0      # the emulator's instance-id
readonly CI_DIR=/var/lib/cloud/credlock-test # the fake cloud-init's records, inside the container

WORK=""
ROOT=""
NSPAWN_PID=""
LEADER=""
EMU_PID=""
MOTO_PID=""
CONTROL=""
T0=$SECONDS
SUMMARY_T0=$T0 # summary: "N passed, M failed (Ts)"

log() { printf '  [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }

# ---------------------------------------------------------------------------------------------
# Processes and cleanup. Every process is ended by its recorded pid, never by name (stop_pids).

# A pid recorded by a previous run is ours only if its command line still matches.
stop_recorded() {
    local file=$STATE/$1 pattern=$2 pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"; then
        stop_pids 10 "$pid"
    fi
    rm -f "$file"
}

# shellcheck disable=SC2317 # also run at exit
teardown() {
    # Container: SIGTERM to systemd-nspawn halts it; its init is killed if it does not.
    stop_recorded nspawn.pid systemd-nspawn
    stop_recorded leader.pid systemd
    stop_recorded emulator.pid imds_emulator
    stop_recorded moto.pid moto_server
    ip netns del "$NS_INST" 2>/dev/null
    ip netns del "$NS_IMDS" 2>/dev/null
    ip link del "$VETH_I" 2>/dev/null
    rm -rf "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null
    if [[ -f $STATE/workdir ]]; then
        local w
        w=$(<"$STATE/workdir")
        if [[ ${CREDLOCK_NSPAWN_KEEP:-0} == 1 && $w == "$WORK" ]]; then
            printf 'kept %s\n' "$w"
        elif [[ $w == /var/tmp/credlock-nspawn.* ]]; then
            rm -rf --one-file-system "$w"
        fi
        rm -f "$STATE/workdir"
    fi
    rmdir "$STATE" 2>/dev/null || true
}

# fatal NAME REASON: a setup step failed; nothing after it can be checked.
fatal() {
    fail "$1" "$2"
    if [[ -n $LEADER ]]; then dump_journal; fi
    summary
}

# ---------------------------------------------------------------------------------------------
# Helpers for the running container.

# Run a command inside the booted container (all its namespaces), with a clean environment,
# for at most CEXEC_TIMEOUT (default 60) seconds.
cexec() {
    timeout -k 5 "${CEXEC_TIMEOUT:-60}" nsenter -t "$LEADER" -a -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

# quiet COMMAND...: run it with its output discarded.
# shellcheck disable=SC2317 # called through check
quiet() { "$@" >/dev/null 2>&1; }

# ckill SIGNAL PID: signal a process by its pid inside the container (bash's kill: the minbase
# root has no procps). Never pid 0 or 1 (a process group or the container's init).
ckill() {
    if [[ ! $2 =~ ^[0-9]+$ ]] || (($2 <= 1)); then
        printf 'ckill: refusing pid "%s"\n' "$2" >&2
        return 1
    fi
    # shellcheck disable=SC2016 # expanded by the inner bash
    cexec /bin/bash -c 'kill "-$1" "$2"' ckill "$1" "$2"
}

prop() { cexec systemctl show -p "$2" --value "$1"; }

dump_journal() {
    printf -- '---- journal (credlock units, last 80 lines) ----\n'
    cexec journalctl -b --no-pager -o short-monotonic -n 80 \
        -u credlock-firewall.service -u credlock.service -u credlock-example-app.service \
        -u "$DENIED_UNIT" \
        -u cloud-init-local.service -u cloud-init.service -u cloud-final.service 2>&1 |
        sed 's/^/  | /'
    printf -- '----\n'
}

# The IMDSv2 credential fetch (token, role name, credentials) against the URL base in $1.
# shellcheck disable=SC2016 # expanded by the inner sh
readonly CREDS_SCRIPT='
    b=$1
    t=$(curl -sS --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$b/latest/api/token") || exit $?
    r=$(curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $t" "$b/latest/meta-data/iam/security-credentials/") || exit $?
    curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $t" "$b/latest/meta-data/iam/security-credentials/$r"
'

# creds_via URL_BASE OUTFILE COMMAND...: the credential fetch run under COMMAND (runuser,
# setpriv, systemd-run ...) inside the container; prints curl's exit code.
creds_via() {
    local base=$1 out=$2
    shift 2
    cexec "$@" /bin/sh -c "$CREDS_SCRIPT" sh "$base" >"$out" 2>"$out.err"
    echo $?
}

# curl_as USER URL_BASE OUTFILE: IMDSv2 credential fetch as USER; prints curl's exit code.
curl_as() {
    creds_via "$2" "$3" runuser -u "$1" --
}

# shellcheck disable=SC2317 # called through check
fw_status() { cexec /usr/libexec/credlock/credlock-firewall status >>"$WORK/firewall-status.log" 2>&1; }
# shellcheck disable=SC2317 # called through check
fw_strict() { cexec /usr/libexec/credlock/credlock-firewall status --strict >>"$WORK/firewall-status.log" 2>&1; }
# fw_status_within NAME: `credlock-firewall status` says the rules are in place, at once or
# within HAND_BOUND s. (The exemption names credlock.service's cgroup by id: when credlock
# stops, status reports the loaded rules as stale until the periodic check re-pins them; they
# keep redirecting everyone meanwhile, which the connection-refused checks show.)
fw_status_within() {
    local name=$1 t0 first
    t0=$(date +%s%N)
    if fw_status; then
        pass "$name"
        return
    fi
    first=$(cexec /usr/libexec/credlock/credlock-firewall status 2>&1 | tr '\n' ' ' | head -c 300)
    if wait_until "$HAND_BOUND" fw_status; then
        pass "$name (status in place $(ms_since "$t0") ms later; at first: $first)"
    else
        fail "$name" "not in place within $HAND_BOUND s: $first"
    fi
}

# The mode the loaded rules are in: strict, boot or none.
fw_mode() {
    cexec /usr/libexec/credlock/credlock-firewall status 2>/dev/null | sed -n 's/^mode: \([a-z]*\).*/\1/p'
}

# ci_field STAGE KEY: a value the fake cloud-init recorded ("KEY value" lines in STAGE.log).
ci_field() {
    awk -v k="$2" '$1 == k { sub(/^[^ ]+ /, ""); print; exit }' "$ROOT$CI_DIR/$1.log" 2>/dev/null
}

# The emulator's control API, from inside its namespace.
emulator_state() {
    ip netns exec "$NS_IMDS" curl -sS --max-time 5 "http://$CONTROL/state"
}

# json_field FILE KEY: a top-level string field of a JSON document ("" if absent/invalid).
json_field() {
    /usr/bin/python3 - "$1" "$2" <<'EOF' 2>/dev/null
import json, sys
try:
    print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))
except Exception:
    print("")
EOF
}

# Every AccessKeyId anywhere in the emulator's state, one per line.
emulator_key_ids() {
    emulator_state | /usr/bin/python3 -c '
import json, sys
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "AccessKeyId" and isinstance(x, str):
                print(x)
            walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(json.load(sys.stdin))'
}

# locked_creds NAME FILE: FILE is a Success credential document whose AccessKeyId is not one of
# the emulator's (credlock replaced it with the locked set).
locked_creds() {
    local name=$1 file=$2 code key raw
    code=$(json_field "$file" Code)
    key=$(json_field "$file" AccessKeyId)
    raw=$(emulator_key_ids)
    if [[ $code != Success || -z $key ]]; then
        fail "$name" "no credential document: $(head -c 200 "$file" 2>/dev/null) $(head -c 200 "$file.err" 2>/dev/null)"
    elif [[ -z $raw ]]; then
        fail "$name" "could not read the emulator's credentials from GET /state"
    elif grep -qxF -- "$key" <<<"$raw"; then
        fail "$name" "AccessKeyId $key is the emulator's raw one"
    else
        pass "$name (AccessKeyId ${key:0:8}..., emulator's: $(tr '\n' ' ' <<<"$raw" | cut -c1-60))"
    fi
}

# raw_creds NAME FILE: FILE holds the emulator's own (unlocked) credentials.
raw_creds() {
    local name=$1 file=$2 key
    key=$(json_field "$file" AccessKeyId)
    if [[ -n $key ]] && grep -qxF -- "$key" <<<"$(emulator_key_ids)"; then
        pass "$name"
    else
        fail "$name" "got: $(head -c 200 "$file" 2>/dev/null) $(head -c 200 "$file.err" 2>/dev/null)"
    fi
}

# shellcheck disable=SC2317 # called through check/wait_until
is_active() { [[ $(prop "$1" ActiveState) == active ]]; }

# restarted UNIT OLD_NRESTARTS OLD_PID: active again, with a new main pid, after a restart.
# shellcheck disable=SC2317 # called through wait_until
restarted() {
    local n pid
    n=$(prop "$1" NRestarts)
    pid=$(prop "$1" MainPID)
    [[ $n =~ ^[0-9]+$ ]] && ((n > $2)) && [[ $pid != "$3" && $pid != 0 ]] && is_active "$1"
}

# ---------------------------------------------------------------------------------------------
# Setup

preflight() {
    local missing=()
    [[ $(id -u) == 0 ]] || { fail "preflight" "must run as root"; summary; }
    if [[ ! -x $BIN ]]; then
        missing+=("$BIN (cargo build --bin credlock)")
    elif ! "$BIN" --help >/dev/null 2>&1; then
        missing+=("a working $BIN ('$BIN --help' fails)")
    fi
    [[ -f $EMULATOR ]] || missing+=("$EMULATOR")
    [[ -x $REPO/systemd/credlock-firewall ]] || missing+=("$REPO/systemd/credlock-firewall")
    [[ -x $VENV/bin/moto_server ]] || missing+=("$VENV/bin/moto_server (tests/setup.sh)")
    compgen -G "$REPO/policy-templates/*.json" >/dev/null || missing+=("$REPO/policy-templates/*.json")
    if ((${#missing[@]} > 0)); then
        local m
        for m in "${missing[@]}"; do fail "preflight: missing $m"; done
        summary
    fi
    local pkgs=()
    command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
    command -v systemd-nspawn >/dev/null 2>&1 || pkgs+=(systemd-container)
    command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus) # promtool: the firewall alert
    if ((${#pkgs[@]} > 0)); then
        log "apt-get install ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
            --no-install-recommends "${pkgs[@]}" >/dev/null ||
            fatal "preflight" "apt-get install ${pkgs[*]} failed"
    fi
    pass "preflight (binary $BIN)"
}

make_rootfs() {
    local tarball
    tarball=$("$HERE/nspawn_rootfs.sh") || fatal "rootfs" "tests/root/nspawn_rootfs.sh failed"
    WORK=$(mktemp -d /var/tmp/credlock-nspawn.XXXXXX)
    printf '%s\n' "$WORK" >"$STATE/workdir"
    ROOT=$WORK/root
    mkdir "$ROOT"
    tar --numeric-owner --xattrs -C "$ROOT" -xf "$tarball" || fatal "rootfs" "cannot extract $tarball"
    log "rootfs from $tarball"

    # The repo's files, as ami/provision.sh expects them (the Packer upload layout).
    local src=$ROOT$SRC_IN
    mkdir -p "$src"
    cp -R "$REPO/systemd" "$REPO/ami" "$REPO/policy-templates" "$src/"
    [[ -f $REPO/README.md ]] && cp "$REPO/README.md" "$src/"
    install -m 0755 "$BIN" "$src/credlock"
    install -m 0755 "$HERE/nspawn_example_app.sh" "$ROOT/usr/local/bin/credlock-example-app"
    install -m 0755 "$HERE/nspawn_squatter.sh" "$ROOT/usr/local/bin/credlock-squatter"
    install -m 0755 "$HERE/nspawn_lock_holder.sh" "$ROOT/usr/local/bin/credlock-lock-holder"
    install -m 0755 "$HERE/nspawn_imds_probe.sh" "$ROOT/usr/local/bin/credlock-imds-probe"
    install -m 0755 "$HERE/nspawn_denied_app.sh" "$ROOT/usr/local/bin/credlock-denied-app"
}

# ami/provision.sh install inside the (not yet booted) root, the way an image build runs it:
# units enabled, nothing started.
provision_offline() {
    local out=$WORK/provision-install.log
    if systemd-nspawn -q -D "$ROOT" -M "$MACHINE" --register=no --keep-unit --private-network \
        /bin/bash "$SRC_IN/ami/provision.sh" install --binary "$SRC_IN/credlock" --source-dir "$SRC_IN" \
        >"$out" 2>&1; then
        pass "provision.sh install in the image (offline)"
    else
        sed 's/^/  | /' "$out"
        fatal "provision.sh install in the image (offline)" "exit $?"
    fi
    if [[ -f $REPO/systemd/credlock-firewall.defaults ]]; then
        check "provision.sh installed the shipped /etc/default/credlock-firewall" \
            cmp -s "$REPO/systemd/credlock-firewall.defaults" "$ROOT/etc/default/credlock-firewall"
    fi
    grep -q 'units start at the next boot' "$out" ||
        fail "provision.sh install offline did not notice systemd is not running" "$(tr '\n' ' ' <"$out")"
}

configure_test_instance() {
    # AWS APIs go to moto; environment discovery must not need the internet.
    cat >"$ROOT/etc/default/credlock" <<EOF
AWS_ENDPOINT_URL_STS=http://$MOTO_ADDR:$MOTO_PORT
AWS_ENDPOINT_URL_EC2=http://$MOTO_ADDR:$MOTO_PORT
AWS_REGION=us-east-1
CREDLOCK_LOG=info
# A firewall setting in credlock's environment file: credlock.service's UnsetEnvironment= keeps
# it from its ExecStartPost= firewall apply (else the strict rules would DNAT to port 1).
CREDLOCK_PORT=1
EOF
    write_test_config "$ROOT/etc/credlock/credlock.toml"

    # The application: an unprivileged user and a oneshot unit with the documented drop-in.
    chroot "$ROOT" useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$APP_USER" || fatal "setup" "useradd $APP_USER"
    cat >"$ROOT/etc/systemd/system/credlock-example-app.service" <<EOF
[Unit]
Description=credlock example application (fetches role credentials at start)

[Service]
Type=oneshot
RemainAfterExit=yes
User=$APP_USER
StateDirectory=credlock-example-app
ExecStart=/usr/local/bin/credlock-example-app

[Install]
WantedBy=multi-user.target
EOF
    install -D -m 0644 "$REPO/systemd/app-after-credlock.conf" \
        "$ROOT/etc/systemd/system/credlock-example-app.service.d/after-credlock.conf"
    mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
    ln -sf /etc/systemd/system/credlock-example-app.service \
        "$ROOT/etc/systemd/system/multi-user.target.wants/credlock-example-app.service"
    install_fake_cloud_init
    # Debian's nftables.service, enabled as on an instance whose administrator uses nftables: at
    # boot (before credlock-firewall) and on every reload/restart it loads /etc/nftables.conf,
    # whose first command is `flush ruleset` (issue 20).
    mkdir -p "$ROOT/etc/systemd/system/sysinit.target.wants"
    ln -sf /usr/lib/systemd/system/nftables.service \
        "$ROOT/etc/systemd/system/sysinit.target.wants/nftables.service"
    # No login prompt on the (read-only) console.
    ln -sf /dev/null "$ROOT/etc/systemd/system/console-getty.service"
}

# cloud-init, simulated: /usr/bin/cloud-init is tests/root/nspawn_fake_cloud_init.sh, and the
# units carry the [Unit] ordering of Debian bookworm's cloud-init 22.4.2 (cloud-config.service
# and its target left out: nothing of credlock's depends on them). TimeoutSec= is bounded here
# (cloud-init's own units say 0). cloud-init's generator enables cloud-init.target; a symlink
# does it here.
install_fake_cloud_init() {
    local d=$ROOT/etc/systemd/system u
    install -m 0755 "$HERE/nspawn_fake_cloud_init.sh" "$ROOT/usr/bin/cloud-init"
    cat >"$d/cloud-init-local.service" <<'EOF'
[Unit]
Description=Initial cloud-init job (pre-networking) [credlock test: fake]
DefaultDependencies=no
Wants=network-pre.target
After=hv_kvp_daemon.service
After=systemd-remount-fs.service
Before=NetworkManager.service
Before=network-pre.target
Before=shutdown.target
Before=sysinit.target
Conflicts=shutdown.target
RequiresMountsFor=/var/lib/cloud

[Service]
Type=oneshot
ExecStart=/usr/bin/cloud-init init --local
RemainAfterExit=yes
TimeoutSec=60

[Install]
WantedBy=cloud-init.target
EOF
    cat >"$d/cloud-init.service" <<'EOF'
[Unit]
Description=Initial cloud-init job (metadata service crawler) [credlock test: fake]
DefaultDependencies=no
Wants=cloud-init-local.service
Wants=sshd-keygen.service
Wants=sshd.service
After=cloud-init-local.service
After=systemd-networkd-wait-online.service
After=networking.service
Before=network-online.target
Before=chronyd.service
Before=sshd-keygen.service
Before=sshd.service
Before=sysinit.target
Before=shutdown.target
Conflicts=shutdown.target
Before=systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/usr/bin/cloud-init init
RemainAfterExit=yes
TimeoutSec=60

[Install]
WantedBy=cloud-init.target
EOF
    cat >"$d/cloud-final.service" <<'EOF'
[Unit]
Description=Execute cloud user/final scripts [credlock test: fake]
After=network-online.target cloud-config.service rc-local.service
After=multi-user.target
Before=apt-daily.service
Wants=network-online.target cloud-config.service

[Service]
Type=oneshot
ExecStart=/usr/bin/cloud-init modules --mode=final
RemainAfterExit=yes
TimeoutSec=60
KillMode=process
TasksMax=infinity

[Install]
WantedBy=cloud-init.target
EOF
    cat >"$d/cloud-init.target" <<'EOF'
[Unit]
Description=Cloud-init target [credlock test: fake]
After=multi-user.target
EOF
    mkdir -p "$d/cloud-init.target.wants"
    for u in cloud-init-local.service cloud-init.service cloud-final.service; do
        ln -sf "/etc/systemd/system/$u" "$d/cloud-init.target.wants/$u"
    done
    ln -sf /etc/systemd/system/cloud-init.target "$d/multi-user.target.wants/cloud-init.target"
}

write_test_config() {
    cat >"$1" <<'EOF'
# credlock nspawn test: no internet in the test network.
[discovery.echo]
enabled = false
EOF
}

setup_network() {
    if ! {
        ip netns add "$NS_INST" && ip netns add "$NS_IMDS" &&
        ip link add "$VETH_I" type veth peer name "$VETH_M" &&
        ip link set "$VETH_I" netns "$NS_INST" && ip link set "$VETH_M" netns "$NS_IMDS" &&
        ip -n "$NS_INST" link set lo up && ip -n "$NS_IMDS" link set lo up &&
        ip -n "$NS_INST" addr add 169.254.0.2/16 dev "$VETH_I" &&
        ip -n "$NS_INST" -6 addr add fd00:ec2::2/64 dev "$VETH_I" nodad &&
        ip -n "$NS_IMDS" addr add "$IMDS4/16" dev "$VETH_M" &&
        ip -n "$NS_IMDS" addr add "$MOTO_ADDR/16" dev "$VETH_M" &&
        ip -n "$NS_IMDS" -6 addr add "$IMDS6/64" dev "$VETH_M" nodad &&
        ip -n "$NS_INST" link set "$VETH_I" up && ip -n "$NS_IMDS" link set "$VETH_M" up
    }; then
        fatal "network namespaces" "ip netns/link/addr failed"
    fi
}

start_servers() {
    local line
    ip netns exec "$NS_IMDS" /usr/bin/python3 "$EMULATOR" --tokens required \
        --listen "$IMDS4:80" --listen "[$IMDS6]:80" --control 127.0.0.1:0 \
        >"$WORK/emulator.out" 2>"$WORK/emulator.err" &
    EMU_PID=$!
    printf '%s\n' "$EMU_PID" >"$STATE/emulator.pid"
    ip netns exec "$NS_IMDS" "$VENV/bin/moto_server" -H "$MOTO_ADDR" -p "$MOTO_PORT" \
        >"$WORK/moto.log" 2>&1 &
    MOTO_PID=$!
    printf '%s\n' "$MOTO_PID" >"$STATE/moto.pid"

    wait_ready "$EMU_PID" 10 grep -q '^control ' "$WORK/emulator.out"
    line=$(grep -m1 '^control ' "$WORK/emulator.out" 2>/dev/null)
    CONTROL=${line#control }
    [[ -n $CONTROL && $line == control* ]] ||
        fatal "IMDS emulator" "did not start: $(head -c 500 "$WORK/emulator.err")"
    wait_http "http://$MOTO_ADDR:$MOTO_PORT/moto-api/" any 30 ip netns exec "$NS_IMDS" ||
        fatal "moto_server" "not answering on $MOTO_ADDR:$MOTO_PORT: $(tail -c 500 "$WORK/moto.log")"
    log "IMDS emulator (control $CONTROL) and moto_server ($MOTO_ADDR:$MOTO_PORT) up in $NS_IMDS"
}

# boot_container [LABEL]
boot_container() {
    local state label=${1:-}
    # CAP_NET_ADMIN: nspawn keeps it only with --private-network, not for a network namespace
    # passed by path; the firewall needs it (the namespace is the test's own).
    systemd-nspawn -D "$ROOT" -M "$MACHINE" -b --register=no --keep-unit \
        --network-namespace-path="/run/netns/$NS_INST" --capability=CAP_NET_ADMIN \
        --console=read-only \
        >"$WORK/console${label:+-$label}.log" 2>&1 &
    NSPAWN_PID=$!
    printf '%s\n' "$NSPAWN_PID" >"$STATE/nspawn.pid"
    wait_ready "$NSPAWN_PID" 10 pgrep -P "$NSPAWN_PID" -x systemd
    LEADER=$(pgrep -P "$NSPAWN_PID" -x systemd | head -n1)
    [[ -n $LEADER ]] || fatal "boot" "no container init: $(tail -c 1000 "$WORK/console.log")"
    printf '%s\n' "$LEADER" >"$STATE/leader.pid"
    # Wait for the boot to finish (credlock's start job included: up to TimeoutStartSec).
    wait_until 20 cexec systemctl show -p Version --value ||
        fatal "boot" "the container's systemd does not answer: $(tail -c 1000 "$WORK/console.log")"
    state=$(CEXEC_TIMEOUT=120 cexec systemctl is-system-running --wait 2>/dev/null)
    log "container booted${label:+ ($label)}: $state"
    if [[ $state == running ]]; then
        pass "container boots to 'running'${label:+ ($label)}"
    else
        fail "container boots to 'running'${label:+ ($label)}" "state '$state'; failed: $(cexec systemctl --failed --plain --no-legend | tr '\n' ' ')"
    fi
}

# Power the container off (SIGTERM to systemd-nspawn), like the end of an instance's boot cycle.
# The network namespace is the test's and outlives the container: its rules are flushed, as a
# reboot would.
shutdown_container() {
    stop_pids 30 "$NSPAWN_PID"
    rm -f "$STATE/nspawn.pid" "$STATE/leader.pid"
    NSPAWN_PID="" LEADER=""
    ip netns exec "$NS_INST" nft flush ruleset 2>/dev/null
}

# Control boot: CREDLOCK_BOOT_EXEMPT_ROOT=no, so `apply --boot` loads the strict rules and
# cloud-init's early stages, as root, are refused (nothing listens on 8169 yet): the first-boot
# failure boot mode exists for. The shipped defaults file is restored afterwards.
control_boot() {
    local defaults=$ROOT/etc/default/credlock-firewall
    cp -p "$defaults" "$WORK/credlock-firewall.defaults"
    printf '\n# nspawn test control boot\nCREDLOCK_BOOT_EXEMPT_ROOT=no\n' >>"$defaults"
    boot_container control
    local fwlog
    fwlog=$(cexec journalctl -b -u credlock-firewall.service --no-pager -q -o cat)
    if grep -q 'strict mode' <<<"$fwlog" && ! grep -q 'boot mode' <<<"$fwlog"; then
        pass "control (CREDLOCK_BOOT_EXEMPT_ROOT=no): credlock-firewall.service loaded the strict rules at boot"
    else
        fail "control (CREDLOCK_BOOT_EXEMPT_ROOT=no): credlock-firewall.service loaded the strict rules at boot" "$(tr '\n' ' ' <<<"$fwlog" | head -c 300)"
    fi
    local mode rc
    mode=$(ci_field local firewall)
    rc=$(ci_field local root_token_rc)
    if [[ $mode == "mode: strict"* && $rc == 7 ]]; then
        pass "control: cloud-init-local (root, early boot) is refused: no metadata (curl exit 7, rules '${mode%% (*}')"
    else
        fail "control: cloud-init-local (root, early boot) is refused: no metadata" "firewall '$mode', curl exit '$rc': $(tr '\n' ' ' <"$ROOT$CI_DIR/local.log" 2>/dev/null)"
    fi
    shutdown_container
    rm -rf "${ROOT:?}$CI_DIR"
    cp -p "$WORK/credlock-firewall.defaults" "$defaults"
    log "control boot done; booting with the shipped defaults"
}

# Issue 20: an unprivileged user's process, started in the real boot after the boot-mode rules and
# before credlock, takes every firewall lock it can (the issue's old 0644 /run/lock file, and
# whatever lock path the installed credlock-firewall names) and holds it for LOCK_HOLD seconds,
# through credlock's ExecStartPost= apply. Not in the control boot.
readonly LOCK_HOLDER=test-lock-holder.service LOCK_HOLD=150
install_lock_holder() {
    local paths
    # The issue's old lock (a world-writable /run/lock lets a user plant it even when nothing
    # uses it any more), the new one in the run directory, and any other lock path the firewall
    # script names.
    paths=$( { printf '%s\n' /run/lock/credlock-firewall.lock /run/credlock-firewall/lock
        grep -oE '/run/[A-Za-z0-9_./-]*(\.lock|/lock)\b' "$ROOT/usr/libexec/credlock/credlock-firewall"; } |
        sort -u | tr '\n' ' ')
    log "the lock holder will try: $paths"
    cat >"$ROOT/etc/systemd/system/$LOCK_HOLDER" <<EOF
[Unit]
Description=credlock test: an unprivileged user holding the firewall lock(s) before credlock starts
After=credlock-firewall.service
Before=credlock.service

[Service]
Type=forking
User=$APP_USER
ExecStart=/usr/local/bin/credlock-lock-holder $LOCK_HOLD $paths
TimeoutStartSec=20

[Install]
WantedBy=multi-user.target
EOF
    ln -sf "/etc/systemd/system/$LOCK_HOLDER" "$ROOT/etc/systemd/system/multi-user.target.wants/$LOCK_HOLDER"
}

# Issue 15: a per-process access policy in credlock's config, for the real boot only. The rule
# "reporting" matches one unit by name, credlock-test-denied.service (tests/root/
# nspawn_denied_app.sh, User= the app user): no credentials, metadata as before. The example app
# is the same user in another unit and matches no rule: allowed, as is every identified caller
# matching none. The suite's own probes (cexec: nsenter from a host cgroup the container cannot
# name) are unidentified, which a policy denies unless a rule says otherwise: "harness" keeps
# today's behaviour for them.
readonly DENIED_UNIT=credlock-test-denied.service
install_access_policy() {
    local role
    role=$(emulator_state | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin).get("role") or "")' 2>/dev/null)
    [[ -n $role ]] || fatal "access policy" "cannot read the emulator's role from GET /state"
    cat >>"$ROOT/etc/credlock/credlock.toml" <<EOF

# Issue 15 (nspawn test, real boot): one unit is refused credentials by its name.
[[access.rule]]
name = "reporting"
units = ["$DENIED_UNIT"]
credentials = "deny"

[[access.rule]]
name = "harness"
unidentified = true
EOF
    cat >"$ROOT/etc/systemd/system/$DENIED_UNIT" <<EOF
[Unit]
Description=credlock test: an application refused credentials by the access policy (its unit)

[Service]
Type=oneshot
RemainAfterExit=yes
User=$APP_USER
StateDirectory=${DENIED_UNIT%.service}
ExecStart=/usr/local/bin/credlock-denied-app $role

[Install]
WantedBy=multi-user.target
EOF
    install -D -m 0644 "$REPO/systemd/app-after-credlock.conf" \
        "$ROOT/etc/systemd/system/$DENIED_UNIT.d/after-credlock.conf"
    ln -sf "/etc/systemd/system/$DENIED_UNIT" "$ROOT/etc/systemd/system/multi-user.target.wants/$DENIED_UNIT"
}

# ---------------------------------------------------------------------------------------------
# Checks

check_boot_order() {
    local fw_active cl_start cl_active app_start n
    fw_active=$(prop credlock-firewall.service ActiveEnterTimestampMonotonic)
    cl_start=$(prop credlock.service ExecMainStartTimestampMonotonic)
    cl_active=$(prop credlock.service ActiveEnterTimestampMonotonic)
    app_start=$(prop credlock-example-app.service ExecMainStartTimestampMonotonic)
    n=$(prop credlock.service NRestarts)
    log "monotonic us: firewall active $fw_active, credlock exec $cl_start, credlock READY $cl_active, app exec $app_start, NRestarts $n"

    check "credlock-firewall.service is active (exited)" is_active credlock-firewall.service
    check "credlock.service is active" is_active credlock.service
    local sock_active listen
    sock_active=$(prop credlock.socket ActiveEnterTimestampMonotonic)
    listen=$(prop credlock.socket Listen | tr '\n' ' ')
    if is_active credlock.socket && [[ $listen == *"127.0.0.1:8169"* && $listen == *"[::1]:8169"* &&
        $listen == *"127.0.0.1:9169"* ]] && [[ $sock_active =~ ^[0-9]+$ ]] && ((sock_active > 0 && sock_active <= cl_start)); then
        pass "credlock.socket held 127.0.0.1:8169, [::1]:8169 and 127.0.0.1:9169 before credlock started (+$(((cl_start - sock_active) / 1000)) ms)"
    else
        fail "credlock.socket held 127.0.0.1:8169, [::1]:8169 and 127.0.0.1:9169 before credlock started" \
            "$(prop credlock.socket LoadState)/$(prop credlock.socket ActiveState), active at '$sock_active', credlock exec $cl_start, Listen: $listen"
    fi
    local pid
    pid=$(prop credlock.service MainPID)
    if [[ $pid =~ ^[0-9]+$ ]] && ((pid > 1)); then
        log "credlock (pid $pid): $(cexec grep -E '^(VmRSS|Threads):' "/proc/$pid/status" | tr -s '\t\n ' ' ')"
    fi
    if [[ $n == 0 ]]; then pass "credlock.service did not restart during boot"; else fail "credlock.service did not restart during boot" "NRestarts=$n"; fi
    if ((fw_active > 0 && cl_start > 0 && fw_active <= cl_start)); then
        pass "firewall finished before credlock started (+$(((cl_start - fw_active) / 1000)) ms)"
    else
        fail "firewall finished before credlock started" "firewall $fw_active, credlock $cl_start"
    fi
    # Type=notify: active is entered on READY=1, which credlock sends once it holds locked
    # credentials.
    if [[ $(prop credlock.service Type) == notify ]] && ((cl_active > cl_start)); then
        pass "credlock.service became active via READY=1 ($(((cl_active - cl_start) / 1000)) ms after exec)"
    else
        fail "credlock.service became active via READY=1" "type $(prop credlock.service Type), exec $cl_start, active $cl_active"
    fi
    if ((app_start > 0 && cl_active > 0 && app_start >= cl_active)); then
        pass "example app started after credlock was READY (+$(((app_start - cl_active) / 1000)) ms)"
    else
        fail "example app started after credlock was READY" "app $app_start, credlock active $cl_active"
    fi
    check "example app finished successfully" \
        test "$(prop credlock-example-app.service Result)" = success
    local journal
    journal=$(cexec journalctl -b --no-pager -q -o cat)
    if grep -qiE 'ordering cycle|job .* deleted to break' <<<"$journal"; then
        fail "no ordering cycles at boot" "$(grep -iE 'ordering cycle|deleted to break' <<<"$journal" | head -3 | tr '\n' ' ')"
    else
        pass "no ordering cycles at boot"
    fi
    local ready
    ready=$(cexec curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:9169/readyz)
    if [[ $ready == 200 ]]; then pass "admin /readyz is 200"; else fail "admin /readyz is 200" "got $ready"; fi
}

# The fake cloud-init's stages in the real boot (shipped defaults: CREDLOCK_BOOT_EXEMPT_ROOT=auto,
# which the fake /usr/bin/cloud-init turns into yes).
check_cloud_init() {
    local fw_active cl_start cl_active local_start net_start final_start stage u
    fw_active=$(prop credlock-firewall.service ActiveEnterTimestampMonotonic)
    cl_start=$(prop credlock.service ExecMainStartTimestampMonotonic)
    cl_active=$(prop credlock.service ActiveEnterTimestampMonotonic)
    local_start=$(prop cloud-init-local.service ExecMainStartTimestampMonotonic)
    net_start=$(prop cloud-init.service ExecMainStartTimestampMonotonic)
    final_start=$(prop cloud-final.service ExecMainStartTimestampMonotonic)
    log "monotonic us: firewall active $fw_active, cloud-init-local $local_start, cloud-init $net_start, credlock exec $cl_start, READY $cl_active, cloud-final $final_start"
    local bad=()
    for u in cloud-init-local.service cloud-init.service cloud-final.service; do
        if [[ $(prop "$u" Result) != success || $(prop "$u" ExecMainStartTimestampMonotonic) == 0 ]]; then
            bad+=("$u: $(prop "$u" ActiveState)/$(prop "$u" Result)")
        fi
    done
    if ((${#bad[@]} == 0)); then
        pass "fake cloud-init units ran at boot (cloud-init-local, cloud-init, cloud-final)"
    else
        fail "fake cloud-init units ran at boot" "${bad[*]}"
    fi
    if ((fw_active > 0 && local_start >= fw_active && net_start >= local_start && cl_start > net_start)); then
        pass "order: firewall (boot mode) -> cloud-init-local -> cloud-init -> credlock start"
    else
        fail "order: firewall (boot mode) -> cloud-init-local -> cloud-init -> credlock start"
    fi
    if ((cl_active > 0 && final_start >= cl_active)); then
        pass "order: cloud-final (user-data scripts) started after credlock was READY (+$(((final_start - cl_active) / 1000)) ms)"
    else
        fail "order: cloud-final started after credlock was READY" "final $final_start, credlock active $cl_active"
    fi
    local fwlog
    fwlog=$(cexec journalctl -b -u credlock-firewall.service --no-pager -q -o cat)
    if grep -q 'applied (.*boot mode)' <<<"$fwlog"; then
        pass "credlock-firewall.service loaded the boot-mode rules (auto: cloud-init is installed)"
    else
        fail "credlock-firewall.service loaded the boot-mode rules" "$(tr '\n' ' ' <<<"$fwlog" | head -c 300)"
    fi
    for stage in local network; do
        u=cloud-init-local
        [[ $stage == network ]] && u=cloud-init
        if [[ $(ci_field $stage firewall) == "mode: boot"* && $(ci_field $stage root_instance_id) == "$IID" &&
            $(ci_field $stage app_token_rc) == 7 ]]; then
            pass "$u (root, before credlock): boot-mode rules, got its metadata (instance-id $IID); an ordinary user at the same moment: refused"
        else
            fail "$u (root, before credlock): boot-mode rules, got its metadata; ordinary user refused" \
                "$(tr '\n' ' ' <"$ROOT$CI_DIR/$stage.log" 2>/dev/null)"
        fi
        raw_creds "$u (root, before credlock) was answered directly by the upstream (the emulator's own AccessKeyId)" \
            "$ROOT$CI_DIR/$stage.root.json"
    done
    if [[ $(ci_field final firewall) == "mode: strict"* && $(ci_field final root_instance_id) == "$IID" ]]; then
        pass "cloud-final (root, after credlock): strict rules, metadata through credlock"
    else
        fail "cloud-final (root, after credlock): strict rules, metadata through credlock" \
            "$(tr '\n' ' ' <"$ROOT$CI_DIR/final.log" 2>/dev/null)"
    fi
    locked_creds "cloud-final (user-data scripts, root) gets locked credentials" "$ROOT$CI_DIR/final.root.json"
}

# Issue 20: the user process holding (or planting) the firewall lock since before credlock started
# must not keep the instance in boot mode: credlock's ExecStartPost= still loads the strict rules
# at once, and credlock does not fail its start.
check_lock_holder() {
    local hlog h_active cl_start cl_active mode n journal what
    hlog=$(cexec journalctl -b -u "$LOCK_HOLDER" --no-pager -q -o cat | grep '^lock-holder:')
    h_active=$(prop "$LOCK_HOLDER" ActiveEnterTimestampMonotonic)
    cl_start=$(prop credlock.service ExecMainStartTimestampMonotonic)
    cl_active=$(prop credlock.service ActiveEnterTimestampMonotonic)
    what=$(grep -v 'holding' <<<"$hlog" | sed 's/^lock-holder: //' | tr '\n' ';')
    log "lock holder: $(tr '\n' ';' <<<"$hlog")"
    if is_active "$LOCK_HOLDER" && [[ $h_active =~ ^[0-9]+$ ]] && ((h_active > 0 && h_active <= cl_start)) &&
        grep -q 'holding' <<<"$hlog"; then
        pass "lock holder ($APP_USER) started $(((cl_start - h_active) / 1000)) ms before credlock and still runs: $what"
    else
        fail "lock holder ($APP_USER) started before credlock and still runs" \
            "$(prop "$LOCK_HOLDER" ActiveState), active at $h_active, credlock exec $cl_start: $(tr '\n' ';' <<<"$hlog")"
    fi
    mode=$(fw_mode)
    n=$(prop credlock.service NRestarts)
    journal=$(cexec journalctl -b -u credlock.service --no-pager -q -o cat)
    if [[ $mode == strict && $n == 0 ]] && is_active credlock.service &&
        grep -q 'credlock-firewall: applied (.*strict mode)' <<<"$journal"; then
        pass "a user holding the firewall lock(s) since before credlock did not keep the instance in boot mode (strict rules from ExecStartPost=, credlock READY $(((cl_active - cl_start) / 1000)) ms after exec, no restart)"
    else
        fail "a user holding the firewall lock(s) since before credlock did not keep the instance in boot mode" \
            "mode '$mode', credlock $(prop credlock.service ActiveState), NRestarts $n; $(grep -iE 'lock|firewall' <<<"$journal" | tail -n 3 | tr '\n' ' ')"
    fi
    # Done: the later checks (reloads, restarts) run without it.
    cexec systemctl stop "$LOCK_HOLDER"
}

check_firewall() {
    local rules
    check "credlock-firewall status: rules in place" fw_status
    # credlock.service's ExecStartPost= (after READY=1) replaced the boot-mode rules.
    check "credlock-firewall status --strict: the strict rules are loaded after boot" fw_strict
    local journal ready_line applied_line
    journal=$(cexec journalctl -b -u credlock.service --no-pager -q -o cat)
    ready_line=$(grep -n -m1 'holding locked credentials: ready' <<<"$journal" | cut -d: -f1)
    applied_line=$(grep -n -m1 'credlock-firewall: applied (.*strict mode)' <<<"$journal" | cut -d: -f1)
    if [[ -n $ready_line && -n $applied_line ]] && ((applied_line > ready_line)); then
        pass "credlock.service ExecStartPost= loaded the strict rules after credlock was ready (journal lines $ready_line, $applied_line)"
    else
        fail "credlock.service ExecStartPost= loaded the strict rules after credlock was ready" \
            "ready at line '${ready_line}', strict apply at line '${applied_line}'"
    fi
    rules=$( (cexec nft list ruleset; cexec iptables-save; cexec ip6tables-save) 2>/dev/null)
    if grep -q "$IMDS4" <<<"$rules" && grep -q "$IMDS6" <<<"$rules"; then
        pass "IPv4 and IPv6 IMDS redirect rules are loaded"
    else
        fail "IPv4 and IPv6 IMDS redirect rules are loaded" "$(head -c 400 <<<"$rules")"
    fi
}

check_credentials() {
    locked_creds "example app (started at boot) got locked credentials" \
        "$ROOT/var/lib/credlock-example-app/credentials.json"
    curl_as "$APP_USER" "http://$IMDS4" "$WORK/app4.json" >/dev/null
    locked_creds "app user via 169.254.169.254 gets locked credentials" "$WORK/app4.json"
    curl_as "$APP_USER" "http://[$IMDS6]" "$WORK/app6.json" >/dev/null
    locked_creds "app user via [fd00:ec2::254] gets locked credentials" "$WORK/app6.json"
    # Root exempt (boot mode) would get the emulator's raw set here: locked means strict mode.
    curl_as root "http://$IMDS4" "$WORK/root4.json" >/dev/null
    locked_creds "root via 169.254.169.254 gets locked credentials (strict mode)" "$WORK/root4.json"
    curl_as root "http://[$IMDS6]" "$WORK/root6.json" >/dev/null
    locked_creds "root via [fd00:ec2::254] gets locked credentials (strict mode)" "$WORK/root6.json"
    # Only credlock's service is exempt from the redirect, not every process with its uid.
    same_uid_redirected "credlock's uid outside its service (setpriv from another cgroup) via 169.254.169.254 is redirected: locked credentials" \
        "http://$IMDS4" "$WORK/sameuid-setpriv4.json" setpriv --reuid=credlock --regid=credlock --clear-groups --
    same_uid_redirected "credlock's uid outside its service (setpriv from another cgroup) via [fd00:ec2::254] is redirected: locked credentials" \
        "http://[$IMDS6]" "$WORK/sameuid-setpriv6.json" setpriv --reuid=credlock --regid=credlock --clear-groups --
    same_uid_redirected "credlock's uid outside its service (systemd-run --scope --uid=credlock) via 169.254.169.254 is redirected: locked credentials" \
        "http://$IMDS4" "$WORK/sameuid-scope4.json" systemd-run --quiet --scope --uid=credlock --gid=credlock --
}

# access_decisions RULE DECISION: credlock_access_decisions_total from credlock's /metrics (0 if
# absent).
access_decisions() {
    cexec curl -sS --max-time 3 http://127.0.0.1:9169/metrics 2>/dev/null |
        awk -v r="$1" -v d="$2" '$1 == "credlock_access_decisions_total{decision=\"" d "\",rule=\"" r "\"}" { print $2; f=1 } END { if (!f) print 0 }'
}

# denied_field KEY: a value credlock-denied-app recorded ("KEY value" lines).
denied_field() {
    awk -v k="$1" '$1 == k { sub(/^[^ ]+ ?/, ""); print; exit }' "$ROOT/var/lib/${DENIED_UNIT%.service}/result" 2>/dev/null
}

# Issue 15: the rule "reporting" refuses credentials to credlock-test-denied.service by its unit
# name (404), not metadata; the example app (same user, another unit) got locked credentials
# (check_credentials) and credlock names its unit in the log. Runs before any restart of credlock
# (the decision counters are its process's).
check_access_policy() {
    local journal n
    check "$DENIED_UNIT (access policy) finished successfully" \
        test "$(prop "$DENIED_UNIT" Result)" = success
    log "$DENIED_UNIT: $(tr '\n' ' ' <"$ROOT/var/lib/${DENIED_UNIT%.service}/result" 2>/dev/null | head -c 400)"
    if [[ $(denied_field user) == "$APP_USER" && $(denied_field token_rc) == 0 &&
        $(denied_field listing) == 404 && $(denied_field credentials) == 404 ]]; then
        pass "access policy: $DENIED_UNIT (User=$APP_USER) is refused credentials by its unit: 404 for the role listing and the role's credentials"
    else
        fail "access policy: $DENIED_UNIT (User=$APP_USER) is refused credentials by its unit" \
            "user '$(denied_field user)', token curl exit '$(denied_field token_rc)', listing '$(denied_field listing)', credentials '$(denied_field credentials)': $(denied_field credentials_body)"
    fi
    if [[ $(denied_field instance_id) == 200 && $(denied_field instance_id_body) == "$IID" ]]; then
        pass "access policy: $DENIED_UNIT still reads metadata (instance-id 200, $IID)"
    else
        fail "access policy: $DENIED_UNIT still reads metadata (instance-id 200)" \
            "status '$(denied_field instance_id)', body '$(denied_field instance_id_body)'"
    fi
    n=$(access_decisions reporting denied)
    if [[ $n =~ ^[0-9]+$ ]] && ((n >= 1)); then
        pass "access policy: /metrics credlock_access_decisions_total{decision=\"denied\",rule=\"reporting\"} is $n"
    else
        fail "access policy: /metrics credlock_access_decisions_total{decision=\"denied\",rule=\"reporting\"} >= 1" "got '$n'"
    fi
    journal=$(cexec journalctl -b -u credlock.service --no-pager -q -o cat)
    if grep 'access policy: request answered locally' <<<"$journal" | grep 'reporting' | grep -q "$DENIED_UNIT"; then
        pass "access policy: credlock's journal names rule reporting and $DENIED_UNIT for the local answer"
    else
        fail "access policy: credlock's journal names rule reporting and $DENIED_UNIT for the local answer" \
            "$(grep 'access policy' <<<"$journal" | head -3 | tr '\n' ' ')"
    fi
    if grep 'locked credentials served to a caller' <<<"$journal" | grep -q 'credlock-example-app.service'; then
        pass "access policy: credlock identified credlock-example-app.service (same user, no rule) and served it locked credentials"
    else
        fail "access policy: credlock identified credlock-example-app.service and served it locked credentials" \
            "$(grep 'served to a caller' <<<"$journal" | head -3 | tr '\n' ' ')"
    fi
    # Under the real unit's sandbox (ProtectControlGroups, ProtectProc=invisible) the log still
    # names the caller's processes: cgroup.procs is readable where /proc/<pid> is not.
    if grep 'access policy: request answered locally' <<<"$journal" | grep "$DENIED_UNIT" | grep -qE 'pids=[0-9]+'; then
        pass "access policy: the denial's log line names $DENIED_UNIT's processes (pids=...)"
    else
        fail "access policy: the denial's log line names $DENIED_UNIT's processes (pids=...)" \
            "$(grep 'answered locally' <<<"$journal" | head -2 | tr '\n' ' ')"
    fi
}

# Issue 14: credlock's direct IMDS access belongs to its service, not to its uid number. A process
# with credlock's uid outside credlock.service (another unit or scope; on a real host a
# host-network container whose image user has the same number) is redirected like any other
# process, so it gets the locked set. (credlock itself serving locked credentials, at boot and
# after every restart, shows that its own service still reaches the real IMDS.)
# same_uid_redirected LABEL URL_BASE OUTFILE COMMAND...
same_uid_redirected() {
    local label=$1 base=$2 out=$3 want svc_cg info uid cg
    shift 3
    want=$(cexec id -u credlock)
    svc_cg=$(prop credlock.service ControlGroup)
    # shellcheck disable=SC2016 # expanded by the inner sh
    info=$(cexec "$@" /bin/sh -c 'id -u; grep -m1 "^0::" /proc/self/cgroup' 2>&1)
    uid=$(sed -n 1p <<<"$info")
    cg=$(sed -n 2p <<<"$info")
    cg=${cg#0::}
    if [[ -z $want || $uid != "$want" ]]; then
        fail "$label" "the process runs as uid '$uid', credlock's uid is '$want': $(tr '\n' ' ' <<<"$info")"
        return
    fi
    if [[ -n $svc_cg && ($cg == "$svc_cg" || $cg == "$svc_cg"/*) ]]; then
        fail "$label" "the process is in credlock's own cgroup $cg"
        return
    fi
    creds_via "$base" "$out" "$@" >/dev/null
    locked_creds "$label (uid $uid, cgroup ${cg:-?}; credlock.service: $svc_cg)" "$out"
}

# ---- Issue 20: the rules survive nftables.service, and a removal by hand is noticed ----------

# Bounds, seconds. The firewall's check runs every CREDLOCK_CHECK_INTERVAL s (default 5) and
# states its own bound as that + about 1 s; a loaded 2-core machine gets the rest.
readonly FW_BACK_BOUND=15 # reload/restart/stop/start of nftables.service -> credlock's table back
readonly HAND_BOUND=20    # rules removed by hand -> re-applied, or reported by credlock

# ms_since START_NS: milliseconds since a `date +%s%N` value.
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# The firewall lines of credlock's /metrics (credlock_firewall_*), "" when it does not answer.
fw_metrics() {
    cexec curl -sS --max-time 3 http://127.0.0.1:9169/metrics 2>/dev/null | grep '^credlock_firewall'
}

# fw_metric_family FAMILY [METRICS]: what credlock's firewall gauges say of FAMILY (ipv4|ipv6):
# "STATE ENFORCED" from credlock_firewall_state{family,state} (the state whose series is 1) and
# credlock_firewall_enforced{family} (1|0), "-" for a missing part; "absent" when neither exists.
fw_metric_family() {
    local fam=$1 m=${2-} en st
    [[ $# -ge 2 ]] || m=$(fw_metrics)
    en=$(awk -v f="family=\"$fam\"" '$1 ~ /^credlock_firewall_enforced\{/ && index($1, f) { print $2; exit }' <<<"$m")
    st=$(awk -v f="family=\"$fam\"" '$1 ~ /^credlock_firewall_state\{/ && index($1, f) && $2 == 1 {
            if (match($1, /state="[^"]*"/)) { print substr($1, RSTART + 7, RLENGTH - 8); exit } }' <<<"$m")
    if [[ -z $en && -z $st ]]; then echo absent; else echo "${st:--} ${en:--}"; fi
}

# journal_cursor: the cursor of the container journal's last entry (for journal_since).
journal_cursor() { cexec journalctl -n 1 --show-cursor -q -o cat | sed -n 's/^-- cursor: //p'; }

# fw_applies_since CURSOR: "UNIT: MESSAGE" for each firewall apply or load logged after CURSOR
# by credlock's units (credlock-firewall*, credlock.service's ExecStartPre=/ExecStartPost=) or by
# nftables.service (whose commands credlock-firewall may wrap).
fw_applies_since() {
    cexec journalctl --after-cursor "$1" -u 'credlock*' -u nftables.service --no-pager -q -o json 2>/dev/null |
        /usr/bin/python3 -c '
import json, sys
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    m = e.get("MESSAGE")
    if isinstance(m, str) and m.startswith("credlock-firewall:") and (
            "applied" in m or "in one transaction" in m):
        print("%s: %s" % (e.get("_SYSTEMD_UNIT", "?"), m))'
}

# An unprivileged user asking IMDS for credentials non-stop (tests/root/nspawn_imds_probe.sh,
# each request bounded to 1 s like the SDKs), while something happens to credlock or its rules.
readonly PROBE_DIR=/run/credlock-nspawn-probe # inside the container
PROBE_PID=""

# start_probe OUTFILE: returns once the probe runs.
start_probe() {
    local out=$1
    cexec /bin/sh -c "rm -rf $PROBE_DIR && mkdir -m 0755 $PROBE_DIR" || return 1
    CEXEC_TIMEOUT=90 cexec runuser -u "$APP_USER" -- /usr/local/bin/credlock-imds-probe "$PROBE_DIR" \
        >"$out" 2>&1 &
    PROBE_PID=$!
    wait_until 10 grep -q '^started' "$out"
}

# stop_probe OUTFILE LABEL: PASS if no answer the probe got carried one of the emulator's (raw)
# AccessKeyIds.
stop_probe() {
    local out=$1 label=$2 raw ok nraw errs
    cexec touch "$PROBE_DIR/stop"
    wait "$PROBE_PID"
    PROBE_PID=""
    cexec rm -rf "$PROBE_DIR"
    raw=$(emulator_key_ids)
    ok=$(grep -c '^ok ' "$out")
    nraw=0
    if [[ -n $raw ]]; then
        nraw=$(awk '$1 == "ok" { print $2 }' "$out" | grep -cxF -f <(printf '%s\n' "$raw"))
    fi
    errs=$(awk '$1 == "err" { print $2 "/exit" $3 }' "$out" | sort | uniq -c |
        awk '{ printf "%s%s x%s", sep, $2, $1; sep = ", " }')
    if [[ -z $raw ]]; then
        fail "$label" "could not read the emulator's credentials from GET /state"
    elif ((nraw == 0 && ok > 0)); then
        pass "$label ($ok answers, all locked; failed tries: ${errs:-none})"
    elif ((nraw > 0)); then
        fail "$label" "$nraw of $ok answers carried the emulator's raw AccessKeyId; failed tries: ${errs:-none}"
    else
        fail "$label" "no answer at all: $(tail -c 200 "$out" | tr '\n' ' ')"
    fi
}

# Debian's nftables.service (enabled in the image) loads /etc/nftables.conf, whose first command
# is `flush ruleset`, on start, reload and restart, and flushes the whole ruleset on stop. After
# each of them credlock's table must be in place, strict: at once, at the latest within
# FW_BACK_BOUND s; and the app user asking for credentials non-stop meanwhile must never get
# raw ones.
check_nftables() {
    local fw_start nft_active op cursor t0 ms at_once pid0 pid1 fwlog
    nft_active=$(prop nftables.service ActiveEnterTimestampMonotonic)
    fw_start=$(prop credlock-firewall.service ExecMainStartTimestampMonotonic)
    if is_active nftables.service && cexec test -f /etc/nftables.conf &&
        [[ $(cexec grep -m1 -v '^#\|^$' /etc/nftables.conf) == "flush ruleset" ]] &&
        ((nft_active > 0 && nft_active <= fw_start)); then
        pass "nftables.service (Debian's, /etc/nftables.conf starts with 'flush ruleset') ran at boot before credlock-firewall (+$(((fw_start - nft_active) / 1000)) ms)"
    else
        fail "nftables.service (Debian's) ran at boot before credlock-firewall" \
            "$(prop nftables.service ActiveState), active at $nft_active, firewall exec at $fw_start"
    fi
    for op in reload restart stop start; do
        cursor=$(journal_cursor)
        pid0=$(prop credlock.service MainPID)
        start_probe "$WORK/probe-nft-$op.out" || fail "systemctl $op nftables: the IMDS probe (app user) starts"
        sleep 0.5
        t0=$(date +%s%N)
        if ! cexec systemctl "$op" nftables.service; then
            fail "systemctl $op nftables" "$(prop nftables.service ActiveState)"
            [[ -z $PROBE_PID ]] || stop_probe "$WORK/probe-nft-$op.out" "systemctl $op nftables (failed)"
            continue
        fi
        at_once=no
        if quiet cexec nft list table inet credlock; then at_once=yes; fi
        log "systemctl $op nftables returned after $(ms_since "$t0") ms; table inet credlock present then: $at_once"
        if fw_strict || wait_until "$FW_BACK_BOUND" fw_strict; then
            ms=$(ms_since "$t0")
            pass "systemctl $op nftables: credlock's table is in place, strict, $ms ms after the $op began (bound ${FW_BACK_BOUND} s; present when systemctl returned: $at_once)"
        else
            fail "systemctl $op nftables: credlock's table is back, strict, within ${FW_BACK_BOUND} s" \
                "$(cexec nft list tables 2>&1 | tr '\n' ' ')"
        fi
        sleep 0.5
        if [[ -n $PROBE_PID ]]; then
            stop_probe "$WORK/probe-nft-$op.out" \
                "systemctl $op nftables: an unprivileged user requesting credentials non-stop through the $op never got raw ones"
        fi
        # The operation really happened: nftables.conf's own table is there, or gone after a stop.
        if [[ $op == stop ]]; then
            check "systemctl stop nftables: the ruleset was flushed (nftables.conf's table inet filter is gone)" \
                test "$(cexec nft list tables 2>/dev/null | grep -c 'inet filter')" = 0
        else
            check "systemctl $op nftables: /etc/nftables.conf was loaded (table inet filter exists)" \
                quiet cexec nft list table inet filter
        fi
        fwlog=$(fw_applies_since "$cursor")
        log "firewall applies/loads after the $op: $(cut -c1-160 <<<"$fwlog" | tr '\n' ';')"
        if [[ -n $fwlog ]]; then
            pass "systemctl $op nftables: credlock's rules were loaded again by $(cut -d: -f1 <<<"$fwlog" | sort -u | tr '\n' ' ')"
        else
            fail "systemctl $op nftables: credlock's rules were loaded again by a unit" \
                "no apply or load in the journal since the $op: $(cexec journalctl --after-cursor "$cursor" -u 'credlock*' -u nftables.service --no-pager -q -o cat | tr '\n' ' ' | head -c 300)"
        fi
        wait_until 30 is_active credlock.service
        pid1=$(prop credlock.service MainPID)
        log "credlock.service across the $op: pid $pid0 -> $pid1, $(prop credlock.service ActiveState)"
        curl_as "$APP_USER" "http://$IMDS4" "$WORK/nft-$op-4.json" >/dev/null
        locked_creds "after systemctl $op nftables the app user gets locked credentials via 169.254.169.254" "$WORK/nft-$op-4.json"
        curl_as "$APP_USER" "http://[$IMDS6]" "$WORK/nft-$op-6.json" >/dev/null
        locked_creds "after systemctl $op nftables the app user gets locked credentials via [fd00:ec2::254]" "$WORK/nft-$op-6.json"
    done
}

# fw_observe LIMIT_S STOP: poll every ~0.3 s for at most LIMIT_S seconds what credlock says of
# the firewall (metrics, /readyz) and whether the rules are in place (status --strict), until
# STOP holds: "back" (rules strict again and the metric strict 1 again after that) or "reported"
# (the metric ipv4 not strict, or enforced 0, and /readyz not 200). Sets OBS_METRIC (ms when the
# metric first said so, and what), OBS_READY (ms, /readyz code), OBS_BACK (ms, rules strict),
# OBS_ENFORCED (ms, metric strict 1 after OBS_BACK), OBS_LAST (last metric lines).
fw_observe() {
    local limit=$1 stop=$2 t0 ms m v4 code
    OBS_METRIC="" OBS_READY="" OBS_BACK="" OBS_ENFORCED="" OBS_LAST=""
    t0=$(date +%s%N)
    while (($(ms_since "$t0") < limit * 1000)); do
        m=$(fw_metrics)
        OBS_LAST=$m
        v4=$(fw_metric_family ipv4 "$m")
        ms=$(ms_since "$t0")
        if [[ -z $OBS_METRIC && $v4 != absent && ($v4 == *" 0" || $v4 != "strict "*) ]]; then
            OBS_METRIC="$ms ms: ipv4 '$v4', ipv6 '$(fw_metric_family ipv6 "$m")'"
        fi
        if [[ -n $OBS_BACK && -z $OBS_ENFORCED && $v4 == "strict 1" ]]; then OBS_ENFORCED=$ms; fi
        if [[ -z $OBS_READY ]]; then
            code=$(cexec curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:9169/readyz)
            [[ $code == 200 ]] || OBS_READY="$ms ms: $code"
        fi
        if [[ -z $OBS_BACK ]] && fw_strict; then OBS_BACK=$ms; fi
        case $stop in
        back) [[ -n $OBS_BACK && -n $OBS_ENFORCED ]] && return 0 ;;
        reported) [[ -n $OBS_METRIC && -n $OBS_READY ]] && return 0 ;;
        esac
        sleep 0.2
    done
    return 1
}

# alert_check LABEL METRICS FAMILIES: feed credlock_firewall_enforced/_required as scraped
# (METRICS, exposition lines) for 5 minutes to the shipped alert rules (promtool test rules on
# ami/monitoring/credlock-alerts.yml as installed) and expect CredlockFirewallNotEnforced to be
# firing after 3 minutes for exactly FAMILIES ("ipv4 ipv6", or "" for none).
alert_check() {
    local label=$1 metrics=$2 families=$3 dir=$WORK/promtool name value series="" samples="" fam
    local rules=$ROOT$SRC_IN/ami/monitoring/credlock-alerts.yml
    mkdir -p "$dir"
    while read -r name value; do
        [[ $name == credlock_firewall_enforced* || $name == credlock_firewall_required* ]] || continue
        if [[ $name == *"{"* ]]; then
            name="${name%%\{*}{job=\"credlock\",instance=\"nspawn\",${name#*\{}"
        else
            name="$name{job=\"credlock\",instance=\"nspawn\"}"
        fi
        series+="      - series: '$name'"$'\n'"        values: '${value}x20'"$'\n'
    done <<<"$metrics"
    for fam in $families; do
        samples+="          - labels: '{family=\"$fam\"}'"$'\n'"            value: 1"$'\n'
    done
    if [[ -z $series ]]; then
        fail "$label" "no credlock_firewall_enforced/_required series in the scrape"
        return
    fi
    local exp=" []"
    if [[ -n $samples ]]; then exp=$'\n'${samples%$'\n'}; fi
    cat >"$dir/test.yml" <<EOF
rule_files:
  - $rules
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
$series    promql_expr_test:
      - expr: 'count by (family) (ALERTS{alertname="CredlockFirewallNotEnforced",alertstate="firing"})'
        eval_time: 3m
        exp_samples:$exp
EOF
    if promtool test rules "$dir/test.yml" >"$dir/out" 2>&1; then
        pass "$label"
    else
        fail "$label" "$(tr '\n' ' ' <"$dir/out" | head -c 400)"
    fi
}

# Issue 20: rules removed by hand.
#  1. `nft delete table inet credlock`: the firewall's periodic check puts them back within
#     HAND_BOUND s (its own bound: CREDLOCK_CHECK_INTERVAL + about 1 s), and credlock's metric
#     says strict again. (What credlock's metric showed meanwhile is logged: the check writes
#     the state file after it re-applied, so a removal it repairs may never show as "missing".)
#  2. `credlock-firewall remove` (removed on purpose: the check reports, does not re-apply):
#     the metric shows ipv4 missing / enforced 0 and /readyz is not 200 within HAND_BOUND s,
#     and those scraped gauges fire CredlockFirewallNotEnforced under the shipped alert rules
#     (promtool; the gauges from before the removal fire nothing); `credlock-firewall apply`
#     brings metric and readiness back.
check_hand_removal() {
    local m v4 v6 st ready="" before
    m=$(fw_metrics)
    before=$m
    v4=$(fw_metric_family ipv4 "$m")
    v6=$(fw_metric_family ipv6 "$m")
    log "firewall metrics before: $(tr '\n' ';' <<<"$m")"
    if [[ $v4 == "strict 1" && $v6 == "strict 1" ]]; then
        pass "credlock's firewall metrics: ipv4 and ipv6 strict, enforced 1"
    else
        fail "credlock's firewall metrics: ipv4 and ipv6 strict, enforced 1" \
            "ipv4 '$v4', ipv6 '$v6': $(tr '\n' ' ' <<<"$m" | head -c 400)"
    fi
    st=$(cexec curl -sS --max-time 3 http://127.0.0.1:9169/status)
    if /usr/bin/python3 -c 'import json,sys; f=json.loads(sys.argv[1])["firewall"]; sys.exit(0 if f.get("enforced") is True and f.get("ipv4") == "strict" else 1)' "$st" 2>/dev/null; then
        pass "admin /status: firewall enforced, ipv4 strict"
    else
        fail "admin /status: firewall enforced, ipv4 strict" "$(head -c 300 <<<"$st")"
    fi

    if ! cexec nft delete table inet credlock; then
        fail "nft delete table inet credlock (by hand)" "$(cexec nft list tables 2>&1 | tr '\n' ' ')"
    else
        fw_observe "$HAND_BOUND" back
        log "after 'nft delete table inet credlock': rules strict again at ${OBS_BACK:-never} ms, metric strict 1 again at ${OBS_ENFORCED:-never} ms; meanwhile metric not strict: ${OBS_METRIC:-never seen}; /readyz not 200: ${OBS_READY:-never seen}"
        if [[ -n $OBS_BACK ]]; then
            pass "rules deleted by hand (nft delete table inet credlock) are re-applied, strict, after $OBS_BACK ms (bound $HAND_BOUND s)"
        else
            fail "rules deleted by hand (nft delete table inet credlock) are re-applied within $HAND_BOUND s" \
                "$(cexec nft list tables 2>&1 | tr '\n' ' ')"
        fi
        if [[ -n $OBS_ENFORCED ]]; then
            pass "after the re-apply credlock's firewall metric says ipv4 strict, enforced 1 ($OBS_ENFORCED ms after the delete)"
        else
            fail "after the re-apply credlock's firewall metric says ipv4 strict, enforced 1" "$(tr '\n' ' ' <<<"$OBS_LAST" | head -c 300)"
        fi
        curl_as "$APP_USER" "http://$IMDS4" "$WORK/hand-deleted.json" >/dev/null
        locked_creds "after the re-apply the app user gets locked credentials" "$WORK/hand-deleted.json"
    fi

    if ! cexec /usr/libexec/credlock/credlock-firewall remove >"$WORK/fw-remove.log" 2>&1; then
        fail "credlock-firewall remove (by hand)" "$(tail -c 300 "$WORK/fw-remove.log")"
        return
    fi
    if fw_observe "$HAND_BOUND" reported; then
        pass "rules removed by hand (credlock-firewall remove): credlock's metric says so (${OBS_METRIC}) and /readyz is not ready (${OBS_READY})"
        alert_check "rules removed by hand: the scraped metrics fire the CredlockFirewallNotEnforced alert for ipv4 and ipv6 (promtool, shipped rules)" \
            "$OBS_LAST" "ipv4 ipv6"
        alert_check "rules in place: the metrics scraped before the removal fire no CredlockFirewallNotEnforced alert (promtool, shipped rules)" \
            "$before" ""
    else
        fail "rules removed by hand (credlock-firewall remove): credlock's metric says so and /readyz is not ready within $HAND_BOUND s" \
            "metric: ${OBS_METRIC:-not seen} ($(tr '\n' ' ' <<<"$OBS_LAST" | head -c 300)); /readyz: ${OBS_READY:-200 throughout}; rules: $(fw_mode)"
    fi
    if ! cexec /usr/libexec/credlock/credlock-firewall apply >"$WORK/fw-apply.log" 2>&1; then
        fail "credlock-firewall apply (after the remove)" "$(tail -c 300 "$WORK/fw-apply.log")"
        return
    fi
    if fw_observe "$HAND_BOUND" back && ready=$(cexec curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:9169/readyz) &&
        [[ $ready == 200 ]]; then
        pass "credlock-firewall apply: credlock's metric says ipv4 strict, enforced 1 again ($OBS_ENFORCED ms) and /readyz is 200"
    else
        fail "credlock-firewall apply: credlock's metric says ipv4 strict, enforced 1 again and /readyz is 200" \
            "rules strict at ${OBS_BACK:-never} ms, metric: $(tr '\n' ' ' <<<"$OBS_LAST" | head -c 300), /readyz ${ready:-?}"
    fi
}

check_watchdog() {
    local pid n t
    if ! is_active credlock.service; then
        fail "watchdog: a hung credlock is killed and restarted" "credlock.service is not active"
        return
    fi
    pid=$(prop credlock.service MainPID)
    n=$(prop credlock.service NRestarts)
    t=$SECONDS
    ckill STOP "$pid"
    log "SIGSTOP credlock (pid $pid in the container); waiting for the watchdog (${WATCHDOG_SEC}s)"
    if wait_until $((WATCHDOG_SEC + RESTART_SEC + 30)) restarted credlock.service "$n" "$pid"; then
        pass "watchdog: a hung credlock is killed and restarted ($((SECONDS - t)) s, NRestarts $n -> $(prop credlock.service NRestarts))"
    else
        fail "watchdog: a hung credlock is killed and restarted" "after $((SECONDS - t)) s: $(prop credlock.service ActiveState), NRestarts $(prop credlock.service NRestarts)"
        ckill CONT "$pid" 2>/dev/null
    fi
    # Capture first: `grep -q` closing the pipe early would fail the pipeline (pipefail).
    local journal
    journal=$(cexec journalctl -b -u credlock.service --no-pager -q -o cat)
    if grep -qi 'watchdog timeout' <<<"$journal"; then
        pass "watchdog: systemd logged the watchdog timeout"
    else
        fail "watchdog: systemd logged the watchdog timeout"
    fi
}

# Issue 14, port squatting. The addresses the firewall redirects IMDS traffic to, and the admin
# port: no other user may ever bind them, not even while credlock is down.
readonly SQUAT_DIR=/run/credlock-nspawn-squat # inside the container
readonly SQUAT_TARGETS=(127.0.0.1:8169 "[::1]:8169" 127.0.0.1:9169)
readonly SQUAT_MIN=20 # attempts per address and way while credlock is down, or the check is void
SQUAT_PID=""

# start_squatter OUTFILE: the app user starts binding SQUAT_TARGETS over and over
# (tests/root/nspawn_squatter.sh); returns once it runs.
start_squatter() {
    local out=$1
    cexec /bin/sh -c "rm -rf $SQUAT_DIR && mkdir -m 0755 $SQUAT_DIR" || return 1
    CEXEC_TIMEOUT=90 cexec runuser -u "$APP_USER" -- /usr/local/bin/credlock-squatter \
        "$SQUAT_DIR" "${SQUAT_TARGETS[@]}" >"$out" 2>&1 &
    SQUAT_PID=$!
    wait_until 10 grep -q '^started' "$out"
}

# squat_window_open: from now on the squatter's attempts count as "while credlock is down".
squat_window_open() { cexec touch "$SQUAT_DIR/window"; }

# stop_squatter OUTFILE LABEL: stop it and judge: nothing bound, and every address tried in every
# way at least SQUAT_MIN times inside the window.
stop_squatter() {
    local out=$1 label=$2 rc total win bound minwin errs
    cexec touch "$SQUAT_DIR/stop"
    wait "$SQUAT_PID"
    rc=$?
    SQUAT_PID=""
    read -r total win bound < <(awk '$1 == "total" { print $3, $5, $7 }' "$out")
    minwin=$(awk '$3 == "attempts" { print $6 }' "$out" | sort -n | head -n1)
    errs=$(awk '$3 == "attempts" { print $10 }' "$out" | sort | uniq -c |
        awk '{ printf "%s%s x%s", sep, $2, $1; sep = ", " }')
    if [[ $rc == 0 && $minwin =~ ^[0-9]+$ ]] && ((minwin >= SQUAT_MIN)); then
        pass "$label (${SQUAT_TARGETS[*]}: $win tries in the window, at least $minwin per address and way: plain, SO_REUSEADDR, SO_REUSEPORT, v4-mapped; $total in all; last errors: $errs)"
    elif [[ ${bound:-0} =~ ^[0-9]+$ ]] && ((${bound:-0} > 0)); then
        fail "$label" "the user bound $bound times: $(grep '^BOUND' "$out" | cut -d' ' -f2- | tr '\n' ';')"
    else
        fail "$label" "squatter exit $rc, ${win:-?} tries in the window (fewest per way: '${minwin}', need $SQUAT_MIN): $(tail -c 300 "$out" | tr '\n' ' ')"
    fi
    cexec rm -rf "$SQUAT_DIR"
}

# not_raw NAME FILE: FILE holds no credentials of the emulator's (an error or the locked set).
not_raw() {
    local name=$1 file=$2 key what
    key=$(json_field "$file" AccessKeyId)
    if [[ -z $key ]]; then
        what="no credentials: $(head -c 120 "$file" 2>/dev/null | tr '\n' ' ') $(head -c 120 "$file.err" 2>/dev/null | tr '\n' ' ')"
    elif grep -qxF -- "$key" <<<"$(emulator_key_ids)"; then
        fail "$name" "got the emulator's raw AccessKeyId $key"
        return
    else
        what="locked credentials (AccessKeyId ${key:0:8}...)"
    fi
    pass "$name: $what"
}

# Issue 14: kill -9; an unprivileged user tries all the while to bind every redirect target and
# the admin port and must fail; credlock comes back and serves locked credentials; a process
# with credlock's uid outside the (new) service is still redirected.
check_kill9() {
    local pid n t out=$WORK/squat-kill9.out during rc ms
    if ! is_active credlock.service; then
        fail "kill -9: credlock is restarted" "credlock.service is not active"
        fail "kill -9: an unprivileged user cannot bind the redirect targets or the admin port" "credlock.service is not active"
        return
    fi
    if ! start_squatter "$out"; then
        fail "kill -9: the squatter (app user) starts" "$(tail -c 300 "$out")"
    fi
    start_probe "$WORK/probe-kill9.out" || fail "kill -9: the IMDS probe (app user) starts"
    pid=$(prop credlock.service MainPID)
    n=$(prop credlock.service NRestarts)
    t=$SECONDS
    ckill KILL "$pid"
    squat_window_open
    # An application asking for credentials while credlock is down.
    (
        s=$(date +%s%N)
        r=$(curl_as "$APP_USER" "http://$IMDS4" "$WORK/during-restart.json")
        printf '%s %s\n' "$r" "$((($(date +%s%N) - s) / 1000000))" >"$WORK/during-restart.rc"
    ) &
    during=$!
    if wait_until 30 restarted credlock.service "$n" "$pid"; then
        pass "kill -9: credlock is restarted ($((SECONDS - t)) s, NRestarts $n -> $(prop credlock.service NRestarts))"
    else
        fail "kill -9: credlock is restarted" "$(prop credlock.service ActiveState), NRestarts $(prop credlock.service NRestarts)"
    fi
    if [[ -n $SQUAT_PID ]]; then
        stop_squatter "$out" "kill -9: from the kill until credlock was READY again, an unprivileged user could not bind the redirect targets or the admin port"
    fi
    if [[ -n $PROBE_PID ]]; then
        stop_probe "$WORK/probe-kill9.out" \
            "kill -9: an unprivileged user requesting credentials non-stop through the crash and restart never got raw ones"
    fi
    wait "$during"
    read -r rc ms <"$WORK/during-restart.rc"
    not_raw "kill -9: an app request sent right after the kill got no raw credentials (curl exit $rc after $ms ms)" \
        "$WORK/during-restart.json"
    curl_as "$APP_USER" "http://$IMDS4" "$WORK/after-restart.json" >/dev/null
    locked_creds "after the restarts the app user gets locked credentials" "$WORK/after-restart.json"
    curl_as "$APP_USER" "http://[$IMDS6]" "$WORK/after-restart6.json" >/dev/null
    locked_creds "after the restarts the app user gets locked credentials via [fd00:ec2::254]" "$WORK/after-restart6.json"
    local ready
    ready=$(cexec curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:9169/readyz)
    if [[ $ready == 200 ]]; then pass "after the restarts admin /readyz is 200"; else fail "after the restarts admin /readyz is 200" "got $ready"; fi
    check "after the restarts the rules are still strict" fw_strict
    same_uid_redirected "after the restarts, credlock's uid outside its service (systemd-run --scope) is still redirected: locked credentials" \
        "http://$IMDS4" "$WORK/sameuid-after-restart.json" systemd-run --quiet --scope --uid=credlock --gid=credlock --
}

# Stopping credlock. credlock.service alone: credlock.socket keeps the ports (no user can bind
# them), and the next connection starts credlock again. Both stopped (an operator, on purpose):
# the redirect meets a closed port, connection refused. The rules stay throughout.
check_fail_closed() {
    local rc4 rc6 t0 ms out=$WORK/squat-stopped.out
    local err
    if err=$(cexec systemctl stop credlock.service 2>&1); then
        pass "systemctl stop credlock${err:+ (systemctl: $(tr '\n' ' ' <<<"$err"))}"
    else
        fail "systemctl stop credlock" "$err"
    fi
    if is_active credlock.socket && ! is_active credlock.service; then
        pass "credlock.service stopped, credlock.socket still listening"
    else
        fail "credlock.service stopped, credlock.socket still listening" \
            "credlock.socket $(prop credlock.socket LoadState)/$(prop credlock.socket ActiveState), credlock.service $(prop credlock.service ActiveState)"
    fi
    if start_squatter "$out"; then
        squat_window_open
        sleep 1.5
        stop_squatter "$out" "credlock.service stopped: an unprivileged user cannot bind the redirect targets or the admin port"
    else
        fail "credlock.service stopped: the squatter (app user) starts" "$(tail -c 300 "$out")"
    fi
    check "credlock.service stopped: it stayed stopped while the squatter ran (nothing connected)" \
        test "$(prop credlock.service ActiveState)" != active
    # A client now: its connection waits in credlock.socket's backlog and starts credlock.
    t0=$(date +%s%N)
    rc4=$(curl_as "$APP_USER" "http://$IMDS4" "$WORK/stopped4.json")
    ms=$(ms_since "$t0")
    not_raw "credlock.service stopped: an app request gets no raw credentials (curl exit $rc4 after $ms ms)" "$WORK/stopped4.json"
    if wait_until 30 is_active credlock.service; then
        pass "credlock.service stopped: the app's connection started it again (socket activation)"
    else
        fail "credlock.service stopped: the app's connection started it again (socket activation)" \
            "credlock.service $(prop credlock.service ActiveState)/$(prop credlock.service SubState)"
    fi
    if cexec systemctl stop credlock.socket credlock.service; then
        pass "systemctl stop credlock.socket credlock.service"
    else
        fail "systemctl stop credlock.socket credlock.service"
    fi
    rc4=$(curl_as "$APP_USER" "http://$IMDS4" "$WORK/stopped4.json")
    rc6=$(curl_as "$APP_USER" "http://[$IMDS6]" "$WORK/stopped6.json")
    # curl exit 7: failed to connect (connection refused).
    if [[ $rc4 == 7 && $rc6 == 7 ]]; then
        pass "credlock and its socket stopped: app user gets connection refused (v4 and v6)"
    else
        fail "credlock and its socket stopped: app user gets connection refused (v4 and v6)" "curl exit $rc4/$rc6: $(head -c 200 "$WORK/stopped4.json")"
    fi
    fw_status_within "credlock stopped: the firewall rules stay"
    # No ExecStop= in credlock-firewall.service: stopping the unit itself keeps the rules too.
    cexec systemctl stop credlock-firewall.service
    fw_status_within "credlock-firewall.service stopped: the rules stay"
    rc4=$(curl_as "$APP_USER" "http://$IMDS4" "$WORK/fwstopped4.json")
    if [[ $rc4 == 7 ]]; then
        pass "credlock-firewall.service stopped: app user still gets connection refused"
    else
        fail "credlock-firewall.service stopped: app user still gets connection refused" "curl exit $rc4"
    fi
    # Starting it again runs `apply --boot`: strict was loaded in this boot, so it stays strict
    # (only a reboot brings boot mode back), and root is refused like everyone while credlock is down.
    cexec systemctl start credlock-firewall.service
    local mode
    mode=$(fw_mode)
    rc4=$(curl_as root "http://$IMDS4" "$WORK/fwrestarted-root4.json")
    if [[ $mode == strict && $rc4 == 7 ]]; then
        pass "credlock-firewall.service started again (apply --boot) keeps the strict rules: root refused while credlock is down"
    else
        fail "credlock-firewall.service started again keeps the strict rules" "mode '$mode', root curl exit $rc4"
    fi
}

# After uninstall nothing of credlock remains and IMDS is reached directly.
check_uninstalled() {
    local label=$1 left=() p
    for p in /usr/bin/credlock /usr/libexec/credlock /usr/lib/systemd/system/credlock.service \
        /usr/lib/systemd/system/credlock-firewall.service /etc/credlock /etc/default/credlock \
        /etc/default/credlock-firewall /usr/share/credlock /usr/share/doc/credlock \
        /etc/systemd/system/multi-user.target.wants/credlock.service \
        /etc/systemd/system/sysinit.target.wants/credlock-firewall.service; do
        [[ -e $ROOT$p || -L $ROOT$p ]] && left+=("$p")
    done
    # Any other unit file or enablement link of credlock's (credlock.socket, firewall check units);
    # not the test's own application units.
    while IFS= read -r p; do
        left+=("${p#"$ROOT"}")
    done < <(find "$ROOT/usr/lib/systemd/system" "$ROOT/etc/systemd/system" -name 'credlock*' \
        ! -name 'credlock-example-app*' ! -path '*/credlock-example-app.service.d*' \
        ! -name "$DENIED_UNIT*" ! -path "*/$DENIED_UNIT.d*" 2>/dev/null)
    if ((${#left[@]} == 0)); then pass "$label: files removed"; else fail "$label: files removed" "left: ${left[*]}"; fi
    if cexec getent passwd credlock >/dev/null || cexec getent group credlock >/dev/null; then
        fail "$label: user and group credlock removed"
    else
        pass "$label: user and group credlock removed"
    fi
    local rules
    rules=$( (cexec nft list ruleset; cexec iptables-save; cexec ip6tables-save) 2>/dev/null)
    if grep -qiE 'credlock|169\.254\.169\.254|fd00:ec2::254' <<<"$rules"; then
        fail "$label: firewall rules removed" "$(grep -iE 'credlock|169.254' <<<"$rules" | head -3 | tr '\n' ' ')"
    else
        pass "$label: firewall rules removed"
    fi
    local u known=() units=()
    # The units of the copy installed (the repo may have changed since).
    for u in "$ROOT$SRC_IN"/systemd/*.service "$ROOT$SRC_IN"/systemd/*.socket "$ROOT$SRC_IN"/systemd/*.timer; do
        [[ -f $u ]] || continue
        u=$(basename "$u")
        units+=("$u")
        [[ $(prop "$u" LoadState) == not-found ]] || known+=("$u: $(prop "$u" LoadState)/$(prop "$u" ActiveState)")
    done
    if ((${#known[@]} == 0)); then
        pass "$label: units unknown to systemd (${units[*]})"
    else
        fail "$label: units unknown to systemd" "${known[*]}"
    fi
    curl_as "$APP_USER" "http://$IMDS4" "$WORK/uninstalled.json" >/dev/null
    raw_creds "$label: the app user reaches IMDS directly again" "$WORK/uninstalled.json"
}

check_uninstall() {
    local out=$WORK/uninstall.log
    if CEXEC_TIMEOUT=90 cexec "$SRC_IN/ami/provision.sh" uninstall >"$out" 2>&1; then
        pass "provision.sh uninstall on the running system"
    else
        fail "provision.sh uninstall on the running system" "$(tail -n 5 "$out" | tr '\n' ' ')"
    fi
    check_uninstalled "uninstall"
}

# provision.sh on a plain running instance: install starts everything, keeps an existing
# config, is idempotent, and uninstall cleans up again.
check_online_install() {
    local out=$WORK/install-online.log i
    mkdir -p "$ROOT/etc/credlock"
    write_test_config "$ROOT/etc/credlock/credlock.toml"
    cp "$ROOT/etc/credlock/credlock.toml" "$WORK/config-before"
    cat >"$ROOT/etc/default/credlock" <<EOF
AWS_ENDPOINT_URL_STS=http://$MOTO_ADDR:$MOTO_PORT
AWS_ENDPOINT_URL_EC2=http://$MOTO_ADDR:$MOTO_PORT
AWS_REGION=us-east-1
EOF
    for i in 1 2; do
        if CEXEC_TIMEOUT=120 cexec "$SRC_IN/ami/provision.sh" install \
            --binary "$SRC_IN/credlock" --source-dir "$SRC_IN" >"$out" 2>&1; then
            pass "provision.sh install on the running system (run $i)"
        else
            fail "provision.sh install on the running system (run $i)" "$(tail -n 8 "$out" | tr '\n' ' ')"
            dump_journal
            return
        fi
    done
    check "online install: credlock-firewall active" is_active credlock-firewall.service
    check "online install: credlock active" is_active credlock.service
    check "online install: credlock.socket active" is_active credlock.socket
    check "online install: credlock-firewall-check active" is_active credlock-firewall-check.service
    check "online install: the strict rules are loaded" fw_strict
    check "online install: the existing credlock.toml was kept" \
        cmp -s "$WORK/config-before" "$ROOT/etc/credlock/credlock.toml"
    check "online install: one credlock user" \
        test "$(grep -c '^credlock:' "$ROOT/etc/passwd")" = 1
    curl_as "$APP_USER" "http://$IMDS4" "$WORK/online.json" >/dev/null
    locked_creds "online install: app user gets locked credentials" "$WORK/online.json"
    if CEXEC_TIMEOUT=90 cexec "$SRC_IN/ami/provision.sh" uninstall >"$out" 2>&1; then
        pass "provision.sh uninstall again"
    else
        fail "provision.sh uninstall again" "$(tail -n 5 "$out" | tr '\n' ' ')"
    fi
    check_uninstalled "second uninstall"
}

# ---------------------------------------------------------------------------------------------

main() {
    preflight
    # One run at a time on a machine (the machine, namespace and state names are fixed): a
    # second run waits here instead of tearing down the first one's container as "leftovers".
    exec 8>/run/credlock-nspawn-test.lock
    if ! flock -w 900 8; then
        fail "another run of this suite holds /run/credlock-nspawn-test.lock (waited 15 min)"
        summary # its container is not ours to tear down (teardown is not registered yet)
    fi
    at_exit teardown
    mkdir -p "$STATE"
    teardown # leftovers of an interrupted run
    mkdir -p "$STATE"
    make_rootfs
    provision_offline
    configure_test_instance
    setup_network
    start_servers
    control_boot
    install_lock_holder
    install_access_policy
    boot_container
    check_boot_order
    check_cloud_init
    check_lock_holder
    check_firewall
    check_credentials
    check_access_policy
    check_nftables
    check_hand_removal
    check_watchdog
    check_kill9
    check_fail_closed
    check_uninstall
    check_online_install
    if ((FAILED > 0)); then dump_journal; fi
    summary
}

main "$@"
