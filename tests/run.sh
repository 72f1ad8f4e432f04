#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs (tests/setup.sh), then runs
# every suite and ends with one line "N passed, M failed" (one count per suite). System suites
# (network namespaces, firewall rules, systemd-nspawn) need root; without root they fail, they
# are never skipped. Usage: tests/run.sh [SUITE...]   (default: all; names as printed)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

tests/setup.sh || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }
export PATH="$PWD/.venv/bin:$PATH"

passed=0
failed=0
failures=()
selected=("$@")

# Colour only on a terminal: in CI logs and files, escape codes are noise.
if [[ -t 1 ]]; then
  bold=$'\033[1m' green=$'\033[32m' red=$'\033[31m' plain=$'\033[0m'
else
  bold='' green='' red='' plain=''
fi

suite() {
  local name=$1
  shift
  if ((${#selected[@]})) && [[ ! " ${selected[*]} " == *" $name "* ]]; then
    return
  fi
  printf '\n%s===== %s: %s%s\n' "$bold" "$name" "$*" "$plain"
  local start=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    printf '%s===== %s passed (%ss)%s\n' "$green" "$name" $((SECONDS - start)) "$plain"
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf '%s===== %s FAILED (%ss)%s\n' "$red" "$name" $((SECONDS - start)) "$plain"
  fi
}

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "this suite needs root (network namespaces, firewall rules, systemd-nspawn)" >&2
    return 1
  fi
  "$@"
}

suite build cargo build --all-targets
suite fmt cargo fmt --all -- --check
suite clippy cargo clippy --all-targets -- -D warnings
suite cargo-test cargo test --all-targets
suite emulator python -m pytest -q tests/support
suite sdk-e2e python -m pytest -q tests/e2e
suite adversarial python -m pytest -q tests/adversarial
suite lint tests/lint.sh
suite fuzz tests/fuzz.sh 30
suite prometheus tests/root/prometheus_e2e_test.sh
suite tripwire tests/tripwire/run.sh
suite firewall-nft need_root tests/root/netns_firewall_test.sh --backend nft
suite firewall-iptables need_root tests/root/netns_firewall_test.sh --backend iptables
suite firewall-ecs need_root tests/root/netns_ecs_test.sh
suite firewall-pod-identity need_root tests/root/netns_pod_identity_test.sh
suite systemd-nspawn need_root tests/root/nspawn_systemd_test.sh

echo
if ((failed)); then
  echo "failed suites: ${failures[*]}"
fi
echo "$passed passed, $failed failed"
((failed == 0))
