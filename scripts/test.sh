#!/usr/bin/env bash
# Every test, then one summary. The suites, in this order:
#   release     the Release build (build/) and its ctest: every C++ test, the examples, the command-line
#               program, the MPI tests under mpirun (except the consumer test, its own suite below, and
#               the tests labelled "python", which need the installed package: in the pytest suite)
#   consumer    the installed package used from another CMake project (ctest -L consumer)
#   demo        `moedist demo` on 3 processes, as scripts/demo.sh runs it
#   pytest      the Python package (pip install . into the project's virtual environment) and its tests,
#               then the release build's tests of it (ctest -L python: torchrun across network-namespace
#               hosts, scripts/torchrun-netns-test.sh; skipped where namespaces cannot be made)
#   tsan        ThreadSanitizer build (build-tsan/): the tests whose ranks are threads of one process
#   asan+ubsan  AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/): the C++ tests
#               (last: its suite keeps the cores busier than ThreadSanitizer's, so the run ends with
#               fewer idle cores while the build that finishes last still compiles)
# MOEDIST_QUICK=1 skips the two sanitizer suites. MOEDIST_PYTHON=/path/to/python uses that interpreter
# (and its environment) instead of the project's virtual environment build-py/venv.
#
# What the sanitizer builds contain (neither builds the examples or the command-line program: they hold
# no library code that the tests do not run). The library is compiled at -O1 -g1 (less compiling than
# -O2 -g; the line tables of -g1 are what a report needs to name file and line), the test programs at
# -O0 -g1 (MOEDIST_TEST_CXX_FLAGS: the tested code is the library's), with clang++ where it is installed
# (install-deps.sh installs it), else g++. CPU time of the ASan+UBSan build, measured: g++ 12 with all at
# -O1 547 s (the tests 322 s of it, 142 s at -O0); clang++ 14 with the tests at -O0 218 s. Its suite ran in
# 139 s of CPU (g++, -O1), 151 s (g++, tests at -O0), 147 s (clang++, tests at -O0). ThreadSanitizer with
# clang++: build 162 s, suite 82 s.
#   asan+ubsan: every test program and its tests, except what repeats, on another transport or with more
#     ranks, code paths that the suite already runs under the sanitizers (each still runs in release,
#     where its results are checked bit for bit):
#     - two mpirun runs that repeat test_mpi's cases with more ranks (mpi_np16_conformance,
#       mpi_hybrid_np8): the MPI transport's code runs in mpi_np4 and mpi_np8, which hold every MPI case;
#     - the fp16 half of the conformance sweep over shared-memory processes (Shm/ConformanceShm.*_fp16_*):
#       the transport moves bytes whatever the dtype; the fp16 paths of the ops run in the thread sweep
#       (every case, both dtypes) and the shared-memory transport in the bf16 half;
#     - the fuzz runs 1000 cases (the Release build 1500, ThreadSanitizer 300; MOEDIST_FUZZ_CASES sets it).
#     With clang++ 14, which has no _Float16 on x86, the two tests that compare the fp16 conversions with
#     the compiler's own skip (they run in Release, compiled by g++).
#     (Not the consumer, bench and netns tests, which are not defined in sanitizer builds.)
#   tsan: every test program but test_core and test_mpi. ThreadSanitizer finds races between threads of
#     one process: the thread transport (ranks as threads), the threads inside a rank process. test_core
#     is single-threaded (the pure core: nothing to race); in test_mpi the ranks are processes, and Open
#     MPI, not built with ThreadSanitizer, would be reported for its own internals.
#
# Speed: the compiler runs through ccache (Debian's ccache, installed by install-deps.sh), so a second
# run rebuilds only what changed. Most suites spend their time waiting (ranks waiting on each other,
# mpirun, importing torch), so the builds run in the background at nice 19, in what the tests leave
# idle (a build that a suite has to wait for is set back to normal priority): from the start the two
# sanitizer builds, one after the other; the Python dependencies are fetched while the release build
# runs, and the extension (which links build/'s library, installed into build-py/package, rather than
# compiling the library again) is built while the release suite runs. A
# suite's time in the summary is from its start to its end, including any wait for its background
# build; the summary also says how long each background step took, and the total is the wall time.
# A test that fails is run once more, alone (ctest --rerun-failed; pytest --last-failed; not after a
# sanitizer's report, which is a finding): one that then passes counts as passed and the summary names
# it as flaky; one that fails again counts as failed, and the summary names it. Each suite's full output is in build-logs/<suite>.log (a sanitizer suite's log:
# its build, then its ctest; the extension's build: python-setup.log, copied into pytest.log). The exit
# code is 1 when any suite failed.
set -uo pipefail
{  # the whole script is read before it runs, so that editing it meanwhile does not change a run
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh || exit 1
jobs=$(nproc)
quick=${MOEDIST_QUICK:-0}
logs=$PWD/build-logs
mkdir -p "$logs"
if command -v ccache >/dev/null 2>&1; then
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache  # CMake takes it from the environment (also pip install .'s build)
  export CCACHE_NOHASHDIR=true               # so that build/ and build-py/ share their objects
  export CCACHE_BASEDIR=$PWD                 # paths inside the checkout hashed relative: clones share the cache
fi
export CMAKE_BUILD_PARALLEL_LEVEL=$jobs

# --- the summary's rows -----------------------------------------------------------------------------
names=() states=() passed=() failed=() skipped=() seconds=()
record() {  # suite state passed failed skipped seconds
  names+=("$1") states+=("$2") passed+=("$3") failed+=("$4") skipped+=("$5") seconds+=("$6")
  echo "== $1: $2 ($3 passed, $4 failed, $5 skipped, $6 s)"
}
section() { echo; echo "== $* =="; }

# ctest_counts, run_ctest, pytest_twice, ...: the part that runs tests and counts them, with its reruns
source scripts/test-lib.sh

# build SUITE DIR TYPE START [cmake arguments...]: configures and builds; on failure records the suite as
# failed (one failure) and returns 1.
build() {
  local suite=$1 dir=$2 type=$3 start=$4
  shift 4
  local log=$logs/$suite.log
  : >"$log"
  echo "-- configure $dir ($type $*)"
  if cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" "$@" >>"$log" 2>&1 &&
     cmake --build "$dir" 2>&1 | tee -a "$log" | grep -E --line-buffered '^\[ *[0-9]+%\]|error|warning' ; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    return 0
  fi
  echo "-- the build failed; the end of $log:"
  tail -n 40 "$log"
  record "$suite" failed 0 1 0 $((SECONDS - start))
  return 1
}

skip_suite() { record "$1" skipped 0 0 0 0; }

# --- work in the background ---------------------------------------------------------------------------
# Most suites spend their time waiting (processes and threads waiting on each other, mpirun, importing
# torch): the builds that later suites need run meanwhile at the lowest priority (nice 19), so that they
# take only what the running tests leave idle. Each writes its process id to $logs/.NAME.pid and then
# "EXIT_CODE SECONDS" to $logs/.NAME.done. When a suite has to wait for one, nothing of ours runs but it:
# it is then set back to this script's priority (renice; where that is not allowed, it stays at 19).
bg_pids=()
kill_tree() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$c"; done; kill "$1" 2>/dev/null; }
# the parent first, so that the children it starts meanwhile inherit the new priority
renice_tree() { local c; renice -n "$2" -p "$1" >/dev/null 2>&1; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do renice_tree "$c" "$2"; done; }
own_nice=$(ps -o ni= -p $$ | tr -d ' ')
trap 'for p in "${bg_pids[@]}"; do kill_tree "$p"; done' EXIT
rm -f "$logs"/.*.done "$logs"/.*.pid
# bg_build SUITE DIR TYPE [cmake arguments...]: configures and builds into $logs/SUITE.log, quietly.
bg_build() {
  local suite=$1 dir=$2 type=$3 t0=$SECONDS rc=0
  shift 3
  (
    echo "$BASHPID" >"$logs/.$suite.pid"
    renice -n 19 -p "$BASHPID" >/dev/null 2>&1
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" "$@" && cmake --build "$dir"
  ) >"$logs/$suite.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - t0))" >"$logs/.$suite.done"
  return $rc
}
# wait_bg NAME: waits for $logs/.NAME.done; prints how the background step went and returns its exit code.
wait_bg() {
  local name=$1 t0=$SECONDS rc secs
  if [ ! -e "$logs/.$name.done" ]; then
    echo "-- waiting for the background step $name (now at this script's priority)"
    [ -e "$logs/.$name.pid" ] && renice_tree "$(cat "$logs/.$name.pid")" "$own_nice"
  fi
  while [ ! -e "$logs/.$name.done" ]; do sleep 2; done
  read -r rc secs <"$logs/.$name.done"
  echo "-- $name: done in the background in $((secs / 60))m$(printf %02d $((secs % 60)))s (exit code $rc; waited here $((SECONDS - t0)) s)"
  bg_done+=("$name $((secs / 60))m$(printf %02d $((secs % 60)))s")
  return "$rc"
}
bg_done=()

# The Python dependencies: fetched while the release build runs.
py_deps_log=$logs/python-deps.log
{
  rc=0 t0=$SECONDS
  bash scripts/python-setup.sh --deps-only >"$py_deps_log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - t0))" >"$logs/.python-deps.done"
} &
bg_pids+=($!)

# The sanitizer builds, one after the other (each with $jobs compilers), from the start: the sanitizer
# suites run at the end, when both are (nearly) done; the smaller (ThreadSanitizer) first.
sanitizer_args=(-DMOEDIST_BUILD_TOOLS=OFF -DMOEDIST_BUILD_EXAMPLES=OFF -DMOEDIST_TEST_NETNS=OFF
                "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" -DMOEDIST_TEST_CXX_FLAGS=-O0)
command -v clang++ >/dev/null 2>&1 && sanitizer_args+=(-DCMAKE_CXX_COMPILER=clang++)
if [ "$quick" != 1 ]; then
  {
    bg_build tsan build-tsan RelWithDebInfo -DMOEDIST_SANITIZE=thread "${sanitizer_args[@]}" "-DMOEDIST_TESTS_SKIP=test_core;test_mpi"
    bg_build asan+ubsan build-asan RelWithDebInfo -DMOEDIST_SANITIZE=address,undefined "${sanitizer_args[@]}"
  } &
  bg_pids+=($!)
fi

# --- release ------------------------------------------------------------------------------------------
# The test programs' own code is compiled at -O0 (MOEDIST_TEST_CXX_FLAGS), as in the sanitizer builds:
# the library, the harness, the examples and the command-line program keep Release's flags.
section "release: build (build/), then ctest"
start=$SECONDS
if build release build Release "$start" -DMOEDIST_TEST_CXX_FLAGS=-O0; then
  # The Python package, built meanwhile: its extension links this build's library (installed into
  # build-py/package) instead of compiling the library again.
  {
    rc=0 t0=$SECONDS
    while [ ! -e "$logs/.python-deps.done" ]; do sleep 2; done
    read -r rc _ <"$logs/.python-deps.done"
    if [ "$rc" -eq 0 ]; then
      (
        echo "$BASHPID" >"$logs/.python-setup.pid"
        renice -n 19 -p "$BASHPID" >/dev/null 2>&1
        cmake --install build --prefix build-py/package &&
          MOEDIST_PYTHON_PACKAGE=$PWD/build-py/package bash scripts/python-setup.sh
      ) >"$logs/python-setup.log" 2>&1 || rc=$?
    fi
    echo "$rc $((SECONDS - t0))" >"$logs/.python-setup.done"
  } &
  bg_pids+=($!)
  run_ctest release build "$start" -LE 'consumer|python'
  release_ok=1
else
  release_ok=0
fi

section "consumer: the installed package from another CMake project"
start=$SECONDS
if [ $release_ok = 1 ]; then
  : >"$logs/consumer.log"
  run_ctest consumer build "$start" -L consumer
else
  skip_suite consumer
fi

section "demo: moedist demo --ranks 3 --experts 6 --tokens 16 --hidden 256"
start=$SECONDS
if [ $release_ok = 1 ]; then
  ./build/moedist demo --ranks 3 --experts 6 --tokens 16 --hidden 256 2>&1 | tee "$logs/demo.log"
  if [ "${PIPESTATUS[0]}" -eq 0 ] && tail -n 1 "$logs/demo.log" | grep -q "moedist demo: PASS"; then
    record demo passed 1 0 0 $((SECONDS - start))
  else
    record demo failed 0 1 0 $((SECONDS - start))
  fi
else
  skip_suite demo
fi

# --- pytest -------------------------------------------------------------------------------------------
section "pytest: the Python package (python-setup.sh, in the background), then pytest tests/python"
start=$SECONDS
log=$logs/pytest.log
if wait_bg python-deps; then
  cat "$py_deps_log" >"$log"
  cat "$py_deps_log"
  if [ $release_ok = 1 ]; then
    wait_bg python-setup; rc=$?
    cat "$logs/python-setup.log" | tee -a "$log"
  else  # no build/ to link: the extension builds the library itself
    bash scripts/python-setup.sh 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" -eq 0 ]; then
    pytest_twice pytest "$(cat build-py/python)" "$log" tests/python
    if [ $release_ok = 1 ]; then  # the installed package across hosts under torchrun (ctest -L python)
      pylog=$logs/pytest-ctest.log
      : >"$pylog"
      pp=$p pf=$f ps=$s
      MOEDIST_PYTHON="$(cat build-py/python)" ctest_jobs=1 ctest_twice pytest build "$pylog" -L python
      cat "$pylog" >>"$log"
      if ! grep -q "No tests were found" "$pylog"; then  # none where the build leaves them out (MOEDIST_TEST_NETNS=OFF)
        p=$((pp + p)) f=$((pf + f)) s=$((ps + s))
      else
        p=$pp f=$pf s=$ps
      fi
    fi
    record pytest "$([ "$f" -eq 0 ] && echo passed || echo failed)" "$p" "$f" "$s" $((SECONDS - start))
  else
    record pytest failed 0 1 0 $((SECONDS - start))
  fi
else
  cat "$py_deps_log" | tee "$log"
  echo "-- installing the Python dependencies failed (above)"
  record pytest failed 0 1 0 $((SECONDS - start))
fi

# --- sanitizers ---------------------------------------------------------------------------------------
# bg_suite SUITE DIR START [ctest arguments...]: waits for the background build, then its ctest.
bg_suite() {
  local suite=$1 dir=$2 start=$3
  shift 3
  if wait_bg "$suite"; then
    run_ctest "$suite" "$dir" "$start" "$@"
  else
    echo "-- the build failed; the end of $logs/$suite.log:"
    tail -n 40 "$logs/$suite.log"
    record "$suite" failed 0 1 0 $((SECONDS - start))
  fi
}
if [ "$quick" != 1 ]; then
  section "tsan: build (build-tsan/, in the background), then ctest"
  start=$SECONDS
  export TSAN_OPTIONS=halt_on_error=1
  bg_suite tsan build-tsan "$start"

  section "asan+ubsan: build (build-asan/, in the background), then ctest"
  start=$SECONDS
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  # The last suite runs alone, and its tests wait on each other's ranks part of the time: one test more
  # than cores keeps them busy (measured alone: 147 s of CPU in 112 s with one per core).
  ctest_jobs=$((jobs + 1)) bg_suite asan+ubsan build-asan "$start" -E '^(mpi_np16_conformance|mpi_hybrid_np8)$|^Shm/ConformanceShm\..*_fp16_'
else
  skip_suite tsan
  skip_suite asan+ubsan
fi

wait "${bg_pids[@]}" 2>/dev/null  # all have finished (each suite waited for its step): nothing left to kill
bg_pids=()

# --- summary ------------------------------------------------------------------------------------------
echo
echo "== summary (full logs: build-logs/) =="
printf '%-12s %-8s %7s %7s %8s %8s\n' suite result passed failed skipped time
tp=0 tf=0 ts=0
for i in "${!names[@]}"; do
  printf '%-12s %-8s %7d %7d %8d %5dm%02ds\n' "${names[$i]}" "${states[$i]}" "${passed[$i]}" "${failed[$i]}" "${skipped[$i]}" \
    $((seconds[i] / 60)) $((seconds[i] % 60))
  tp=$((tp + passed[i])) tf=$((tf + failed[i])) ts=$((ts + skipped[i]))
done
[ ${#bg_done[@]} -gt 0 ] && echo "built in the background, while the suites ran: $(IFS=,; echo "${bg_done[*]}" | sed 's/,/, /g')"
# By name, where the end of the output shows them: what failed (also when run again), and what failed
# once and passed when run again.
if [ ${#failures[@]} -gt 0 ]; then
  echo "failed (also when run again; the details: build-logs/<suite>.log):"
  printf '  %s\n' "${failures[@]}" | cut -c1-300
fi
if [ ${#flaky[@]} -gt 0 ]; then
  echo "flaky (failed, then passed when run again; counted as passed; the first failure: build-logs/<suite>.log):"
  printf '  %s\n' "${flaky[@]}" | cut -c1-300
fi
printf 'total time %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60))
echo "$tp passed, $tf failed, $ts skipped"
[ "$tf" -eq 0 ]
exit
}
