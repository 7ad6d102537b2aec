"""The CPU thread pool of the fused backend, with BLAS held at one thread inside it.

Jobs are independent tiles of work that spend their time in BLAS calls and ``nogil`` numba
kernels, so Python threads run them in parallel. BLAS must not start its own threads inside a
job: two levels of threads on the same cores oversubscribe them (measured: a numba ``prange``
around multi-threaded BLAS ran at ~18 GFLOP/s where one BLAS thread per job reaches ~100).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["num_threads", "rescan_blas", "run_jobs"]

_lock = threading.Lock()
_pool = None
_pool_size = 0
_controller = None


def num_threads() -> int:
    """Worker count: ``XATTN_NUM_THREADS`` if set, else the CPUs this process may use."""
    env = os.environ.get("XATTN_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(
                f"XATTN_NUM_THREADS: expected a positive integer, got {env!r}"
            ) from None
        if n < 1:
            raise ValueError(f"XATTN_NUM_THREADS: expected a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _forget_pool_after_fork():
    # A forked child inherits the executor object but not its threads: start afresh.
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _get_pool(n):
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="xattn")
            _pool_size = n
        return _pool


def rescan_blas():
    """Forget the BLAS libraries seen so far: call after loading another one.

    numba's ``np.dot`` calls SciPy's OpenBLAS, a different library from NumPy's; a limit
    that misses it lets each job start BLAS threads of its own (measured: 1.4 GFLOP/s
    instead of ~45 when scipy's BLAS ran with 2 threads inside each of 2 jobs).
    """
    global _controller
    with _lock:
        _controller = None


def _blas_limit():
    global _controller
    from threadpoolctl import ThreadpoolController

    with _lock:
        # Scanning the loaded libraries costs about a millisecond: do it once.
        if _controller is None:
            _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def run_jobs(fn, jobs):
    """Run ``fn(job)`` for every job on the pool (one BLAS thread each); returns nothing.

    ``jobs`` should come longest first, so that the last ones to start are the short ones.
    The first exception raised by a job is re-raised here.
    """
    jobs = list(jobs)
    size = num_threads()
    n = min(size, len(jobs))
    with _blas_limit():
        if n <= 1:
            for job in jobs:
                fn(job)
            return
        pool = _get_pool(size)
        # A shared iterator: each worker takes the next job when it finishes one.
        it = iter(jobs)
        it_lock = threading.Lock()
        done = object()

        def worker():
            while True:
                with it_lock:
                    job = next(it, done)
                if job is done:
                    return
                fn(job)

        futures = [pool.submit(worker) for _ in range(n)]
        for f in futures:
            f.result()
