"""Ring attention on one rank (``MPI.COMM_SELF``): the cost of the ring's machinery (cross-rank
check, chunk-pair planning, lse merge, final agreement) over plain ``flash_attention``.

asv runs one process, so only P = 1 can be measured here; ``benchmarks/ring_cpu.py`` launches
``mpiexec`` for P = 1, 2, 4 (time per rank, waiting, overlap). Skipped without mpi4py.
"""

import numpy as np

import xattn

from . import sizes

HEADS, HEAD_DIM = 4, 64


class RingOneRank:
    """``ring_attention`` forward and backward at P = 1, against ``flash_attention``."""

    params = (sizes([4096, 16384], [1024]), ["contiguous", "zigzag"], [False, True])
    param_names = ["seq_len", "layout", "causal"]
    timeout = 300

    def setup(self, seq_len, layout, causal):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise NotImplementedError("mpi4py is not installed") from exc
        from xattn.distributed import ring_attention

        self.comm = MPI.COMM_SELF
        rng = np.random.default_rng(0)
        self.q, self.k, self.v = (
            rng.standard_normal((HEADS, seq_len, HEAD_DIM), dtype=np.float32) for _ in range(3)
        )
        self.out, self.lse = ring_attention(self.q, self.k, self.v, self.comm, causal=causal,
                                            layout=layout, return_lse=True)
        self.dout = np.ones_like(self.out)

    def time_ring_forward(self, seq_len, layout, causal):
        from xattn.distributed import ring_attention

        ring_attention(self.q, self.k, self.v, self.comm, causal=causal, layout=layout)

    def time_flash_forward(self, seq_len, layout, causal):
        xattn.flash_attention(self.q, self.k, self.v, causal=causal)

    def time_ring_backward(self, seq_len, layout, causal):
        from xattn.distributed import ring_attention_backward

        ring_attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse,
                                self.comm, causal=causal, layout=layout)
