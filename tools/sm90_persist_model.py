"""Random-interleaving model of the handover in flash_fwd_sm90_ws_persist (mode 235).

The producer thread (Q of each tile into QST buffers, then the tile's key blocks into the
WS_ST-stage K/V ring on a running count), the consumer warpgroup (waits on Q's and the stage's
full barriers by phase parity, releases Q after the tile's last S = Q K^T and each stage after
the P V that reads it, the last one after the tile's final P V) and the copy engine (copies land
in any order) step in random order over random tile lists, tiles without a visible key block
among them. Every read must see its own tile's data, and every run must end. A model of the
protocol, not of the code: keep it in step with the kernel when either changes.

Usage: python3 tools/sm90_persist_model.py [RUNS]
"""

from __future__ import annotations

import random
import sys

WS_ST = 3


class Barrier:
    """An mbarrier: a phase completes after ``count`` arrivals; waits compare parities only,
    as the hardware's try_wait.parity does."""

    def __init__(self, count):
        self.count = self.pending = count
        self.phase = 0

    def arrive(self, n=1):
        self.pending -= n
        assert self.pending >= 0, "more arrivals than the phase expects"
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):
        return (self.phase & 1) != parity


def run(tiles, qst, seed):
    """One schedule over ``tiles`` ((tile, key blocks) pairs) with ``qst`` Q buffers."""
    rng = random.Random(seed)
    full = [Barrier(1) for _ in range(WS_ST)]
    empty = [Barrier(4) for _ in range(WS_ST)]
    qfull = [Barrier(1) for _ in range(qst)]
    qempty = [Barrier(4) for _ in range(qst)]
    ring, qbuf, inflight = [None] * WS_ST, [None] * qst, []

    def producer():
        i = qn = 0
        for t, nkb in tiles:
            if nkb == 0:
                continue
            qs = qn % qst
            if qn >= qst:
                while not qempty[qs].done(((qn // qst) - 1) & 1):
                    yield
            inflight.append(("q", qs, t))
            qn += 1
            for j in range(nkb):
                st = (i + j) % WS_ST
                if i + j >= WS_ST:
                    while not empty[st].done((((i + j) // WS_ST) - 1) & 1):
                        yield
                inflight.append(("kv", st, (t, j)))
                yield
            i += nkb

    def consumer():
        ibase = qn = 0
        for t, nkb in tiles:
            if nkb == 0:
                yield
                continue
            qs = qn % qst
            while not qfull[qs].done((qn // qst) & 1):
                yield
            for i in range(nkb):
                ir = ibase + i
                st, pst = ir % WS_ST, (ir + WS_ST - 1) % WS_ST
                while not full[st].done((ir // WS_ST) & 1):
                    yield
                assert ring[st] == (t, i) and qbuf[qs] == t, (ring[st], qbuf[qs], t, i)
                if i == nkb - 1:  # the tile's last S = Q K^T is complete
                    yield
                    qempty[qs].arrive(4)
                yield
                # P V of the previous block (the first step's reads this block's stage).
                want = (t, i) if i == 0 else (t, i - 1)
                assert ring[st if i == 0 else pst] == want, (ring, want)
                yield
                if i > 0:
                    empty[pst].arrive(4)
            last = (ibase + nkb - 1) % WS_ST
            assert ring[last] == (t, nkb - 1)
            yield
            empty[last].arrive(4)
            ibase += nkb
            qn += 1

    def copy_engine():
        while True:
            if inflight and rng.random() < 0.5:
                kind, idx, tag = inflight.pop(rng.randrange(len(inflight)))
                if kind == "q":
                    qbuf[idx] = tag
                    qfull[idx].arrive()
                else:
                    ring[idx] = tag
                    full[idx].arrive()
            yield

    actors = {"producer": producer(), "consumer": consumer(), "copies": copy_engine()}
    alive = {"producer", "consumer"}
    for _ in range(200000):
        if not alive:
            return
        name = rng.choice(sorted(alive | {"copies"}))
        try:
            next(actors[name])
        except StopIteration:
            alive.discard(name)
    raise AssertionError(f"no progress (deadlock): tiles {tiles}, QST {qst}")


def main(runs=300):
    for seed in range(runs):
        rng = random.Random(seed)
        tiles = [(t, rng.choice((0, 1, 2, 3, 5, 9))) for t in range(rng.randrange(1, 12))]
        for qst in (1, 2):
            run(tiles, qst, seed * 7 + qst)
    print(f"ok: {2 * runs} schedules, no deadlock, every read saw its own tile's data")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
