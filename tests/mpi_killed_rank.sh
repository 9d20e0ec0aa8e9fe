#!/usr/bin/env bash
# An MPI job one of whose ranks dies (SIGKILL) must end promptly with the rank named, never hang: Open MPI
# as Debian ships it has no fault-tolerant communicators, so the job cannot continue without the rank
# (docs/design.md, "Failover"). Checks: mpirun ends within the deadline with a non-zero status, its
# output names the dead rank, and every rank saw recover_group refuse (Unsupported) beforehand.
#   mpi_killed_rank.sh <mpirun and its options...> -- <mpi_stalled_rank program> <ranks>
set -u
mpirun=()
while [ "$1" != "--" ]; do mpirun+=("$1"); shift; done
shift
prog=$1 np=$2
deadline_s=45
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s%N)
timeout -s KILL "$deadline_s" "${mpirun[@]}" -np "$np" "$prog" killed 1 >"$out" 2>&1
rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
cat "$out"
echo "mpirun ended after $((ms / 1000)).$(printf %03d $((ms % 1000))) s with status $rc"
fail=0
victim=$((np - 1))
[ "$ms" -ge $((deadline_s * 1000)) ] && { echo "FAIL: the job was still running after ${deadline_s} s"; fail=1; }
[ "$rc" = 0 ] && { echo "FAIL: mpirun returned 0 although rank $victim died"; fail=1; }
grep -Eiq "rank $victim .*(signal 9|killed)|process rank $victim" "$out" || { echo "FAIL: the output does not name rank $victim as dead"; fail=1; }
for ((r = 0; r < np; ++r)); do
  grep -q "^CHECK rank $r: ok" "$out" || { echo "FAIL: rank $r did not see recover_group refuse"; fail=1; }
done
grep -q "FAIL" "$out" && fail=1
[ "$fail" = 0 ] && echo "PASS"
exit "$fail"
