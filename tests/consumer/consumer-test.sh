#!/usr/bin/env bash
# The installed package, used as another project would: installs the build into a temporary prefix
# (cmake --install), configures examples/cpp as a project of its own (project(... CXX), nothing but
# CMAKE_PREFIX_PATH), builds and runs every example against it:
#   thread_ranks                        (threads of one process)
#   moedist launch -n 3 -- shm_ranks    (processes over shared memory, the installed launcher)
#   mpirun -np 3 mpi_ranks              (when the package has MPI)
# Then the same for a package built without MPI (library only, Debug for a quick build): its config
# must not look for MPI, and the thread and shm examples work all the same.
# usage: consumer-test.sh SOURCE_DIR BUILD_DIR [MPIEXEC]
set -euo pipefail
src=$1 build=$2 mpiexec=${3:-}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moedist-consumer-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_NOHASHDIR=true  # the build directories are new each time: hits need the cwd left out
fi

step() { echo "-- $*"; }
# consumer PREFIX NAME: configures and builds examples/cpp against PREFIX, quietly unless it fails.
consumer() {
  local prefix=$1 dir=$tmp/$2
  step "configure examples/cpp against $prefix"
  cmake -S "$src/examples/cpp" -B "$dir" -DCMAKE_PREFIX_PATH="$prefix" "${launcher[@]}" >"$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
  step "build"
  cmake --build "$dir" >>"$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
}
run_examples() {  # DIR: thread_ranks, and shm_ranks under the installed launcher
  local dir=$tmp/$1
  step "run thread_ranks"; "$dir/thread_ranks"
  step "run $tmp/prefix/bin/moedist launch -n 3 -- shm_ranks"; "$tmp/prefix/bin/moedist" launch -n 3 --timeout 60 -- "$dir/shm_ranks"
}

# 1. The package as built (with MPI when the build found it).
step "cmake --install $build --prefix $tmp/prefix"
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; exit 1; }
consumer "$tmp/prefix" with-package
run_examples with-package
if [ -x "$tmp/with-package/mpi_ranks" ]; then
  [ -n "$mpiexec" ] || { echo "mpi_ranks was built but no mpiexec was given" >&2; exit 1; }
  extra=()
  "$mpiexec" --version 2>/dev/null | grep -qE "Open MPI|OpenRTE" && extra=(--oversubscribe --allow-run-as-root --bind-to none)
  step "run $mpiexec -np 3 mpi_ranks"; "$mpiexec" "${extra[@]}" -np 3 "$tmp/with-package/mpi_ranks"
fi

# 2. A package without MPI: the library alone, Debug (a quick build); shm_ranks runs under the
#    launcher of the first package (the launcher does not depend on MPI).
step "build and install moedist without MPI"
cmake -S "$src" -B "$tmp/nompi-build" -DCMAKE_BUILD_TYPE=Debug -DMOEDIST_WITH_MPI=OFF -DMOEDIST_BUILD_TESTS=OFF \
  -DMOEDIST_BUILD_TOOLS=OFF -DMOEDIST_BUILD_EXAMPLES=OFF "${launcher[@]}" >"$tmp/nompi.log" 2>&1 &&
  cmake --build "$tmp/nompi-build" >>"$tmp/nompi.log" 2>&1 &&
  cmake --install "$tmp/nompi-build" --prefix "$tmp/nompi" >>"$tmp/nompi.log" 2>&1 || { cat "$tmp/nompi.log"; exit 1; }
! grep -q "find_dependency(MPI" "$tmp"/nompi/lib*/cmake/moedist/moedistConfig.cmake || { echo "the config of a package without MPI looks for MPI" >&2; exit 1; }
consumer "$tmp/nompi" without-mpi
[ ! -e "$tmp/without-mpi/mpi_ranks" ] || { echo "mpi_ranks was built against a package without MPI" >&2; exit 1; }
run_examples without-mpi
echo "consumer: PASS"
