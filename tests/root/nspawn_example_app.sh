#!/bin/bash
# credlock-example-app: what an application ordered after credlock.service does at start-up.
# Installed inside the nspawn test's container as /usr/local/bin/credlock-example-app and run by
# credlock-example-app.service as the unprivileged user credlock-app. It records when it started,
# then fetches the role's credentials the way an AWS SDK does (IMDSv2, default endpoint), and
# keeps them in $STATE_DIRECTORY for the test to compare with the IMDS emulator's.
set -euo pipefail

out=${STATE_DIRECTORY:-/var/lib/credlock-example-app}
imds=${IMDS_ENDPOINT:-http://169.254.169.254}

read -r uptime _ </proc/uptime
printf '%s\n' "$uptime" >"$out/started-uptime"
date -u +%Y-%m-%dT%H:%M:%S.%NZ >"$out/started-at"

token=$(curl -sS --fail --max-time 5 -X PUT \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds/latest/api/token")
role=$(curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
    "$imds/latest/meta-data/iam/security-credentials/")
curl -sS --fail --max-time 5 -H "X-aws-ec2-metadata-token: $token" \
    -o "$out/credentials.json" "$imds/latest/meta-data/iam/security-credentials/$role"
printf 'credlock-example-app: got credentials for role %s\n' "$role"
