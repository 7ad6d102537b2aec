"""masking.cuh's visibility helpers, compiled for the host (g++) and checked against each other
and against xattn._masking: the per-row key interval that an edge tile may test instead of the
whole rule (``xattn_visible_keys``) must agree with ``xattn_visible`` on every key, and the
per-key query interval of the backward's key-major tiles (``xattn_visible_queries``) on every
query."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import host_program

from xattn import _masking

HARNESS = r"""
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
using std::max;
using std::min;
#define __device__
#define __forceinline__ inline
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
#include "masking.cuh"
using namespace xattn;

int main() {
    const int sqs[] = {1, 3, 64, 100}, sks[] = {0, 1, 5, 64, 100};
    const int sides[] = {-1, 0, 1, 3, 16, 200, INT_MAX};
    long long checked = 0;
    for (int sq : sqs) for (int sk : sks) for (int causal = 0; causal < 2; ++causal)
    for (int wl : sides) for (int wr : sides) {
        const int off = sk - sq;
        for (int qi = 0; qi < sq; ++qi) {
            int lo, hi;
            xattn_visible_keys(qi, off, sk, causal, wl, wr, lo, hi);
            if (lo < 0 || lo > sk || hi < 0 || hi > sk) {
                std::printf("bounds %d %d outside [0, %d]\n", lo, hi, sk);
                return 1;
            }
            for (int kj = 0; kj < sk + 70; ++kj) {
                const bool a = xattn_visible(qi, kj, off, sk, causal, wl, wr);
                const bool b = lo <= kj && kj < hi;
                if (a != b) {
                    std::printf("sq=%d sk=%d causal=%d wl=%d wr=%d qi=%d kj=%d: rule %d, "
                                "interval [%d, %d)\n", sq, sk, causal, wl, wr, qi, kj, a, lo, hi);
                    return 1;
                }
                ++checked;
            }
            // One line per row for the Python side: the interval of (qi) under these options.
            if (wl != INT_MAX && wr != INT_MAX)
                std::printf("%d %d %d %d %d %d %d %d\n", sq, sk, causal, wl, wr, qi, lo, hi);
        }
        for (int kj = 0; kj < sk + 70; ++kj) {
            int lo, hi;
            xattn_visible_queries(kj, off, sk, causal, wl, wr, lo, hi);
            if (lo < 0 || hi < 0) {
                std::printf("query bounds %d %d below 0\n", lo, hi);
                return 1;
            }
            for (int qi = 0; qi < sq + 70; ++qi) {
                const bool a = xattn_visible(qi, kj, off, sk, causal, wl, wr);
                const bool b = lo <= qi && qi < hi;
                if (a != b) {
                    std::printf("sq=%d sk=%d causal=%d wl=%d wr=%d kj=%d qi=%d: rule %d, "
                                "query interval [%d, %d)\n", sq, sk, causal, wl, wr, kj, qi, a,
                                lo, hi);
                    return 1;
                }
                ++checked;
            }
        }
    }
    std::fprintf(stderr, "checked %lld pairs\n", checked);
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness_output(tmp_path_factory):
    exe = host_program(tmp_path_factory, "masking_cuh", HARNESS)
    return subprocess.run([str(exe)], capture_output=True, text=True)


def test_interval_equals_the_rule_on_every_key(harness_output):
    assert harness_output.returncode == 0, harness_output.stdout[-2000:]
    assert "checked" in harness_output.stderr


def test_interval_equals_the_python_rule(harness_output):
    """The same intervals from xattn._masking's visibility (the oracle's rule)."""
    assert harness_output.returncode == 0, harness_output.stdout[-2000:]
    lines = harness_output.stdout.split("\n")
    rows = np.array([[int(x) for x in ln.split()] for ln in lines if ln], dtype=np.int64)
    assert len(rows) > 1000
    rng = np.random.default_rng(0)
    for sq, sk, causal, wl, wr, qi, lo, hi in rows[rng.choice(len(rows), 400, replace=False)]:
        window = None if wl < 0 and wr < 0 else (None if wl < 0 else int(wl),
                                                  None if wr < 0 else int(wr))
        vis = _masking.tile_visibility(np, int(qi), int(qi) + 1, 0, int(sk), sq=int(sq),
                                       sk=int(sk), causal=bool(causal), window=window,
                                       cache=False)
        keys = np.arange(sk) if vis is None else np.flatnonzero(vis[0])
        expect = (keys[0], keys[-1] + 1) if len(keys) else None
        got = (lo, hi) if hi > lo else None
        assert got == expect, (sq, sk, causal, wl, wr, qi)
