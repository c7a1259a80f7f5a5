#!/usr/bin/env bash
# ops/deps.sh - installs the Debian 12 packages settle needs to build, test and run the demo.
#
# Idempotent and cheap when nothing is missing: each package is checked with dpkg-query, and
# apt-get (update, then install) runs only when something must be installed, so a second run
# installs nothing and touches no network.
#
# Notes:
# - postgresql-15 may start a system cluster on port 5432 when it is installed. Nothing in
#   settle's scripts or tests uses or touches it: they run their own initdb clusters on free
#   ports under a temporary directory.
# - The libFuzzer runtime comes with libclang-rt-14-dev (libclang_rt.fuzzer-x86_64.a, which
#   `clang -fsanitize=fuzzer` links); libfuzzer-14-dev is the standalone libFuzzer library,
#   which the fuzz build does not use, so it is not installed.
# - passwd provides useradd: the integration harness runs initdb/pg_ctl as an unprivileged
#   user when it runs as root, because PostgreSQL refuses to run as root.
set -euo pipefail
# shellcheck source=ops/lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

packages=(
    # build
    build-essential cmake pkg-config git ca-certificates curl
    libuv1-dev libhiredis-dev libcurl4-openssl-dev libpq-dev libjansson-dev libmicrohttpd-dev
    # servers used by the integration tests and the demo
    redis-server postgresql-15 postgresql-client-15
    # integration tests (always run with /usr/bin/python3, Debian's interpreter)
    python3 python3-redis python3-psycopg2 passwd
    # clang-format for the format check; clang and its runtimes for the libFuzzer build
    clang clang-format libclang-rt-14-dev
    # ops file checks (tests/integration/test_ops_files.py): yamllint, PyYAML, and promtool,
    # which Debian ships only in the prometheus package (its server is not used or started by
    # settle's scripts; on a machine with systemd, `systemctl disable --now prometheus`)
    yamllint python3-yaml prometheus
)

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for p in "${packages[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all ${#packages[@]} packages present"
    exit 0
fi

log "installing: ${missing[*]}"
# DPkg::Lock::Timeout: wait (bounded) for another apt/dpkg run to finish instead of failing.
# noninteractive + no stdin: CI has no terminal, and a prompt would hang the job.
apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update
as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}" \
    </dev/null

# Check the result rather than trusting apt's exit status alone.
still=()
for p in "${missing[@]}"; do
    is_installed "$p" || still+=("$p")
done
[[ ${#still[@]} -eq 0 ]] || die "still missing after apt-get install: ${still[*]}"
log "installed ${#missing[@]} packages"
