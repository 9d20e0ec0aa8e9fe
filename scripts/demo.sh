#!/usr/bin/env bash
# The main job: builds moedist and runs `moedist demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
exec ./build/moedist demo "$@"
