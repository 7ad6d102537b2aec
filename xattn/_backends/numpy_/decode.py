"""CPU decode attention: split-KV ("flash-decoding") with GQA packing, on the thread pool.

Job = (sequence, kv head, split of the key range). The ``G`` query heads that share a kv
head and the ``T`` new tokens are packed into one block of ``R = G * T`` rows
(:func:`.decode_kernels.decode_split`), so each kv head's keys and values are read once for
all of them. When there are fewer (sequence, kv head) pairs than the pool needs to stay busy
(one sequence with 8 kv heads on 2 cores balances; one MQA head does not), each key range
is split and the partial states ``(acc, m, l)`` are merged afterwards by their maxima::

    M = max_i m_i      l = sum_i l_i exp(m_i - M)      out = sum_i acc_i exp(m_i - M) / l

A contiguous cache is read as a paged one whose pages are whole sequences, so one kernel
reads both layouts; a paged cache's keys are found through the block table.
"""

from __future__ import annotations

import numpy as np

from . import _pool
from .decode_generic import key_bounds
from .fused import host_reason

# Splits per worker thread to aim for: enough that uneven jobs (ragged lengths, a loaded
# core) even out, few enough that each job streams a long run of keys.
_JOBS_PER_THREAD = 4
# Keys below which a range is not split further: a job must outweigh its Python dispatch
# (~20 us) by far; 4096 keys of D=128 float32 are 4 MiB of K and V.
MIN_SPLIT = 4096
# Below this many multiply-adds (keys x rows x (D + Dv)) one thread does it all: waking the
# pool costs ~40 us, the time of about this much work.
SERIAL_WORK = 1 << 21


def _kernels():
    from . import decode_kernels

    return decode_kernels


def supports(prob, opts, op):
    """None when this backend serves the request, else the reason it cannot."""
    why = host_reason(prob)
    if why is not None:
        return why
    if opts:
        return f"options not handled by this backend: {sorted(opts)}"
    return None


def plan_splits(ranges, hkv, threads):
    """``[(b, lo, hi)]`` key ranges, each to be run for every kv head.

    ``ranges`` holds each sequence's ``(lo, hi)``. Ranges are cut into pieces of at least
    ``MIN_SPLIT`` keys until there are about ``_JOBS_PER_THREAD`` jobs per thread.
    """
    total = sum(hi - lo for lo, hi in ranges) * hkv
    if total == 0:
        return []
    piece = max(MIN_SPLIT, -(-total // (_JOBS_PER_THREAD * threads)))
    out = []
    for b, (lo, hi) in enumerate(ranges):
        n = hi - lo
        if n <= 0:
            continue
        parts = max(1, -(-n // piece))
        step = -(-n // parts)
        out.extend((b, a, min(a + step, hi)) for a in range(lo, hi, step))
    return out


def decode(prob, q, cache, *, alibi_slopes=None):
    """Return ``(out, lse)`` of :func:`xattn.decode_attention`."""
    K = _kernels()
    cd = prob.cdtype
    B, Hkv, G, T, D, Dv = prob.batch, prob.hkv, prob.group, prob.sq, prob.d, prob.dv
    R = G * T
    kpool, vpool, table, page_size = cache._pool()
    bf16 = prob.dtype.name == "bfloat16"
    if prob.dtype.itemsize == 2:  # numba reads 16-bit values as their bits
        kpool, vpool = kpool.view(np.uint16), vpool.view(np.uint16)
    qs = np.empty((B, Hkv, R, D), dtype=cd)
    qs[...] = q.reshape(B, Hkv, R, D)
    qs *= cd.type(prob.scale)
    if alibi_slopes is None:
        slopes = np.empty((B, Hkv, 0), dtype=cd)
    else:
        per_head = np.broadcast_to(alibi_slopes.astype(cd), (B, prob.hq))
        slopes = np.repeat(per_head, T, axis=1).reshape(B, Hkv, R)
    left = -1 if prob.window is None or prob.window[0] is None else prob.window[0]
    softcap = cd.type(0 if prob.softcap is None else prob.softcap)
    lengths = cache.lengths
    ranges = [key_bounds(int(n), prob) for n in lengths]
    threads = _pool.num_threads()
    splits = plan_splits(ranges, Hkv, threads)
    per_seq = np.zeros(B, dtype=np.int64)
    tasks = []
    for b, lo, hi in splits:
        slot = int(per_seq[b])
        per_seq[b] += 1
        tasks.extend((b, g, slot, lo, hi) for g in range(Hkv))
    n_slots = max(1, int(per_seq.max(initial=0)))
    acc = np.zeros((B, Hkv, n_slots, R, Dv), dtype=cd)
    m = np.full((B, Hkv, n_slots, R), -np.inf, dtype=cd)
    l = np.zeros((B, Hkv, n_slots, R), dtype=cd)
    # Longest first, dealt round-robin into jobs: each job is one compiled call over its
    # tasks, and the pool hands jobs to whichever thread is free.
    tasks.sort(key=lambda t: t[3] - t[4])
    work = sum(t[4] - t[3] for t in tasks) * R * (D + Dv)
    n_jobs = 1 if work < SERIAL_WORK else min(len(tasks), _JOBS_PER_THREAD * threads)
    table_arr = np.asarray(tasks, dtype=np.int64).reshape(-1, 5)
    args = (qs, kpool, vpool, table, page_size, lengths.astype(np.int64), T, left, slopes,
            softcap, acc, m, l, bf16)
    if n_jobs == 1:  # no pool (and no BLAS thread limit: nothing else runs beside it)
        K.decode_tasks(table_arr, *args)
    else:
        jobs = [table_arr[i::n_jobs] for i in range(n_jobs)]
        _pool.run_jobs(lambda job: K.decode_tasks(job, *args), jobs)
    out = np.empty((B * Hkv, R, Dv), dtype=cd)
    lse = np.empty((B * Hkv, R), dtype=cd)
    K.merge_splits(acc.reshape(B * Hkv, n_slots, R, Dv), m.reshape(B * Hkv, n_slots, R),
                   l.reshape(B * Hkv, n_slots, R), out, lse)
    out = out.reshape(B, prob.hq, T, Dv).astype(prob.dtype, copy=False)
    return out, lse.reshape(B, prob.hq, T)
