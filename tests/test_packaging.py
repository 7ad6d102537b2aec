"""Packaging and first run: a base install (NumPy only) runs the main job; the metadata, the
LICENSE and the sdist carry what they promise."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

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
    # The header lists every backend; the missing numba one names the extra that installs it.
    numba = [line for line in res.stdout.splitlines() if line.strip().startswith("numba (cpu)")]
    assert numba and "pip install 'xattn[numba]'" in numba[0]


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


# --- metadata, LICENSE, sdist ----------------------------------------------------------------


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_and_spdx_expression():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "xattn developers" in text
    project = _pyproject()["project"]
    assert project["license"] == "BSD-3-Clause"  # SPDX string, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])


def test_one_version_source():
    import xattn

    meta = _pyproject()
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xattn.__version__"}
    assert xattn.__version__


def test_dependencies_and_extras():
    project = _pyproject()["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["numpy"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("scipy") for d in extras["numba"])
    # No CUDA library in the test extra; NVRTC has its own, pinned.
    assert not any(d.startswith("nvidia") for d in extras["test"])
    assert extras["kernels"] == ["nvidia-cuda-nvrtc==13.5.37"]
    torch_pins = [d for e in extras.values() for d in e if d.startswith("torch")]
    assert all(d == "torch==2.13.0" for d in torch_pins)


def test_scipy_imported_only_behind_the_numba_backend():
    # scipy left the core dependencies: only the numba kernels may import it, and they load
    # after fused.numba_missing (called by each numba entry's supports) found it installed.
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "xattn").rglob("*.py")
                   if "import scipy" in p.read_text())
    assert users == ["xattn/_backends/numpy_/_fused_kernels.py",
                     "xattn/_backends/numpy_/decode_kernels.py",
                     "xattn/_backends/numpy_/fused.py"]


def test_sdist_carries_its_tests(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this pyproject")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "_build", "generated", ".asv", "*.egg-info",
        "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "bench_results"))
    out = tmp_path / "dist"
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (name,) = [p for p in out.iterdir() if p.name.endswith(".tar.gz")]
    with tarfile.open(name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path / "unpacked", **safe)
    assert {"LICENSE", "PKG-INFO", "tests/conftest.py", "tests/data/rope_golden.npz",
            "tests/test_positional.py", "tools/check_kernels.py"} <= members
    assert not [m for m in members if "__pycache__" in m]
    (tree,) = (tmp_path / "unpacked").iterdir()
    pkg_info = (tree / "PKG-INFO").read_text()
    assert "License-Expression: BSD-3-Clause" in pkg_info and "License-File: LICENSE" in pkg_info
    # The tests run from the unpacked tree (golden data, conftest fixtures, doctests).
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_positional.py", "-k", "golden or alibi_bias", "xattn/positional.py"],
        cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
