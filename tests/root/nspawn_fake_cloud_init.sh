#!/bin/bash
# A stand-in for cloud-init in tests/root/nspawn_systemd_test.sh, installed inside the test
# container as /usr/bin/cloud-init (never on a real machine). Its presence makes
# credlock-firewall's CREDLOCK_BOOT_EXEMPT_ROOT=auto resolve to yes, and units named and ordered
# like Debian's cloud-init units run it with cloud-init's own arguments:
#   cloud-init init --local          cloud-init-local.service: before the network and sysinit
#   cloud-init init                  cloud-init.service: before network-online.target
#   cloud-init modules --mode=final  cloud-final.service: after multi-user.target and credlock
# Each stage reads IMDS as root the way the EC2 datasource does (IMDSv2 token, meta-data) and
# records, in /var/lib/cloud/credlock-test/STAGE.log: the firewall mode at that moment, whether
# root got an answer, and what an unprivileged user (credlock-app) got at the same moment.
# Unlike cloud-init (which skips iam/security-credentials) it also saves the role's credentials
# as STAGE.root.json, so the test can tell a direct answer from the upstream (the emulator's own
# AccessKeyId) from one through credlock (a locked AccessKeyId). One short try per request
# (cloud-init would retry for up to 120 s); it always exits 0 so the boot does not degrade.
set -u

case "$*" in
"init --local") stage=local ;;
init) stage=network ;;
"modules --mode=final") stage=final ;;
*)
    echo "fake cloud-init (credlock test): $*"
    exit 0
    ;;
esac

dir=/var/lib/cloud/credlock-test
imds=http://169.254.169.254
app=credlock-app
mkdir -p "$dir"
out=$dir/$stage
rm -f "$out.log" "$out.root.json"

{
    read -r up _ </proc/uptime
    echo "uptime $up"
    echo "firewall $(/usr/libexec/credlock/credlock-firewall status 2>/dev/null | head -n 1)"
    token=$(curl -sS --max-time 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
        "$imds/latest/api/token")
    echo "root_token_rc $?"
    iid=$(curl -sS --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
        "$imds/latest/meta-data/instance-id")
    echo "root_instance_id_rc $?"
    echo "root_instance_id $iid"
    role=$(curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
        "$imds/latest/meta-data/iam/security-credentials/")
    curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $token" -o "$out.root.json" \
        "$imds/latest/meta-data/iam/security-credentials/$role"
    echo "root_credentials_rc $?"
    # The same moment, as an ordinary user: redirected to credlock (refused while it is not up).
    if uid=$(id -u "$app" 2>/dev/null); then
        setpriv --reuid "$uid" --regid "$(id -g "$app")" --clear-groups -- \
            curl -sS --max-time 5 -o /dev/null -X PUT \
            -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$imds/latest/api/token"
        echo "app_token_rc $?"
    fi
} >"$out.log" 2>&1
exit 0
