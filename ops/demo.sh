#!/usr/bin/env bash
# ops/demo.sh - README command 1: installs what is missing, builds build/release, then runs
# the demo (ops/demo.py): throwaway redis-server, PostgreSQL and PG simulator (seed fault
# profile), a few hundred orders, three workers for at most 90 s, and a summary of orders,
# stock, queues, dead letters and job outcomes. Everything it starts is stopped at the end,
# also on Ctrl-C. Options are passed to demo.py (--orders N, --workers N, --max-seconds N,
# --keep, --help).
set -euo pipefail
# shellcheck source=ops/lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$SETTLE_ROOT"

bash ops/deps.sh
log "building build/release"
mkdir -p build
# The build output goes to a file so the demo's own output stays readable; on a failure its
# tail is shown.
if ! cmake_build build/release -DCMAKE_BUILD_TYPE=RelWithDebInfo >build/demo-build.log 2>&1
then
    tail -n 40 build/demo-build.log >&2
    die "build failed (full output: build/demo-build.log)"
fi
# exec: the Python process receives Ctrl-C itself and stops what it started.
SETTLE_BIN="$SETTLE_ROOT/build/release/settle" exec "$SETTLE_PYTHON" ops/demo.py "$@"
