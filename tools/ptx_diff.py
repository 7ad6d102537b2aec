"""Compare the PTX of every kernel entry point between two snapshots (refactors must not move it).

Usage::

    python3 tools/ptx_diff.py snapshot DIR [--file F.cu] [--experimental] [--arch sm_90a]
    python3 tools/ptx_diff.py compare BEFORE_DIR AFTER_DIR [--registers]

``snapshot`` compiles every shipped instance (the list of ``xattn/_backends/cupy_/instances.py``,
one translation unit per kernel file, as the CI compile step does) to PTX with ``nvcc -ptx`` for
each architecture, with the launchers' options, and stores one file per (file, arch).
``compare`` splits both snapshots into entry points and reports the entries whose PTX differs,
appeared or disappeared (branch labels and local depots are numbered by the function's place
in its translation unit: those numbers are ignored); the exit status is non-zero when any did.
``--registers`` renumbers virtual registers by first use inside each entry before comparing.
``flash_fwd_simt.cu``, ``flash_fwd_tf32.cu`` and ``flash_bwd_tf32x3.cu`` give PTX that varies
between two builds of the same, unchanged source (one ``ld.shared`` more or less vectorised,
in one to three entries a build): compare their entries' instruction histograms instead, or
against several builds of the old source.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(", re.M)
_REG = re.compile(r"%(r|rd|f|fd|p|rs|h|hh)(\d+)\b")
# Labels and local depots carry the function's position in its translation unit, and so do
# the labels that inline asm numbers with %= (mbar_wait's WAIT_<n>: a count over the unit).
_POSITIONAL = ((re.compile(r"\$L__BB\d+_"), "$L__BB_"),
               (re.compile(r"__local_depot\d+"), "__local_depot"),
               (re.compile(r"\bWAIT_\d+\b"), "WAIT_"))


def entries(ptx: str) -> dict:
    """``{entry name: PTX text of its body}``, comments and blank lines removed."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        body = ptx[pos:end]
        close = body.rfind("\n}")
        body = body[: close + 2] if close >= 0 else body
        lines = [ln.split("//")[0].rstrip() for ln in body.splitlines()]
        body = "\n".join(ln for ln in lines if ln.strip())
        for pattern, repl in _POSITIONAL:
            body = pattern.sub(repl, body)
        out[name] = body
    return out


def renumber(body: str) -> str:
    """Virtual registers renamed by first use (``%r17`` -> ``%r<k>``), per register class."""
    seen: dict = {}
    count: dict = {}

    def sub(m):
        key = (m.group(1), m.group(2))
        if key not in seen:
            seen[key] = count.get(m.group(1), 0)
            count[m.group(1)] = seen[key] + 1
        return f"%{m.group(1)}{seen[key]}"

    return _REG.sub(sub, body)


def compare(before: Path, after: Path, registers: bool, renames=()) -> int:
    bad = 0
    total = 0
    for pb in sorted(before.glob("*.ptx")):
        pa = after / pb.name
        text = pb.read_text()
        for old, new in renames:
            text = re.sub(old, new, text)
        eb = entries(text)
        ea = entries(pa.read_text()) if pa.exists() else {}
        for name in sorted(set(eb) | set(ea)):
            total += 1
            if name not in ea:
                print(f"{pb.name}: {name}: gone")
                bad += 1
                continue
            if name not in eb:
                print(f"{pb.name}: {name}: new")
                continue
            x, y = eb[name], ea[name]
            if registers:
                x, y = renumber(x), renumber(y)
            if x != y:
                bad += 1
                print(f"{pb.name}: {name}: PTX differs")
    print(f"{total} entry/arch pairs compared, {bad} differ or are gone")
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("dir", type=Path)
    s.add_argument("--arch", action="append", default=None)
    s.add_argument("--nvcc", default=None)
    s.add_argument("--file", action="append", default=None,
                   help="only this kernel file (repeatable), e.g. flash_fwd_sm90.cu")
    s.add_argument("--experimental", action="store_true",
                   help="also the experimental instances")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--registers", action="store_true")
    c.add_argument("--rename", action="append", default=[], metavar="REGEX=REPL",
                   help="rewrite symbols of BEFORE first (a moved namespace changes the mangled "
                        "names of shared-memory arrays), e.g. _ZN7xattn90=_ZN5xattn4sm90")
    args = ap.parse_args(argv)
    if args.cmd == "compare":
        renames = [tuple(r.split("=", 1)) for r in args.rename]
        return compare(args.before, args.after, args.registers, renames)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import check_kernels

    nvcc = check_kernels.find_nvcc(args.nvcc)
    if nvcc is None:
        print("ptx_diff: nvcc not found", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    return check_kernels.write_ptx(nvcc, args.dir, args.arch or ["sm_80", "sm_90a"],
                                   args.experimental, args.file)


if __name__ == "__main__":
    sys.exit(main())
