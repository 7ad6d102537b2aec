"""Compile every decode kernel module once into CuPy's on-disk kernel cache, several processes
at a time (the loader compiles one module at a time per process), so that pytest workers and
the benchmark load the modules instead of compiling them. Used by tools/gpu_check_decode.sh.

Usage: ``python3 tools/decode_precompile.py [processes]``
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xattn._backends.cupy_ import instances  # noqa: E402

# function_handle loads the module (CuPy compiles a RawModule lazily) and fails without one.
CODE = ("import sys; from xattn._backends.cupy_ import decode as m; "
        "f = m._function(sys.argv[1], int(sys.argv[2]), "
        "(int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])); "
        "assert m.function_handle(f), 'no CUfunction handle'")


def specs():
    out = []
    for d in instances.DECODE_HEAD_DIMS:
        for cfg in (instances.DECODE[d], *instances.DECODE_EXTRA.get(d, ())):
            for tn in ("f16", "bf16"):  # the GPU tests take every instance in both
                out.append((tn, d, cfg))
    return out


def run(spec):
    tn, d, (nw, st, *kind) = spec
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", CODE, tn, str(d), str(nw), str(st), *kind],
                          capture_output=True, text=True, env=env)


def main():
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    failed = 0
    with cf.ThreadPoolExecutor(workers) as ex:
        for spec, r in zip(specs(), ex.map(run, specs()), strict=True):
            ok = r.returncode == 0
            failed += not ok
            print(spec, "ok" if ok else "FAILED\n" + r.stderr[-3000:], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
