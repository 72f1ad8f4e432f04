#!/bin/bash
# credlock-denied-app ROLE: an application the access policy (issue 15) refuses credentials by
# its systemd unit. Installed inside the nspawn test's container as
# /usr/local/bin/credlock-denied-app and run by credlock-test-denied.service as the same
# unprivileged user as credlock-example-app. It asks IMDS (IMDSv2, default endpoint, like an
# SDK) for the role listing, ROLE's credentials and the instance-id, and records each HTTP status
# ("KEY value" lines in $STATE_DIRECTORY/result) for the test to judge. It never fails on an
# HTTP error: a refusal is what the test expects, and a failed unit would degrade the boot.
set -uo pipefail

out=${STATE_DIRECTORY:-/var/lib/credlock-test-denied}
imds=${IMDS_ENDPOINT:-http://169.254.169.254}
role=${1:?usage: credlock-denied-app ROLE}
res=$out/result

# status PATH: the HTTP status of an IMDSv2 GET of PATH (000 when curl got no answer).
status() {
    curl -s --max-time 5 -o "$out/body" -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" "$imds$1"
}

{
    printf 'user %s\n' "$(id -un)"
    printf 'cgroup %s\n' "$(grep -m1 '^0::' /proc/self/cgroup | cut -d: -f3)"
    token=$(curl -sS --fail --max-time 5 -X PUT \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds/latest/api/token")
    printf 'token_rc %s\n' "$?"
    printf 'listing %s\n' "$(status /latest/meta-data/iam/security-credentials/)"
    printf 'credentials %s\n' "$(status "/latest/meta-data/iam/security-credentials/$role")"
    printf 'credentials_body %s\n' "$(head -c 200 "$out/body" | tr '\n' ' ')"
    printf 'instance_id %s\n' "$(status /latest/meta-data/instance-id)"
    printf 'instance_id_body %s\n' "$(head -c 100 "$out/body" | tr '\n' ' ')"
} >"$res.tmp"
mv "$res.tmp" "$res"
printf 'credlock-denied-app: %s\n' "$(tr '\n' ' ' <"$res")"
