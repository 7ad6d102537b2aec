"""Compile every shipped kernel instance for sm_80 and sm_90a and report ptxas resource usage.

Usage: ``python3 tools/check_kernels.py [--nvcc PATH] [--experimental] [--all] [FILE.cu ...]``

The instances come from the one list of ``xattn/_backends/cupy_/instances.py`` (the launchers
build the same entries): per kernel file, one generated translation unit includes the file and
expands one entry macro per instance. Each unit is compiled by ``nvcc`` (``-std=c++17``,
warnings are errors) for ``-gencode=arch=compute_80,code=sm_80`` and
``-gencode=arch=compute_90a,code=sm_90a`` with ``-Xptxas -v``; the registers, stack frame, spill
stores/loads and static shared memory of every entry point are printed. The exit status is
non-zero on any compiler error or warning, on any entry point that spills registers to local
memory, and on any listed entry that the compiler did not produce (a name in the list that
the file's macros spell differently). ``--experimental`` adds the instances kept for
experiments (Hopper schedule modes 0-3 and 27), ``--all`` the bfloat16 block-sparse twins CI
leaves out. CI runs this wherever nvcc exists.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "xattn" / "kernels"
sys.path.insert(0, str(ROOT))
ARCHS = (("compute_80", "sm_80"), ("compute_90a", "sm_90a"))
FLAGS = ("-std=c++17", "-Werror", "all-warnings", "-Xptxas", "-v", "-Xptxas", "-warn-spills",
         "-Xptxas", "-warn-lmem-usage")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_nvcc(explicit=None):
    for cand in (explicit, os.environ.get("NVCC"), "/usr/local/bin/nvcc", shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def parse_ptxas(text):
    """``{(entry, arch): {"regs", "smem", "stack", "spill_st", "spill_ld"}}`` from ptxas -v."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = (m.group(1), m.group(2))
            out[cur] = {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                            spill_ld=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            out[cur]["smem"] = int(m.group(2) or 0)
    return out


def instances(experimental=False, everything=False):
    """The instances to compile, grouped by kernel file: ``{file name: [Instance]}``."""
    from xattn._backends.cupy_ import instances as inst

    chosen = [i for i in inst.shipped() if i.ci or everything]
    if experimental:
        chosen += inst.experimental()
    out: dict = {}
    for i in chosen:
        if i.macro_call() not in {j.macro_call() for j in out.get(i.source, ())}:
            out.setdefault(i.source, []).append(i)
    return out


def unit_source(source, items):
    """The translation unit of one kernel file: the file, then one macro call per instance."""
    calls = "\n".join(i.macro_call() for i in items)
    extra = "".join(f'#include "{ROOT / f}"\n' for f in dict.fromkeys(
        f for i in items for f in i.includes))
    return f'#include "{KERNELS / source}"\n{extra}{calls}\n'


def compile_file(nvcc, path, keep_dir=None, items=()):
    """Return ``(ok, log, resources)`` for one kernel file's instances (fatbin kept in
    ``keep_dir``)."""
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / f"{Path(path).stem}.cu"
        unit.write_text(unit_source(Path(path).name, items))
        cmd = [nvcc, *FLAGS, "--threads", "2"]
        for comp, code in ARCHS:
            cmd.append(f"-gencode=arch={comp},code={code}")
        target = Path(keep_dir or tmp) / (f"{Path(path).stem}.fatbin" if keep_dir else "out.fatbin")
        cmd += ["-fatbin", "-o", str(target), str(unit)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    # ptxas -v lines are informational; anything else mentioning a warning is a failure.
    warnings = [ln for ln in log.splitlines()
                if re.search(r"\bwarning\b", ln, re.I) and "ptxas info" not in ln]
    res = parse_ptxas(log)
    ok = proc.returncode == 0 and not warnings
    missing = [(n, a) for i in items for n in i.names for _, a in ARCHS if (n, a) not in res]
    if proc.returncode == 0 and missing:
        ok = False
        log += "\nlisted entries the compiler did not produce: " + ", ".join(
            f"{n} ({a})" for n, a in missing[:20])
    return ok, log, res


def write_ptx(nvcc, out_dir, archs, experimental=False, files=None):
    """PTX of every instance, one file per (kernel file, arch), for tools/ptx_diff.py."""
    failed = 0
    for source, items in sorted(instances(experimental).items()):
        if files and source not in files:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            unit = Path(tmp) / source
            unit.write_text(unit_source(source, items))
            for arch in archs:
                if arch == "sm_80" and all(i.arch for i in items):
                    continue  # sm_90a-only kernels have no sm_80 body to compare
                target = Path(out_dir) / f"{Path(source).stem}.{arch}.ptx"
                proc = subprocess.run([nvcc, "-std=c++17", "-ptx", f"-arch={arch}", "-o",
                                       str(target), str(unit)], capture_output=True, text=True)
                if proc.returncode:
                    failed += 1
                    print(proc.stderr)
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--nvcc", default=None)
    ap.add_argument("--keep-fatbin", default=None, metavar="DIR",
                    help="keep each file's fatbin as DIR/NAME.fatbin (for cuobjdump -sass)")
    ap.add_argument("--experimental", action="store_true",
                    help="also the experimental instances (Hopper schedule modes 0-3, 27)")
    ap.add_argument("--all", action="store_true",
                    help="also the bfloat16 block-sparse twins CI leaves out")
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_kernels: nvcc not found (set NVCC or pass --nvcc)", file=sys.stderr)
        return 2
    groups = instances(args.experimental, args.all)
    names = {Path(f).name for f in args.files}
    unknown = names - set(groups)
    if unknown:
        print(f"check_kernels: no instances listed for {sorted(unknown)}", file=sys.stderr)
        return 2
    files = [KERNELS / n for n in sorted(names or groups)]
    failed = False
    for path in files:
        ok, log, res = compile_file(nvcc, path, args.keep_fatbin, groups[path.name])
        print(f"== {path.name}: {'ok' if ok else 'FAILED'} ({len(res)} entry/arch pairs)")
        if not ok:
            failed = True
            print(log)
        print(f"  {'entry':<44} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st/ld':>11} "
              f"{'smem':>5}")
        for (entry, arch), r in sorted(res.items()):
            spill = r["spill_st"] + r["spill_ld"]
            flag = "  <-- SPILLS" if spill else ""
            print(f"  {entry:<44} {arch:<7} {r['regs']:>4} {r['stack']:>5} "
                  f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['smem']:>5}{flag}")
            if spill:
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
