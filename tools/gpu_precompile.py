"""Compile every shipped kernel instance once, many processes at a time, into the caches the
launchers read (CuPy's kernel cache for NVRTC modules, xattn's cubin cache for the sm_90a
ones), so that a GPU test run loads its modules instead of compiling them one at a time per
pytest worker. Used by tools/gpu_suite.sh.

Usage: ``python3 tools/gpu_precompile.py [processes] [--only SOURCE.cu ...]``
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xattn._backends.cupy_ import instances  # noqa: E402

# One process per module: the launcher's own path (compiled_function, with the instance's
# defines), then the module loaded -- CuPy compiles a RawModule lazily, at its first function.
CODE = """
import sys
from xattn._backends.cupy_ import _compile, instances
want = sys.argv[1]
inst = next(i for i in instances.shipped() if i.name == want)
fn = _compile.compiled_function(inst.source, inst.name, inst.defines, 0, arch=inst.arch,
                                includes=inst.includes)
assert getattr(fn, "ptr", None) or getattr(getattr(fn, "kernel", None), "ptr", None)
"""


def run(name):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", CODE, name], capture_output=True, text=True,
                          env=env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("processes", nargs="?", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--only", nargs="*", default=None, help="kernel files to compile")
    args = ap.parse_args(argv)
    todo = [i.name for i in instances.shipped()
            if args.only is None or i.source in args.only]
    failed, t0 = 0, time.time()
    with cf.ThreadPoolExecutor(args.processes) as ex:
        for name, r in zip(todo, ex.map(run, todo), strict=True):
            if r.returncode:
                failed += 1
                print(f"{name}: FAILED\n{r.stderr[-2000:]}", flush=True)
    print(f"{len(todo) - failed} of {len(todo)} modules compiled or found cached in "
          f"{time.time() - t0:.0f} s ({args.processes} processes)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
