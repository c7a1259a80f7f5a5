# shellcheck shell=bash
# ops/lib.sh - helpers shared by the ops/*.sh scripts. Source it; it defines functions and
# SETTLE_ROOT (the repository root, found from this file's own path so every script works
# from any working directory) and SETTLE_PYTHON (Debian's interpreter: a pyenv python3 that
# may come first on PATH lacks the Debian python3-redis and python3-psycopg2 modules).

SETTLE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SETTLE_PYTHON=/usr/bin/python3
export SETTLE_ROOT SETTLE_PYTHON

# Messages go to stderr so that a script's stdout stays usable for its real output.
log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Seconds since the epoch, for durations in summaries.
now_s() { date +%s; }

# Prefix for commands that need root (apt-get, useradd): nothing when we are root, sudo
# without a password prompt when available (CI has no stdin), else a clear failure.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

# Configures and builds one tree: cmake_build DIR [cmake -D options...]. -j2 because CI has
# two cores; a larger -j only adds memory pressure there.
cmake_build() {
    local dir=$1
    shift
    cmake -S "$SETTLE_ROOT" -B "$SETTLE_ROOT/$dir" "$@" &&
        cmake --build "$SETTLE_ROOT/$dir" -j2
}
