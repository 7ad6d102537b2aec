"""Smoke test of examples/generate.py: a few greedy tokens on the CPU, checked against a full
recomputation without the cache (the example's ``--check``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "generate.py"


def _load():
    spec = importlib.util.spec_from_file_location("xattn_example_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page_size", [None, 4])
def test_generate_runs_and_matches_full_recomputation(capsys, page_size):
    gen = _load()
    argv = ["--tokens", "5", "--prompt", "7", "--layers", "2", "--heads", "4", "--kv-heads",
            "2", "--head-dim", "16", "--vocab", "97", "--batch", "2", "--check"]
    if page_size:
        argv += ["--page-size", str(page_size)]
    tokens = gen.main(argv)
    assert tokens.shape == (2, 12)
    text = capsys.readouterr().out
    assert "tokens/s" in text
    assert "check: 10 greedy tokens equal a full recomputation" in text
