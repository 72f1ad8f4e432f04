#!/usr/bin/env bash
# Installs everything the demo and the test suite need, on a fresh Debian machine with Rust,
# Python 3.11 and Node: Debian packages, a Python venv (.venv) and the JS SDK test package.
# Idempotent: what is already there is kept. Usage: tests/setup.sh [--minimal]
#   --minimal: only what the local demo needs (no system-test packages).
set -euo pipefail
cd "$(dirname "$0")/.."

minimal=false
[[ "${1:-}" == "--minimal" ]] && minimal=true

need_pkgs=()
want() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$1"); }
want ca-certificates
want curl
if ! $minimal; then
  for p in nftables iptables iproute2 nginx haproxy wrk prometheus shellcheck debootstrap \
           systemd-container systemd jq; do
    want "$p"
  done
fi
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: need root to install: ${need_pkgs[*]}" >&2
    exit 1
  fi
  echo "setup: apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  # The packaged services are tools for the tests here, not daemons to keep running.
  for svc in nginx haproxy prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
fi

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import moto, boto3, pytest, requests, awscli, hcl2' 2>/dev/null; then
  echo "setup: python venv .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r tests/e2e/requirements.txt
fi

if ! $minimal && [[ -f tests/js/package.json && ! -d tests/js/node_modules ]]; then
  echo "setup: npm ci (tests/js)"
  (cd tests/js && npm ci --silent --no-audit --no-fund)
fi
echo "setup: done"
