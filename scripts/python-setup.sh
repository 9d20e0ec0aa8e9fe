#!/usr/bin/env bash
# Installs what the Python package and its tests need, then `pip install .` (the extension is built by
# scikit-build-core into build-py/). Writes the interpreter to use to build-py/python, so that
#   "$(cat build-py/python)" -m pytest tests/python
# runs the suite.
#
# The interpreter: $MOEDIST_PYTHON if set (its environment is used as it is), else the project's own
# virtual environment build-py/venv, made from python3 with --system-site-packages (so a torch that
# python3 already has is used, not downloaded again; whatever is missing is installed into the venv,
# never into python3's own site-packages).
#   --deps-only   stop after the dependencies (torch, pytest, ...): scripts/test.sh fetches them while
#                 it builds the C++ tests, and installs moedist afterwards
# MOEDIST_PYTHON_PACKAGE=PREFIX: the extension links the moedist package installed there (`cmake --install`
# of a Release build; scripts/test.sh installs build/ into build-py/package) instead of compiling the
# library once more. Unset: `pip install .` builds the library itself.
#
# torch: PyPI's wheel is the CUDA build, whose dependencies are several GB of nvidia-* packages that a
# CPU run never uses. It is installed with --no-deps plus its pure-Python dependencies; the CUDA libraries
# that libtorch links against and that the machine lacks (or has in an older version, e.g. NCCL from the
# CUDA toolkit) are then installed, pinned to torch's own requirements, one by one until `import torch`
# works (on a machine with the CUDA toolkit: cusparselt, nvshmem, nccl, cufile). pip then reports torch's
# other requirements (nvidia-*, triton) as missing ("ERROR: pip's dependency resolver ..."): expected,
# so those lines are left out of the output of a pip run that succeeded; other conflicts are shown.
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
mkdir -p build-py

bash scripts/install-deps.sh  # cmake, g++ (Debian)

deps_only=0
[ "${1:-}" = "--deps-only" ] && deps_only=1
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

install_python() {  # python3 with venv and headers, from Debian
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-pip python3-venv python3-dev >/dev/null
}

if [ -n "${MOEDIST_PYTHON:-}" ]; then
  PY=$MOEDIST_PYTHON
  command -v "$PY" >/dev/null 2>&1 || { echo "MOEDIST_PYTHON=$PY: no such interpreter" >&2; exit 1; }
else
  if [ ! -x build-py/venv/bin/python ]; then
    command -v python3 >/dev/null 2>&1 || install_python
    echo "making the virtual environment build-py/venv (python3 --system-site-packages)"
    python3 -m venv --system-site-packages build-py/venv 2>/dev/null || {
      rm -rf build-py/venv
      install_python
      python3 -m venv --system-site-packages build-py/venv
    }
  fi
  PY=$PWD/build-py/venv/bin/python
fi
PY=$("$PY" -c "import sys; print(sys.executable)")
echo "python: $PY ($("$PY" --version 2>&1))"

# pip install, quiet; after a success the resolver's complaints about torch's CUDA requirements (see
# above) are dropped, everything else is shown. After a failure everything is shown.
PIP_ARGS=(-m pip install -q)
pip_install() {
  local out rc=0
  out=$("$PY" "${PIP_ARGS[@]}" "$@" 2>&1) || rc=$?
  if [ $rc -ne 0 ]; then
    printf '%s\n' "$out" >&2
    return $rc
  fi
  printf '%s\n' "$out" | awk '
    /^ERROR: pip.s dependency resolver does not currently take into account/ { header = $0; block = 1; next }
    block && /^torch [^ ]+ requires / { next }  # installed with --no-deps on purpose
    block && / requires / { if (header != "") print header; header = ""; print; next }
    { block = 0; header = ""; if (NF) print }' >&2
}

torch_ok() { "$PY" -c 'import torch; torch.randn(2).sum()' >/dev/null 2>&1; }

if ! torch_ok; then
  if ! "$PY" -m pip show -q torch >/dev/null 2>&1; then
    echo "installing torch (CPU use: without its CUDA dependencies)"
    pip_install --no-deps torch
    pip_install filelock typing-extensions sympy networkx jinja2 fsspec mpmath MarkupSafe setuptools
  fi
  # The shared libraries libtorch needs and cannot load, by soname -> the pip package that ships them.
  for _ in $(seq 20); do
    torch_ok && break
    err=$("$PY" -c 'import torch' 2>&1 | tail -n 1 || true)
    pkg=$("$PY" - "$err" <<'EOF'
import re, sys
from importlib.metadata import requires
err = sys.argv[1]
# soname prefix -> the package that ships it (torch's pinned requirement when it names one)
table = [
    ("libcufile", "nvidia-cufile"), ("libcusparseLt", "nvidia-cusparselt"), ("libnvshmem", "nvidia-nvshmem"),
    ("libnccl", "nvidia-nccl"), ("libcudnn", "nvidia-cudnn"), ("libcublasLt", "nvidia-cublas"),
    ("libcublas", "nvidia-cublas"), ("libcudart", "nvidia-cuda-runtime"), ("libnvrtc", "nvidia-cuda-nvrtc"),
    ("libcufft", "nvidia-cufft"), ("libcusparse", "nvidia-cusparse"), ("libcusolver", "nvidia-cusolver"),
    ("libcurand", "nvidia-curand"), ("libcupti", "nvidia-cuda-cupti"), ("libnvJitLink", "nvidia-nvjitlink"),
    ("libnvToolsExt", "nvidia-nvtx"),
]
want = None
m = re.search(r"(lib[A-Za-z_]+)\.so\S*:? (?:cannot open shared object|not found)", err)
if m:
    lib = m.group(1)
    want = next((p for s, p in table if lib == s or lib.startswith(s)), None)
elif "undefined symbol: nccl" in err:
    want = "nvidia-nccl"  # an older system NCCL shadows the one torch was built with
if want is None:
    sys.exit(0)
reqs = [r.split(";")[0].strip() for r in (requires("torch") or [])]
# torch pins e.g. nvidia-nccl-cu13==...; the CUDA toolkit's own libraries come through its cuda-toolkit[...]
# requirement, whose packages (nvidia-cufile, nvidia-cublas, ...) are taken at their latest version.
pinned = next((r for r in reqs if r.lower().startswith(want)), want)
print(pinned.replace(" ", ""))
EOF
)
    if [ -z "$pkg" ]; then
      echo "import torch fails and the cause is not a known CUDA library:" >&2
      echo "$err" >&2
      exit 1
    fi
    echo "torch needs $pkg: installing it (--no-deps)"
    pip_install --no-deps "$pkg"
  done
  torch_ok || { echo "torch still does not import:" >&2; "$PY" -c 'import torch' >&2; exit 1; }
fi
"$PY" -c 'import torch; print("torch", torch.__version__)'

pip_install pytest pytest-timeout numpy scikit-build-core pybind11 "transformers>=5.24"  # transformers: moedist.hf and its tests
if [ $deps_only = 1 ]; then
  echo "$PY" > build-py/python
  exit 0
fi
echo "building and installing moedist (pip install .)"
# Without build isolation the build environment's path stays the same from run to run, so scikit-build-core
# keeps build-py/ and rebuilds incrementally (a fresh isolated environment makes it start over).
# MOEDIST_PYTHON_PACKAGE=<prefix of an installed Release build> (scripts/test.sh): the extension links that
# package's library instead of compiling it again; passed every time (also empty), so that build-py/'s
# cached configuration never keeps a prefix of an earlier run.
pip_install --no-build-isolation -Ccmake.define.MOEDIST_PYTHON_PACKAGE="${MOEDIST_PYTHON_PACKAGE:-}" .
"$PY" -c 'import moedist; print("moedist", moedist.__version__, "installed at", moedist.__path__[0])'
echo "$PY" > build-py/python
