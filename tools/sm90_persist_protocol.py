"""A model of the mbarrier protocol of flash_fwd_sm90.cu's persistent schedule (mode 43).

    python3 tools/sm90_persist_protocol.py [--trials 20000]

The producer (``ws_produce_persist``) and the NWG consumer warpgroups (``flash_fwd_sm90_persist``)
as Python generators, run in random interleavings over random tile sequences (0 to 7 key
blocks per tile: tiles that see no key included): mbarriers with arrival counts and phase
parities as in the kernel (``try_wait.parity`` returns once the phase of that parity has
completed), the K/V ring of 3 stages with the running block count, Q in one or two buffers
(QST, as the kernel: two where they fit beside the ring). Checks:
no deadlock (every actor blocked for 2000 scheduler steps), and every read sees the data of
its own tile and key block (K and Q at S = Q K^T, V at the next step's or the tile's last
P V). cp.async completion is modelled as immediate (the kernel waits for its groups before
every arrival). A change to the kernel's handover order should be tried here first: moving
the producer's arrival of the previous tile's last block after its wait for ``qempty``
deadlocks, releasing Q after the first instead of the last S = Q K^T reads a wrong Q.
"""

from __future__ import annotations

import argparse
import random

NST = 3


class Bar:
    def __init__(self, count):
        self.count, self.arr, self.done = count, 0, 0

    def arrive(self):
        self.arr += 1
        assert self.arr <= self.count
        if self.arr == self.count:
            self.arr, self.done = 0, self.done + 1

    def ready(self, parity):
        return (self.done & 1) != parity


def run(tiles, nwg, qst, rnd):
    full = [Bar(1) for _ in range(NST)]
    empty = [Bar(nwg) for _ in range(NST)]
    qfull = [Bar(1) for _ in range(qst)]
    qempty = [Bar(nwg) for _ in range(qst)]
    K = [None] * NST
    V = [None] * NST
    Q = [None] * qst

    def producer():
        i, pend = 0, -1
        for n, blocks in enumerate(tiles):
            pos = 0

            def issue(n=n, blocks=blocks):
                nonlocal i, pos
                st = i % NST
                if i >= NST:
                    while not empty[st].ready(((i // NST) - 1) & 1):
                        yield "B"
                K[st] = V[st] = (n, blocks[pos])
                pos += 1
                i += 1
                yield

            first = pos < len(blocks)
            if first:
                yield from issue()
            if pend >= 0:
                full[pend].arrive()
                yield
            qs = n % qst
            if n >= qst:
                while not qempty[qs].ready(((n // qst) - 1) & 1):
                    yield "B"
            Q[qs] = n
            yield
            qfull[qs].arrive()
            if first:
                full[(i - 1) % NST].arrive()
            pend = -1
            yield
            while pos < len(blocks):
                yield from issue()
                if pend >= 0:
                    full[pend].arrive()
                pend = (i - 1) % NST
                yield
        if pend >= 0:
            full[pend].arrive()

    def consumer():
        ibase = 0
        for n, blocks in enumerate(tiles):
            qs = n % qst
            while not qfull[qs].ready((n // qst) & 1):
                yield "B"
            for j, kb in enumerate(blocks):
                ir = ibase + j
                st, pst = ir % NST, (ir + NST - 1) % NST
                while not full[st].ready((ir // NST) & 1):
                    yield "B"
                assert K[st] == (n, kb) and Q[qs] == n, ("K / Q", K[st], Q[qs], n, kb)
                yield
                assert Q[qs] == n, ("Q overwritten during S = Q K^T", Q[qs], n)
                if j == len(blocks) - 1:
                    qempty[qs].arrive()
                yield
                if j > 0:
                    assert V[pst] == (n, blocks[j - 1]), ("V", V[pst], n, blocks[j - 1])
                yield
                if j > 0:
                    empty[pst].arrive()
                yield
            if blocks:
                last = (ibase + len(blocks) - 1) % NST
                yield
                assert V[last] == (n, blocks[-1]), ("V of the tile's last P V", V[last])
                empty[last].arrive()
            else:
                qempty[qs].arrive()
            yield
            ibase += len(blocks)

    alive = [producer()] + [consumer() for _ in range(nwg)]
    stuck = 0
    while alive:
        a = rnd.choice(alive)
        try:
            stuck = stuck + 1 if next(a) == "B" else 0
        except StopIteration:
            alive.remove(a)
            stuck = 0
        if stuck > 2000:
            raise RuntimeError(f"deadlock: tiles {tiles}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    for _ in range(args.trials):
        tiles = [sorted(rnd.sample(range(20), rnd.choice([0, 0, 1, 1, 2, 3, 4, 5, 7])))
                 for _ in range(rnd.randint(1, 6))]
        run(tiles, rnd.choice([2, 3]), rnd.choice([1, 2]), rnd)
    print(f"{args.trials} random schedules: no deadlock, every read saw its own data")


if __name__ == "__main__":
    main()
