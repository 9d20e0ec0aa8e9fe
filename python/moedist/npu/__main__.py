"""python -m moedist.npu SCRIPT [ARGS...] | -m MODULE [ARGS...]

Runs an Ascend program (one that imports torch_npu / torchair) on CPUs with moedist's stand-ins, as
`python SCRIPT ARGS` / `python -m MODULE ARGS` would run it on an NPU host; the processes it starts
(torch.multiprocessing with fork or spawn, subprocess running python) get the stand-ins too.
"""
import os
import runpy
import sys

USAGE = "usage: python -m moedist.npu SCRIPT [ARGS...]\n       python -m moedist.npu -m MODULE [ARGS...]\n"


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ if argv else USAGE)
        return 0 if argv else 2
    from moedist.npu import install

    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            sys.stderr.write(USAGE)
            return 2
        sys.argv = argv[1:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    script = argv[0]
    if not os.path.isfile(script):
        sys.stderr.write(f"python -m moedist.npu: can't open file {script!r}\n")
        return 2
    sys.argv = list(argv)
    # As `python SCRIPT` does: the script's folder first on sys.path (the shim stays right after it).
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.exit(code)
