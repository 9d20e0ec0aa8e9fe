#!/usr/bin/env bash
# The MPI tests across separate hosts made on this machine: 3 network namespaces joined by a bridge
# (scripts/netns-hosts.sh), 2 ranks on each, Open MPI over TCP between them (its shared-memory BTL is
# left out: it fails between namespaces). Runs the conformance suite over make_mpi_group and
# make_hybrid_group (shared memory inside a host, TCP across), the error tests and the bytes-across-
# hosts test with the hosts detected, not configured; then, given the moedist program, its demo and bench
# across the hosts. The hosts are removed afterwards whatever happens.
#   usage: scripts/netns-test.sh TEST_MPI [MOEDIST]     (as root; MPIRUN=path overrides `mpirun`)
# Exits 77 (ctest: skipped) with the reason when namespaces cannot be made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mpirun=${MPIRUN:-mpirun}

# Every mpirun has a deadline (MOEDIST_NETNS_STEP_S, default 120 s for test_mpi, which takes about 40 s,
# and 60 s for the demo and bench steps, which take a few seconds; the ctest allows 900 s): Open MPI
# aborts the job when it passes and reports its processes' state, so a hang fails the test with a
# diagnosis instead of being killed from outside (which would also skip removing the hosts).
# Starting Open MPI's daemons in the namespaces now and then stalls (one daemon never reports back;
# seen about once in ten launches on this kind of machine): the hosts' mpirun options include
# orte_startup_timeout, and a step whose program never started (its first output line is missing) is
# launched again, up to 3 times, saying so. A step that started and then failed is not repeated.
step_s=${MOEDIST_NETNS_STEP_S:-120}
short_s=${MOEDIST_NETNS_STEP_S:-60}

# on_hosts LABEL STARTED_REGEX CMD...: runs CMD; on failure says which step failed and what was left
# running, and runs it again if its output never matched STARTED_REGEX.
on_hosts() {
  local label=$1 started=$2; shift 2
  local attempt rc log="$MOEDIST_NETNS_DIR/step.log"
  for attempt in 1 2 3; do
    local start=$SECONDS
    rc=0
    "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    echo "== $label: exit $rc after $((SECONDS - start)) s (attempt $attempt)"
    [ $rc -ne 0 ] || return 0
    echo "== processes in the host namespaces:"
    while read -r kind name; do
      [ "$kind" = ns ] || continue
      echo "-- $name: $(ip netns pids "$name" 2>/dev/null | xargs -r ps -o pid=,stat=,etime=,args= -p 2>/dev/null | tr '\n' ';')"
    done <"$MOEDIST_NETNS_DIR/state"
    if grep -Eq "$started" "$log"; then
      return $rc
    fi
    echo "== $label: the program never started (no line matching '$started'): Open MPI's launch failed; again"
    # what a stalled launch left behind in the namespaces
    while read -r kind name; do
      [ "$kind" = ns ] && ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done <"$MOEDIST_NETNS_DIR/state"
  done
  return $rc
}

if [ "${1:-}" = "--inner" ]; then
  shift
  test_mpi=$1
  cli=${2:-}
  mapfile -t hostargs <"$MOEDIST_NETNS_DIR/mpirun-args"
  base=("$mpirun" --allow-run-as-root --oversubscribe --bind-to none --report-state-on-timeout "${hostargs[@]}")
  run=("${base[@]}" --timeout "$step_s")
  echo "== hosts: $(tr '\n' ' ' <"$MOEDIST_NETNS_DIR/hostfile")"
  echo "== test_mpi on 3 hosts x 2 ranks: ${run[*]} -np 6 ..."
  on_hosts "test_mpi" '^\[==========\] Running' "${run[@]}" -np 6 -x MOEDIST_TEST_DETECT_HOSTS=1 "$test_mpi" --gtest_color=no
  if [ -n "$cli" ]; then
    echo "== moedist demo on 3 hosts x 2 ranks (hybrid: shared memory inside a host, TCP between hosts)"
    on_hosts "demo hybrid" '^moedist demo \(' "${base[@]}" --timeout "$short_s" -np 6 "$cli" demo --transport hybrid --ranks 6 --experts 12 --tokens 32
    echo "== moedist bench on 2 hosts x 2 ranks (mpi and hybrid; fullmesh and hierarchy)"
    for transport in mpi hybrid; do
      on_hosts "bench $transport" '^\| ranks' timeout -k 5 "$short_s" "$cli" bench --transport "$transport" --comm-alg fullmesh,hierarchy --ranks 4 \
        --tokens 16 --hidden 512 --experts 16 --topk 4 --quant 0 --iters 5 --warmup 1 --out "$MOEDIST_NETNS_DIR/bench-$transport" \
        --mpirun-args "$(tr '\n' ' ' <"$MOEDIST_NETNS_DIR/mpirun-args")"
    done
  fi
  exit 0
fi

[ $# -ge 1 ] || { echo "usage: $0 TEST_MPI [MOEDIST]" >&2; exit 2; }
if ! reason=$(bash "$here/netns-hosts.sh" check 2>&1); then
  echo "skipped: separate hosts cannot be made here: $reason"
  exit 77
fi
command -v "$mpirun" >/dev/null || { echo "skipped: no $mpirun (apt-get install openmpi-bin)"; exit 77; }
exec bash "$here/netns-hosts.sh" run 3 bash "$here/netns-test.sh" --inner "$@"
