#!/usr/bin/env bash
# Host links as slow as a real network's, for the hosts of scripts/netns-hosts.sh. Each host reaches the
# bridge (the "switch") through one veth pair; its link is limited in both directions by shaping the
# egress of both ends: the host's eth0 (what the host sends) and the bridge's port (what the bridge
# delivers to the host). Traffic between two hosts therefore crosses two shaped links, as between
# two servers behind a switch; a host's link is the bottleneck whatever the others send it.
#
#   scripts/shaped-links.sh set DIR RATE [DELAY]   RATE: a tc rate (10gbit, 25gbit, 800mbit) or "off";
#                                                   DELAY: one-way delay added on each end (e.g. 20us;
#                                                   needs the kernel's netem qdisc, which many containers
#                                                   lack: the command then fails and says so)
#   scripts/shaped-links.sh show DIR               the qdiscs and their counters (bytes, drops, overlimits)
#   scripts/shaped-links.sh measure DIR [MB] [both] raw TCP throughput host 1 -> host 2 (MB megabytes in one
#                                                   connection, default 512) and the TCP round trip
#                                                   (median of 200 one-byte ping-pongs); "both": host 2 ->
#                                                   host 1 at the same time too (both directions of the
#                                                   links busy, as in an all-to-all); needs python3
# DIR is the directory of `netns-hosts.sh up` (or $MOEDIST_NETNS_DIR inside `netns-hosts.sh run`).
# `set` also gives the bridge, the ports and the hosts' eth0 an MTU of MOEDIST_SHAPE_MTU bytes (default
# 9000, jumbo frames as data-centre networks use; 1500 is Ethernet's default): on this kind of machine
# TCP through a shaped 10 Gbit/s link then reaches about 9.4 Gbit/s where 1500-byte frames cost so
# much CPU per byte that it got 4.8-7.9.
# Without DELAY the shaper is tbf (a token bucket of BURST bytes, default 256kb: at least one 64 KiB
# GSO packet, so that tbf never has to split them; env MOEDIST_SHAPE_BURST). tbf counts the bytes of
# every frame as it would go on the wire (headers included), so TCP's own payload gets about 95 % of
# RATE with 1500-byte frames. Needs root and iproute2's tc.
set -euo pipefail

die() { echo "shaped-links: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)

# links DIR: "NS PORT" per host (its namespace and the bridge's end of its veth), from DIR/state.
links() {
  [ -f "$1/state" ] || die "no hosts in '$1' (expected the directory of netns-hosts.sh up)"
  local ns="" kind name
  while read -r kind name; do
    case "$kind" in
      ns) ns=$name ;;
      link) [ -n "$ns" ] && [[ "$name" == *v[0-9]* ]] && { echo "$ns $name"; ns=""; } ;;
    esac
  done <"$1/state"
}

set_links() {
  local dir=$1 rate=$2 delay=${3:-} burst=${MOEDIST_SHAPE_BURST:-256kb}
  command -v tc >/dev/null || die "no 'tc' command (apt-get install iproute2)"
  [[ "$rate" == off || "$rate" =~ ^[0-9]+(\.[0-9]+)?([kmgt]?bit)$ ]] || die "RATE must be a tc rate such as 10gbit or 'off', got '$rate'"
  [ -z "$delay" ] || [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?(us|ms)$ ]] || die "DELAY must look like 20us or 1ms, got '$delay'"
  local mtu=${MOEDIST_SHAPE_MTU:-9000}
  [[ "$mtu" =~ ^[0-9]+$ ]] && [ "$mtu" -ge 576 ] && [ "$mtu" -le 65535 ] || die "MOEDIST_SHAPE_MTU must be in [576, 65535], got '$mtu'"
  local qdisc
  if [ "$rate" = off ]; then
    qdisc=""
  elif [ -n "$delay" ]; then
    qdisc="netem delay $delay rate $rate limit 100000"
  else
    qdisc="tbf rate $rate burst $burst latency 20ms"
  fi
  local ns port n=0 bridge
  while read -r ns port; do
    n=$((n + 1))
    ip link set "$port" mtu "$mtu"
    ip netns exec "$ns" ip link set eth0 mtu "$mtu"
    if [ -z "$qdisc" ]; then
      ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
      tc qdisc del dev "$port" root 2>/dev/null || true
      continue
    fi
    local err
    # shellcheck disable=SC2086
    if ! err=$(ip netns exec "$ns" tc qdisc replace dev eth0 root $qdisc 2>&1) || ! err=$(tc qdisc replace dev "$port" root $qdisc 2>&1); then
      if [ -n "$delay" ] && grep -qi "unknown" <<<"$err"; then
        die "this kernel has no netem qdisc (sch_netem), so no delay can be added here: $err"
      fi
      die "tc qdisc replace ... $qdisc failed on host $n ($ns / $port): $err"
    fi
  done < <(links "$dir")
  [ "$n" -gt 0 ] || die "no host links found in $dir/state"
  bridge=$(awk '$1 == "link" && $2 ~ /br$/ {print $2; exit}' "$dir/state")
  [ -z "$bridge" ] || ip link set "$bridge" mtu "$mtu"
  echo "shaped-links: $n host links: ${qdisc:-unshaped} (both directions), MTU $mtu"
}

show() {
  local ns port
  while read -r ns port; do
    echo "== $ns eth0 (host -> bridge):"
    ip netns exec "$ns" tc -s qdisc show dev eth0
    echo "== $port (bridge -> host):"
    tc -s qdisc show dev "$port"
  done < <(links "$1")
}

# probe DIR FROM TO MB: one link-probe.py connection from host FROM to host TO (1-based).
probe() {
  local dir=$1 from=$2 to=$3 mb=$4 hosts=() ns=()
  mapfile -t hosts < <(awk '{print $1}' "$dir/hostfile")
  mapfile -t ns < <(links "$dir" | awk '{print $1}')
  local port=$((20000 + RANDOM % 20000)) ready
  ready=$(mktemp)
  ip netns exec "${ns[$((to - 1))]}" python3 "$here/link-probe.py" serve "${hosts[$((to - 1))]}" "$port" "$ready" &
  local server=$!
  for _ in $(seq 1 100); do [ -s "$ready" ] && break; sleep 0.05; done
  local rc=0
  ip netns exec "${ns[$((from - 1))]}" python3 "$here/link-probe.py" send "${hosts[$((to - 1))]}" "$port" "$mb" | sed "s/^/host $from -> $to: /" || rc=$?
  wait "$server" || rc=$?
  rm -f "$ready"
  return $rc
}

measure() {
  local dir=$1 mb=${2:-512} both=${3:-}
  [[ "$mb" =~ ^[0-9]+$ ]] && [ "$mb" -ge 1 ] || die "MB must be a positive integer, got '$mb'"
  [ -z "$both" ] || [ "$both" = both ] || die "the third argument of measure is 'both' or nothing, got '$both'"
  [ "$(wc -l <"$dir/hostfile")" -ge 2 ] || die "measure needs 2 hosts"
  if [ -z "$both" ]; then
    probe "$dir" 1 2 "$mb"
    return
  fi
  local rc=0 other
  probe "$dir" 2 1 "$mb" &
  other=$!
  probe "$dir" 1 2 "$mb" || rc=$?
  wait "$other" || rc=$?
  return $rc
}

cmd=${1:-}
if [ $# -ge 2 ] && [ ! -f "$2/state" ]; then die "no hosts in '$2' (expected the directory of netns-hosts.sh up)"; fi
case "$cmd" in
  set) [ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $0 set DIR RATE [DELAY]"; set_links "$2" "$3" "${4:-}" ;;
  show) [ $# -eq 2 ] || die "usage: $0 show DIR"; show "$2" ;;
  measure) [ $# -ge 2 ] && [ $# -le 4 ] || die "usage: $0 measure DIR [MB] [both]"; measure "$2" "${3:-512}" "${4:-}" ;;
  *) die "usage: $0 set DIR RATE [DELAY] | show DIR | measure DIR [MB] [both]" ;;
esac
