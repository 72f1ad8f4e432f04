#!/bin/bash
# Install or remove credlock on this machine: an AMI build instance (Packer, EC2 Image Builder),
# a chroot, or a plain running instance. Idempotent: run it again to upgrade or repair.
#
#   provision.sh install   [--binary PATH] [--source-dir PATH] [--no-start]
#   provision.sh uninstall [--keep-config]
#
# --source-dir  checkout (or upload) holding systemd/, policy-templates/ and ami/
#               (default: the directory above this script)
# --binary      the credlock executable (default: SOURCE/credlock, then
#               SOURCE/target/release/credlock, then SOURCE/target/debug/credlock)
# --no-start    enable the units but do not start them now (AMI builds: the rules and the proxy
#               then first run on instances launched from the image, not on the build instance)
# --keep-config uninstall everything but /etc/credlock and /etc/default/credlock*
#
# Exit codes: 0 done, 1 failed, 2 usage error.
set -euo pipefail

readonly USER_NAME=credlock
readonly BIN=/usr/bin/credlock
readonly LIBEXEC_DIR=/usr/libexec/credlock
readonly FIREWALL=$LIBEXEC_DIR/credlock-firewall
readonly UNIT_DIR=/usr/lib/systemd/system
# credlock-firewall-check: the watchdog that re-applies the rules when something removes them;
# credlock-firewall-reapply: re-applies them right after nftables/iptables services reload;
# credlock.socket: credlock's listeners, held by systemd (installed when the source has it).
UNITS=(credlock-firewall.service credlock-firewall-check.service credlock-firewall-reapply.service
    credlock.socket credlock.service)
readonly CONF_DIR=/etc/credlock
readonly CONF=$CONF_DIR/credlock.toml
readonly FIREWALL_DEFAULTS=/etc/default/credlock-firewall
readonly FIREWALL_RUNDIR=/run/credlock-firewall
readonly ENV_FILE=/etc/default/credlock
readonly SHARE_DIR=/usr/share/credlock
readonly DOC_DIR=/usr/share/doc/credlock
# The nftables.service drop-in: its reload/stop/restart load credlock's table in the same nft
# transaction as the operator's ruleset (systemd/nftables-credlock*.conf).
readonly NFT_DROPIN_DIR=$UNIT_DIR/nftables.service.d
readonly NFT_DROPIN=$NFT_DROPIN_DIR/credlock.conf

log() { printf 'provision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }

# systemd is PID 1 and we are not in a chroot: units can be started and rules applied here.
systemd_running() {
    [[ -d /run/systemd/system ]] || return 1
    if command -v systemd-detect-virt >/dev/null 2>&1 && systemd-detect-virt --quiet --chroot; then
        return 1
    fi
    return 0
}

nologin_shell() {
    local s
    for s in /usr/sbin/nologin /sbin/nologin /bin/false; do
        [[ -x $s ]] && { printf '%s\n' "$s"; return; }
    done
    printf '/bin/false\n'
}

# Copy SRC to DEST atomically (write a temporary file next to DEST, then rename), so a running
# credlock never sees a half-written binary and "Text file busy" cannot happen.
install_atomic() {
    local mode=$1 src=$2 dest=$3 tmp
    install -d -m 0755 "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
    install -m "$mode" "$src" "$tmp"
    mv -f "$tmp" "$dest"
}

# Install a configuration file only when none exists (the administrator's copy always wins).
install_config_once() {
    local mode=$1 group=$2 src=$3 dest=$4
    if [[ -e $dest ]]; then
        if ! cmp -s "$src" "$dest"; then
            log "keeping existing $dest (shipped version: $SHARE_DIR/examples/$(basename "$dest"))"
        fi
        return
    fi
    install -m "$mode" -o root -g "$group" "$src" "$dest"
    log "installed $dest"
}

# The defaults file shipped next to the firewall script (systemd/credlock-firewall.defaults), or
# (an older checkout without it) a commented file listing every setting at its default.
firewall_defaults_source() {
    local shipped=$SOURCE_DIR/systemd/credlock-firewall.defaults out
    if [[ -f $shipped ]]; then
        printf '%s\n' "$shipped"
        return
    fi
    out=$(mktemp)
    cat >"$out" <<'EOF'
# /etc/default/credlock-firewall: settings of /usr/libexec/credlock/credlock-firewall, which
# credlock-firewall.service runs at boot. KEY=value lines; the values shown are the defaults.
# Show what would be loaded:  /usr/libexec/credlock/credlock-firewall render
# Apply a change:             systemctl reload credlock-firewall
# Check:                      /usr/libexec/credlock/credlock-firewall status

# The proxy's user: only its traffic reaches the real IMDS.
#CREDLOCK_USER=credlock
# credlock's IMDS listener port on 127.0.0.1 and [::1] ([server] listen in credlock.toml).
#CREDLOCK_PORT=8169
# auto (nft if it works, else iptables) | nft | iptables
#CREDLOCK_BACKEND=auto
# Forwarded traffic to IMDS (containers on bridges): refuse | redirect (IPv4 to credlock).
#CREDLOCK_CONTAINERS=refuse
# Interfaces redirected in redirect mode (a trailing + is a prefix wildcard).
#CREDLOCK_CONTAINER_IFACES="docker0 br-+ cni+ podman+"
# auto (on when the kernel has IPv6) | on | off
#CREDLOCK_IPV6=auto
# Root keeps direct IMDS access at boot until credlock is ready (cloud-init):
# auto (yes when cloud-init is installed) | yes | no
#CREDLOCK_BOOT_EXEMPT_ROOT=auto
EOF
    printf '%s\n' "$out"
}

# The drop-in matching the installed nftables.service's commands: Debian's (`nft -f
# /etc/nftables.conf`) or the RHEL family's (`nft -f /etc/sysconfig/nftables.conf`, reload
# `flush ruleset; include ...`). Prints its path under SOURCE_DIR, or nothing (no nftables.service,
# or commands this script does not know: then only the reapply unit and the watchdog cover it).
nftables_dropin_source() {
    local unit="" u start reload
    for u in /etc/systemd/system/nftables.service /usr/lib/systemd/system/nftables.service \
        /lib/systemd/system/nftables.service; do
        if [[ -f $u ]]; then unit=$u; break; fi
    done
    [[ -n $unit ]] || return 0
    start=$(sed -n 's/^ExecStart=[-@:+!]*//p' "$unit" | tail -n 1)
    reload=$(sed -n 's/^ExecReload=[-@:+!]*//p' "$unit" | tail -n 1)
    case "$start|$reload" in
    "/usr/sbin/nft -f /etc/nftables.conf|/usr/sbin/nft -f /etc/nftables.conf" | \
        "/sbin/nft -f /etc/nftables.conf|/sbin/nft -f /etc/nftables.conf")
        printf '%s\n' "$SOURCE_DIR/systemd/nftables-credlock.conf"
        ;;
    "/"*"/nft -f /etc/sysconfig/nftables.conf|/"*"/nft 'flush ruleset; include \"/etc/sysconfig/nftables.conf\";'")
        printf '%s\n' "$SOURCE_DIR/systemd/nftables-credlock-rhel.conf"
        ;;
    *)
        log "warning: $unit runs commands this script does not know (ExecStart=$start, ExecReload=$reload): no nftables.service drop-in; its reloads leave a moment without credlock's rules (credlock-firewall-reapply.service and the watchdog put them back)"
        ;;
    esac
}

find_binary() {
    local c
    if [[ -n $BINARY ]]; then
        [[ -f $BINARY && -x $BINARY ]] || die "--binary $BINARY is not an executable file"
        printf '%s\n' "$BINARY"
        return
    fi
    for c in "$SOURCE_DIR/credlock" "$SOURCE_DIR/target/release/credlock" "$SOURCE_DIR/target/debug/credlock"; do
        [[ -f $c && -x $c ]] && { printf '%s\n' "$c"; return; }
    done
    die "no credlock binary found under $SOURCE_DIR (use --binary PATH)"
}

do_install() {
    local binary f tmpl_dir defaults_src
    binary=$(find_binary)
    if [[ ! -f $SOURCE_DIR/systemd/credlock.socket ]]; then
        UNITS=("${UNITS[@]/credlock.socket/}")
        read -ra UNITS <<<"${UNITS[*]}"
    fi
    for f in systemd/credlock.service systemd/credlock-firewall.service systemd/credlock-firewall \
             systemd/credlock-firewall-check.service systemd/credlock-firewall-reapply.service \
             systemd/credlock.toml; do
        [[ -f $SOURCE_DIR/$f ]] || die "missing $SOURCE_DIR/$f (wrong --source-dir?)"
    done
    tmpl_dir=$SOURCE_DIR/policy-templates
    compgen -G "$tmpl_dir/*.json" >/dev/null || die "no policy templates in $tmpl_dir"
    "$binary" --help >/dev/null 2>&1 || die "$binary does not run on this machine (architecture/libc?)"
    if ! command -v nft >/dev/null 2>&1 && ! command -v iptables >/dev/null 2>&1; then
        die "neither nft nor iptables is installed (install nftables or iptables first)"
    fi
    [[ -d /etc/ssl/certs || -d /etc/pki/tls/certs ]] || log "warning: no CA certificates found (install ca-certificates): STS over HTTPS will fail"

    # 1. The service user: a system account with no shell and no home. Static, not DynamicUser=:
    #    the firewall matches this uid before credlock ever starts.
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --gid "$USER_NAME" --no-create-home --home-dir /nonexistent \
            --shell "$(nologin_shell)" --comment "credlock IMDS proxy" "$USER_NAME"
        log "created system user $USER_NAME (uid $(id -u "$USER_NAME"))"
    fi

    # 2. Shared data: policy templates, examples, docs (replaced on every install).
    rm -rf "$SHARE_DIR/policy-templates.new"
    install -d -m 0755 "$SHARE_DIR/policy-templates.new" "$SHARE_DIR/examples" "$DOC_DIR"
    cp -R "$tmpl_dir/." "$SHARE_DIR/policy-templates.new/"
    chmod -R u=rwX,go=rX "$SHARE_DIR/policy-templates.new"
    rm -rf "$SHARE_DIR/policy-templates"
    mv "$SHARE_DIR/policy-templates.new" "$SHARE_DIR/policy-templates"
    install -m 0644 "$SOURCE_DIR/systemd/credlock.toml" "$SHARE_DIR/examples/credlock.toml"
    [[ -f $SOURCE_DIR/systemd/app-after-credlock.conf ]] &&
        install -m 0644 "$SOURCE_DIR/systemd/app-after-credlock.conf" "$SHARE_DIR/examples/app-after-credlock.conf"
    [[ -f $SOURCE_DIR/systemd/README.md ]] && install -m 0644 "$SOURCE_DIR/systemd/README.md" "$DOC_DIR/systemd.md"
    [[ -f $SOURCE_DIR/ami/README.md ]] && install -m 0644 "$SOURCE_DIR/ami/README.md" "$DOC_DIR/ami.md"
    [[ -f $SOURCE_DIR/ami/launch-settings.md ]] && install -m 0644 "$SOURCE_DIR/ami/launch-settings.md" "$DOC_DIR/launch-settings.md"
    [[ -f $SOURCE_DIR/README.md ]] && install -m 0644 "$SOURCE_DIR/README.md" "$DOC_DIR/README.md"

    # 3. Configuration, never overwritten. credlock reads it as its own group; nobody else can.
    install -d -m 0750 -o root -g "$USER_NAME" "$CONF_DIR"
    install_config_once 0640 "$USER_NAME" "$SOURCE_DIR/systemd/credlock.toml" "$CONF"
    defaults_src=$(firewall_defaults_source)
    install -d -m 0755 /etc/default
    install -m 0644 "$defaults_src" "$SHARE_DIR/examples/credlock-firewall"
    install_config_once 0644 root "$defaults_src" "$FIREWALL_DEFAULTS"
    [[ $defaults_src == "$SOURCE_DIR"/* ]] || rm -f "$defaults_src"
    # Validate both configurations with the NEW programs before replacing the running ones.
    if ! "$binary" check-config --config "$CONF" >/dev/null; then
        die "$CONF is not valid for the new binary: run '$binary check-config --config $CONF'"
    fi
    if ! CREDLOCK_FIREWALL_CONFIG=$FIREWALL_DEFAULTS "$SOURCE_DIR/systemd/credlock-firewall" render >/dev/null; then
        die "$FIREWALL_DEFAULTS is not valid: run '$SOURCE_DIR/systemd/credlock-firewall render'"
    fi

    # 4. Programs.
    install_atomic 0755 "$binary" "$BIN"
    install_atomic 0755 "$SOURCE_DIR/systemd/credlock-firewall" "$FIREWALL"

    # 5. Units, enabled for every boot.
    for f in "${UNITS[@]}"; do
        install -D -m 0644 "$SOURCE_DIR/systemd/$f" "$UNIT_DIR/$f"
    done
    # nftables.service loads its ruleset and credlock's table in one transaction (no window at
    # its reload, stop or restart). Installed whether nftables.service is enabled or not.
    f=$(nftables_dropin_source)
    if [[ -n $f && -f $f ]]; then
        install -d -m 0755 "$NFT_DROPIN_DIR"
        install -m 0644 "$f" "$NFT_DROPIN"
        log "installed $NFT_DROPIN ($(basename "$f"))"
    else
        rm -f "$NFT_DROPIN"
    fi
    if systemd_running; then
        systemctl daemon-reload
    fi
    systemctl enable "${UNITS[@]}" >/dev/null 2>&1 || systemctl enable "${UNITS[@]}"
    log "enabled ${UNITS[*]}"

    # 6. Start (or restart onto the new binary) unless told not to or not possible here.
    if [[ $NO_START == 1 ]]; then
        log "not started (--no-start): the rules and the proxy start at the next boot"
    elif ! systemd_running; then
        log "systemd is not running here (chroot/image): units start at the next boot"
    else
        # A running system is past cloud-init's early stages: no boot-mode exemption for root
        # here. The strict rules go in first; the unit's `apply --boot` then keeps them (only a
        # reboot brings boot mode back). Root, like everyone, is refused until credlock is ready.
        "$FIREWALL" apply || die "'$FIREWALL apply' failed: IMDS is not redirected"
        systemctl reload-or-restart credlock-firewall.service
        # The watchdog onto the new script; the reapply unit active, so that a reload of
        # nftables.service propagates to it from now on (its apply keeps the strict rules).
        systemctl restart credlock-firewall-check.service
        systemctl reload-or-restart credlock-firewall-reapply.service
        if [[ " ${UNITS[*]} " == *" credlock.socket "* ]]; then
            # From now on systemd holds credlock's ports: a running credlock that bound them
            # itself (an older version) lets go first.
            systemctl stop credlock.service
            systemctl restart credlock.socket
        fi
        if ! systemctl restart credlock.service; then
            journalctl -u credlock.service -n 30 --no-pager >&2 || true
            die "credlock.service did not become ready (IMDS traffic is refused until it does)"
        fi
        log "credlock-firewall and credlock are running"
    fi
    log "install complete"
}

do_uninstall() {
    local f
    # First of all the nftables.service drop-in: it runs the firewall script, which goes below;
    # without it nftables.service runs its own commands again (their reload flushes everything).
    rm -f "$NFT_DROPIN"
    rmdir "$NFT_DROPIN_DIR" 2>/dev/null || true
    if systemd_running; then
        systemctl daemon-reload
    fi
    if systemd_running; then
        # Stop the proxy first (clients are refused), then remove the rules (clients reach IMDS
        # directly, as before credlock was installed).
        systemctl disable --now credlock.service credlock.socket >/dev/null 2>&1 || true
        # The watchdog and the reapply unit before the rules go, or they would put them back.
        systemctl disable --now credlock-firewall-check.service credlock-firewall-reapply.service \
            >/dev/null 2>&1 || true
        systemctl disable --now credlock-firewall.service >/dev/null 2>&1 || true
        if [[ -x $FIREWALL ]]; then
            "$FIREWALL" remove || die "'$FIREWALL remove' failed; the rules may still be loaded"
        fi
        # Its state: the lock, the state file, the "strict rules loaded in this boot" and
        # "removed" markers, route_localnet records.
        rm -rf "$FIREWALL_RUNDIR"
    else
        systemctl disable "${UNITS[@]}" >/dev/null 2>&1 || true
        log "systemd is not running here (chroot/image): no rules to remove in this namespace"
    fi
    for f in "${UNITS[@]}"; do
        rm -f "$UNIT_DIR/$f" "/etc/systemd/system/$f"
        rm -rf "/etc/systemd/system/$f.d" "/run/systemd/system/$f.d"
    done
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed "${UNITS[@]}" >/dev/null 2>&1 || true
    fi
    rm -f "$BIN"
    rm -rf "$LIBEXEC_DIR" "$SHARE_DIR" "$DOC_DIR"
    if [[ $KEEP_CONFIG == 1 ]]; then
        log "kept $CONF_DIR, $FIREWALL_DEFAULTS and $ENV_FILE (--keep-config)"
    else
        rm -rf "$CONF_DIR"
        rm -f "$FIREWALL_DEFAULTS" "$ENV_FILE"
    fi
    if getent passwd "$USER_NAME" >/dev/null; then
        userdel "$USER_NAME" || die "could not delete user $USER_NAME (processes still running as it?)"
        log "deleted user $USER_NAME"
    fi
    if getent group "$USER_NAME" >/dev/null; then
        groupdel "$USER_NAME" || true
    fi
    log "uninstall complete"
}

[[ $# -ge 1 ]] || usage
ACTION=$1
shift
SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BINARY=""
NO_START=0
KEEP_CONFIG=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --binary) [[ $# -ge 2 ]] || usage; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#*=}; shift ;;
        --source-dir) [[ $# -ge 2 ]] || usage; SOURCE_DIR=$2; shift 2 ;;
        --source-dir=*) SOURCE_DIR=${1#*=}; shift ;;
        --no-start) NO_START=1; shift ;;
        --keep-config) KEEP_CONFIG=1; shift ;;
        -h|--help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
[[ $(id -u) == 0 ]] || die "must run as root"
SOURCE_DIR=$(cd "$SOURCE_DIR" && pwd) || die "no such directory: $SOURCE_DIR"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

case $ACTION in
    install) do_install ;;
    uninstall) do_uninstall ;;
    -h|--help) usage ;;
    *) log "unknown action: $ACTION"; usage ;;
esac
