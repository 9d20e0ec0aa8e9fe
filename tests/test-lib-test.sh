#!/usr/bin/env bash
# scripts/test-lib.sh, the part of scripts/test.sh that runs tests and counts them, on small projects made
# here: four tests, one that passes, one that fails the first time only, one that always fails, one that
# skips. Checks what the suite is recorded with (2 passed, 1 failed, 1 skipped), that the test failing once
# is named as flaky and the one failing always as failed, that a run without failures runs nothing
# twice, and that a failure with a sanitizer's report is not run again.
#   usage: tests/test-lib-test.sh ctest            ctest_twice / run_ctest on a CMake project
#          tests/test-lib-test.sh pytest [PYTHON]  pytest_twice (PYTHON: $MOEDIST_PYTHON, else the project's
#                                                  build-py/python; exits 77, skipped, where none has pytest)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kind=${1:?usage: test-lib-test.sh ctest|pytest [PYTHON]}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
logs=$work/logs jobs=2
mkdir -p "$logs"
names=() states=() passed=() failed=() skipped=()
record() { names+=("$1") states+=("$2") passed+=("$3") failed+=("$4") skipped+=("$5"); }
# shellcheck source=../scripts/test-lib.sh
source "$root/scripts/test-lib.sh"
bad=0
expect() {  # WHAT GOT WANTED
  if [ "$2" != "$3" ]; then
    echo "FAIL: $1: got '$2', expected '$3'"
    bad=1
  else
    echo "ok: $1: $2"
  fi
}

case $kind in
  ctest)
    # project LINES: a CMake project (proj/, built in proj/build) with these tests, from a clean slate
    project() {
      mkdir -p proj
      printf 'cmake_minimum_required(VERSION 3.16)\nproject(reruns NONE)\nenable_testing()\n%s\n' "$1" >proj/CMakeLists.txt
      cmake -S proj -B proj/build >/dev/null || exit 1
      rm -f "$work/once"
      names=() states=() passed=() failed=() skipped=() flaky=() failures=()
    }
    recorded() { echo "${names[*]} ${states[*]} ${passed[*]} ${failed[*]} ${skipped[*]}"; }
    project "add_test(NAME passes COMMAND true)
add_test(NAME fails_once COMMAND sh -c \"[ -e $work/once ] || { touch $work/once; exit 1; }\")
add_test(NAME always_fails COMMAND false)
add_test(NAME skips COMMAND sh -c \"exit 77\")
set_tests_properties(skips PROPERTIES SKIP_RETURN_CODE 77)"
    run_ctest demo proj/build "$SECONDS" >"$work/out.log" 2>&1
    expect "recorded" "$(recorded)" "demo failed 2 1 1"
    expect "flaky" "${flaky[*]}" "demo: fails_once"
    expect "failures" "${failures[*]}" "demo: always_fails"
    expect "the rerun ran only the failed tests" "$(grep -c 'Test *#' "$logs/.demo.ctest2.log")" 2
    # Without failures: one run, nothing named.
    names=() states=() passed=() failed=() skipped=() flaky=() failures=()
    run_ctest clean proj/build "$SECONDS" -E 'always_fails' >"$work/out2.log" 2>&1
    expect "recorded without failures" "$(recorded)" "clean passed 2 0 1"
    expect "nothing named" "${flaky[*]}|${failures[*]}" "|"
    expect "no rerun" "$([ -e "$logs/.clean.ctest2.log" ] && echo ran || echo none)" none
    # A sanitizer's report is a finding: the test that failed once with one is not run again.
    project "add_test(NAME passes COMMAND true)
add_test(NAME races_once COMMAND sh -c \"[ -e $work/once ] || { touch $work/once; echo 'WARNING: ThreadSanitizer: data race (pid=1)'; exit 66; }\")"
    run_ctest tsan proj/build "$SECONDS" >"$work/out3.log" 2>&1
    expect "recorded with a sanitizer's report" "$(recorded)" "tsan failed 1 1 0"
    expect "named as failed, not flaky" "${flaky[*]}|${failures[*]}" "|tsan: races_once"
    expect "not run again" "$([ -e "$logs/.tsan.ctest2.log" ] && echo ran || echo none)" none
    ;;
  pytest)
    py=${2:-${MOEDIST_PYTHON:-}}
    [ -z "$py" ] && [ -e "$root/build-py/python" ] && py=$(cat "$root/build-py/python")
    if [ -z "$py" ] || ! "$py" -c 'import pytest' 2>/dev/null; then
      echo "skipped: no Python with pytest (MOEDIST_PYTHON, or scripts/python-setup.sh's build-py/python)"
      exit 77
    fi
    mkdir -p t
    printf '[tool.pytest.ini_options]\ncache_dir = ".pytest_cache"\n' >pyproject.toml
    cat >t/test_reruns.py <<PY
import os
import pytest

def test_passes():
    pass

def test_fails_once():
    if not os.path.exists("$work/once"):
        open("$work/once", "w").close()
        raise AssertionError("the first time")

def test_always_fails():
    raise AssertionError("every time")

@pytest.mark.skip(reason="a skip")
def test_skips():
    pass
PY
    pytest_twice demo "$py" "$logs/demo.log" t >"$work/out.log" 2>&1
    expect "counts" "$p $f $s" "2 1 1"
    expect "flaky" "${flaky[*]}" "demo: t/test_reruns.py::test_fails_once"
    expect "failures" "${failures[*]}" "demo: t/test_reruns.py::test_always_fails"
    expect "the rerun ran only the failed tests" "$(pytest_counts "$logs/.demo.pytest2.log")" "1 1 0"
    flaky=() failures=()
    pytest_twice clean "$py" "$logs/clean.log" t -k "not always_fails" >"$work/out2.log" 2>&1
    expect "counts without failures" "$p $f $s" "2 0 1"
    expect "nothing named" "${flaky[*]}|${failures[*]}" "|"
    expect "no rerun" "$([ -e "$logs/.clean.pytest2.log" ] && echo ran || echo none)" none
    ;;
  *) echo "usage: test-lib-test.sh ctest|pytest [PYTHON]"; exit 2 ;;
esac
if [ $bad = 1 ]; then
  echo "--- the output of the runs:"
  cat "$work"/out*.log
  exit 1
fi
echo "PASS"
