#!/usr/bin/env bash
# The MPI tests across separate hosts made on this machine: 3 network namespaces joined by a bridge
# (scripts/netns-hosts.sh), 2 ranks on each, Open MPI over TCP between them (its shared-memory BTL is
# left out: it fails between namespaces). Runs the conformance suite over make_mpi_group and
# make_hybrid_group (shared memory inside a host, TCP across), the error tests and the bytes-across-
# hosts test with the hosts detected, not configured; then, given the moedist program, its bench across
# the hosts. The hosts are removed afterwards whatever happens.
#   usage: scripts/netns-test.sh TEST_MPI [MOEDIST]     (as root; MPIRUN=path overrides `mpirun`)
# Exits 77 (ctest: skipped) with the reason when namespaces cannot be made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mpirun=${MPIRUN:-mpirun}

if [ "${1:-}" = "--inner" ]; then
  shift
  test_mpi=$1
  cli=${2:-}
  mapfile -t hostargs <"$MOEDIST_NETNS_DIR/mpirun-args"
  run=("$mpirun" --allow-run-as-root --oversubscribe --bind-to none "${hostargs[@]}")
  echo "== hosts: $(tr '\n' ' ' <"$MOEDIST_NETNS_DIR/hostfile")"
  echo "== test_mpi on 3 hosts x 2 ranks: ${run[*]} -np 6 ..."
  "${run[@]}" -np 6 -x MOEDIST_TEST_DETECT_HOSTS=1 "$test_mpi" --gtest_color=no
  if [ -n "$cli" ]; then
    echo "== moedist bench on 2 hosts x 2 ranks (mpi and hybrid; fullmesh and hierarchy)"
    for transport in mpi hybrid; do
      "$cli" bench --transport "$transport" --comm-alg fullmesh,hierarchy --ranks 4 --tokens 16 --hidden 512 --experts 16 \
        --topk 4 --quant 0 --iters 5 --warmup 1 --out "$MOEDIST_NETNS_DIR/bench-$transport" \
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
