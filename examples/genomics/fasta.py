"""FASTA reading and writing, and a synthetic genome with planted repeats.

No genome small enough to ship could be had from a package registry without a download at
run time, so the pipeline's default input is synthetic: random DNA (with a GC content you
choose) in which repeats are planted at known places, written as FASTA and read back like any
genome. Pass ``--fasta`` to the pipeline to read a real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# One-hot codes: A C G T; anything else (N, IUPAC ambiguity codes) is all zeros.
_CODE = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate(b"ACGT"):
    _CODE[_b] = _i
    _CODE[_b + 32] = _i  # lower case: soft-masked repeats in real assemblies


def read_fasta(path):
    """The records of a FASTA file as ``[(name, sequence bytes), ...]``.

    Header lines start with ``>`` (the name is the header's first word); sequence lines are
    concatenated with white space removed; ``;`` comment lines are skipped.
    """
    records, name, parts = [], None, []
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(b";"):
                continue
            if line.startswith(b">"):
                if name is not None:
                    records.append((name, b"".join(parts)))
                header = line[1:].split()
                name = header[0].decode() if header else f"record{len(records)}"
                parts = []
            else:
                if name is None:
                    raise ValueError(f"{path}: sequence data before the first '>' header")
                parts.append(line.replace(b" ", b""))
    if name is not None:
        records.append((name, b"".join(parts)))
    if not records:
        raise ValueError(f"{path}: no FASTA record found")
    return records


def write_fasta(path, records, *, width=60):
    """Write ``[(name, sequence bytes or str), ...]`` as FASTA, ``width`` bases a line."""
    with open(path, "wb") as f:
        for name, seq in records:
            seq = seq.encode() if isinstance(seq, str) else bytes(seq)
            f.write(b">" + name.encode() + b"\n")
            for i in range(0, len(seq), width):
                f.write(seq[i:i + width] + b"\n")


def encode(seq):
    """Base codes ``uint8 (S,)``: 0..3 for A, C, G, T (either case), 4 for anything else."""
    return _CODE[np.frombuffer(seq, dtype=np.uint8)]


@dataclass(frozen=True)
class Repeat:
    """One planted repeat: copies of ``unit`` bases at each start in ``starts``."""

    kind: str
    unit: int
    starts: tuple

    def spans(self):
        return [(s, s + self.unit) for s in self.starts]


def synthetic_genome(length, *, seed=0, gc=0.41, reach=1500):
    """Random DNA of ``length`` bases with planted repeats, and the list of repeats.

    Planted (scaled to the length, copies at most ``reach`` bases apart so that an attention
    window of ``2 * reach`` sees both): a tandem array (a short unit repeated in a row) and
    duplicated segments (one segment copied further downstream). Elsewhere the sequence is
    i.i.d. with the given GC content, so any context longer than ~16 bases is unique.
    """
    rng = np.random.default_rng(seed)
    p = np.array([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
    codes = rng.choice(4, size=length, p=p).astype(np.uint8)
    repeats = []

    def place(kind, unit, starts):
        src = codes[starts[0]:starts[0] + unit].copy()
        for s in starts[1:]:
            codes[s:s + unit] = src
        repeats.append(Repeat(kind, unit, tuple(int(s) for s in starts)))

    if length >= 400:
        unit = max(8, min(60, length // 500))
        n = max(3, min(12, length // (20 * unit)))
        t0 = length // 5
        place("tandem", unit, [t0 + i * unit for i in range(n)])
        seg = max(16, min(400, length // 100))
        gap = max(0, min(reach - seg, length // 10))  # copies start at most `reach` apart
        for frac in (0.5, 0.8):
            s0 = int(length * frac) - (seg + gap) // 2
            place("duplication", seg, [s0, s0 + seg + gap])
    seq = np.frombuffer(b"ACGT", dtype=np.uint8)[codes].tobytes()
    return seq, repeats
