#!/bin/sh
# IMDS probe for tests/root/nspawn_systemd_test.sh, run inside the container as an unprivileged
# user: fetches the role's credentials the IMDSv2 way (token PUT, role name, credentials) through
# 169.254.169.254 over and over, until DIR/stop exists (at most 60 s), and prints one line per
# try:
#   ok ACCESS_KEY_ID      a credential document (the test tells locked from raw)
#   err STEP CURL_EXIT    no document (STEP: token, role or creds)
# Each request gives up after 1 s, like the AWS SDKs. Prints "started" first.
#
#   credlock-imds-probe DIR [URL_BASE]
dir=$1
b=${2:-http://169.254.169.254}
end=$(($(date +%s) + 60))
echo started
while [ ! -e "$dir/stop" ] && [ "$(date +%s)" -lt "$end" ]; do
    t=$(curl -sS --max-time 1 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" \
        "$b/latest/api/token" 2>/dev/null)
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "err token $rc"
        sleep 0.05
        continue
    fi
    r=$(curl -s --fail --max-time 1 -H "X-aws-ec2-metadata-token: $t" \
        "$b/latest/meta-data/iam/security-credentials/" 2>/dev/null)
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "err role $rc"
        sleep 0.05
        continue
    fi
    c=$(curl -s --fail --max-time 1 -H "X-aws-ec2-metadata-token: $t" \
        "$b/latest/meta-data/iam/security-credentials/$r" 2>/dev/null)
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "err creds $rc"
        sleep 0.05
        continue
    fi
    k=$(printf '%s' "$c" | sed -n 's/.*"AccessKeyId"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n1)
    echo "ok ${k:-?}"
done
