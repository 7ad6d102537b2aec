"""The main job, ``python -m xattn``: its table on a tiny problem and its error paths."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import xattn
from xattn import __main__ as job
from xattn._backends import available_backends

TINY = ["--seq-len", "96", "--heads", "4", "--head-dim", "16", "--repeats", "1"]


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "xattn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The rows between the dashed separator and the first blank line after it."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-------"))
    header = lines[start - 1].split()
    assert header[:2] == ["variant", "backend"], lines[start - 1]
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.fixture(scope="module")
def default_run():
    res = run(*TINY)
    assert res.returncode == 0, res.stderr
    return res


def test_table_has_every_available_variant(default_run):
    rows = table_rows(default_run.stdout)
    assert {r[0] for r in rows} == set(job.available_variants())
    assert "seq_len=96" in default_run.stdout


def test_flash_runs_on_every_available_cpu_backend(default_run):
    expected = {name for name, why in available_backends(np).items() if why is None}
    got = {r[1] for r in table_rows(default_run.stdout) if r[0] == "flash"}
    assert got == expected


def test_exact_variants_match_the_float64_reference(default_run):
    rows = table_rows(default_run.stdout)
    exact = [r for r in rows if r[-1] == "exact"]
    assert exact, default_run.stdout
    for r in exact:
        # time, GFLOP/s, MiB are numbers; error is float32-small against float64.
        float(r[2]), float(r[3]), float(r[4])
        assert float(r[5]) < 1e-4, r


def test_causal_applies_to_every_variant():
    res = run(*TINY, "--causal", "--kv-heads", "2")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert {r[0] for r in rows} == set(job.available_variants())
    for r in rows:
        if r[-1] in ("exact", "formula"):
            assert float(r[5]) < 1e-4, r


def test_chosen_variants_causal_window_and_gqa():
    res = run(*TINY, "--causal", "--window", "8", "-1", "--kv-heads", "2",
              "--variants", "window,gqa,causal", "--dtype", "float64")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert [r[0] for r in rows] == ["window", "gqa", "causal"]
    assert "kv_heads=2" in res.stdout and "window=8,-1" in res.stdout
    for r in rows:
        assert float(r[5]) < 1e-10, r


def test_no_check_skips_the_reference():
    res = run(*TINY, "--variants", "standard", "--no-check")
    assert res.returncode == 0, res.stderr
    (row,) = table_rows(res.stdout)
    assert row[5] == "skipped"


def test_help_explains_the_options():
    res = run("--help")
    assert res.returncode == 0
    for opt in ("--seq-len", "--heads", "--kv-heads", "--head-dim", "--batch", "--dtype",
                "--causal", "--window", "--device", "--repeats", "--variants"):
        assert opt in res.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "abc"], "--seq-len"),
        (["--heads", "4", "--kv-heads", "3"], "--kv-heads"),
        (["--variants", "nonsense"], "nonsense"),
        (["--dtype", "int8"], "--dtype"),
        (["--window", "-2", "0"], "--window"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args, words):
    res = run(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m xattn: error:") and words in last, res.stderr


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_gpu_without_cupy_is_one_line():
    res = run(*TINY, "--device", "gpu")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "CuPy" in lines[0], res.stderr


def test_library_value_error_is_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("window: expected (left, right), got nonsense")

    monkeypatch.setattr(xattn, "flash_attention", broken)
    code = job.main([*TINY, "--variants", "causal"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        "python -m xattn: error: causal: window: expected (left, right), got nonsense"
    )


def test_a_variant_that_cannot_run_here_is_a_skipped_row(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no backend supports this request\nsecond line")

    monkeypatch.setattr(xattn, "flash_attention", refuse)
    code = job.main([*TINY, "--variants", "window,standard"])
    out = capsys.readouterr().out
    assert code == 0
    rows = table_rows(out)
    assert rows[0][:3] == ["window", "auto", "-"]
    assert "skipped: no backend supports this request" in out and "second line" not in out
    assert rows[1][0] == "standard" and float(rows[1][5]) < 1e-4


def test_header_provenance_and_json(tmp_path):
    """The header carries show_config's provenance; --json writes it with every row."""
    import json

    path = tmp_path / "run.json"
    res = run(*TINY, "--variants", "flash,causal", "--json", str(path))
    assert res.returncode == 0, res.stderr
    head = res.stdout.split("variant", 1)[0]
    assert "packages: numpy" in head and "backends (auto tries them in this order)" in head
    doc = json.loads(path.read_text())
    assert set(doc) == {"config", "problem", "rows"}
    assert doc["config"]["packages"]["numpy"] == np.__version__
    assert doc["problem"]["seq_len"] == 96
    names = {n for n, why in available_backends(np).items() if why is None}
    assert {r["backend"] for r in doc["rows"] if r["variant"] == "flash"} == names
    causal = next(r for r in doc["rows"] if r["variant"] == "causal")
    assert causal["backend"] in names and causal["error"] < 1e-4
