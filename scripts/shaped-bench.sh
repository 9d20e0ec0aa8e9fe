#!/usr/bin/env bash
# moedist bench across 2 network-namespace hosts x 4 ranks whose links are shaped like a real network's
# (scripts/shaped-links.sh): for each link rate, the raw TCP throughput across the link, then
# `moedist bench --transport hybrid --comm-alg fullmesh,hierarchy` (shared memory inside a host, MPI over
# TCP between hosts) beside the MPI_Alltoallv pipeline, with --link-gbit so that every row carries the
# bytes on the busiest host link and the link floor. Ends with the table and plot of
# scripts/plot-shaped.py (OUT/shaped.md, OUT/shaped.svg).
#
#   usage: scripts/shaped-bench.sh MOEDIST OUT        (as root; the hosts are removed afterwards)
#   env:   RATES   link rates, tc syntax or "off" (default "off 25gbit 10gbit")
#          TOKENS  tokens per rank (default 8,128); HIDDEN 7168, EXPERTS 64, TOPK 8 (bf16, quant 0)
#          ITERS   timed rounds per configuration (default 10, after 2 warm-up rounds)
#          PROBE_MB  megabytes of the raw throughput probes (default 256; one direction, then both at once)
#          MPI_EXTRA more mpirun options (e.g. "--mca btl_tcp_links 2")
#          TRANSPORT the bench's --transport between hosts (default hybrid; ucx: UCX instead of MPI)
#          COMM_ALG  the bench's --comm-alg (default fullmesh,hierarchy)
#          COMM_QUANT  the bench's --comm-quant (default 0; 0,2: combine with and without int8)
# Exits 77 when namespaces cannot be made here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" = "--inner" ]; then
  cli=$2 out=$3
  dir=$MOEDIST_NETNS_DIR
  mpiargs="$(tr '\n' ' ' <"$dir/mpirun-args") ${MPI_EXTRA:-}"
  for rate in ${RATES:-off 25gbit 10gbit}; do
    name=${rate}
    gbit=""
    case "$rate" in
      off) ;;
      *gbit) gbit=${rate%gbit} ;;
      *mbit) gbit=$(awk -v m="${rate%mbit}" 'BEGIN { print m / 1000 }') ;;
      *) echo "shaped-bench: give rates in gbit or mbit (or off), got '$rate'" >&2; exit 2 ;;
    esac
    mkdir -p "$out/$name"
    bash "$here/shaped-links.sh" set "$dir" "$rate" | tee "$out/$name/links.txt"
    { echo "uptime before: $(uptime)"
      echo "one direction:"; bash "$here/shaped-links.sh" measure "$dir" "${PROBE_MB:-256}"
      echo "both directions at once:"; bash "$here/shaped-links.sh" measure "$dir" "${PROBE_MB:-256}" both; } | tee -a "$out/$name/links.txt"
    args=(bench --transport "${TRANSPORT:-hybrid}" --comm-alg "${COMM_ALG:-fullmesh,hierarchy}" --ranks 8 --tokens "${TOKENS:-8,128}"
          --hidden "${HIDDEN:-7168}" --experts "${EXPERTS:-64}" --topk "${TOPK:-8}" --quant 0 --comm-quant "${COMM_QUANT:-0}"
          --iters "${ITERS:-10}" --warmup 2
          --out "$out/$name" --mpirun-args "$mpiargs")
    [ -z "$gbit" ] || args+=(--link-gbit "$gbit")
    echo "== $rate: $cli ${args[*]}"
    ok=0
    # Open MPI's daemons now and then fail to start in the namespaces (see netns-test.sh): up to 3 tries.
    for attempt in 1 2 3; do
      rm -f "$out/$name/bench.json"
      if timeout -k 5 600 "$cli" "${args[@]}" >"$out/$name/bench.log" 2>&1 && [ -s "$out/$name/bench.json" ]; then ok=1; break; fi
      echo "== $rate: attempt $attempt failed:"; tail -5 "$out/$name/bench.log"
    done
    [ $ok -eq 1 ] || { echo "shaped-bench: the bench at $rate failed 3 times" >&2; exit 1; }
    echo "uptime after: $(uptime)" | tee -a "$out/$name/links.txt"
    bash "$here/shaped-links.sh" show "$dir" >"$out/$name/qdisc-counters.txt"
    grep -E '^\|' "$out/$name/bench.md" | head -20 || true
  done
  exit 0
fi

[ $# -eq 2 ] || { echo "usage: $0 MOEDIST OUT" >&2; exit 2; }
if ! reason=$(bash "$here/netns-hosts.sh" check 2>&1); then
  echo "skipped: separate hosts cannot be made here: $reason"
  exit 77
fi
cli=$(realpath "$1")
mkdir -p "$2"
out=$(realpath "$2")
MOEDIST_NETNS_SLOTS=4 bash "$here/netns-hosts.sh" run 2 bash "$here/shaped-bench.sh" --inner "$cli" "$out"
python3 "$here/plot-shaped.py" "$out"
