"""NcclComm (xattn.distributed over cupy.cuda.nccl) on one GPU, and its checks everywhere.

On a GPU (marked ``gpu``): a one-rank communicator made from a unique id runs ring attention,
forward and backward, contiguous and zigzag, on CuPy float16, within twice the error of a
naive float16 implementation of the float64 oracle, and equal to single-GPU
``flash_attention`` where the ring computes the very same call (contiguous forward); the NCCL
transport sends every dtype to itself byte for byte. A ring of one rank exchanges no block,
so the send/recv path is tested by the transport test; more ranks need more GPUs (NCCL does
not put two ranks of one communicator on one GPU) and have their own issue.

Everywhere: the unique id's forms, the choice of the form the installed CuPy takes, and the
TypeError of an NcclComm given NumPy arrays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xattn
from xattn import _transport
from xattn.distributed import (
    NcclComm,
    ring_attention,
    ring_attention_backward,
    shard,
    unshard,
)
from xattn.testing import (
    assert_close,
    naive_attention,
    naive_attention_backward,
    reference_attention,
    reference_attention_backward,
    to_numpy,
)

# ------------------------------------------------------------------------------------------
# Everywhere (no GPU needed)


def _one_rank_comm_without_nccl():
    """An NcclComm of one rank whose __init__ (which needs CuPy and NCCL) is skipped: the ring
    checks its inputs before it moves anything, and one rank exchanges nothing."""
    comm = object.__new__(NcclComm)
    comm.rank, comm.size, comm.device = 0, 1, 0
    return comm


def test_nccl_comm_refuses_numpy_arrays():
    comm = _one_rank_comm_without_nccl()
    q = np.zeros((2, 16, 8), np.float32)
    lse = np.zeros((2, 16), np.float32)
    match = "q: NcclComm moves CuPy arrays, got numpy.ndarray; use an mpi4py communicator"
    with pytest.raises(TypeError, match=match):
        ring_attention(q, q, q, comm)
    with pytest.raises(TypeError, match=match):
        ring_attention_backward(q, q, q, q, q, lse, comm, causal=True)


def test_unique_id_forms():
    raw = bytes(range(128))
    assert _transport._unique_id_bytes(raw) == raw
    assert _transport._unique_id_bytes(bytearray(raw)) == raw
    signed = tuple(b - 256 if b > 127 else b for b in range(200, 200 + 128))
    assert _transport._unique_id_bytes(signed) == bytes(b % 256 for b in range(200, 328))
    with pytest.raises(ValueError, match="128 values, got 3"):
        _transport._unique_id_bytes(b"abc")
    with pytest.raises(ValueError, match="-128..255"):
        _transport._unique_id_bytes((300,) * 128)
    with pytest.raises(TypeError, match="bytes or a sequence of ints"):
        _transport._unique_id_bytes(3.5)


class _Binding:
    """A stand-in for cupy.cuda.nccl whose NcclCommunicator takes one form of the id, refusing
    the others as a Cython signature (TypeError) or a char conversion (OverflowError) does."""

    def __init__(self, accepts):
        self.accepts, self.got = accepts, None
        binding = self

        class NcclCommunicator:
            def __init__(self, size, comm_id, rank):
                kind = "bytes" if isinstance(comm_id, bytes) else (
                    "signed" if min(comm_id) < 0 else "unsigned")
                if binding.accepts == "bytes" and kind != "bytes":
                    raise TypeError("Argument 'commId' has incorrect type (expected bytes)")
                if binding.accepts != "bytes" and kind == "bytes":
                    raise TypeError("Argument 'commId' has incorrect type (expected tuple)")
                if binding.accepts == "unsigned" and kind == "signed":
                    raise OverflowError("value too large to convert to char")
                binding.got = comm_id

        self.NcclCommunicator = NcclCommunicator


@pytest.mark.parametrize("accepts", ["bytes", "signed", "unsigned"])
def test_communicator_takes_the_form_the_binding_takes(accepts):
    raw = bytes(range(100, 228))
    binding = _Binding(accepts)
    _transport._communicator(binding, 2, raw, 1)
    assert bytes(b % 256 for b in binding.got) == raw
    if accepts == "signed":
        assert min(binding.got) < 0


# ------------------------------------------------------------------------------------------
# One GPU


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    cp.cuda.Device(0).use()
    return cp


@pytest.fixture(scope="module")
def comm(cupy):
    from cupy.cuda import nccl

    if not getattr(nccl, "available", False):
        pytest.skip("this CuPy has no NCCL (cupy.cuda.nccl.available is False)")
    return NcclComm(unique_id=NcclComm.unique_id(), rank=0, size=1)


@pytest.mark.gpu
def test_nccl_comm_from_every_unique_id_form(comm, cupy):
    uid = NcclComm.unique_id()
    assert len(uid) == 128
    again = NcclComm(unique_id=tuple(bytes(b % 256 for b in uid)), rank=0, size=1)
    assert (again.rank, again.size, again.device) == (0, 1, cupy.cuda.Device().id)
    assert again.nccl.size() == 1


@pytest.mark.gpu
def test_nccl_comm_from_mpi_comm_self(comm):
    """From an mpi4py communicator (rank 0 draws the id and broadcasts it). In a child
    process: MPI initialised in pytest's process would leak its environment into the
    ``mpiexec`` runs of later tests."""
    pytest.importorskip("mpi4py")
    code = ("from mpi4py import MPI; from xattn.distributed import NcclComm; "
            "c = NcclComm(MPI.COMM_SELF); print('ranks', c.rank, c.size)")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p),
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "ranks 0 1" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
def test_nccl_comm_refuses_numpy_arrays_on_the_gpu(comm):
    q = np.zeros((2, 16, 8), np.float16)
    with pytest.raises(TypeError, match="q: NcclComm moves CuPy arrays"):
        ring_attention(q, q, q, comm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int8"])
def test_nccl_transport_sends_bytes_unchanged(comm, cupy, dtype):
    from conftest import cupy_array

    rng = np.random.default_rng(3)
    host = np.clip(rng.standard_normal((3, 40, 6)) * 40, -120, 120)
    x = cupy_array(host, dtype)[:, ::3]  # strided: the transport sends a contiguous copy
    t = _transport.transport_for(comm, 30.0)
    h = t.post([(x, 0, 7)], [(x.shape, x.dtype, 0, 7, cupy)], what="a send to itself")
    (got,) = t.wait(h)
    assert isinstance(got, cupy.ndarray) and got.dtype == x.dtype and got.shape == x.shape
    width = np.dtype(x.dtype).itemsize
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    np.testing.assert_array_equal(cupy.ascontiguousarray(got).view(bits).get(),
                                  cupy.ascontiguousarray(x).view(bits).get())


CASES = [
    ("contiguous", {}),
    ("contiguous", {"causal": True}),
    ("contiguous", {"window": (40, 9)}),
    ("zigzag", {"causal": True}),
    ("zigzag", {"window": (70, 21)}),
    ("zigzag", {"causal": True, "window": (90, 0), "alibi": True}),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("layout", "options"), CASES,
                         ids=[f"{lay}-{'-'.join(o) or 'full'}" for lay, o in CASES])
def test_ring_over_nccl_float16(comm, cupy, layout, options):
    """Forward and backward at twice the naive float16 error of the float64 oracle; GQA."""
    opts = dict(options)
    hq, hkv, s, d = 4, 2, 256, 32
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = xattn.alibi_slopes(hq, dtype=np.float32)
    rng = np.random.default_rng(11)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float16) for shape in
                     ((2, hq, s, d), (2, hkv, s, d), (2, hkv, s, d), (2, hq, s, d)))
    ref, ref_lse, _ = reference_attention(q, k, v, **opts)
    naive = naive_attention(q, k, v, **opts)
    grads = reference_attention_backward(dout, q, k, v, **opts)
    naive_grads = naive_attention_backward(dout, q, k, v, naive.astype(np.float16), **opts)

    dev_opts = {key: (cupy.asarray(val) if isinstance(val, np.ndarray) else val)
                for key, val in opts.items()}
    loc = [cupy.asarray(shard(x, comm, layout=layout)) for x in (q, k, v, dout)]
    out, lse = ring_attention(*loc[:3], comm, layout=layout, return_lse=True, **dev_opts)
    got = ring_attention_backward(loc[3], *loc[:3], out, lse, comm, layout=layout, **dev_opts)

    def local(x, axis=-2):
        return shard(x, comm, layout=layout, axis=axis)

    assert_close(out, local(ref), xp=cupy, dtype=np.float16, naive=local(naive), name="out")
    assert_close(lse, local(ref_lse, -1), xp=cupy, dtype=np.float32, atol=2e-3, rtol=2e-3,
                 name="lse")
    for name, g, r, n in zip(("dq", "dk", "dv"), got, grads, naive_grads, strict=True):
        assert_close(g, local(r), xp=cupy, dtype=np.float16, naive=local(n), name=name)
    whole = unshard(out, comm, layout=layout)
    assert_close(whole, ref, xp=cupy, dtype=np.float16, naive=naive, name="unshard(out)")

    flash, flash_lse = xattn.flash_attention(*(cupy.asarray(x) for x in (q, k, v)),
                                             return_lse=True, **dev_opts)
    assert_close(flash, ref, xp=cupy, dtype=np.float16, naive=naive, name="flash out")
    if layout == "contiguous":
        # One rank holding the whole sequence in order: the ring makes flash's own call.
        np.testing.assert_array_equal(to_numpy(out), to_numpy(flash))
        np.testing.assert_array_equal(to_numpy(lse), to_numpy(flash_lse))
