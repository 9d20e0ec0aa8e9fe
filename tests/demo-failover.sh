#!/usr/bin/env bash
# `moedist demo --kill / --stop` as a user runs it: exit code 0, the failover line, PASS as the last line.
# usage: demo-failover.sh 'EXPECTED LINE (extended regex)' PATH/TO/moedist demo ARGS...
set -uo pipefail
want=$1
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$rc" -eq 0 ] || fail "$* exited with $rc (expected 0)"
grep -qE -- "^$want\$" <<<"$out" || fail "no line matching '$want'"
[ "$(tail -n 1 <<<"$out")" = "moedist demo: PASS" ] || fail "the last line is not 'moedist demo: PASS'"
echo "demo failover: PASS"
