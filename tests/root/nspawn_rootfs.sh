#!/bin/bash
# Print the path of a cached Debian bookworm rootfs tarball for the systemd-nspawn tests, building
# it with debootstrap first if it is not cached yet. Root only.
#
#   tests/root/nspawn_rootfs.sh            -> /var/cache/credlock-test/rootfs-bookworm-<key>.tar
#
# The cache key is a hash of the suite, variant, package list and mirror, so changing any of them
# builds a new tarball. Concurrent callers wait on a lock instead of building twice.
# Environment: CREDLOCK_TEST_MIRROR (default http://deb.debian.org/debian),
#              CREDLOCK_TEST_CACHE  (default /var/cache/credlock-test).
set -euo pipefail

readonly SUITE=bookworm
readonly VARIANT=minbase
readonly PACKAGES=systemd,systemd-sysv,dbus,nftables,iptables,iproute2,curl,ca-certificates
MIRROR=${CREDLOCK_TEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${CREDLOCK_TEST_CACHE:-/var/cache/credlock-test}

log() { printf 'nspawn_rootfs: %s\n' "$*" >&2; }

[[ $(id -u) == 0 ]] || { log "must run as root"; exit 1; }
command -v debootstrap >/dev/null 2>&1 || {
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq debootstrap >&2
}

key=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "$MIRROR" | sha256sum | cut -c1-12)
tarball=$CACHE/rootfs-$SUITE-$key.tar
install -d -m 0755 "$CACHE"

exec 9>"$CACHE/.lock"
flock -w 900 9 || { log "timed out waiting for $CACHE/.lock"; exit 1; }

if [[ ! -s $tarball ]]; then
    build=$(mktemp -d "$CACHE/build.XXXXXX")
    # shellcheck disable=SC2064 # expand now: the path is fixed
    trap "rm -rf '$build'" EXIT
    log "debootstrap $SUITE ($VARIANT, $PACKAGES) from $MIRROR into $build (about a minute)"
    if ! debootstrap --variant="$VARIANT" --include="$PACKAGES" "$SUITE" "$build/root" "$MIRROR" \
            >"$build/debootstrap.log" 2>&1; then
        tail -n 30 "$build/debootstrap.log" >&2
        log "debootstrap failed"
        exit 1
    fi
    # Shrink and neutralise: no apt lists or package cache, no machine-id (systemd makes one
    # per boot), no hostname inherited from the build host.
    rm -rf "$build/root/var/cache/apt/archives/"*.deb "$build/root/var/lib/apt/lists/"*
    : >"$build/root/etc/machine-id"
    printf 'credlock-test\n' >"$build/root/etc/hostname"
    tar --numeric-owner --xattrs -C "$build/root" -cf "$tarball.tmp" .
    mv -f "$tarball.tmp" "$tarball"
    log "cached $tarball ($(du -h "$tarball" | cut -f1))"
fi
printf '%s\n' "$tarball"
