"""flash_attention's host plan per CuPy call signature (xattn/flash.py: _signature, _PLANNED),
checked on the CPU with stand-ins for CuPy arrays and for the backend (the GPU test
tests/gpu/test_gpu_host_plan.py runs the same rules on real kernels)."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

import xattn
from xattn import _backends
from xattn import flash as flash_mod
from xattn._array import AttnProblem


class FakeCupyArray:
    """Just what the signature reads: a type from a module named cupy..., shape, dtype and
    device.id."""

    def __init__(self, shape, dtype="float16", device=0):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.device = types.SimpleNamespace(id=device)
        self.ndim = len(shape)


FakeCupyArray.__module__ = "cupy._core.fake"


def _qkv(**kw):
    return (FakeCupyArray((2, 4, 100, 64), **kw), FakeCupyArray((2, 2, 130, 64), **kw),
            FakeCupyArray((2, 2, 130, 64), **kw))


def _key(arrays, score=None, block_mask=None, backend="auto", flags=False):
    return flash_mod._signature("forward", arrays, score or {}, block_mask, backend, flags)


def test_the_signature_holds_what_the_plan_reads(monkeypatch):
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    q, k, v = _qkv()
    base = _key((q, k, v), {"causal": True, "window": (40, None)})
    assert base is not None
    assert base == _key(_qkv(), {"causal": True, "window": (40, None)})
    others = [
        _key((q, k, v), {"causal": True, "window": (41, None)}),
        _key((q, k, v), {"causal": True}),
        _key((q, k, v), {"causal": True, "window": (40, None)}, backend="cupy"),
        _key((q, k, v), {"causal": True, "window": (40, None)}, flags=True),
        _key(_qkv(dtype="float32"), {"causal": True, "window": (40, None)}),
        _key(_qkv(device=1), {"causal": True, "window": (40, None)}),
        _key((FakeCupyArray((2, 4, 101, 64)), k, v), {"causal": True, "window": (40, None)}),
    ]
    assert base not in others and len(set(others)) == len(others)
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm90")
    assert _key((q, k, v), {"causal": True, "window": (40, None)}) != base


@pytest.mark.parametrize("case", ["array_option", "numpy_scalar", "block_mask", "numpy",
                                  "mixed", "backend_object", "debug_logging"])
def test_what_is_planned_every_time(monkeypatch, case):
    q, k, v = _qkv()
    arrays, score, bm, backend = (q, k, v), {"causal": True}, None, "auto"
    if case == "array_option":
        score["alibi_slopes"] = FakeCupyArray((4,), "float32")
    elif case == "numpy_scalar":
        score["scale"] = np.float32(0.1)
    elif case == "block_mask":
        bm = object()
    elif case == "numpy":
        arrays = tuple(np.zeros(a.shape, np.float16) for a in arrays)
    elif case == "mixed":
        arrays = (q, k, np.zeros(v.shape, np.float16))
    elif case == "backend_object":
        backend = object()
    else:
        monkeypatch.setattr(_backends._log, "isEnabledFor", lambda level: level >= logging.DEBUG)
    assert _key(arrays, score, bm, backend) is None


def test_a_repeated_call_validates_and_selects_once(monkeypatch):
    """The flow of flash_attention with the validation, the table and the kernel stubbed: the
    second identical call reuses the plan; another option value plans again."""
    monkeypatch.setattr(flash_mod, "_PLANNED", {})
    seen = {"validate": 0, "select": 0, "forward": []}

    def validate(q, k, v, *, block_mask=None, **score):
        seen["validate"] += 1
        return AttnProblem(xp=None, batch=(2,), hq=4, hkv=2, sq=100, sk=130, d=64, dv=64,
                           dtype=np.dtype("float16"), cdtype=np.dtype("float32"), scale=0.125,
                           causal=bool(score.get("causal")), window=None, softcap=None)

    impl = types.SimpleNamespace(
        __name__="stub", forward=lambda prob, q, k, v, **kw: (seen["forward"].append(prob)
                                                                or ("out", "lse")))

    def select(prob, opts, backend, op):
        seen["select"] += 1
        return impl

    monkeypatch.setattr(flash_mod, "validate_attention", validate)
    monkeypatch.setattr(_backends, "select", select)
    q, k, v = _qkv()
    assert xattn.flash_attention(q, k, v, causal=True) == "out"
    assert xattn.flash_attention(q, k, v, causal=True, return_lse=True) == ("out", "lse")
    assert (seen["validate"], seen["select"]) == (1, 1)
    assert seen["forward"][0] is seen["forward"][1]
    xattn.flash_attention(q, k, v, causal=False)
    assert (seen["validate"], seen["select"]) == (2, 2)
    assert len(flash_mod._PLANNED) == 2


def test_cpu_calls_are_planned_every_time():
    """Only CuPy calls reuse a planned problem (xattn/flash.py: _signature): the CPU table's
    choice follows which packages import, and planning is small beside a CPU call."""
    q = np.ones((2, 8, 16), np.float32)
    before = dict(flash_mod._PLANNED)
    xattn.flash_attention(q, q, q, causal=True)
    assert flash_mod._PLANNED == before


def test_the_table_switches_are_part_of_the_signature(monkeypatch):
    """A switch of the kernel table flipped at run time gives a new signature (the choice is
    made again), and every switch of instances.py is listed."""
    from xattn._backends.cupy_ import instances

    named = {n for n in vars(instances) if n.endswith("_ON") and n.isupper()}
    assert named <= set(instances.SWITCHES), named - set(instances.SWITCHES)
    q, k, v = _qkv()
    before = _key((q, k, v), {"causal": True})
    for name in instances.SWITCHES:
        monkeypatch.setattr(instances, name, not getattr(instances, name))
        assert _key((q, k, v), {"causal": True}) != before, name
        monkeypatch.undo()
    assert _key((q, k, v), {"causal": True}) == before
