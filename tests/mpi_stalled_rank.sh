#!/usr/bin/env bash
# An MPI job whose last ranks stop themselves (SIGSTOP) must end on its own: the running ranks get a
# Timeout naming the stopped ranks, and MPI_Finalize, which can never complete, must not hang:
# moedist ends the job with MPI_Abort. Checks: mpirun returned (well before the deadline below),
# with a non-zero status, every running rank printed "CHECK rank r: ok", and the abort was explained.
# Whatever is left (the stopped ranks, if mpirun did not kill them) is killed at the end.
#   mpi_stalled_rank.sh <mpirun and its options...> -- <program> <world|own> <stopped ranks> <ranks>
set -u
mpirun=()
while [ "$1" != "--" ]; do mpirun+=("$1"); shift; done
shift
prog=$1 mode=$2 nstop=$3 np=$4
deadline=60
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s%N)
timeout -s KILL "$deadline" "${mpirun[@]}" -np "$np" "$prog" "$mode" "$nstop" >"$out" 2>&1
rc=$?
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
elapsed="$((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000)))"
# Nothing may linger: a rank process still running (or stopped) 2 s after mpirun returned is killed.
alive() {  # running or stopped, not a zombie
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}
pids=$(awk '/^pid [0-9]+ [0-9]+$/ {print $3}' "$out")
for ((i = 0; i < 20; ++i)); do
  left=""
  for pid in $pids; do alive "$pid" && left="$left $pid"; done
  [ -z "$left" ] && break
  sleep 0.1
done
for pid in $left; do
  echo "rank process $pid still there 2 s after mpirun returned: killed"
  kill -CONT "$pid" 2>/dev/null
  kill -KILL "$pid" 2>/dev/null
done
cat "$out"
echo "mpirun ended after ${elapsed} s with status $rc"
fail=0
if [ "$rc" = 137 ]; then echo "FAIL: mpirun did not end within ${deadline} s (MPI_Finalize hung)"; fail=1; fi
if [ "$rc" = 0 ]; then echo "FAIL: mpirun returned 0 although ranks were stopped"; fail=1; fi
for ((r = 0; r < np - nstop; ++r)); do
  grep -q "^CHECK rank $r: ok$" "$out" || { echo "FAIL: rank $r did not report a Timeout naming the stopped ranks"; fail=1; }
done
grep -q "FAIL" "$out" && fail=1
grep -q "ending the job with MPI_Abort" "$out" || { echo "FAIL: no explanation of the abort in the output"; fail=1; }
[ "$fail" = 0 ] && echo "PASS: the job ended after ${elapsed} s"
exit "$fail"
