#!/usr/bin/env bash
# The main job: builds moedist (showing the build's progress), then runs `moedist demo` (arguments are
# passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
MOEDIST_BUILD_TARGET=moedist_cli bash scripts/build.sh
echo
exec ./build/moedist demo "$@"
