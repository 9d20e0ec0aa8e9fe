#!/usr/bin/env bash
# Installs what building and testing moedist needs (Debian packages), only when missing.
#   cmake g++ make libgtest-dev     build and unit tests
#   ccache                          scripts/test.sh: a second run recompiles only what changed
#   clang                           scripts/test.sh: the sanitizer builds (they compile in half the time)
#   libopenmpi-dev openmpi-bin      the MPI transports, `moedist bench` and the mpirun tests
#   libucx-dev pkg-config           the UCX transport between hosts (torchrun jobs on several hosts)
#   iproute2                        `ip netns`: separate hosts on one machine for the multi-host tests
set -euo pipefail
need=()
for pkg in cmake g++ clang make ccache libgtest-dev libopenmpi-dev openmpi-bin libucx-dev pkg-config iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
