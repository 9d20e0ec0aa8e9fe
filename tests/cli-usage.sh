#!/usr/bin/env bash
# `moedist` as a user calls it for help and with a mistake: help goes to stdout with exit code 0, a
# usage error to stderr with exit code 2, naming the bad value.  usage: cli-usage.sh PATH/TO/moedist
set -uo pipefail
moedist=$1
fail() { echo "FAIL: $*" >&2; exit 1; }
for cmd in "--help" "help" "help demo" "help bench" "help launch" "demo --help" "bench --help" "launch --help" "help --help"; do
  # shellcheck disable=SC2086
  out=$("$moedist" $cmd 2>/tmp/cli-usage-err.$$) || fail "moedist $cmd exited with $?"
  err=$(cat /tmp/cli-usage-err.$$)
  grep -q "usage: moedist" <<<"$out" || fail "moedist $cmd: no usage on stdout (stdout: '$out')"
  [ -z "$err" ] || fail "moedist $cmd wrote to stderr: $err"
done
rm -f /tmp/cli-usage-err.$$
expect_usage_error() {  # expected-text args...
  local want=$1 out err rc
  shift
  out=$("$moedist" "$@" 2>/tmp/cli-usage-err.$$); rc=$?
  err=$(cat /tmp/cli-usage-err.$$); rm -f /tmp/cli-usage-err.$$
  [ "$rc" -eq 2 ] || fail "moedist $*: exit code $rc (expected 2)"
  [ -z "$out" ] || fail "moedist $*: wrote to stdout: $out"
  grep -qF -- "$want" <<<"$err" || fail "moedist $*: stderr lacks '$want': $err"
}
expect_usage_error "-n x is not a positive integer" launch -n x -- true
expect_usage_error "-n 0 is not a positive integer" launch -n 0 -- true
expect_usage_error "--timeout soon is not a number of seconds" launch -n 2 --timeout soon -- true
expect_usage_error "-n needs a value" launch -n
expect_usage_error "unknown command 'frobnicate'" frobnicate
expect_usage_error "--ranks expects an integer, got 'x'" demo --ranks x
expect_usage_error "--slow-us N needs N >= 0 and --slow-rank R with R >= 0 (got --slow-rank -1 --slow-us 5)" bench --waits --slow-us 5
expect_usage_error "--kill 9@dispatch: rank 9 is out of range (must be in [0, 4)" demo --ranks 4 --kill 9@dispatch
expect_usage_error "--kill 1@gating: unknown phase 'gating' (must be dispatch or combine)" demo --kill 1@gating
expect_usage_error "--kill '3' must be RANK@PHASE" demo --kill 3
expect_usage_error "--stop 1@combine needs rank processes: threads of one process cannot be killed or stopped one by one" demo --threads --stop 1@combine
expect_usage_error "--kill-round 7 is past the last round (--rounds 6)" demo --kill 1@dispatch --kill-round 7
expect_usage_error "--kill-round 2 needs --kill or --stop" demo --kill-round 2
expect_usage_error "--expect-signal x is not RANK:SIGNAL" launch --expect-signal x -n 2 -- true
echo "cli usage: PASS"
