"""Packaging and first run: a base install (NumPy only) runs the main job; the metadata, the
LICENSE and the sdist carry what they promise."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Everything outside the core dependencies (numpy): what `pip install xattn` does not bring.
OPTIONAL = ("numba", "threadpoolctl", "scipy", "ml_dtypes", "matplotlib", "cupy", "torch", "jax")

# Runs a snippet as if only the core dependencies were installed: importing an optional module
# fails as it does when it is absent (find_spec says None, import raises ModuleNotFoundError).
BASE_INSTALL = (
    "import sys\n"
    f"for name in {OPTIONAL!r}:\n"
    "    sys.modules[name] = None\n"
)


def run_base(code, timeout=300):
    return subprocess.run([sys.executable, "-c", BASE_INSTALL + code], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_main_job_runs_on_a_base_install():
    # `pip install xattn` then `python -m xattn` crashed at the flex row (No module numba).
    res = run_base(
        "import runpy\n"
        "sys.argv = ['xattn', '--seq-len', '64', '--heads', '2', '--head-dim', '8',"
        " '--repeats', '1', '--variants', 'standard,flash,flex,linear']\n"
        "runpy.run_module('xattn', run_name='__main__')\n"
    )
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines()
            if line.split() and line.split()[0] in ("standard", "flex", "linear")}
    assert "skipped, needs numba and threadpoolctl: pip install 'xattn[numba]'" in rows["flex"]
    assert "skipped" not in rows["standard"] and "skipped" not in rows["linear"]
    flash_numba = [line for line in res.stdout.splitlines() if line.startswith("flash")
                   and "numba" in line]
    assert flash_numba and "pip install 'xattn[numba]'" in flash_numba[0]


def test_core_functions_run_on_a_base_install():
    res = run_base(
        "import numpy as np, xattn\n"
        "q = np.ones((1, 2, 16, 8), np.float32)\n"
        "out, lse = xattn.flash_attention(q, q, q, causal=True, return_lse=True)\n"
        "xattn.flash_attention_backward(out, q, q, q, out, lse, causal=True)\n"
        "xattn.linear_attention(q, q, q, causal=True); xattn.performer_attention(q, q, q)\n"
        "xattn.block_sparse_attention(q, q, q, xattn.BlockMask.causal(16, block_size=8))\n"
        "try:\n"
        "    xattn.flex_attention(q, q, q)\n"
        "except ImportError as exc:\n"
        "    print('flex:', exc)\n"
    )
    assert res.returncode == 0, res.stderr
