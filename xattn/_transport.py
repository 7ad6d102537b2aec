"""Point-to-point transport for :mod:`xattn.distributed`: mpi4py and NCCL behind one protocol.

Ring attention needs only this from a communicator (``Transport``):

* ``rank``, ``size``;
* ``post(sends, recvs)``: start every send ``(array, dest, tag)`` and every receive
  ``(shape, dtype, source, tag)`` of one step without blocking, and return a handle;
* ``wait(handle)``: the received arrays, in the order of ``recvs``, once every transfer of the
  handle has completed; a peer's failure notice or ``timeout`` seconds without completion raise
  :class:`RingError` instead of hanging;
* ``progress()``: give the library a chance to move pending transfers (between computations);
* ``notify_failure(message)``: tell every other rank that this one failed (best effort).

Every rank posts its steps in the same order (the schedule is computed identically on each
rank), so the tags matter only to MPI's message matching; NCCL matches sends and receives
between two peers by their order, and all the transfers of one ``post`` form one NCCL group so
that two ranks sending to each other cannot deadlock.

Neither mpi4py nor CuPy is imported here until a communicator of theirs is used.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ._array import is_cupy

__all__ = ["NcclComm", "RingError", "RingTimeoutError", "transport_for"]

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for one transfer before declaring its peer lost
_ABORT_TAG = 32000  # MPI guarantees tags up to 32767
_NOTICE_BYTES = 1024
_POLL_MAX_SLEEP = 2e-3  # seconds; waiting ranks must leave the cores to the computing ones


class RingError(RuntimeError):
    """A rank of a ring computation failed, or a peer did not answer in time."""


class RingTimeoutError(RingError, TimeoutError):
    """No transfer completed within the timeout: a peer hung, died or never joined."""


def transport_for(comm, timeout):
    """The transport of ``comm``: an mpi4py communicator or a :class:`NcclComm`."""
    if isinstance(comm, NcclComm):
        return _NcclTransport(comm, timeout)
    mod = type(comm).__module__.split(".")[0]
    if mod == "mpi4py":
        return _MpiTransport(comm, timeout)
    raise TypeError(
        "comm: expected an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD) or "
        f"xattn.distributed.NcclComm, got {type(comm).__module__}.{type(comm).__qualname__}"
    )


def _as_bytes(x):
    """A contiguous uint8 view (or copy, if ``x`` is strided) of ``x``'s buffer."""
    xp = _xp(x)
    return xp.ascontiguousarray(x).reshape(-1).view(xp.uint8)


def _xp(x):
    if is_cupy(x):
        import cupy

        return cupy
    return np


def _sleep_backoff(delay):
    time.sleep(delay)
    return min(max(2 * delay, 1e-5), _POLL_MAX_SLEEP)


class _Handle:
    """The transfers of one ``post``: requests, the buffers they use, the received arrays."""

    __slots__ = ("event", "keep", "out", "peers", "requests", "what")

    def __init__(self, what):
        self.requests, self.keep, self.out, self.what, self.event = [], [], [], what, None
        self.peers = []  # (verb, rank) of each request, for the error message


class _MpiTransport:
    """mpi4py: NumPy buffers directly; CuPy buffers staged through host memory, or handed to
    MPI as device buffers when ``XATTN_MPI_CUDA_AWARE=1`` says the MPI library is CUDA-aware
    (MPI offers no portable query, so this is the user's statement, never a guess)."""

    def __init__(self, comm, timeout):
        from mpi4py import MPI

        self.MPI, self.comm, self.timeout = MPI, comm, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.cuda_aware = os.environ.get("XATTN_MPI_CUDA_AWARE", "0") == "1"
        self._live = []  # handles not yet waited for: their receives are cancelled on failure

    def post(self, sends, recvs, what="transfer"):
        h = _Handle(what)
        device = self.cuda_aware and (any(xp is not np for *_, xp in recvs)
                                      or any(is_cupy(x) for x, _, _ in sends))
        send_bufs = [_as_bytes(x.get() if is_cupy(x) and not device else x) for x, _, _ in sends]
        recv_bufs = [(xp if device else np).empty(shape, dtype=dtype)
                     for shape, dtype, _, _, xp in recvs]
        if device:  # MPI touches device memory outside CuPy's stream order: finish it first
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        # Without CUDA-aware MPI a CuPy receive lands in host memory; wait() moves it over.
        for buf, (_, _, source, tag, xp) in zip(recv_bufs, recvs, strict=True):
            h.requests.append(self.comm.Irecv([_as_bytes(buf), self.MPI.BYTE], source, tag))
            h.peers.append(("from", source))
            h.out.append((buf, xp))
        for buf, (_, dest, tag) in zip(send_bufs, sends, strict=True):
            h.keep.append(buf)
            h.requests.append(self.comm.Isend([buf, self.MPI.BYTE], dest, tag))
            h.peers.append(("to", dest))
        self._live.append(h)
        return h

    def wait(self, h):
        deadline = time.monotonic() + self.timeout
        delay = 0.0
        pending = list(zip(h.requests, h.peers, strict=True))
        while pending:
            pending = [(r, peer) for r, peer in pending if not r.Test()]
            if not pending:
                break
            try:
                self._check_notice()
                if time.monotonic() > deadline:
                    peers = ", ".join(sorted({f"{verb} rank {p}" for _, (verb, p) in pending}))
                    raise RingTimeoutError(
                        f"rank {self.rank}: {h.what} did not complete within "
                        f"{self.timeout:g} s (nothing {peers}); a peer hung, died or is not in "
                        "this call"
                    )
            except RingError:
                self.cancel_pending()
                raise
            delay = _sleep_backoff(delay)
        self._live.remove(h)
        return [buf if _xp(buf) is xp else xp.asarray(buf) for buf, xp in h.out]

    def progress(self):
        """Let MPI move pending messages: without a progress thread, MPICH advances a large
        transfer only inside MPI calls, so the ring calls this between block computations."""
        for h in self._live:
            for r in h.requests:
                r.Test()

    def cancel_pending(self):
        """Withdraw the receives still posted (after a failure), so that no stale transfer
        matches a later call's."""
        for h in self._live:
            for r, (verb, _) in zip(h.requests, h.peers, strict=True):
                if verb == "from" and not r.Test():
                    r.Cancel()
                    r.Wait()
        self._live = []

    def _check_notice(self):
        status = self.MPI.Status()
        if self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_ABORT_TAG, status=status):
            buf = np.zeros(_NOTICE_BYTES, np.uint8)
            self.comm.Recv([buf, self.MPI.BYTE], status.Get_source(), _ABORT_TAG)
            text = bytes(buf).rstrip(b"\0").decode("utf-8", "replace")
            raise RingError(f"rank {self.rank}: rank {status.Get_source()} failed: {text}")

    def notify_failure(self, message):
        self.cancel_pending()
        buf = np.zeros(_NOTICE_BYTES, np.uint8)
        raw = message.encode("utf-8")[:_NOTICE_BYTES]
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
        # Small messages go eagerly, so these complete without the peers' help; the
        # requests are kept so that the buffer outlives them.
        self._notices = [
            self.comm.Isend([buf, self.MPI.BYTE], dest, _ABORT_TAG)
            for dest in range(self.size)
            if dest != self.rank
        ]


class NcclComm:
    """An NCCL communicator for GPU ring attention, wrapping ``cupy.cuda.nccl``.

    Create it from an mpi4py communicator (rank 0 draws the NCCL unique id and broadcasts it)
    or, without MPI, from a unique id that your own launcher distributed::

        comm = NcclComm(MPI.COMM_WORLD)
        uid = NcclComm.unique_id()            # on one process, shipped to the others
        comm = NcclComm(unique_id=uid, rank=r, size=n)

    Each process uses the current CuPy device; select it (``cupy.cuda.Device(i).use()``)
    before creating the communicator. NCCL needs a different GPU for every rank of a
    communicator (ranks that share a GPU use an mpi4py communicator instead). Transfers are
    byte copies (``ncclUint8``), so every dtype travels unchanged, bfloat16 included.

    Parameters
    ----------
    mpi_comm : mpi4py communicator, optional
    unique_id : bytes or sequence of 128 ints, optional
        From :meth:`NcclComm.unique_id` (whatever form this CuPy returns: bytes since CuPy
        14, a tuple of ints before), identical on every rank.
    rank, size : int
        This process's rank and the number of ranks (with ``unique_id``).
    """

    def __init__(self, mpi_comm=None, *, unique_id=None, rank=None, size=None):
        if mpi_comm is not None and unique_id is not None:
            raise TypeError("NcclComm: pass an mpi4py communicator or unique_id, not both")
        if mpi_comm is None and unique_id is None:
            raise TypeError(
                "NcclComm: expected an mpi4py communicator or unique_id=, rank=, size="
            )
        if mpi_comm is not None:
            if type(mpi_comm).__module__.split(".")[0] != "mpi4py":
                raise TypeError(
                    "NcclComm: mpi_comm must be an mpi4py communicator, got "
                    f"{type(mpi_comm).__module__}.{type(mpi_comm).__qualname__}"
                )
            if rank is not None or size is not None:
                raise TypeError("NcclComm: rank and size come from the mpi4py communicator")
            rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        else:
            for name, val in (("rank", rank), ("size", size)):
                if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
                    raise TypeError(f"NcclComm: {name} must be an int, got {val!r}")
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"NcclComm: need 0 <= rank < size, got rank={rank}, size={size}")
            unique_id = _unique_id_bytes(unique_id)
        nccl = _nccl()
        if mpi_comm is not None:
            unique_id = _unique_id_bytes(
                mpi_comm.bcast(nccl.get_unique_id() if rank == 0 else None, root=0))
        import cupy

        self.rank, self.size = int(rank), int(size)
        self.device = cupy.cuda.Device().id  # NCCL binds the communicator to this device
        self.nccl = _communicator(nccl, self.size, unique_id, self.rank)
        # Transfers run on a stream of their own, ordered after the compute stream by events
        # (see _NcclTransport.post), so that a block's transfer overlaps the next computation.
        self.stream = cupy.cuda.Stream(non_blocking=True)

    @staticmethod
    def unique_id():
        """A fresh NCCL unique id (draw it on one process and send it to the others)."""
        return _nccl().get_unique_id()

    def abort(self):
        """Abort the NCCL communicator: pending transfers end, the communicator is unusable."""
        self.nccl.abort()


def _unique_id_bytes(unique_id):
    """The 128-byte NCCL unique id from bytes or a sequence of ints (C chars: -128..255)."""
    if isinstance(unique_id, (bytes, bytearray)):
        raw = bytes(unique_id)
    else:
        try:
            values = [int(c) for c in unique_id]
        except (TypeError, ValueError):
            raise TypeError("NcclComm: unique_id must be bytes or a sequence of ints, got "
                            f"{type(unique_id).__qualname__}") from None
        if any(not -128 <= c <= 255 for c in values):
            raise ValueError("NcclComm: unique_id values must be bytes (-128..255)")
        raw = bytes(c % 256 for c in values)
    if len(raw) != 128:
        raise ValueError(f"NcclComm: unique_id must hold 128 values, got {len(raw)}")
    return raw


def _communicator(nccl, size, raw, rank):
    """``nccl.NcclCommunicator`` from the 128-byte id, in the form this CuPy takes: bytes
    (CuPy >= 14), else a tuple of C chars (signed on most CPUs, unsigned on ARM). A form of
    the wrong type is refused by the binding's argument check before NCCL is called."""
    forms = (raw, tuple(b - 256 if b > 127 else b for b in raw), tuple(raw))
    for i, form in enumerate(forms):
        try:
            return nccl.NcclCommunicator(size, form, rank)
        except (TypeError, OverflowError):
            if i == len(forms) - 1:
                raise
    raise AssertionError("unreachable")


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise ImportError(
            "NcclComm needs CuPy with NCCL (pip install cupy-cuda12x; "
            "python -m cupyx.tools.install_library --library nccl)"
        ) from exc
    if not getattr(nccl, "available", False):
        raise ImportError("NcclComm: this CuPy was built without NCCL (cupy.cuda.nccl)")
    return nccl


class _NcclTransport:
    """NCCL send/recv on the communicator's own stream, ordered after the compute stream."""

    def __init__(self, comm: NcclComm, timeout):
        self.comm, self.timeout = comm, timeout
        self.rank, self.size = comm.rank, comm.size

    def post(self, sends, recvs, what="transfer"):
        import cupy
        from cupy.cuda import nccl

        h = _Handle(what)
        stream = self.comm.stream
        for x, _dest, _tag in sends:
            if not is_cupy(x):
                raise TypeError(f"NcclComm moves CuPy arrays only, got {type(x).__module__} "
                                "arrays")
        bufs = [cupy.ascontiguousarray(x) for x, _, _ in sends]
        outs = [cupy.empty(shape, dtype=dtype) for shape, dtype, _, _, _ in recvs]
        # The arrays to send (and the memory of the receive buffers) belong to the current
        # stream's work; NCCL's stream must wait for it.
        stream.wait_event(cupy.cuda.get_current_stream().record())
        # One group: the sends and receives of a step progress together, so two ranks that
        # send to each other cannot deadlock, and NCCL matches them per peer in this order.
        nccl.groupStart()
        try:
            for out, (_, _, source, _tag, _xp) in zip(outs, recvs, strict=True):
                self.comm.nccl.recv(out.data.ptr, out.nbytes, nccl.NCCL_UINT8, source,
                                    stream.ptr)
                h.out.append((out, cupy))
            for buf, (_, dest, _tag) in zip(bufs, sends, strict=True):
                h.keep.append(buf)
                self.comm.nccl.send(buf.data.ptr, buf.nbytes, nccl.NCCL_UINT8, dest, stream.ptr)
        finally:
            nccl.groupEnd()
        h.event = stream.record()
        return h

    def wait(self, h):
        import cupy

        deadline = time.monotonic() + self.timeout
        delay = 0.0
        while not h.event.done:
            if time.monotonic() > deadline:
                # A GPU stream blocked in NCCL never returns by itself: abort the communicator.
                self.comm.abort()
                raise RingTimeoutError(
                    f"rank {self.rank}: {h.what} did not complete within {self.timeout:g} s; "
                    "a peer hung, died or is not in this call (the NCCL communicator was "
                    "aborted)"
                )
            delay = _sleep_backoff(delay)
        cupy.cuda.get_current_stream().wait_event(h.event)
        return [out for out, _ in h.out]

    def progress(self):
        return None  # NCCL runs on its own stream

    def cancel_pending(self):
        return None

    def notify_failure(self, message):
        # NCCL has no out-of-band channel: the peers see this rank's silence as a timeout.
        return None


def exchange_all(transport, x: Any, tag: int, what: str):
    """Every rank's ``x`` (same shape and dtype on every rank), as a list indexed by rank."""
    if transport.size == 1:
        return [x]  # nobody to exchange with
    xp = _xp(x)
    others = [r for r in range(transport.size) if r != transport.rank]
    h = transport.post(
        [(x, r, tag) for r in others],
        [(x.shape, x.dtype, r, tag, xp) for r in others],
        what=what,
    )
    got = dict(zip(others, transport.wait(h), strict=True))
    got[transport.rank] = x
    return [got[r] for r in range(transport.size)]
