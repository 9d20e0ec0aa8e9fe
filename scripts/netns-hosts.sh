#!/usr/bin/env bash
# Separate "hosts" on this machine for multi-host tests: network namespaces joined by veth pairs to a
# bridge in the root namespace, each with its own address in 198.18.0.0/15 (the range reserved for
# network benchmarks, RFC 2544). Open MPI reaches them through an rsh agent that runs the command inside
# the host's network namespace (nsenter --net; `ip netns exec` where nsenter is missing), so ranks on
# different hosts talk TCP for real.
#
#   scripts/netns-hosts.sh up N DIR     create N hosts; DIR receives:
#                                         hostfile  (one line per host: "<address> slots=<SLOTS>")
#                                         rsh-agent (plm_rsh_agent: runs the command in the host's network namespace)
#                                         mpirun-args (the options that make mpirun use them, one per line)
#                                         state     (what to remove)
#   scripts/netns-hosts.sh down DIR     remove everything `up` created (idempotent)
#   scripts/netns-hosts.sh run N CMD... up, run CMD with MOEDIST_NETNS_DIR=DIR set, then down (always,
#                                       on success, failure or interrupt); exits with CMD's status
#   scripts/netns-hosts.sh check        exit 0 if namespaces can be made here (as root), else say why
# SLOTS (ranks per host) defaults to 2 (env MOEDIST_NETNS_SLOTS). Needs root and iproute2.
set -euo pipefail

die() { echo "netns-hosts: $*" >&2; exit 1; }

check() {
  [ "$(id -u)" -eq 0 ] || { echo "netns-hosts: needs root (ip netns)"; return 1; }
  command -v ip >/dev/null || { echo "netns-hosts: no 'ip' command (apt-get install iproute2)"; return 1; }
  local probe="mdprobe$$"
  if ! ip netns add "$probe" 2>/dev/null; then echo "netns-hosts: 'ip netns add' is not permitted here"; return 1; fi
  ip netns del "$probe" 2>/dev/null || true
  if ! ip link add "mdpb$$" type bridge 2>/dev/null; then echo "netns-hosts: cannot create a bridge here"; return 1; fi
  ip link del "mdpb$$" 2>/dev/null || true
  return 0
}

# reach NS ADDR: a TCP connection from namespace NS to ADDR port 9 is accepted or refused (not lost).
reach() {
  local out
  out=$(timeout 5 ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  grep -qi refused <<<"$out"
}

down() {
  local dir=$1
  [ -f "$dir/state" ] || { rm -rf "$dir"; return 0; }
  # state: "ns NAME" and "link NAME" lines; remove namespaces first (their veth ends go with them).
  while read -r kind name; do
    [ "$kind" = ns ] && ip netns del "$name" 2>/dev/null || true
  done <"$dir/state"
  while read -r kind name; do
    [ "$kind" = link ] && ip link del "$name" 2>/dev/null || true
  done <"$dir/state"
  rm -rf "$dir"
}

# Hosts of an earlier `run` whose process is gone (killed with SIGKILL, e.g. by a test timeout, so its
# EXIT trap never ran) are removed before new ones are made.
reap_stale() {
  local d pid
  for d in /tmp/moedist-netns.*; do
    [ -f "$d/owner" ] || continue
    pid=$(cat "$d/owner")
    if [[ "$pid" =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null; then
      echo "netns-hosts: removing the hosts of an earlier run that was killed ($d, pid $pid)" >&2
      down "$d"
    fi
  done
}

up() {
  local n=$1 dir=$2 slots=${MOEDIST_NETNS_SLOTS:-2}
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be in [1, 200], got '$n'"
  check >&2 || exit 1
  reap_stale
  mkdir -p "$dir"
  : >"$dir/state"
  # A /24 of 198.18.0.0/16 (inside 198.18.0.0/15) that no interface uses yet, chosen under a lock (parallel runs do not collide).
  exec 9>/tmp/moedist-netns.lock
  flock 9
  local used sub="" tag
  used=$(ip -4 -o addr show | awk '{print $4}')
  for k in $(seq 1 250); do
    if ! grep -q "^198\.18\.$k\." <<<"$used"; then sub=$k; break; fi
  done
  [ -n "$sub" ] || die "no free /24 in 198.18.0.0/16"
  tag="md${sub}"                 # interface names stay under 15 characters
  local br="${tag}br"
  ip link add "$br" type bridge
  echo "link $br" >>"$dir/state"
  ip addr add "198.18.$sub.1/24" dev "$br"
  ip link set "$br" up
  flock -u 9
  exec 9>&-
  : >"$dir/hostfile"
  {
    echo '#!/bin/sh'
    echo '# plm_rsh_agent for netns hosts: "rsh-agent [-x] HOST COMMAND..." runs COMMAND in HOST'"'"'s namespace.'
    echo 'while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done'
    echo 'host=$1; shift'
    echo 'case "$host" in'
  } >"$dir/rsh-agent"
  for i in $(seq 1 "$n"); do
    local ns="${tag}h$i" addr="198.18.$sub.$((10 + i))"
    ip netns add "$ns"
    echo "ns $ns" >>"$dir/state"
    ip link add "${tag}v$i" type veth peer name "${tag}p$i"
    echo "link ${tag}v$i" >>"$dir/state"
    ip link set "${tag}p$i" netns "$ns"
    ip link set "${tag}v$i" master "$br"
    ip link set "${tag}v$i" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "${tag}p$i" name eth0
    ip netns exec "$ns" ip addr add "$addr/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    echo "$addr slots=$slots" >>"$dir/hostfile"
    echo "  $addr) ns=$ns ;;" >>"$dir/rsh-agent"
  done
  {
    echo '  *) echo "rsh-agent: unknown host $host" >&2; exit 255 ;;'
    echo 'esac'
    # nsenter joins only the network namespace; `ip netns exec` also makes a mount namespace and
    # remounts /sys for every command, and an Open MPI daemon started that way was seen stuck in the
    # kernel (state D) under load.
    echo 'if command -v nsenter >/dev/null 2>&1; then exec nsenter --net="/run/netns/$ns" /bin/sh -c "$*"; fi'
    echo 'exec ip netns exec "$ns" /bin/sh -c "$*"'
  } >>"$dir/rsh-agent"
  chmod +x "$dir/rsh-agent"
  local net="198.18.$sub.0/24"
  printf '%s\n' --hostfile "$dir/hostfile" --mca plm_rsh_agent "$dir/rsh-agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca btl tcp,self --mca btl_tcp_if_include "$net" --mca oob_tcp_if_include "$net" --mca orte_startup_timeout 30 >"$dir/mpirun-args"
  echo "$net" >"$dir/subnet"
  # Every host reaches the launcher at 198.18.$sub.1 (a refused connection proves the route).
  for i in $(seq 1 "$n"); do
    reach "${tag}h$i" "198.18.$sub.1" || die "host $i (namespace ${tag}h$i) cannot reach 198.18.$sub.1"
  done
}

cmd=${1:-}
case "$cmd" in
  check) check ;;
  up)
    [ $# -eq 3 ] || die "usage: $0 up N DIR"
    updir=$3
    trap 'rc=$?; [ $rc -eq 0 ] || down "$updir"' EXIT  # a failed `up` removes what it made
    up "$2" "$updir"
    ;;
  down) [ $# -eq 2 ] || die "usage: $0 down DIR"; down "$2" ;;
  run)
    [ $# -ge 3 ] || die "usage: $0 run N CMD..."
    n=$2; shift 2
    dir=$(mktemp -d /tmp/moedist-netns.XXXXXX)
    trap 'rc=$?; down "$dir"; exit $rc' EXIT
    trap 'exit 130' INT TERM
    echo $$ >"$dir/owner"
    up "$n" "$dir"
    set +e
    MOEDIST_NETNS_DIR=$dir "$@"
    rc=$?
    set -e
    exit $rc
    ;;
  *) die "usage: $0 up N DIR | down DIR | run N CMD... | check" ;;
esac
