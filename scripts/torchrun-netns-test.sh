#!/usr/bin/env bash
# The Python package across separate hosts under torchrun: NNODES "hosts" made of network namespaces on
# this machine (scripts/netns-hosts.sh), one `torchrun --nnodes NNODES --node_rank i --nproc_per_node
# NPROC_PER_NODE` in each, every rank running tests/python/multihost/run_torchrun.py (gloo process group,
# moedist.get_comm_name over the whole group, dispatch_v2 + combine_v2 checked bit for bit against the
# reference). Passes only if every torchrun exits 0 and every one of the NNODES x NPROC_PER_NODE ranks
# printed "ALL PASS". The hosts are removed afterwards whatever happens.
#   usage: scripts/torchrun-netns-test.sh NNODES NPROC_PER_NODE [PROGRAM OPTIONS...]   (as root)
#
# A host here is more than a network namespace (which already separates abstract Unix sockets, so
# moedist's shared-memory rendezvous cannot cross it): each torchrun also gets its own UTS namespace (host
# name = the namespace's name, e.g. md3h1), PID namespace (torchrun is its pid 1, pids repeat between
# hosts, /proc shows the host's processes only) and mount namespace, with an empty /dev/shm, a
# temporary folder of its own (TMPDIR; /tmp itself stays, as the checkout or the interpreter may be in it), a
# boot_id (/proc/sys/kernel/random/boot_id) of its own and an /etc/hosts naming every host's address. So
# nothing passes between hosts but TCP over the bridge, and a host's name, boot id and pids tell it apart
# as they do between machines. When a host's torchrun ends, the kernel ends every process of its PID
# namespace. (c10d's warnings "The hostname of the client socket cannot be retrieved" are about the
# IPv4-mapped IPv6 form of the addresses, which /etc/hosts does not list; they do no harm.)
# torchrun's rendezvous is static (--master_addr = host 1's address, --master_port 29500; each namespace
# has its own ports); gloo uses the hosts' interface (GLOO_SOCKET_IFNAME=eth0, as netns-hosts.sh names it).
#
# Python: $MOEDIST_PYTHON, else the interpreter scripts/python-setup.sh wrote to build-py/python, else
# build-py/venv/bin/python; moedist must be installed there (scripts/python-setup.sh).
# Deadline: everything ends within MOEDIST_TORCHRUN_DEADLINE_S seconds (default 150): each torchrun runs
# under `timeout` (SIGTERM, then SIGKILL 5 s later), and whatever is left in the namespaces is killed.
# Exit status of a host: torchrun's, 124 when it passed the deadline (137: it had to be killed). Once a
# host has failed, the others are stopped after MOEDIST_TORCHRUN_GRACE_S seconds (default 40).
# Exits 77 (ctest: skipped) with the reason when the hosts cannot be made here or moedist is not installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
program=$root/tests/python/multihost/run_torchrun.py
deadline=${MOEDIST_TORCHRUN_DEADLINE_S:-150}
grace=${MOEDIST_TORCHRUN_GRACE_S:-40}

# ns_pids: the processes in the hosts' network namespaces.
ns_pids() {
  local kind name
  while read -r kind name; do
    [ "$kind" = ns ] && ip netns pids "$name" 2>/dev/null || true
  done <"$MOEDIST_NETNS_DIR/state"
}

if [ "${1:-}" = "--inner" ]; then
  shift
  nnodes=$1 nproc=$2 py=$3
  shift 3
  dir=$MOEDIST_NETNS_DIR
  mapfile -t addrs < <(awk '{print $1}' "$dir/hostfile")
  mapfile -t nss < <(awk '$1 == "ns" {print $2}' "$dir/state")
  [ "${#addrs[@]}" -eq "$nnodes" ] && [ "${#nss[@]}" -eq "$nnodes" ] || { echo "torchrun-netns: expected $nnodes hosts in $dir"; exit 1; }
  { echo "127.0.0.1 localhost"; for i in "${!addrs[@]}"; do echo "${addrs[$i]} ${nss[$i]}"; done; } >"$dir/etc-hosts"
  for i in "${!nss[@]}"; do
    cat /proc/sys/kernel/random/uuid >"$dir/boot_id$((i + 1))"
    mkdir -p "$dir/tmp$((i + 1))"
  done
  master=${addrs[0]}
  echo "== hosts: $(for i in "${!addrs[@]}"; do printf '%s=%s ' "${nss[$i]}" "${addrs[$i]}"; done)"
  echo "== $nnodes x torchrun --nnodes $nnodes --nproc_per_node $nproc --master_addr $master --master_port 29500 (deadline $deadline s)"
  start=$SECONDS
  pids=()
  for i in "${!nss[@]}"; do
    # In the host's network namespace, with UTS, PID and mount namespaces of its own (see the header).
    # The deadline's `timeout` is the namespace's pid 1: it sends torchrun SIGTERM, then SIGKILL 5 s
    # later, and when it exits the kernel ends whatever is left there. The outer `timeout` is a backstop.
    timeout -k 5 "$((deadline + 20))" nsenter --net="/run/netns/${nss[$i]}" -- \
      unshare --uts --mount --propagation private --pid --fork --kill-child --mount-proc -- /bin/sh -c '
        set -e
        hostname "$1"
        mount --bind "$2" /etc/hosts
        mount --bind "$3" /proc/sys/kernel/random/boot_id
        mount -t tmpfs -o mode=1777 md-shm /dev/shm
        deadline=$4
        shift 4
        exec timeout -k 5 "$deadline" "$@"' sh "${nss[$i]}" "$dir/etc-hosts" "$dir/boot_id$((i + 1))" "$deadline" \
      env GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TMPDIR="$dir/tmp$((i + 1))" \
      "$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$i" --nproc_per_node "$nproc" \
        --master_addr "$master" --master_port 29500 --max_restarts 0 --monitor_interval 0.5 \
        "$program" --expect-hosts "$nnodes" "$@" >"$dir/host$((i + 1)).log" 2>&1 &
    pids+=($!)
  done
  # Wait for every host; once one has failed, the others get MOEDIST_TORCHRUN_GRACE_S to end on their own
  # (their ranks' own errors, e.g. moedist naming a peer that is gone, come within its 30 s deadline)
  # before their processes get SIGTERM, then SIGKILL 5 s later.
  rcs=() done=() stopped=() failed_at="" failed_host=""
  for i in "${!pids[@]}"; do done[i]=0; done
  while :; do
    running=0
    for i in "${!pids[@]}"; do
      [ "${done[i]}" = 0 ] || continue
      if kill -0 "${pids[i]}" 2>/dev/null; then running=1; continue; fi
      rc=0
      wait "${pids[i]}" || rc=$?
      rcs[i]=$rc done[i]=1
      [ "$rc" -eq 0 ] || [ -n "$failed_at" ] || { failed_at=$SECONDS failed_host=$((i + 1)); }
    done
    [ $running = 1 ] || break
    if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
      for i in "${!pids[@]}"; do
        [ "${done[i]}" = 0 ] || continue
        if [ -z "${stopped[i]:-}" ]; then
          echo "== host $((i + 1)) still running $grace s after host $failed_host failed: stopped (SIGTERM)"
          stopped[i]=$SECONDS
          ip netns pids "${nss[i]}" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
        elif [ $((SECONDS - stopped[i])) -ge 5 ]; then
          ip netns pids "${nss[i]}" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        fi
      done
    fi
    sleep 0.5
  done
  took=$((SECONDS - start))
  left=$(ns_pids | tr '\n' ' ')
  if [ -n "${left// /}" ]; then
    echo "== left running in the namespaces, killed: $(ps -o pid=,stat=,etime=,args= -p "${left// /,}" 2>/dev/null | tr '\n' ';')"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
  fi
  for i in "${!nss[@]}"; do
    echo "== host $((i + 1)) (${nss[$i]}, node_rank $i): torchrun exit ${rcs[$i]}"
    sed "s/^/host$((i + 1)) | /" "$dir/host$((i + 1)).log"
  done
  world=$((nnodes * nproc))
  passed=$( (grep -hoE '^\[rank [0-9]+\] ALL PASS' "$dir"/host*.log || true) | sort -u | wc -l)
  fails=$( (grep -hE '^\[rank [0-9]+\] FAIL ' "$dir"/host*.log || true) | wc -l)
  verdict=PASS
  for i in "${!rcs[@]}"; do
    [ "${rcs[$i]}" -eq 0 ] || verdict=FAIL
    if [ "$took" -ge "$deadline" ] && { [ "${rcs[$i]}" -eq 124 ] || [ "${rcs[$i]}" -eq 137 ]; }; then
      echo "== host $((i + 1)): torchrun passed the deadline of $deadline s"
    fi
  done
  [ "$passed" -eq "$world" ] || verdict=FAIL
  echo "== torchrun-netns: $verdict ($nnodes hosts x $nproc ranks: $passed of $world ranks ALL PASS, $fails FAIL lines, exits ${rcs[*]}, $took s)"
  [ $verdict = PASS ]
  exit
fi

[ $# -ge 2 ] || { echo "usage: $0 NNODES NPROC_PER_NODE [PROGRAM OPTIONS...]" >&2; exit 2; }
nnodes=$1 nproc=$2
shift 2
[[ "$nnodes" =~ ^[0-9]+$ ]] && [ "$nnodes" -ge 1 ] && [ "$nnodes" -le 16 ] || { echo "NNODES must be in [1, 16], got '$nnodes'" >&2; exit 2; }
[[ "$nproc" =~ ^[0-9]+$ ]] && [ "$nproc" -ge 1 ] && [ "$nproc" -le 16 ] || { echo "NPROC_PER_NODE must be in [1, 16], got '$nproc'" >&2; exit 2; }
if ! reason=$(bash "$here/netns-hosts.sh" check 2>&1); then
  echo "skipped: separate hosts cannot be made here: $reason"
  exit 77
fi
for tool in nsenter unshare timeout; do
  command -v "$tool" >/dev/null || { echo "skipped: no '$tool' command (util-linux / coreutils)"; exit 77; }
done
if [ -n "${MOEDIST_PYTHON:-}" ]; then
  py=$MOEDIST_PYTHON
elif [ -s "$root/build-py/python" ]; then
  py=$(cat "$root/build-py/python")
else
  py=$root/build-py/venv/bin/python
fi
if ! why=$("$py" -c 'import moedist, torch.distributed.run' 2>&1); then
  echo "skipped: moedist is not importable with $py (run scripts/python-setup.sh): $(tail -n 1 <<<"$why")"
  exit 77
fi
echo "== python: $py (moedist $("$py" -c 'import moedist; print(moedist.__version__, "at", moedist.__path__[0])'))"
MOEDIST_NETNS_SLOTS=$nproc exec bash "$here/netns-hosts.sh" run "$nnodes" bash "$here/torchrun-netns-test.sh" --inner "$nnodes" "$nproc" "$py" "$@"
