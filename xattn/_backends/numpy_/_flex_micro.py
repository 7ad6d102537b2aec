"""Register-blocked micro-kernels of the flex forward's narrow tiles (sliding-window edges).

BLAS multiplies rectangles. A band (each row sees the keys within a fixed distance) is not one:
covering it with rectangles either wastes pairs (tall tiles over the band's hull) or calls BLAS
on many short ones (a staircase of 64-key tiles), and both cost ~25 % against dense flash
(docs/dev/perf_flex.rst). These kernels multiply a few rows at a time over exactly the keys
those rows see, so the tiles follow the band: each call is a block of ``RB`` rows held in vector
registers for its whole key range.

Written in LLVM IR through :func:`numba.extending.intrinsic`: the accumulators must stay in
registers across the reduction loop, and neither numba's loops (index wraparound checks, no
no-alias information) nor its scalar code (the SLP vectoriser gave up) get LLVM to do that
(measured 5-17 GFLOP/s against 115-150 here). Vectors are 64 bytes where the CPU has AVX-512,
else 32; an ``RB x NV`` block of accumulators fits the 32 (AVX-512) registers. Loads and stores
are unaligned; every pointer is an element offset into a 1-D contiguous array.

Imported by the generated flex modules only (it imports numba).
"""

from __future__ import annotations

from llvmlite import binding as _ll
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _vector_bytes():
    try:
        features = _ll.get_host_cpu_features()
        return 64 if features.get("avx512f", False) else 32
    except RuntimeError:  # pragma: no cover - features unknown
        return 32


VEC_BYTES = _vector_bytes()
# Bump when the kernels below change: the generated modules that use them carry it.
VERSION = 4
# Rows per call and vectors per row: QK^T blocks of 12 rows x 2 vectors (32 float32 keys), and
# P @ V blocks of 6 rows x 4 vectors (64 float32 value columns): 24 accumulators each,
# measured 115-150 GFLOP/s per core (AVX-512) on the band's rows.
QK_ROWS = 12
QK_VECS = 2
PV_ROWS = 6
PV_VECS = 4


def _data(context, builder, aty, val, off):
    arr = context.make_array(aty)(context, builder, val)
    return builder.gep(arr.data, [off])


def _splat(builder, x, vty):
    n = vty.count
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _vload(builder, ptr, vty):
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _vstore(builder, val, ptr, vty):
    builder.store(val, builder.bitcast(ptr, vty.as_pointer()), align=1)


def _operands(context, builder, signature, args, *which):
    """The vector type of the first operand's elements, its width, the index type and the
    data pointers of the array arguments at ``which`` (each followed by its offset)."""
    ety = context.get_value_type(signature.args[0].dtype)
    width = VEC_BYTES // context.get_abi_sizeof(ety)
    ptrs = [_data(context, builder, signature.args[i], args[i], args[i + 1]) for i in which]
    return ir.VectorType(ety, width), width, args[2].type, ptrs


def _accumulators(builder, vty, nrows, nvecs):
    return [[cgutils.alloca_once(builder, vty) for _ in range(nvecs)] for _ in range(nrows)]


def _outer_products(builder, accs, arows, b, ldb, count, vty, ity):
    """``accs[r][v] += a[r][j] * b[j*ldb + v*vector : ...]`` for ``j < count``: one row of ``b``
    (a row of the transposed keys, or of values) per step, ``a``'s rows at ``arows``."""
    width = vty.count
    with cgutils.for_range(builder, count) as loop:
        j = loop.index
        brow = builder.gep(b, [builder.mul(j, ldb)])
        bv = [_vload(builder, builder.gep(brow, [ir.Constant(ity, v * width)]), vty)
              for v in range(len(accs[0]))]
        for r, row in enumerate(accs):
            x = _splat(builder, builder.load(builder.gep(arows[r], [j])), vty)
            for v, acc in enumerate(row):
                builder.store(_fma(builder, builder.load(acc), x, bv[v]), acc)


def _fma(builder, a, x, y):
    return builder.fadd(a, builder.fmul(x, y, flags=["fast"]), flags=["fast"])


def _gemm_kernel(nrows, nvecs, accumulate):
    """``c[r*ldc + x] (+)= sum_j a[r*lda + j] * b[j*ldb + x]`` for ``r < nrows``,
    ``x < nvecs * vector``, ``j < count``: the accumulators start from ``c`` (``accumulate``)
    or from zero, live in registers through the whole sum and are stored once."""

    @intrinsic
    def gemm(typingctx, a, aoff, lda, b, boff, ldb, c, coff, ldc, count):
        sig = types.void(a, aoff, lda, b, boff, ldb, c, coff, ldc, count)

        def codegen(context, builder, signature, args):
            lda, ldb, ldc, count = args[2], args[5], args[8], args[9]
            vty, width, ity, (ap, bp, cp) = _operands(context, builder, signature, args, 0, 3, 6)
            arows = [builder.gep(ap, [builder.mul(ir.Constant(ity, r), lda)])
                     for r in range(nrows)]
            cols = [[builder.gep(builder.gep(cp, [builder.mul(ir.Constant(ity, r), ldc)]),
                                 [ir.Constant(ity, v * width)]) for v in range(nvecs)]
                    for r in range(nrows)]
            accs = _accumulators(builder, vty, nrows, nvecs)
            for acc_row, col_row in zip(accs, cols, strict=True):
                for acc, col in zip(acc_row, col_row, strict=True):
                    start = _vload(builder, col, vty) if accumulate else ir.Constant(vty, None)
                    builder.store(start, acc)
            _outer_products(builder, accs, arows, bp, ldb, count, vty, ity)
            for acc_row, col_row in zip(accs, cols, strict=True):
                for acc, col in zip(acc_row, col_row, strict=True):
                    _vstore(builder, builder.load(acc), col, vty)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


def _qk_kernel(nrows, nvecs):
    qk = _gemm_kernel(nrows, nvecs, accumulate=False)
    qk.__doc__ = (f"``s[r*lds + c] = sum_d q[r*ldq + d] * kt[d*ldk + c]`` for ``r < {nrows}``, "
                  f"``c < {nvecs} * vector``, ``d < dim`` (``kt``: the keys transposed, "
                  "``(D, keys)``).")
    return qk


# QK^T over QK_ROWS rows, and over QK_TAIL (a group's last rows: 256 = 21 x 12 + 4).
QK_TAIL = 4
qk_tile = _qk_kernel(QK_ROWS, QK_VECS)
qk_tile_tail = _qk_kernel(QK_TAIL, QK_VECS)
# One vector of keys: the last keys of a block's range when one vector covers them.
qk_tile_1 = _qk_kernel(QK_ROWS, 1)
qk_tile_tail_1 = _qk_kernel(QK_TAIL, 1)


def _pv_kernel(nrows, nvecs):
    pv = _gemm_kernel(nrows, nvecs, accumulate=True)
    pv.__doc__ = (f"``acc[r*lda + c] += sum_j p[r*ldp + j] * v[j*ldv + c]`` for ``r < {nrows}``, "
                  f"``c < {nvecs} * vector``, ``j < n``.")
    return pv


# P @ V over PV_VECS vectors of value columns, and over one (the columns left after them).
pv_tile = _pv_kernel(PV_ROWS, PV_VECS)
pv_tile_1 = _pv_kernel(PV_ROWS, 1)


@intrinsic
def transpose_tile(typingctx, src, soff, lds, dst, doff, ldd):
    """``dst[d*ldd + c] = src[c*lds + d]`` for ``c, d < vector``: one square tile.

    In registers, by ``log2(vector)`` rounds of two-source shuffles (each round swaps the
    off-diagonal halves of every 2x2 block of sub-tiles); numba's element loops took 1.5-3 ns
    per element, which cost the band path 10-15 % of its time.
    """
    sig = types.void(src, soff, lds, dst, doff, ldd)

    def codegen(context, builder, signature, args):
        lds, ldd = args[2], args[5]
        vty, width, ity, (sp, dp) = _operands(context, builder, signature, args, 0, 3)
        rows = [_vload(builder, builder.gep(sp, [builder.mul(ir.Constant(ity, c), lds)]), vty)
                for c in range(width)]
        i32v = ir.VectorType(ir.IntType(32), width)
        s = width // 2
        while s >= 1:
            out = list(rows)
            for i in range(width):
                if i & s:
                    continue
                a, b = rows[i], rows[i + s]
                lo = [j if not j & s else width + j - s for j in range(width)]
                hi = [j + s if not j & s else width + j for j in range(width)]
                out[i] = builder.shuffle_vector(a, b, ir.Constant(i32v, lo))
                out[i + s] = builder.shuffle_vector(a, b, ir.Constant(i32v, hi))
            rows = out
            s //= 2
        for d in range(width):
            _vstore(builder, rows[d], builder.gep(dp, [builder.mul(ir.Constant(ity, d), ldd)]),
                    vty)
        return context.get_dummy_value()

    return sig, codegen
