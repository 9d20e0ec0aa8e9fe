# The part of scripts/test.sh that runs tests and counts them, sourced by it and by tests/test-lib-test.sh
# (which runs these functions on small projects of its own, a test that fails once among them).
# The caller defines $logs (the folder of the logs), $jobs (tests at once) and the function
# record SUITE STATE PASSED FAILED SKIPPED SECONDS.
#
# A test that fails is run once more, alone (ctest --rerun-failed, pytest --last-failed): one that then
# passes counts as passed and is added to the array `flaky`; one that fails again counts as failed. Every
# test that failed in the end is added to the array `failures`. Both hold "SUITE: TEST" lines, which
# test.sh's summary prints. (The machines that run the suites have 2 cores shared with other work, and
# some tests wait on real signals, deadlines and processes; it takes a second failure to fail a suite.)
# A sanitizer's report (ctest prints a failed test's output) is a finding, never noise: a suite with one
# runs nothing a second time.
flaky=() failures=()
sanitizer_report='WARNING: ThreadSanitizer:|ERROR: (AddressSanitizer|LeakSanitizer):|: runtime error: '

# ctest_counts LOG -> "passed failed skipped" from ctest's output
ctest_counts() {
  local line total fail skip
  line=$(grep -E '^[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$1" | tail -n 1)
  if [ -z "$line" ]; then
    # "No tests were found" or ctest did not get that far
    echo "0 1 0"
    return
  fi
  fail=$(sed -E 's/.* ([0-9]+) tests? failed out of.*/\1/' <<<"$line")
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
  # a skipped test shows as "***Skipped" (and again in the "(Skipped)" list at the end)
  skip=$(grep -cE '\*\*\*Skipped' "$1")
  echo "$((total - fail - skip)) $fail $skip"
}

# failed_ctests LOG -> the names in ctest's list of failed tests, one a line
failed_ctests() {
  sed -n '/^The following tests FAILED:/,/^$/p' "$1" | sed -nE 's/^[[:space:]]*[0-9]+ - (.*) \([^()]*\)$/\1/p'
}

# pytest_failed LOG -> the tests that pytest's summary lines name as failed (FAILED) or in error (ERROR)
pytest_failed() { grep -E '^(FAILED|ERROR) ' "$1" | sed -E 's/^(FAILED|ERROR) ([^ ]+).*/\2/'; }

# pytest_counts LOG -> "passed failed skipped" from pytest's last line of counts
pytest_counts() {
  local last
  last=$(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$1" | tail -n 1)
  _n() { grep -oE "[0-9]+ $1\b" <<<"$last" | grep -oE '^[0-9]+' || echo 0; }
  echo "$(_n passed) $(($(_n failed) + $(_n error) + $(_n errors))) $(_n skipped)"
}

# note SUITE ARRAY NAMES...: adds "SUITE: NAME" to the array ARRAY (flaky or failures) for each name
note() {
  local suite=$1 arr=$2 n
  shift 2
  for n in "$@"; do [ -n "$n" ] && eval "$arr+=(\"\$suite: \$n\")"; done
  return 0
}

# ctest_twice SUITE DIR LOG [ctest arguments...]: ctest in DIR, then its failed tests once more; appends
# the output to LOG, adds to flaky and failures, and sets p f s (passed, failed, skipped). $ctest_jobs
# tests at once the first time (default: $jobs).
ctest_twice() {
  local suite=$1 dir=$2 log=$3 rc=0 got
  shift 3
  local first=$logs/.$suite.ctest1.log again=$logs/.$suite.ctest2.log p2 f2 s2
  (cd "$dir" && ctest --output-on-failure -j"${ctest_jobs:-$jobs}" --timeout 300 "$@") 2>&1 | tee "$first" || rc=$?
  cat "$first" >>"$log"
  read -r p f s <<<"$(ctest_counts "$first")"
  [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1  # ctest failed without a failed test (e.g. a crash of ctest)
  local last=$first
  if [ "$f" -gt 0 ] && grep -qE "$sanitizer_report" "$first"; then
    echo "-- $suite: a sanitizer reported an error (above): a finding, whatever a second run would do; no second run"
  elif [ "$f" -gt 0 ] && [ -n "$(failed_ctests "$first")" ]; then
    echo "-- $suite: the failed tests once more, one at a time"
    rc=0
    (cd "$dir" && ctest --output-on-failure --rerun-failed --timeout 300) 2>&1 | tee "$again" || rc=$?
    cat "$again" >>"$log"
    read -r p2 f2 s2 <<<"$(ctest_counts "$again")"
    [ "$rc" -ne 0 ] && [ "$f2" -eq 0 ] && f2=1
    mapfile -t got < <(comm -23 <(failed_ctests "$first" | sort) <(failed_ctests "$again" | sort))
    note "$suite" flaky "${got[@]}"
    p=$((p + p2)) f=$f2 s=$((s + s2)) last=$again
  fi
  mapfile -t got < <(failed_ctests "$last")
  note "$suite" failures "${got[@]}"
}

# run_ctest SUITE DIR START [ctest arguments...]: ctest_twice into $logs/SUITE.log, then records the suite.
run_ctest() {
  local suite=$1 dir=$2 start=$3 p f s
  shift 3
  ctest_twice "$suite" "$dir" "$logs/$suite.log" "$@"
  record "$suite" "$([ "$f" -eq 0 ] && echo passed || echo failed)" "$p" "$f" "$s" $((SECONDS - start))
}

# pytest_twice SUITE PYTHON LOG [pytest arguments...]: pytest, then its failed tests once more
# (--last-failed: pytest's cache must be on); appends the output to LOG, adds to flaky and failures, and
# sets p f s.
pytest_twice() {
  local suite=$1 py=$2 log=$3 rc got
  shift 3
  local first=$logs/.$suite.pytest1.log again=$logs/.$suite.pytest2.log p2 f2 s2
  COLUMNS=250 "$py" -m pytest -q -rfE "$@" 2>&1 | tee "$first"
  rc=${PIPESTATUS[0]}
  cat "$first" >>"$log"
  read -r p f s <<<"$(pytest_counts "$first")"
  local last=$first
  if [ "$rc" -eq 1 ]; then  # 1: some tests failed (2-5: interrupted, usage error, internal error, none collected)
    echo "-- $suite: the failed tests once more (pytest --last-failed)"
    COLUMNS=250 "$py" -m pytest -q -rfE --last-failed "$@" 2>&1 | tee "$again"
    rc=${PIPESTATUS[0]}
    cat "$again" >>"$log"
    read -r p2 f2 s2 <<<"$(pytest_counts "$again")"
    mapfile -t got < <(comm -23 <(pytest_failed "$first" | sort) <(pytest_failed "$again" | sort))
    note "$suite" flaky "${got[@]}"
    p=$((p + p2)) f=$f2 s=$((s + s2)) last=$again
  fi
  [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
  mapfile -t got < <(pytest_failed "$last")
  note "$suite" failures "${got[@]}"
}
