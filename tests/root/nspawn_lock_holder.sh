#!/bin/bash
# Lock squatter for tests/root/nspawn_systemd_test.sh: an unprivileged user's process, started at
# boot after credlock-firewall.service (boot-mode rules) and before credlock.service, that tries
# to take every firewall lock path it is given, the way issue 20 found a local user could:
#   - a path that exists: open it read-only (flock works on a read-only descriptor) and flock it;
#   - a path that does not exist: create it (a world-writable directory such as /run/lock lets
#     any user plant the file) and flock it.
# It then keeps whatever it got for HOLD seconds (a forked `sleep` inherits the descriptors,
# and with them the locks), so credlock.service's ExecStartPost= apply runs while it holds them.
# Every outcome is logged to stdout (the journal):
#   lock-holder: held PATH | planted+held PATH | cannot open PATH: ERR | busy PATH
# and "lock-holder: holding N lock(s) for HOLD s". Run by a Type=forking unit; exits 0.
#
#   credlock-lock-holder HOLD PATH...
set -u
hold=$1
shift
held=0
for path in "$@"; do
    how=held
    if [[ ! -e $path ]]; then
        if ! err=$( { : >>"$path"; } 2>&1); then
            printf 'lock-holder: cannot open %s: %s\n' "$path" "${err##*: }"
            continue
        fi
        how=planted+held
    fi
    if ! exec {fd}<"$path" 2>/dev/null; then
        printf 'lock-holder: cannot open %s: %s\n' "$path" \
            "$( { : <"$path"; } 2>&1 | sed 's/.*: //')"
        continue
    fi
    if flock -x -n "$fd"; then
        printf 'lock-holder: %s %s\n' "$how" "$path"
        held=$((held + 1))
    else
        printf 'lock-holder: busy %s\n' "$path"
        exec {fd}<&-
    fi
done
printf 'lock-holder: holding %d lock(s) for %s s\n' "$held" "$hold"
# Detached from our stdout so the unit's start finishes when this script exits (Type=forking).
sleep "$hold" >/dev/null 2>&1 &
exit 0
