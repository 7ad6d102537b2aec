"""CPU emulation of the bulk-copy decode candidates' shared-memory layout (decode_splitkv.cu).

For one warp's stage it places every key row where ``load_kv_bulk`` puts it (RPC = 1: one
row a copy into padded rows; RPC = 2: pairs of adjacent keys, a pair split by a page boundary
in two copies, V rows past the sequence end zeroed rather than copied), checks that the bytes
announced to the mbarrier equal the bytes copied, then replays the compute's ldmatrix
addresses (Q K^T's B fragments, P V's transposed B fragments) and checks that each fragment
element holds the key the mask formula assigns to that score column and the right head-dim
element. The GPU tests check the numbers; this checks the index algebra anywhere.

Usage: ``python3 tools/decode_bulk_layout_check.py`` (about 3 s; prints ``ok N``).
"""

from __future__ import annotations

import sys


def place(D, KPS, RPC, ps, j0, hi):
    """``({element offset: ((kind, key), d)}, bytes copied, bytes announced)`` of one stage;
    K rows from offset 0, V rows from ``KPS * (D + 8)`` (16-bit elements)."""
    LD, PS = D + 8, 2 * D + 8
    last = min(j0 + KPS, hi) - 1
    sk, sv = 0, KPS * LD
    sm, copied = {}, 0

    def copy(dst, kind, j, rows):
        nonlocal copied
        for rr in range(rows):
            for d in range(D):
                sm[dst + rr * D + d] = ((kind, j + rr), d)
        copied += rows * D * 2

    def zero(dst, rows):  # the ordinary stores of V rows past the end
        for i in range(rows * D):
            sm[dst + i] = "zero"

    for lane in range(32):
        if RPC == 1:
            is_v = lane >= 16
            for u in range(KPS // 16):
                r = (lane & 15) + u * 16
                if j0 + r <= last:
                    copy((sv if is_v else sk) + r * LD, "V" if is_v else "K", j0 + r, 1)
                elif is_v:
                    zero(sv + r * LD, 1)
            continue
        for w in range((KPS + 31) // 32):
            idx = lane + 32 * w
            if idx >= KPS:
                break
            u, p, is_v = idx >> 4, idx & 7, (idx >> 3) & 1
            j = j0 + u * 16 + 2 * p
            so = (sv if is_v else sk) + u * 16 * LD + p * PS
            n = min(2, max(0, last - j + 1))
            kind = "V" if is_v else "K"
            if n == 2 and j % ps + 1 == ps:  # two pages: two copies
                copy(so, kind, j, 1)
                copy(so + D, kind, j + 1, 1)
            elif n:
                copy(so, kind, j, n)
            if is_v and n < 2:
                zero(so + n * D, 2 - n)
    return sm, copied, (last - j0 + 1) * 2 * D * 2


def key_of(RPC, k0, ntile, nn):
    """The mask formula's key of score column ``nn`` of n-tile ``ntile`` (the kernel's j)."""
    return k0 + nn * 2 + ntile if RPC == 2 else k0 + ntile * 8 + nn


def check(D, KPS, RPC, ps, j0, hi):
    LD, PS = D + 8, 2 * D + 8
    sm, copied, announced = place(D, KPS, RPC, ps, j0, hi)
    assert copied == announced, (copied, announced)
    last = min(j0 + KPS, hi) - 1
    for u in range(KPS // 16):
        k0 = j0 + u * 16
        if k0 >= hi:
            break  # the kernel skips a tile wholly past the end
        kbase, vbase = u * 16 * LD, KPS * LD + u * 16 * LD
        # Q K^T: lane t receives row t >> 2 (the n index), columns (t & 3) * 2 + e of each of
        # the 4 matrices (n-tile m >> 1, k half m & 1).
        for ks in range(D // 16):
            addr = []
            for lane in range(32):
                r = (lane & 7) + (lane >> 4) * 8
                ro = (lane & 7) * PS + (lane >> 4) * D if RPC == 2 else r * LD
                addr.append(kbase + ro + ks * 16 + ((lane >> 3) & 1) * 8)
            for t in range(32):
                for m in range(4):
                    for e in range(2):
                        j = key_of(RPC, k0, m >> 1, t >> 2)
                        want = (("K", j), ks * 16 + (m & 1) * 8 + (t & 3) * 2 + e)
                        got = sm.get(addr[m * 8 + (t >> 2)] + (t & 3) * 2 + e)
                        assert j > last or got == want, ("K", D, KPS, RPC, ps, j0, hi, got, want)
        # P V: transposed, lane t receives rows (t & 3) * 2 + e (the k index: P's column in
        # the n-tiles' order) at column t >> 2 of each matrix (k half m & 1, d half m >> 1).
        for dn in range(D // 16):
            addr = []
            for lane in range(32):
                r = (lane & 7) + ((lane >> 3) & 1) * 8
                ro = (lane & 7) * PS + ((lane >> 3) & 1) * D if RPC == 2 else r * LD
                addr.append(vbase + ro + dn * 16 + (lane >> 4) * 8)
            for t in range(32):
                for m in range(4):
                    for e in range(2):
                        kk = (m & 1) * 8 + (t & 3) * 2 + e
                        j = key_of(RPC, k0, kk >> 3, kk & 7)
                        want = (("V", j), dn * 16 + (m >> 1) * 8 + (t >> 2))
                        got = sm.get(addr[m * 8 + (t & 3) * 2 + e] + (t >> 2))
                        want = want if j <= last else "zero"  # a zero weight meets zeros
                        assert got == want, ("V", D, KPS, RPC, ps, j0, hi, got, want)


def cases():
    for D in (64, 128):
        for KPS, RPC in ((16, 1), (32, 1), (16, 2), (32, 2), (64, 2)):
            for ps in (7, 8, 24, 64, 1 << 20):
                for j0 in (0, 16, 48, 112):
                    for n in (1, 2, 15, 17, 33, 64, 200):
                        yield D, KPS, RPC, ps, j0, j0 + n


def main():
    count = 0
    for case in cases():
        check(*case)
        count += 1
    print("ok", count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
