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

# Every mpirun has a deadline (MOEDIST_NETNS_STEP_S, default 150 s; the ctest allows 600 s): Open MPI
# aborts the job when it passes and reports its processes' state, so a hang fails the test with a
# diagnosis instead of being killed from outside (which would also skip removing the hosts).
step_s=${MOEDIST_NETNS_STEP_S:-150}

# on_hosts LABEL CMD...: runs CMD; on failure says which step failed and what was left running.
on_hosts() {
  local label=$1; shift
  local start=$SECONDS rc=0
  "$@" || rc=$?
  echo "== $label: exit $rc after $((SECONDS - start)) s"
  if [ $rc -ne 0 ]; then
    echo "== processes in the host namespaces:"
    while read -r kind name; do
      [ "$kind" = ns ] || continue
      echo "-- $name: $(ip netns pids "$name" 2>/dev/null | xargs -r ps -o pid=,stat=,etime=,args= -p 2>/dev/null | tr '\n' ';')"
    done <"$MOEDIST_NETNS_DIR/state"
  fi
  return $rc
}

if [ "${1:-}" = "--inner" ]; then
  shift
  test_mpi=$1
  cli=${2:-}
  mapfile -t hostargs <"$MOEDIST_NETNS_DIR/mpirun-args"
  run=("$mpirun" --allow-run-as-root --oversubscribe --bind-to none --timeout "$step_s" --report-state-on-timeout "${hostargs[@]}")
  echo "== hosts: $(tr '\n' ' ' <"$MOEDIST_NETNS_DIR/hostfile")"
  echo "== test_mpi on 3 hosts x 2 ranks: ${run[*]} -np 6 ..."
  on_hosts "test_mpi" "${run[@]}" -np 6 -x MOEDIST_TEST_DETECT_HOSTS=1 "$test_mpi" --gtest_color=no
  if [ -n "$cli" ]; then
    echo "== moedist demo on 3 hosts x 2 ranks (hybrid: shared memory inside a host, TCP between hosts)"
    on_hosts "demo hybrid" "${run[@]}" -np 6 "$cli" demo --transport hybrid --ranks 6 --experts 12 --tokens 32
    echo "== moedist bench on 2 hosts x 2 ranks (mpi and hybrid; fullmesh and hierarchy)"
    for transport in mpi hybrid; do
      on_hosts "bench $transport" timeout -k 5 "$step_s" "$cli" bench --transport "$transport" --comm-alg fullmesh,hierarchy --ranks 4 \
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
