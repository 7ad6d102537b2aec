"""The genomics example (examples/genomics): FASTA round trip, its window + global-token
decomposition against xattn.longformer_attention, and a smoke run on a tiny sequence, in one
process and under ``mpiexec -n 2`` with ring attention."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xattn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "genomics"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"genomics_{name}", EXAMPLE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pipeline():
    return _load("pipeline")


def test_fasta_round_trip(tmp_path):
    fasta = _load("fasta")
    path = tmp_path / "x.fa"
    write_records = [("chr1", b"ACGTNacgt" * 20), ("chrM", "GGGCCC")]
    fasta.write_fasta(path, write_records, width=7)
    text = path.read_text().splitlines()
    assert text[0] == ">chr1" and len(text[1]) == 7
    path.write_text(";comment\n" + path.read_text().replace(">chrM", ">chrM mitochondrion"))
    got = fasta.read_fasta(path)
    assert got == [("chr1", b"ACGTNacgt" * 20), ("chrM", b"GGGCCC")]
    codes = fasta.encode(b"ACGTNacgtRy")
    np.testing.assert_array_equal(codes, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4])
    bad = tmp_path / "bad.fa"
    bad.write_text("ACGT\n")
    with pytest.raises(ValueError, match="before the first"):
        fasta.read_fasta(bad)


def test_synthetic_genome_plants_its_repeats():
    fasta = _load("fasta")
    seq, repeats = fasta.synthetic_genome(20_000, seed=3, reach=500)
    assert len(seq) == 20_000 and set(seq) <= set(b"ACGT")
    assert [r.kind for r in repeats] == ["tandem", "duplication", "duplication"]
    for r in repeats:
        copies = {seq[a:b] for a, b in r.spans()}
        assert len(copies) == 1
        assert r.starts[-1] - r.starts[0] <= 500 or r.kind == "tandem"


@pytest.mark.parametrize(("chunk", "span"), [(64, None), (1000, None), (1000, 64)])
def test_window_global_decomposition_equals_longformer(pipeline, chunk, span):
    rng = np.random.default_rng(0)
    s, window = 300, 40
    q, k, v = (rng.standard_normal((2, s, 16), dtype=np.float32) for _ in range(3))
    pos, global_pos = np.arange(s), np.array([0, 97, 194, 291])
    half = window // 2

    def window_fn(q, k, v):
        return pipeline.window_attention_chunked(q, k, v, half, chunk, lambda n: None)

    out, lse = pipeline.window_global_attention(q, k, v, pos, global_pos, half,
                                                pipeline.Ranks(False), window_fn=window_fn,
                                                span=span)
    ref, ref_lse = xattn.longformer_attention(q, k, v, window=window, global_tokens=global_pos,
                                              return_lse=True)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5)


@pytest.mark.parametrize("span", [7, 64, 100, 150])
def test_global_queries_over_key_pieces_equal_one_call(pipeline, span):
    """The GPU path cuts the keys into pieces (a batch) plus a remainder and merges them."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 5, 8), dtype=np.float32)
    k, v = (rng.standard_normal((3, 300, 8), dtype=np.float32) for _ in range(2))
    out, lse = pipeline.attend_all_keys(q, k, v, span)
    ref, ref_lse = xattn.flash_attention(q, k, v, return_lse=True)
    assert out.dtype == np.float32 and out.shape == ref.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-6)


def test_device_defaults(pipeline):
    cpu = pipeline.parse_args([])
    assert (cpu.device, cpu.dtype, cpu.chunk) == ("cpu", "float32", 8192)
    gpu = pipeline.parse_args(["--device", "gpu"])
    assert (gpu.device, gpu.dtype, gpu.chunk) == ("gpu", "float16", 131072)
    assert pipeline.parse_args(["--device", "gpu", "--dtype", "bfloat16"]).dtype == "bfloat16"


TINY = ["--length", "3000", "--window", "256", "--layers", "2", "--d-model", "32",
        "--heads", "2", "--chunk", "512", "--global-every", "1000", "--no-progress"]


def test_pipeline_smoke(pipeline, tmp_path):
    pipeline.main([*TINY, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bases"] == 3000 and len(summary["layer_s"]) == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "attention_mass.png").stat().st_size > 10_000
    assert (tmp_path / "genome.fa").read_text().startswith(">synthetic\n")
    # The k-mer matching head finds the planted repeats and little else.
    assert summary["mass_in_repeats"] > 0.3
    assert summary["mass_elsewhere"] < 0.05


def test_pipeline_progress_bar(pipeline, tmp_path, capsys):
    pytest.importorskip("tqdm")
    pipeline.main([*[a for a in TINY if a != "--no-progress"], "--layers", "1",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "synthetic: 3,000 bp on 1 rank(s)" in err and "layer 1/1" in err


def _run_under_mpiexec(args, out):
    from test_distributed import _mpiexec

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
        # Open MPI refuses to start as root (the GPU machine) without these; MPICH ignores them.
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(
        [_mpiexec(), "-n", "2", sys.executable, str(EXAMPLE / "pipeline.py"), *args, "--mpi",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_pipeline_under_mpiexec_matches_one_process(pipeline, tmp_path):
    pipeline.main([*TINY, "--out", str(tmp_path / "one")])
    _run_under_mpiexec(TINY, tmp_path / "ring")
    for name in ("attention_mass.npy", "hidden.npy"):
        one, ring = np.load(tmp_path / "one" / name), np.load(tmp_path / "ring" / name)
        np.testing.assert_allclose(ring, one, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------------------------------
# On a GPU (CuPy arrays end to end)


@pytest.fixture
def cupy(monkeypatch):
    """CuPy on a GPU; the CPU runs these tests compare against use the NumPy backend (numba's
    first compilation would take longer than the GPU runs)."""
    monkeypatch.setenv("XATTN_DISABLE", "numba")
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    return cp


@pytest.mark.gpu
def test_global_queries_over_key_pieces_on_gpu(pipeline, cupy):
    rng = np.random.default_rng(2)
    q = cupy.asarray(rng.standard_normal((4, 9, 32)).astype(np.float16))
    k, v = (cupy.asarray(rng.standard_normal((4, 1000, 32)).astype(np.float16))
            for _ in range(2))
    out, lse = pipeline.attend_all_keys(q, k, v, 64)
    ref, ref_lse = xattn.flash_attention(q, k, v, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float16
    np.testing.assert_allclose(out.get().astype(np.float32), ref.get().astype(np.float32),
                               atol=2e-3)
    np.testing.assert_allclose(lse.get(), ref_lse.get(), atol=1e-4)


def _load_run(out):
    summary = json.loads((out / "summary.json").read_text())
    return summary, {n: np.load(out / f"{n}.npy") for n in ("attention_mass", "hidden")}


@pytest.mark.gpu
def test_pipeline_on_gpu_float32_matches_cpu(pipeline, cupy, tmp_path):
    pipeline.main([*TINY, "--out", str(tmp_path / "cpu")])
    pipeline.main([*TINY, "--device", "gpu", "--dtype", "float32", "--out", str(tmp_path / "gpu")])
    summary, gpu = _load_run(tmp_path / "gpu")
    _, cpu = _load_run(tmp_path / "cpu")
    assert summary["dtype"] == "float32" and summary["device"] != "cpu"
    for name in gpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, "bfloat16"], ids=["default-float16", "bfloat16"])
def test_pipeline_on_gpu_16bit_finds_the_repeats(pipeline, cupy, tmp_path, dtype):
    pipeline.main([*TINY, "--out", str(tmp_path / "cpu")])
    pipeline.main([*TINY, "--device", "gpu", "--out", str(tmp_path / "gpu"),
                   *(["--dtype", dtype] if dtype else [])])
    summary, gpu = _load_run(tmp_path / "gpu")
    _, cpu = _load_run(tmp_path / "cpu")
    assert summary["dtype"] == (dtype or "float16") and len(summary["layer_s"]) == 2
    assert summary["mass_in_repeats"] > 0.3
    assert summary["mass_elsewhere"] < 0.05
    assert np.isfinite(gpu["hidden"]).all()
    # 16-bit queries and keys move the k-mer head's scores (30 for an exact match) by a few
    # hundredths (float16) to tenths (bfloat16).
    assert np.abs(gpu["attention_mass"] - cpu["attention_mass"]).mean() < 0.01


@pytest.mark.gpu
def test_pipeline_gpu_under_mpiexec_matches_one_process(pipeline, cupy, tmp_path):
    """Two ranks on one GPU (ring attention over MPI, blocks staged through host memory)."""
    args = [*TINY, "--device", "gpu", "--dtype", "float32"]
    pipeline.main([*args, "--out", str(tmp_path / "one")])
    _run_under_mpiexec(args, tmp_path / "ring")
    for name in ("attention_mass.npy", "hidden.npy"):
        one, ring = np.load(tmp_path / "one" / name), np.load(tmp_path / "ring" / name)
        np.testing.assert_allclose(ring, one, atol=1e-4, err_msg=name)
