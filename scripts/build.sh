#!/usr/bin/env bash
# Configures and builds moedist into build/ (Release), showing the build's progress. Extra arguments go
# to cmake's configure step. The compiler runs through ccache when it is installed. MOEDIST_BUILD_TARGET
# builds that target only (scripts/demo.sh: the command-line program, moedist_cli), else everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
command -v ccache >/dev/null 2>&1 && export CMAKE_CXX_COMPILER_LAUNCHER=ccache
echo "configuring build/ (cmake, Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
target=${MOEDIST_BUILD_TARGET:-}
echo "building (cmake --build build -j$(nproc)${target:+ --target $target})"
cmake --build build -j"$(nproc)" ${target:+--target "$target"}
