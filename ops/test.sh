#!/usr/bin/env bash
# ops/test.sh - README command 2: install what is missing, build, check formatting, run the
# tests. CI runs exactly this (.ci/run).
#
#   bash ops/test.sh            format check; build/release (RelWithDebInfo) + unit tests;
#                               build/asan (Debug, ASan+UBSan) + the whole suite (unit and
#                               integration) under the sanitizers
#   bash ops/test.sh --quick    build/release + unit tests only (no servers, about a minute)
#   bash ops/test.sh --no-asan  no sanitizer tree: the whole suite runs on build/release
#   Both full forms end with a fuzz smoke run (ops/fuzz.sh, FUZZ_SECONDS per target, 50 by
#   default); --quick skips it.
#
# Exits non-zero when any step failed; the last line is a one-line summary. Works from any
# working directory (it changes to the repository root found from its own path).
set -euo pipefail
# shellcheck source=ops/lib.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$SETTLE_ROOT"

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

quick=0
asan=1
for arg in "$@"; do
    case "$arg" in
    --quick) quick=1 ;;
    --no-asan) asan=0 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
done

t_start=$(now_s)
passed=()
failed=()
skipped=()

# step NAME COMMAND...: runs one step, records the outcome, never stops the script (the
# caller decides what a failure means for later steps). Returns the step's status.
step() {
    local name=$1 t0 rc=0
    shift
    t0=$(now_s)
    log "=== $name"
    "$@" || rc=$?
    if [[ $rc -eq 0 ]]; then
        passed+=("$name")
        log "=== $name: ok ($(($(now_s) - t0)) s)"
    else
        failed+=("$name")
        log "=== $name: FAILED (exit $rc, $(($(now_s) - t0)) s)"
    fi
    return "$rc"
}

summary() {
    local secs=$(($(now_s) - t_start)) verdict=PASS
    [[ ${#failed[@]} -eq 0 ]] || verdict=FAIL
    printf 'test.sh: %s in %d s; passed: %s; failed: %s; skipped: %s\n' "$verdict" "$secs" \
        "${passed[*]:-none}" "${failed[*]:-none}" "${skipped[*]:-none}"
    [[ $verdict == PASS ]]
}

# Every C source and header under src/, include/ and tests/ must be clang-formatted with the
# repository's .clang-format; the failure lists the files and the command that fixes them.
check_format() {
    local files=() bad=() f
    while IFS= read -r -d '' f; do
        files+=("$f")
    done < <(find src include tests -type f \( -name '*.c' -o -name '*.h' \) -print0 \
        2>/dev/null | sort -z)
    if [[ ${#files[@]} -eq 0 ]]; then
        log "format: no C files found"
        return 0
    fi
    for f in "${files[@]}"; do
        clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
    done
    if [[ ${#bad[@]} -gt 0 ]]; then
        log "format: ${#bad[@]} of ${#files[@]} files are not clang-formatted" \
            "(fix with: clang-format -i FILE):"
        printf '    %s\n' "${bad[@]}" >&2
        return 1
    fi
    log "format: ${#files[@]} files ok"
}

# ctest with the sanitizer settings: leaks are errors, the first UBSan report stops the
# process, and any report aborts (so a test cannot pass with a report in its output). A
# suppressions file, if the project adds one, covers leaks inside dependencies.
run_ctest_sanitized() {
    local lsan=""
    if [[ -f tests/lsan.supp ]]; then
        lsan="suppressions=$SETTLE_ROOT/tests/lsan.supp:print_suppressions=0"
    fi
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        LSAN_OPTIONS="$lsan" \
        ctest --test-dir build/asan --output-on-failure --no-tests=error -j2
}

# Installing packages is a precondition for everything else: stop at once if it fails.
if ! step deps bash ops/deps.sh; then
    summary
    exit 1
fi

if [[ $quick -eq 0 ]]; then
    step format check_format || true
fi

# The release tree runs the unit tests, or the whole suite with --no-asan (then it is the
# only tree).
release_tests=(unit-release -L unit)
if [[ $quick -eq 0 && $asan -eq 0 ]]; then
    release_tests=(tests-release)
fi
if step build-release cmake_build build/release -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
    step "${release_tests[0]}" ctest --test-dir build/release "${release_tests[@]:1}" \
        --output-on-failure --no-tests=error -j2 || true
else
    skipped+=("${release_tests[0]}")
fi

if [[ $quick -eq 0 && $asan -eq 1 ]]; then
    if step build-asan cmake_build build/asan -DCMAKE_BUILD_TYPE=Debug -DSETTLE_ASAN=ON; then
        step tests-asan run_ctest_sanitized || true
    else
        skipped+=(tests-asan)
    fi
fi

# Fuzz smoke (issue 7): the libFuzzer targets under ASan+UBSan for a bounded time each
# (ops/fuzz.sh builds build/fuzz with clang and replays tests/fuzz/regressions/ first).
# FUZZ_SECONDS per target keeps the step near three minutes on CI's two cores.
if [[ $quick -eq 0 ]]; then
    step fuzz bash ops/fuzz.sh "${FUZZ_SECONDS:-50}" || true
else
    skipped+=(fuzz)
fi

summary
