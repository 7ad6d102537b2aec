"""The CPU thread pool of the fused backend, with BLAS held at one thread inside it.

Jobs are independent tiles of work that spend their time in BLAS calls and ``nogil`` numba
kernels, so Python threads run them in parallel. BLAS must not start its own threads inside a
job: two levels of threads on the same cores oversubscribe them (measured: a numba ``prange``
around multi-threaded BLAS ran at ~18 GFLOP/s where one BLAS thread per job reaches ~100).

The BLAS limit is process-wide (threadpoolctl sets it in the library), so it is counted: the
first call to enter sets it, the last one to leave restores what was there before, whatever
the order in which concurrent calls from several Python threads finish. A call made from
inside one of the pool's own jobs (a user callback calling xattn) runs its jobs serially in
that worker: waiting on the pool from inside it could deadlock.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

__all__ = ["blas_limit", "num_threads", "rescan_blas", "run_jobs"]

_lock = threading.Lock()
_pool = None
_pool_size = 0
_controller = None
# The counted BLAS limit: how many calls are inside, and the threadpoolctl limiters that
# hold it (one per library scan; restored in reverse order by the last call to leave).
_limit_users = 0
_limiters = []
_local = threading.local()  # .worker: True in the pool's threads


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
    # A forked child inherits the executor object but not its threads: start afresh. A limit
    # held by a call of another thread at fork time is the child's BLAS setting from now on
    # (no call in the child will leave it).
    global _pool, _pool_size, _lock, _limit_users, _limiters
    _pool, _pool_size, _lock = None, 0, threading.Lock()
    _limit_users, _limiters = 0, []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _mark_worker():
    _local.worker = True


def _get_pool(n):
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(
                max_workers=n, thread_name_prefix="xattn", initializer=_mark_worker
            )
            _pool_size = n
        return _pool


def in_worker() -> bool:
    """True in one of the pool's threads (a nested call must not wait on the pool)."""
    return getattr(_local, "worker", False)


def _new_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def rescan_blas():
    """Take in the BLAS libraries loaded since the last scan: call after loading another one.

    numba's ``np.dot`` calls SciPy's OpenBLAS, a different library from NumPy's; a limit
    that misses it lets each job start BLAS threads of its own (measured: 1.4 GFLOP/s
    instead of ~45 when scipy's BLAS ran with 2 threads inside each of 2 jobs). If calls are
    inside the limit right now, the new libraries are limited at once too.
    """
    global _controller
    with _lock:
        # Scanning the loaded libraries costs about a millisecond: done once per new library.
        _controller = _new_controller()
        if _limit_users:
            _release_openblas_control()
            _limiters.append(_controller.limit(limits=1, user_api="blas"))
            _release_openblas_control()


def _release_openblas_control():
    """Let the calling Python thread set OpenBLAS's limit, and any thread after it.

    threadpoolctl >= 3.8 lets only one Python thread (the first to set a limit, usually the
    main thread) change OpenBLAS's process-wide thread count; the others' requests are
    silently ignored until that thread leaves a ``with threadpool_limits()``. Our limit is
    process-wide by design, counted under our lock, and set and restored by whichever thread
    enters first and leaves last: without this, calls from worker threads ran BLAS at full
    width inside the jobs (oversubscribed, and not bitwise the results of serial calls).
    """
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - threadpoolctl < 3.8 has no controlling thread
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


class _BlasLimit:
    """Context manager of the counted, process-wide BLAS limit of one thread."""

    def __enter__(self):
        global _controller, _limit_users
        with _lock:
            if _limit_users == 0:
                if _controller is None:
                    _controller = _new_controller()
                _release_openblas_control()
                _limiters.append(_controller.limit(limits=1, user_api="blas"))
                _release_openblas_control()
            _limit_users += 1
        return self

    def __exit__(self, *exc):
        global _limit_users
        with _lock:
            _limit_users -= 1
            if _limit_users == 0:
                _release_openblas_control()
                while _limiters:
                    _limiters.pop().restore_original_limits()
                _release_openblas_control()
        return False


def blas_limit():
    """``with blas_limit():`` BLAS runs one thread until the last such block is left."""
    return _BlasLimit()


def run_jobs(fn, jobs):
    """Run ``fn(job)`` for every job on the pool (one BLAS thread each); returns nothing.

    ``jobs`` should come longest first, so that the last ones to start are the short ones.
    The first exception raised by a job is re-raised here. Called from inside a job of the
    pool (a nested xattn call), the jobs run one after the other in that thread.
    """
    jobs = list(jobs)
    if not jobs:
        return
    size = num_threads()
    n = 1 if in_worker() else min(size, len(jobs))
    with blas_limit():
        if n <= 1:
            for job in jobs:
                fn(job)
            return
        pool = _get_pool(size)
        # A shared iterator: each worker takes the next job when it finishes one.
        it = iter(jobs)
        it_lock = threading.Lock()
        done = object()
        failed = []

        def worker():
            while True:
                with it_lock:
                    job = done if failed else next(it, done)
                if job is done:
                    return
                try:
                    fn(job)
                except BaseException:
                    failed.append(True)  # the other workers stop taking jobs
                    raise

        futures = [pool.submit(worker) for _ in range(n)]
        # Every worker has stopped before this call returns or raises: none may still write
        # into the caller's arrays, or run outside the BLAS limit.
        wait(futures)
        for f in futures:
            f.result()
