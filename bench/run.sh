#!/usr/bin/env bash
# bench/run.sh - settle's benchmark suite, side by side with BullMQ and Sidekiq (issue 6).
#
#   bash bench/run.sh            full run: 3 interleaved rounds (+ up to 2 for noisy figures),
#                                machine limits, latency, recovery, claim cost, sweeps (30-60 min)
#   bash bench/run.sh --quick    one round, small N, no limits or sweeps (~10 min; a smoke
#                                test, not figures to quote)
#   extra options go to bench/settle_bench.py (--runs N, --n N, --peers bullmq,sidekiq,
#   --only R0,R20, --gate-wait S, ...; see its --help)
#
# Installs what is missing (Debian packages via ops/deps.sh, wrk and the peers' packages),
# builds build/release (RelWithDebInfo: -O2 -g), copies ../shared/bench-peers (read-only) into
# a temporary directory and installs BullMQ there from npm, then runs the driver. Figure lines
# (key=value) go to stdout and to build/bench/results-<time>.txt; progress and per-run lines to
# stderr and build/bench/raw-<time>.log. Everything started runs on loopback in the temporary
# directory and is stopped by PID; the directory is removed at the end (BENCH_KEEP_TMP=1 keeps
# it).
set -euo pipefail
# shellcheck source=ops/lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../ops/lib.sh"
cd "$SETTLE_ROOT"

PEERS_SRC=${BENCH_PEERS_SRC:-$SETTLE_ROOT/../shared/bench-peers}
BUILD_DIR=build/release
OUT_DIR=${BENCH_OUT_DIR:-$SETTLE_ROOT/build/bench}

usage() { sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
for arg in "$@"; do
    case "$arg" in
    -h | --help)
        usage
        exit 0
        ;;
    esac
done

# --- dependencies -------------------------------------------------------------------------------
bash ops/deps.sh
is_installed() { [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]; }
# wrk measures the PG stub; the rest is the peers' install line (their README).
bench_pkgs=(wrk nodejs npm ruby-sidekiq ruby-pg python3-rq python3-celery python3-gevent)
missing=()
for p in "${bench_pkgs[@]}"; do
    # nodejs may come from elsewhere (npm inside it): a working node + npm is enough.
    if [[ $p == nodejs || $p == npm ]] && command -v node >/dev/null && command -v npm >/dev/null; then
        continue
    fi
    is_installed "$p" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}" </dev/null
fi

# --- build ----------------------------------------------------------------------------------------
log "building $BUILD_DIR (RelWithDebInfo, -O2)"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD_DIR" -j2 --target settle >/dev/null
SETTLE_BIN=$SETTLE_ROOT/$BUILD_DIR/settle
[[ -x $SETTLE_BIN ]] || die "no binary at $SETTLE_BIN"

# --- temporary directory, the peers' harness ------------------------------------------------------
TMP=$(mktemp -d /tmp/settle-bench-XXXX)
# PostgreSQL runs as an unprivileged user (postgres for the peers, settle-test for settle):
# it must be able to reach its data directory below this one.
chmod 755 "$TMP"
DRIVER_PID=""
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    if [[ -n $DRIVER_PID ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        for ((i = 0; i < 600; i++)); do
            kill -0 "$DRIVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$DRIVER_PID" 2>/dev/null; then
            kill -KILL "$DRIVER_PID" 2>/dev/null || true
        fi
    fi
    if [[ ${BENCH_KEEP_TMP:-0} == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

peers_args=()
if [[ -d $PEERS_SRC ]]; then
    cp -r "$PEERS_SRC" "$TMP/peers"
    chmod -R u+w "$TMP/peers"
    rm -rf "$TMP/peers/node_modules" "$TMP/peers/out"
    log "installing BullMQ into the copy of the peers' harness (npm)"
    # npm ci refuses a lock file that lacks other platforms' optional packages (npm >= 10);
    # npm install then completes it in the copy, with the same pinned versions.
    if ! (cd "$TMP/peers" && timeout 600 npm ci --no-audit --no-fund >"$TMP/npm.log" 2>&1); then
        (cd "$TMP/peers" && timeout 600 npm install --no-audit --no-fund >>"$TMP/npm.log" 2>&1) ||
            die "npm could not install the peers' packages (see $TMP/npm.log)"
    fi
    log "peers: $(cd "$TMP/peers" && node -e 'for (const p of ["bullmq","ioredis","pg"]) process.stdout.write(p+" "+require(p+"/package.json").version+" ")')"
    peers_args=(--peers-dir "$TMP/peers")
else
    log "no peers' harness at $PEERS_SRC: settle figures only"
fi

# --- run ------------------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
stamp=$(date +%Y%m%d-%H%M%S)
RESULTS=$OUT_DIR/results-$stamp.txt
RAW=$OUT_DIR/raw-$stamp.log
log "results: $RESULTS (raw per-run lines: $RAW)"
export SETTLE_BIN SETTLE_TEST_TMPDIR=$TMP PYTHONDONTWRITEBYTECODE=1
"$SETTLE_PYTHON" bench/settle_bench.py --tmp "$TMP" --raw "$RAW" "${peers_args[@]}" "$@" \
    > >(tee "$RESULTS") &
DRIVER_PID=$!
wait "$DRIVER_PID"
