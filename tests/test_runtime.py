"""The CPU runtime: reproducible gradients, concurrent and nested calls, the BLAS limit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import xattn

threadpoolctl = pytest.importorskip("threadpoolctl")
pytest.importorskip("numba")

from xattn._backends.numpy_ import _pool  # noqa: E402


def _qkv(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def _blas_threads():
    return sorted(
        (i["filepath"], i["num_threads"])
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    )


def _backward(q, k, v, **opts):
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend="numba", **opts)
    dout = np.cos(out)  # any fixed upstream gradient
    return xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="numba", **opts)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_independent_of_job_schedule(monkeypatch, deterministic):
    """One kv head, several threads: the query blocks are split into shares whose dk/dv are
    summed. Their sum must not depend on which share finishes first (#9 item 1)."""
    monkeypatch.setenv("XATTN_NUM_THREADS", "4")
    q, k, v = _qkv((1, 1, 3000, 32))
    out, lse = xattn.flash_attention(q, k, v, return_lse=True, backend="numba")
    dout = np.cos(out)

    def grads():
        return xattn.flash_attention_backward(dout, q, k, v, out, lse, backend="numba",
                                              deterministic=deterministic)

    want = grads()
    run_jobs = _pool.run_jobs

    def reversed_serial(fn, jobs):  # a legal schedule: the last share finishes first
        for job in reversed(list(jobs)):
            fn(job)

    monkeypatch.setattr(_pool, "run_jobs", reversed_serial)
    got = grads()
    monkeypatch.setattr(_pool, "run_jobs", run_jobs)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for _ in range(5):
        for name, a, b in zip(("dq", "dk", "dv"), grads(), want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_concurrent_calls_restore_blas_and_match_serial(monkeypatch):
    """Four Python threads calling xattn at once: BLAS runs one thread inside every job
    (threadpoolctl >= 3.8 ignores limits set from a thread other than its 'controlling' one
    unless released), each result is bitwise the serial one, and afterwards every BLAS
    library has the thread count it had before (#9 item 2)."""
    cases = [_qkv((1, 2, 1500, 32), seed=s) for s in range(4)]
    widths = set()
    run_jobs = _pool.run_jobs

    def watched(fn, jobs):
        def job(j):
            widths.update(n for _, n in _blas_threads())
            fn(j)

        run_jobs(job, jobs)

    monkeypatch.setattr(_pool, "run_jobs", watched)
    _backward(*cases[0])  # loads every BLAS library the calls use
    before = _blas_threads()
    serial = [(xattn.flash_attention(*c, causal=True), _backward(*c)) for c in cases]
    assert _blas_threads() == before
    results = [None] * len(cases)
    errors = []
    start = threading.Barrier(len(cases))

    def call(i):
        try:
            start.wait()
            for _ in range(2):
                results[i] = (xattn.flash_attention(*cases[i], causal=True),
                              _backward(*cases[i]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert _blas_threads() == before
    assert widths == {1}
    for (out, grads), (out_s, grads_s) in zip(results, serial, strict=True):
        np.testing.assert_array_equal(out, out_s)
        for a, b in zip(grads, grads_s, strict=True):
            np.testing.assert_array_equal(a, b)


def test_blas_limit_is_counted():
    """Limits entered and left in any interleaving restore the original setting."""
    before = _blas_threads()
    outer, inner = _pool.blas_limit(), _pool.blas_limit()
    outer.__enter__()
    inner.__enter__()
    assert all(n == 1 for _, n in _blas_threads())
    outer.__exit__(None, None, None)  # the first one in leaves first
    assert all(n == 1 for _, n in _blas_threads())
    inner.__exit__(None, None, None)
    assert _blas_threads() == before


@pytest.mark.timeout(60)
def test_nested_call_from_a_feature_map_runs():
    """A linear_attention feature map (run on xattn's pool) that calls flash_attention: the
    nested call runs serially in the worker instead of waiting on the busy pool (#9 item 3)."""
    q, k, v = _qkv((4, 2, 64, 8))

    def phi(x):
        y = xattn.flash_attention(x[..., None, :, :], x[..., None, :, :], x[..., None, :, :])
        return np.exp(y[..., 0, :, :])

    out = xattn.linear_attention(q, k, v, feature_map=phi)
    assert out.shape == q.shape and np.isfinite(out).all()


@pytest.mark.timeout(60)
def test_run_jobs_nested_in_its_own_pool():
    done = []

    def inner(j):
        done.append(j)

    def outer(i):
        _pool.run_jobs(inner, [(i, j) for j in range(3)])

    _pool.run_jobs(outer, range(2 * _pool.num_threads() + 1))
    assert len(done) == 3 * (2 * _pool.num_threads() + 1)


def test_failed_job_stops_the_others_before_returning():
    seen = []
    gate = threading.Event()

    def job(i):
        if i == 0:
            raise RuntimeError("job 0 failed")
        gate.wait(0.05)
        seen.append(i)

    with pytest.raises(RuntimeError, match="job 0 failed"):
        _pool.run_jobs(job, range(50))
    count = len(seen)
    gate.wait(0.2)
    assert len(seen) == count  # nothing ran on after run_jobs raised
    assert count < 49


def test_block_mask_and_plan_caches_are_bounded_by_bytes():
    # The builders' caches kept up to 32-128 masks each, whatever their size (#9 item 7):
    # now a cache holds at most its byte budget, and a mask over 1/8 of it is not kept.
    from xattn import _blockmask, _masking, _plans

    cached = _blockmask._from_mask_mod_cached
    cached.cache_clear()

    def striped(q, k):  # every 32 x 32 block partial: 16 MiB of partial tiles at S=4096
        return (q + k) % 3 == 0

    big = xattn.BlockMask.from_mask_mod(striped, 4096, 4096, block_size=32)
    assert _masking.value_nbytes(big) > _blockmask.BUILD_CACHE_BYTES // 8
    assert cached.cache.nbytes == 0
    small = xattn.BlockMask.from_mask_mod(striped, 256, 256, block_size=32)
    assert 0 < cached.cache.nbytes <= _blockmask.BUILD_CACHE_BYTES
    assert xattn.BlockMask.from_mask_mod(striped, 256, 256, block_size=32) is small
    plan = _plans.block_plan(small, False, None)
    assert _plans.block_plan(small, False, None) is plan
    assert 0 < _plans.block_plan.cache.nbytes <= _masking.PLAN_CACHE_BYTES
