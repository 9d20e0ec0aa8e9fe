#!/usr/bin/env bash
# An MPI job whose last ranks stop themselves (SIGSTOP) must end on its own: the running ranks get a
# Timeout naming the stopped ranks, and MPI_Finalize, which can never complete, must not keep them
# forever: moedist ends the job (MPI_Abort). Checks: every running rank printed "CHECK rank r: ok",
# its process ended within the deadline below, the abort was explained, and mpirun did not return 0.
# Open MPI's mpirun itself sometimes hangs or crashes while it tears down a job with stopped ranks
# (seen with a plain C program too): if it is still there 15 s after all its running ranks ended, it
# is killed and that is reported, not counted as a failure of moedist. Whatever is left at the end
# (stopped ranks, mpirun) is killed.
#   mpi_stalled_rank.sh <mpirun and its options...> -- <program> <world|own> <stopped ranks> <ranks>
set -u
mpirun=()
while [ "$1" != "--" ]; do mpirun+=("$1"); shift; done
shift
prog=$1 mode=$2 nstop=$3 np=$4
deadline_ms=45000
out=$(mktemp)
trap 'rm -f "$out"' EXIT
now_ms() { echo $(($(date +%s%N) / 1000000)); }
alive() {  # running or stopped, not a zombie
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}
pid_of() { awk -v r="$1" '$1 == "pid" && $2 == r {print $3}' "$out"; }

start=$(now_ms)
"${mpirun[@]}" -np "$np" "$prog" "$mode" "$nstop" >"$out" 2>&1 &
mp=$!
rc="" ranks_end="" note="" fail=0
while :; do
  t=$(($(now_ms) - start))
  if ! kill -0 "$mp" 2>/dev/null; then
    wait "$mp"
    rc=$?
    break
  fi
  if [ -z "$ranks_end" ]; then
    all=1
    for ((r = 0; r < np - nstop; ++r)); do
      p=$(pid_of "$r")
      if [ -z "$p" ] || alive "$p"; then all=0; fi
    done
    [ "$all" = 1 ] && ranks_end=$t
  fi
  if [ -n "$ranks_end" ] && [ $((t - ranks_end)) -gt 15000 ]; then
    note="note: mpirun was still there 15 s after all its running ranks ended (an Open MPI problem with stopped ranks): killed"
    kill -KILL "$mp" 2>/dev/null
    wait "$mp" 2>/dev/null
    break
  fi
  if [ "$t" -gt "$deadline_ms" ]; then
    echo "FAIL: running ranks still there after $((deadline_ms / 1000)) s (MPI_Finalize hangs)"
    fail=1
    kill -KILL "$mp" 2>/dev/null
    wait "$mp" 2>/dev/null
    break
  fi
  sleep 0.1
done
[ -z "$ranks_end" ] && ranks_end=$(($(now_ms) - start))
# Nothing may linger: rank processes still running or stopped are continued and killed.
for ((r = 0; r < np; ++r)); do
  p=$(pid_of "$r")
  if [ -n "$p" ] && alive "$p"; then
    echo "rank $r (pid $p) still there after mpirun: killed"
    kill -CONT "$p" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  fi
done
cat "$out"
echo "running ranks ended after $((ranks_end / 1000)).$(printf %03d $((ranks_end % 1000))) s; mpirun status: ${rc:-killed}"
[ -n "$note" ] && echo "$note"
if [ "$rc" = 0 ]; then echo "FAIL: mpirun returned 0 although ranks were stopped"; fail=1; fi
for ((r = 0; r < np - nstop; ++r)); do
  grep -q "^CHECK rank $r: ok$" "$out" || { echo "FAIL: rank $r did not report a Timeout naming the stopped ranks"; fail=1; }
done
grep -q "FAIL" "$out" && fail=1
grep -q "ending the job with MPI_Abort" "$out" || { echo "FAIL: no explanation of the abort in the output"; fail=1; }
[ "$fail" = 0 ] && echo "PASS"
exit "$fail"
