"""The kernel table: one entry per implementation, one supports() shape, switches from the
environment, visible routes (explain, the xattn logger) and the PerformanceWarning."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings

import numpy as np
import pytest

import xattn
from xattn import _backends
from xattn._array import validate_attention


def _prob(**options):
    x = np.zeros((2, 8, 16), dtype=np.float32)
    return validate_attention(x, x, x, **options)


def _inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 40, 16), dtype=np.float32) for _ in range(3)]


def test_every_entry_is_in_one_order_and_names_a_real_module():
    names = [n for dev in _backends._PREFERENCE.values() for n in dev]
    assert sorted(names + list(_backends.OPT_IN)) == sorted(_backends.BACKENDS)
    for alias, members in _backends.ALIASES.items():
        assert alias not in _backends.BACKENDS
        assert set(members) <= set(_backends.BACKENDS)


@pytest.mark.parametrize("name", list(_backends.BACKENDS))
def test_every_entry_has_the_same_supports(name):
    entry = _backends.BACKENDS[name]
    spec = importlib.util.find_spec(entry.module, _backends.__name__)
    assert spec is not None, entry.module
    mod = entry.load()  # the GPU launchers import without CuPy (CuPy is imported in calls)
    params = list(inspect.signature(mod.supports).parameters)
    assert params[:3] == ["prob", "opts", "op"], (name, params)
    if entry.module not in dict(entry.ops).values():  # not an entry of its own op only
        assert callable(mod.forward)


@pytest.mark.parametrize("name", list(_backends.BACKENDS))
def test_entries_read_the_block_mask_from_the_problem(name):
    # A block mask travels in prob.block_mask (validated once); no entry takes it beside it.
    mod = _backends.BACKENDS[name].load()
    for fn in (getattr(mod, "forward", None), getattr(mod, "backward", None)):
        if fn is not None:
            assert "block_mask" not in inspect.signature(fn).parameters, (name, fn.__name__)


def test_public_signatures_keep_block_mask():
    for fn in (xattn.flash_attention, xattn.flash_attention_backward):
        params = list(inspect.signature(fn).parameters)
        assert params[params.index("scale") + 1] == "block_mask", fn.__name__
    assert list(inspect.signature(xattn.block_sparse_attention).parameters)[3] == "block_mask"


@pytest.mark.parametrize("name", list(_backends.BACKENDS))
def test_no_module_globals_switch_kernels(name):
    mod = _backends.BACKENDS[name].load()
    flags = [a for a in vars(mod) if a.startswith("ENABLE_") or a == "POISON"]
    assert not flags, f"{name}: switches belong in XATTN_DISABLE / XATTN_POISON: {flags}"


@pytest.mark.parametrize("name", [n for n, b in _backends.BACKENDS.items() if b.device == "gpu"])
def test_gpu_entries_are_accepted_names_and_refuse_host_arrays(name):
    with pytest.raises(TypeError, match=rf"backend='{name}' runs on the gpu"):
        xattn.flash_attention(*_inputs(), backend=name)


def test_explain_names_the_route_and_the_reasons(monkeypatch):
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    expected = next(n for n, why in _backends.available_backends(np).items() if why is None)
    got = _backends.explain(_prob(), {})
    assert got["backend"] == expected and got["reasons"][expected] is None
    assert _backends.select_entry(_prob(), {}).name == expected


def test_xattn_disable_removes_entries(monkeypatch):
    monkeypatch.setenv("XATTN_DISABLE", "numba")
    got = _backends.explain(_prob(), {})
    assert got["backend"] == "numpy"
    assert got["reasons"]["numba"] == "switched off by XATTN_DISABLE"
    with pytest.raises(NotImplementedError, match="switched off by XATTN_DISABLE"):
        xattn.flash_attention(*_inputs(), backend="numba")
    q, k, v = _inputs()
    np.testing.assert_allclose(xattn.flash_attention(q, k, v),
                               xattn.standard_attention(q, k, v), atol=1e-5)


def test_xattn_disable_prefix_and_typos(monkeypatch):
    monkeypatch.setenv("XATTN_DISABLE", "cupy")
    assert set(_backends.disabled()) == {n for n in _backends.BACKENDS if n.startswith("cupy.")}
    monkeypatch.setenv("XATTN_DISABLE", "cupy.sm9")
    with pytest.raises(ValueError, match="XATTN_DISABLE: unknown backend 'cupy.sm9'"):
        xattn.flash_attention(*_inputs())


def test_debug_log_names_the_backend(caplog, monkeypatch):
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        xattn.flash_attention(*_inputs(), backend="numpy")
    recs = [r for r in caplog.records if getattr(r, "xattn_backend", None)]
    assert [r.xattn_backend for r in recs] == ["numpy"]
    assert "backend numpy" in recs[0].getMessage()


def test_performance_warning_when_an_installed_faster_entry_cannot_run(monkeypatch):
    """numba installed without threadpoolctl: auto takes numpy and says why, once."""
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba not installed: nothing faster is skipped")
    real = importlib.util.find_spec

    def no_threadpoolctl(name, *args, **kwargs):
        return None if name == "threadpoolctl" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_threadpoolctl)
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.setattr(_backends, "_loaded", set())
    with pytest.warns(xattn.PerformanceWarning, match=r"'numba'.*threadpoolctl.*pip install"):
        xattn.flash_attention(*_inputs())
    assert _backends.explain(_prob(), {})["backend"] == "numpy"
    with warnings.catch_warnings():
        warnings.simplefilter("error", xattn.PerformanceWarning)
        xattn.flash_attention(*_inputs())  # once only


def test_no_warning_when_the_faster_entry_is_simply_absent_or_switched_off(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.setenv("XATTN_DISABLE", "numba")
    with warnings.catch_warnings():
        warnings.simplefilter("error", xattn.PerformanceWarning)
        xattn.flash_attention(*_inputs())


def test_show_config_lists_every_entry(capsys):
    info = xattn.show_config(mode="dicts")
    assert [e["name"] for e in info["backends"]] == [
        n for dev in _backends._PREFERENCE.values() for n in dev]
    assert info["packages"]["numpy"] == np.__version__
    assert isinstance(info["cpu"]["threads_used"], int)
    xattn.show_config()
    out = capsys.readouterr().out
    assert "numpy" in out and "backends" in out and "cupy.sm80" in out
    with pytest.raises(ValueError, match="mode"):
        xattn.show_config(mode="yaml")


def test_performance_warning_when_an_installed_package_fails_to_import(monkeypatch):
    """numba present but broken (e.g. built for another NumPy): auto warns, naming the error."""
    monkeypatch.delenv("XATTN_DISABLE", raising=False)
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba not installed")
    import importlib as _importlib

    real = _importlib.import_module

    def broken_numba(name, *args, **kwargs):
        if name == "numba":
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_backends.importlib, "import_module", broken_numba)
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.setattr(_backends, "_loaded", set())
    with pytest.warns(xattn.PerformanceWarning, match=r"numba is installed but fails to import"):
        out = xattn.flash_attention(*_inputs())
    assert out.shape == (2, 40, 16)
