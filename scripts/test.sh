#!/usr/bin/env bash
# Every test: the Release build, then AddressSanitizer + UndefinedBehaviorSanitizer, then
# ThreadSanitizer (in-process ranks are threads). Set MOEDIST_QUICK=1 to run the Release pass only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)

run_pass() {  # name, build dir, build type, extra cmake args...
  local name=$1 dir=$2 type=$3
  shift 3
  echo "== $name =="
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE="$type" "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
  (cd "$dir" && ctest --output-on-failure -j"$jobs" --timeout 300)
}

run_pass "release" build Release
./build/moedist demo --ranks 3 --experts 6 --tokens 16 --hidden 256 | tail -n 1
echo "== python =="
bash scripts/python-setup.sh
"$(cat build-py/python)" -m pytest tests/python -q
if [ "${MOEDIST_QUICK:-0}" != "1" ]; then
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  run_pass "asan+ubsan" build-asan RelWithDebInfo -DMOEDIST_SANITIZE=address,undefined -DMOEDIST_BUILD_TOOLS=OFF -DMOEDIST_BUILD_EXAMPLES=OFF
  export TSAN_OPTIONS=halt_on_error=1
  run_pass "tsan" build-tsan RelWithDebInfo -DMOEDIST_SANITIZE=thread -DMOEDIST_BUILD_TOOLS=OFF -DMOEDIST_BUILD_EXAMPLES=OFF
fi
