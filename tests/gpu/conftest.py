"""The GPU suite: CuPy kernels against the float64 oracle, shaped like the kernel table.

Fixtures of ``tests/conftest.py`` (``rng``, ``make_options``, the ``option_name``
parametrisation over the CPU suite's option builders) reach these tests too. Helpers the test
modules import by name (``from conftest import cupy_array``) are re-exported here from that
file, so that whichever ``conftest`` module Python holds has them all.

Without CuPy or a CUDA device every GPU test is skipped with the reason; the CPU parts of these
files (plans, packing, reasons computed on NumPy problems) still run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from xattn import _backends


def _load_cpu_conftest():
    spec = importlib.util.spec_from_file_location(
        "xattn_tests_cpu_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_plugin_object(name, value):
    # Fixtures and hooks stay registered once, from tests/conftest.py itself.
    return name.startswith("pytest_") or hasattr(value, "_pytestfixturefunction") or \
        type(value).__name__ == "FixtureFunctionDefinition"


# Under pytest-xdist every worker process would run the CPU comparisons (numba, one thread
# per CPU) at once: on a 16-core device, 14 workers x 16 threads. Three CPU references of a
# T5 score_mod then ran past a 100 s per-test timeout (H100 run, 2026-12-05). One thread per
# worker unless the caller chose otherwise.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XATTN_NUM_THREADS", "1")

_cpu = _load_cpu_conftest()
globals().update({k: v for k, v in vars(_cpu).items()
                  if not k.startswith("__") and not _is_plugin_object(k, v)})

try:
    import cupy as cp

    NGPU = cp.cuda.runtime.getDeviceCount()
    CC = int(cp.cuda.Device().compute_capability) if NGPU else 0
except Exception:  # noqa: BLE001 - no CuPy, driver or device: the GPU tests skip
    cp, NGPU, CC = None, 0, 0

# The kernel table's GPU entries, in auto's order: tests parametrised over them run once each.
GPU_ENTRIES = [name for name, b in _backends.BACKENDS.items() if b.device == "gpu"]


@pytest.fixture(params=GPU_ENTRIES)
def gpu_entry(request):
    """One GPU entry of the kernel table (pass it as ``backend=``); skips without a GPU."""
    if NGPU == 0:
        pytest.skip("needs CuPy and a CUDA device")
    return request.param


# The marks of a module that needs a device (its CuPy import is the module's own importorskip).
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(NGPU == 0, reason="no CUDA device")]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output filled with NaN before its launch (``XATTN_POISON``), in every GPU
    test: an element a kernel fails to write then fails the comparison."""
    monkeypatch.setenv("XATTN_POISON", "1")
