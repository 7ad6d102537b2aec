# Emulates load_kv_bulk's placement (RPC 1 and 2) and the compute's ldmatrix addressing and
# mask key index, checking that the key the mask assigns to each score element is the key whose
# row ldmatrix delivers there, for K and V, with paging and sequence ends.
import itertools
def check(D, KPS, RPC, ps, j0, hi):
    LD = D + 8; PS = 2 * D + 8; ROW = D  # in elements
    last = min(j0 + KPS, hi) - 1
    sm = {}  # element offset -> (kind, key, d) ; K region at 0, V region at KPS*LD
    sk, sv = 0, KPS * LD
    nbytes = 0
    def copy(dst, key, nrows):
        nonlocal nbytes
        kind, j = key
        for rr in range(nrows):
            for d in range(D):
                sm[dst + rr * D + d] = ((kind, j + rr), d)
        nbytes += nrows * D * 2
    for lane in range(32):
        if RPC == 1:
            is_v = lane >= 16
            for u in range(KPS // 16):
                r = (lane & 15) + u * 16; j = j0 + r
                so = (sv if is_v else sk) + r * LD
                if j <= last:
                    copy(so, ('V' if is_v else 'K', j), 1)
        else:
            for w in range((KPS + 31) // 32):
                idx = lane + 32 * w
                if idx >= KPS: break
                u, p, is_v = idx >> 4, idx & 7, (idx >> 3) & 1
                r = u * 16 + 2 * p; j = j0 + r
                so = (sv if is_v else sk) + u * 16 * LD + p * PS
                n = min(2, max(0, last - j + 1))
                jo = j % ps
                two = n == 2 and jo + 1 == ps
                kind = 'V' if is_v else 'K'
                if n > 0:
                    if two:
                        copy(so, (kind, j), 1); copy(so + D, (kind, j + 1), 1)
                    else:
                        copy(so, (kind, j), n)
    # fix the key tuple format: copy stored ((kind,j)+rr) wrongly -> redo properly
    assert nbytes == (last - j0 + 1) * 2 * D * 2, (nbytes,)
    for u in range(KPS // 16):
        k0 = j0 + u * 16
        if k0 >= hi: break
        kbase = sk + u * 16 * LD; vbase = sv + u * 16 * LD
        # QK^T: B fragment via ldmatrix: lane t of matrix m gets row t>>2, cols (t&3)*2..+1
        for ks in range(D // 16):
            addr = {}
            for lane in range(32):
                r = (lane & 7) + (lane >> 4) * 8
                c = ks * 16 + ((lane >> 3) & 1) * 8
                ro = (lane & 7) * PS + (lane >> 4) * D if RPC == 2 else r * LD
                addr[lane] = kbase + ro + c
            for t in range(32):
                gq, t4 = t >> 2, t & 3
                for m in range(4):
                    n = m >> 1; khalf = m & 1
                    for e in range(2):
                        a = addr[m * 8 + gq] + t4 * 2 + e
                        # this is B[k = khalf*8 + t4*2+e][n-col gq] of n-tile n
                        want_key = None
                        # mask formula's key for score column (n, gq): score element j uses
                        # col index within n-tile = gq (the c-fragment col is t4*2+e, which
                        # for the B operand is the n index of the thread gq)
                        nn = gq
                        j = (k0 + nn * 2 + n) if RPC == 2 else (k0 + n * 8 + nn)
                        dexp = ks * 16 + khalf * 8 + t4 * 2 + e
                        got = sm.get(a)
                        if j <= last:
                            assert got is not None and got[0] == ('K', j) and got[1] == dexp, (D, KPS, RPC, ps, j0, hi, u, ks, t, m, e, got, j, dexp)
        # PV: B fragment via ldmatrix.trans: matrix m rows are k (keys), thread t gets
        # elements (k = (t&3)*2+e, n = t>>2) of the 8x8, i.e. row (t&3)*2+e, col t>>2
        for dn in range(D // 16):
            addr = {}
            for lane in range(32):
                r = (lane & 7) + ((lane >> 3) & 1) * 8
                c = dn * 16 + (lane >> 4) * 8
                ro = (lane & 7) * PS + ((lane >> 3) & 1) * D if RPC == 2 else r * LD
                addr[lane] = vbase + ro + c
            for t in range(32):
                for m in range(4):
                    for e in range(2):
                        krow = (t & 3) * 2 + e; ncol = t >> 2
                        a = addr[m * 8 + krow] + ncol
                        kk = (m & 1) * 8 + krow  # k index of P (= score column nn + 8*ntile)
                        ntile, nn = kk >> 3, kk & 7
                        j = (k0 + nn * 2 + ntile) if RPC == 2 else (k0 + ntile * 8 + nn)
                        dexp = dn * 16 + (m >> 1) * 8 + ncol
                        got = sm.get(a)
                        if j <= last:
                            assert got is not None and got[0] == ('V', j) and got[1] == dexp, (D, KPS, RPC, ps, j0, hi, dn, t, m, e, got, j, dexp)
    # the score's key for c-fragment element (n, t4*2+e): RPC2 k0+(t4*2+e)*2+n ; same as nn=t4*2+e
    return True

# copy() stores (kind,j)+rr: fix by redefining
import types
def _copy_fix():
    pass
cnt = 0
for D in (64, 128):
    for KPS, RPC in ((16, 1), (32, 1), (16, 2), (32, 2), (64, 2)):
        for ps in (7, 8, 24, 64, 10**6):
            for j0 in (0, 16, 48, 112):
                for hi in (j0 + 1, j0 + 2, j0 + 15, j0 + 17, j0 + 33, j0 + 64, j0 + 200):
                    check(D, KPS, RPC, ps, j0, hi); cnt += 1
print("ok", cnt)
