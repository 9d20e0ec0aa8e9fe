#!/usr/bin/env bash
# The MPI transports across 2 network-namespace hosts whose links are shaped (scripts/shaped-links.sh,
# 1 Gbit/s each way): the shaping is real (raw TCP across the link gets no more than the rate, with
# room for tbf's burst), fullmesh and hierarchy over make_mpi_group and make_hybrid_group still match
# their references bit for bit and their cross-host bytes in and out agree (test_mpi MpiBytes.* and
# MpiRounds.*, 2 x 2 ranks), and given the moedist program, `moedist bench --link-gbit` across the hosts
# combines to the same bits as the MPI_Alltoallv pipeline and reports the link floor. Checks results,
# never how fast they came. The hosts are removed afterwards whatever happens.
#   usage: scripts/shaped-test.sh TEST_MPI [MOEDIST]      (as root; MPIRUN=path overrides `mpirun`)
# Exits 77 (ctest: skipped) with the reason when namespaces or tc shaping cannot be made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mpirun=${MPIRUN:-mpirun}
step_s=${MOEDIST_NETNS_STEP_S:-60}

# on_hosts STARTED_REGEX CMD...: runs CMD; if it failed before its output matched STARTED_REGEX (Open
# MPI's daemons now and then fail to start in the namespaces, see netns-test.sh), runs it again, up to 3 times.
on_hosts() {
  local started=$1 attempt rc log="$MOEDIST_NETNS_DIR/step.log"
  shift
  for attempt in 1 2 3; do
    rc=0
    "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    [ $rc -ne 0 ] || return 0
    grep -Eq "$started" "$log" && return $rc
    echo "== the program never started (attempt $attempt): Open MPI's launch failed; again"
    while read -r kind name; do
      [ "$kind" = ns ] && ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    done <"$MOEDIST_NETNS_DIR/state"
  done
  return $rc
}

if [ "${1:-}" = "--inner" ]; then
  test_mpi=$2
  cli=${3:-}
  dir=$MOEDIST_NETNS_DIR
  if ! out=$(bash "$here/shaped-links.sh" set "$dir" 1gbit 2>&1); then
    echo "skipped: the host links cannot be shaped here: $out"
    exit 77
  fi
  echo "$out"
  probe=$(bash "$here/shaped-links.sh" measure "$dir" 24)
  echo "$probe"
  gbit=$(sed -n 's/.*at the receiver: \([0-9.]*\) Gbit\/s.*/\1/p' <<<"$probe")
  [ -n "$gbit" ] || { echo "FAILED: no throughput in the probe's output"; exit 1; }
  # tbf lets at most its 256 KiB burst through above the rate: 24 MiB can not arrive faster than 1.02 Gbit/s.
  if awk -v g="$gbit" 'BEGIN { exit !(g > 1.1) }'; then
    echo "FAILED: $gbit Gbit/s crossed a link shaped to 1 Gbit/s: the shaping is not in the path"
    exit 1
  fi
  mapfile -t hostargs <"$dir/mpirun-args"
  base=("$mpirun" --allow-run-as-root --oversubscribe --bind-to none --report-state-on-timeout "${hostargs[@]}" --timeout "$step_s")
  echo "== test_mpi on 2 shaped hosts x 2 ranks"
  on_hosts '^\[==========\] Running' "${base[@]}" -np 4 -x MOEDIST_TEST_DETECT_HOSTS=1 "$test_mpi" --gtest_color=no \
    --gtest_filter='MpiBytes.*:MpiRounds.*'
  if [ -n "$cli" ]; then
    echo "== moedist bench on 2 shaped hosts x 2 ranks (hybrid; fullmesh and hierarchy; --link-gbit 1)"
    on_hosts '^moedist bench: mpirun' timeout -k 5 "$step_s" "$cli" bench --transport hybrid --comm-alg fullmesh,hierarchy \
      --ranks 4 --tokens 16 --hidden 2048 --experts 16 --topk 8 --quant 0 --iters 3 --warmup 1 --link-gbit 1 \
      --out "$dir/bench" --mpirun-args "$(tr '\n' ' ' <"$dir/mpirun-args")"
    rows=$(grep -c '"comm_alg"' "$dir/bench/bench.json" || true)
    floors=$(grep -o '"link_floor_us":[0-9.]*' "$dir/bench/bench.json" | grep -vc ':0.00$' || true)
    identical=$(grep -c '"outputs_vs_baseline":"bit-identical"' "$dir/bench/bench.json" || true)
    echo "== bench.json: $rows rows, $floors link floors > 0, $identical fullmesh rows bit-identical to the baseline"
    [ "$rows" -eq 2 ] && [ "$floors" -eq 4 ] && [ "$identical" -eq 1 ] || { echo "FAILED: wanted 2 rows, 4 floors, 1 bit-identical"; exit 1; }
  fi
  exit 0
fi

[ $# -ge 1 ] || { echo "usage: $0 TEST_MPI [MOEDIST]" >&2; exit 2; }
if ! reason=$(bash "$here/netns-hosts.sh" check 2>&1); then
  echo "skipped: separate hosts cannot be made here: $reason"
  exit 77
fi
command -v "$mpirun" >/dev/null || { echo "skipped: no $mpirun (apt-get install openmpi-bin)"; exit 77; }
command -v tc >/dev/null || { echo "skipped: no tc (apt-get install iproute2)"; exit 77; }
command -v python3 >/dev/null || { echo "skipped: no python3 (the link probe needs it)"; exit 77; }
MOEDIST_NETNS_SLOTS=2 exec bash "$here/netns-hosts.sh" run 2 bash "$here/shaped-test.sh" --inner "$@"
