"""The backend table: which implementation serves which request.

Each backend declares, once, the device it runs on and a ``supports(prob, opts)`` check that
returns ``None`` when it can serve the request or a sentence saying why not. Public functions
call :func:`select`; ``backend="auto"`` takes the first entry of the device's preference list
that supports the request, a named backend that cannot serve it raises (never a silent
fallback). Tests, docs and benchmarks read the same table.

Backend modules are imported lazily: importing xattn imports neither numba nor cupy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["BACKENDS", "Backend", "available_backends", "select"]


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # "cpu" or "gpu"
    module: str  # module implementing supports/forward/backward
    description: str
    # (op, module) pairs for ops served by a module of their own; an op in _OWN_MODULE_OPS that
    # an entry does not list here is one it does not implement.
    ops: tuple = ()

    def load(self, op="forward"):
        return importlib.import_module(dict(self.ops).get(op, self.module), __name__)


# Ops that no entry serves through its main module (decode_attention over a KVCache).
_OWN_MODULE_OPS = ("decode",)


BACKENDS = {
    b.name: b
    for b in (
        Backend(
            "numba",
            "cpu",
            ".numpy_.fused",
            "CPU tiles with fused online softmax (numba njit) on a thread pool",
            ops=(("decode", ".numpy_.decode"),),
        ),
        Backend(
            "numpy",
            "cpu",
            ".numpy_.tiled",
            "generic tiled online softmax written with array-namespace operations",
            ops=(("decode", ".numpy_.decode_generic"),),
        ),
        Backend(
            "cupy",
            "gpu",
            ".cupy_.flash",
            "CuPy RawKernels (tensor cores) compiled from xattn/kernels/*.cu",
        ),
        Backend(
            "cupy.decode",
            "gpu",
            ".cupy_.decode",
            "split-KV decode kernel with GQA packing and paged reads (decode_splitkv.cu); "
            "never run on a GPU yet: opt-in by name only, not in auto's list",
            ops=(("decode", ".cupy_.decode"),),
        ),
        Backend(
            "generic",
            "gpu",
            ".numpy_.tiled",
            "the generic tiled path on CuPy arrays (CuPy matmuls, one launch per tile)",
            ops=(("decode", ".numpy_.decode_generic"),),
        ),
    )
}

_PREFERENCE = {"cpu": ("numba", "numpy"), "gpu": ("cupy", "generic")}


def _device(xp) -> str:
    return "gpu" if xp.__name__ == "cupy" else "cpu"


def available_backends(xp, prob=None, opts=None, op="forward") -> dict:
    """``{name: None or reason}`` for every backend of the namespace's device."""
    dev = _device(xp)
    out = {}
    for name in _PREFERENCE[dev]:
        out[name] = _why_not(BACKENDS[name], prob, opts, op)
    return out


def _why_not(backend, prob, opts, op):
    if op in _OWN_MODULE_OPS and op not in dict(backend.ops):
        return f"does not implement {op}"
    try:
        mod = backend.load(op)
    except ImportError as exc:
        return f"not installed ({exc})"
    if prob is None:
        return None
    return mod.supports(prob, opts or {}, op)


def select(prob, opts, backend="auto", op="forward"):
    """Return the implementation module that serves this request."""
    dev = _device(prob.xp)
    if backend == "auto":
        reasons = []
        for name in _PREFERENCE[dev]:
            why = _why_not(BACKENDS[name], prob, opts, op)
            if why is None:
                return BACKENDS[name].load(op)
            reasons.append(f"{name}: {why}")
        raise NotImplementedError(
            f"no {dev} backend supports this {op} request: " + "; ".join(reasons)
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {backend!r}"
        )
    chosen = BACKENDS[backend]
    if chosen.device != dev:
        raise TypeError(
            f"backend={backend!r} runs on the {chosen.device}, but the inputs are "
            f"{prob.xp.__name__} arrays ({dev}); xattn never copies between host and device"
        )
    why = _why_not(chosen, prob, opts, op)
    if why is not None:
        raise NotImplementedError(f"backend={backend!r} cannot serve this {op} request: {why}")
    return chosen.load(op)
