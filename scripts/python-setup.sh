#!/usr/bin/env bash
# Installs what the Python package and its tests need, then `pip install .` (the extension is built by
# scikit-build-core into build-py/). Writes the interpreter to use to build-py/python, so that
#   "$(cat build-py/python)" -m pytest tests/python
# runs the suite. Uses $MOEDIST_PYTHON if set, else python3, or a virtual environment in build-py/venv
# when python3's site-packages are managed by the system (PEP 668).
#
# torch: PyPI's wheel is the CUDA build, whose dependencies are several GB of nvidia-* packages that a CPU
# run never uses. It is installed with --no-deps plus its pure-Python dependencies; the CUDA libraries
# that libtorch links against and that the machine lacks (or has in an older version, e.g. NCCL from the
# CUDA toolkit) are then installed, pinned to torch's own requirements, one by one until `import torch`
# works (on a machine with the CUDA toolkit: cusparselt, nvshmem, nccl, cufile).
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
mkdir -p build-py

bash scripts/install-deps.sh  # cmake, g++ (Debian)

PY=${MOEDIST_PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-pip python3-venv python3-dev >/dev/null
  PY=python3
fi
managed=$("$PY" -c 'import sysconfig, os; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
if [ -z "${MOEDIST_PYTHON:-}" ] && [ "$managed" = 1 ]; then
  if [ ! -x build-py/venv/bin/python ]; then
    "$PY" -m venv build-py/venv 2>/dev/null || {
      SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv python3-dev >/dev/null
      "$PY" -m venv build-py/venv
    }
  fi
  PY=$PWD/build-py/venv/bin/python
fi
PY=$("$PY" -c "import sys; print(sys.executable)")
PIP=("$PY" -m pip install --disable-pip-version-check -q)
echo "python: $PY ($("$PY" --version 2>&1))"

torch_ok() { "$PY" -c 'import torch; torch.randn(2).sum()' >/dev/null 2>&1; }

if ! torch_ok; then
  if ! "$PY" -m pip show -q torch >/dev/null 2>&1; then
    echo "installing torch (CPU use: without its CUDA dependencies)"
    "${PIP[@]}" --no-deps torch
    "${PIP[@]}" filelock typing-extensions sympy networkx jinja2 fsspec mpmath MarkupSafe setuptools
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
    "${PIP[@]}" --no-deps "$pkg"
  done
  torch_ok || { echo "torch still does not import:" >&2; "$PY" -c 'import torch' >&2; exit 1; }
fi
"$PY" -c 'import torch; print("torch", torch.__version__)'

"${PIP[@]}" pytest pytest-timeout numpy scikit-build-core pybind11 "transformers>=5.24"  # transformers: moedist.hf and its tests
echo "building and installing moedist (pip install .)"
# Without build isolation the build environment's path stays the same from run to run, so scikit-build-core
# keeps build-py/ and rebuilds incrementally (a fresh isolated environment makes it start over).
"${PIP[@]}" --no-build-isolation .
"$PY" -c 'import moedist; print("moedist", moedist.__version__, "installed at", moedist.__path__[0])'
echo "$PY" > build-py/python
