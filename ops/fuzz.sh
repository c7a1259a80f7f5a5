#!/usr/bin/env bash
# ops/fuzz.sh - builds the libFuzzer targets (tests/fuzz/fuzz_*.c) with clang, ASan and UBSan,
# and runs each for a bounded time.
#
#   bash ops/fuzz.sh [SECONDS] [TARGET...]     default: 60 s for every target
#
# For each target it first replays the known-bug inputs in tests/fuzz/regressions/<target>/
# (each must run clean), then fuzzes for SECONDS on a temporary copy of the committed corpus
# tests/fuzz/corpus/<target>/ (the committed files are never written). It prints one line per
# target with the executions, coverage and corpus size, and exits non-zero when any input
# crashed, leaked, hung or broke an invariant. A crashing input is kept in
# build/fuzz/crashes/<target>/ with the fuzzer's report next to it.
#
# The build tree is build/fuzz (FUZZ_BUILD_DIR overrides it), configured with
# CC=clang -DSETTLE_FUZZ=ON -DSETTLE_ASAN=ON -DCMAKE_BUILD_TYPE=Debug; only the fuzz targets
# are built. Needs clang and libclang-rt-14-dev (ops/deps.sh installs them).
set -euo pipefail
# shellcheck source=ops/lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$SETTLE_ROOT"

usage() {
    sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

seconds=60
targets=()
for arg in "$@"; do
    case "$arg" in
    -h | --help)
        usage
        exit 0
        ;;
    *[!0-9]*) targets+=("$arg") ;;
    *) seconds=$arg ;;
    esac
done
[[ $seconds -ge 1 ]] || die "SECONDS must be at least 1"

build=${FUZZ_BUILD_DIR:-build/fuzz}
if [[ ${#targets[@]} -eq 0 ]]; then
    for f in tests/fuzz/fuzz_*.c; do
        targets+=("$(basename "$f" .c)")
    done
fi
[[ ${#targets[@]} -gt 0 ]] || die "no fuzz targets in tests/fuzz/"

command -v clang >/dev/null 2>&1 || die "clang is not installed (bash ops/deps.sh)"
log "building ${targets[*]} in $build"
CC=clang cmake -S "$SETTLE_ROOT" -B "$SETTLE_ROOT/$build" -DSETTLE_FUZZ=ON -DSETTLE_ASAN=ON \
    -DCMAKE_BUILD_TYPE=Debug >/dev/null ||
    die "cmake configure of $build failed"
cmake --build "$SETTLE_ROOT/$build" -j2 --target "${targets[@]}" >/dev/null ||
    die "building the fuzz targets failed (cmake --build $build --target ${targets[*]})"

work=$(mktemp -d "${TMPDIR:-/tmp}/settle-fuzz.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

# Leaks are bugs too; any UBSan report stops the run (the build uses -fno-sanitize-recover).
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TMPDIR=$work # fuzz_config writes its secret files here

failed=()
summary=()
for t in "${targets[@]}"; do
    bin=$SETTLE_ROOT/$build/$t
    [[ -x $bin ]] || die "$bin was not built"
    crashes=$SETTLE_ROOT/$build/crashes/$t
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    if [[ -d tests/fuzz/corpus/$t ]]; then
        cp -r "tests/fuzz/corpus/$t/." "$work/$t/corpus/"
    fi
    seeds=$(find "$work/$t/corpus" -type f | wc -l)

    # 1. Known-bug inputs: deterministic, each must pass.
    reg_bad=0
    reg_total=0
    if [[ -d tests/fuzz/regressions/$t ]]; then
        while IFS= read -r -d '' f; do
            reg_total=$((reg_total + 1))
            if ! timeout 60 "$bin" -runs=1 "$f" >"$work/$t/reg.log" 2>&1; then
                reg_bad=$((reg_bad + 1))
                mkdir -p "$crashes"
                cp "$f" "$crashes/"
                cp "$work/$t/reg.log" "$crashes/$(basename "$f").log"
                log "$t: regression input $f fails:"
                grep -aE 'invariant violated|ERROR: |SUMMARY: |survives redaction|^  (in|out):' \
                    "$work/$t/reg.log" | head -8 >&2 || true
            fi
        done < <(find "tests/fuzz/regressions/$t" -type f -print0 | sort -z)
    fi

    # 2. Fuzzing on the copy. -timeout: one input taking this long is a hang.
    rc=0
    timeout $((seconds + 120)) "$bin" "$work/$t/corpus" -max_total_time="$seconds" \
        -timeout=20 -rss_limit_mb=2560 -print_final_stats=1 \
        -artifact_prefix="$work/$t/artifacts/" </dev/null >"$work/$t/fuzz.log" 2>&1 || rc=$?
    done_line=$(grep -aE '^#[0-9]+[[:space:]]+DONE' "$work/$t/fuzz.log" | tail -1 || true)
    # After a crash there is no DONE line: the last status line has the figures so far.
    last_line=$(grep -aE '^#[0-9]+[[:space:]]' "$work/$t/fuzz.log" | tail -1 || true)
    status_line=${done_line:-$last_line}
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/fuzz.log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status_line")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status_line")
    eps=$(sed -n 's/.* exec\/s: \([0-9]*\).*/\1/p' <<<"$status_line")
    corpus=$(find "$work/$t/corpus" -type f | wc -l)
    verdict="fuzzing ok"
    if [[ $rc -ne 0 || -z $done_line ]]; then
        verdict="fuzzing CRASHED (exit $rc)"
        mkdir -p "$crashes"
        cp "$work/$t/fuzz.log" "$crashes/fuzz.log"
        find "$work/$t/artifacts" -type f -exec cp {} "$crashes/" \;
        log "$t: the fuzzer stopped with exit $rc; inputs and report in $crashes:"
        grep -aE 'invariant violated|ERROR: |SUMMARY: |survives redaction|^  (in|out):' \
            "$work/$t/fuzz.log" | head -12 >&2 || true
    fi
    if [[ $reg_bad -gt 0 ]]; then
        verdict="$verdict; $reg_bad of $reg_total regression inputs FAIL"
    fi
    line=$(printf '%s: %s; %s execs in %s s (%s/s), cov %s, ft %s, corpus %s -> %s' \
        "$t" "$verdict" "${execs:-?}" "$seconds" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$seeds" \
        "$corpus")
    line+=", regressions $((reg_total - reg_bad))/$reg_total pass"
    summary+=("$line")
    [[ $verdict == "fuzzing ok" ]] || failed+=("$t")
done

printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'fuzz.sh: FAIL: %s\n' "${failed[*]}"
    exit 1
fi
printf 'fuzz.sh: PASS: %d target(s), %d s each\n' "${#targets[@]}" "$seconds"
