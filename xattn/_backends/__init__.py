"""The kernel table: which implementation serves which request.

One entry per implementation (the CPU fused kernels, the generic array code, each CuPy kernel
family). Every entry names the device it runs on, the packages it needs and a module whose
``supports(prob, opts, op)`` returns ``None`` when it can serve the request or a sentence
saying why not. Public functions call :func:`select`: ``backend="auto"`` takes the first entry
of the device's ordered list that supports the request; a named entry that cannot serve it
raises (never a silent fallback). ``backend="cupy"`` names the best CuPy kernel that supports
the request (the first ``cupy.*`` entry of the list).

Tests, docs, benchmarks and ``python -m xattn`` learn which entry serves a request from
:func:`explain` / :func:`select_entry` (and, after the fact, from the ``xattn`` logger at
debug level), never by patching the table.

Debug switches come from the environment, read at each call: ``XATTN_DISABLE=cupy.sm90,numba``
removes those entries (a prefix such as ``cupy`` removes every ``cupy.*`` entry); ``auto`` then
walks past them and a forced one raises.

When ``auto`` passes over an entry that is installed but cannot run here (numba without
threadpoolctl, a numba that fails to import) it warns once with a :class:`PerformanceWarning`
saying why and how to fix it. Backend modules are imported lazily: importing xattn imports
neither numba nor cupy.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import threading
import warnings
from dataclasses import dataclass

__all__ = ["ALIASES", "BACKENDS", "OPT_IN", "Backend", "PerformanceWarning", "available_backends",
           "disabled", "explain", "select", "select_entry"]

_log = logging.getLogger("xattn")


class PerformanceWarning(UserWarning):
    """``backend="auto"`` passed over an installed, faster implementation (said once)."""


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # "cpu" or "gpu"
    module: str  # module implementing supports/forward/backward
    description: str
    # Packages the entry imports. The first one is what "installed" means: when it is present
    # and the entry still cannot load, auto warns (PerformanceWarning) instead of passing over
    # it in silence. ``fix`` says how to make it usable.
    requires: tuple = ()
    fix: str = ""
    # (op, module) pairs for ops served by a module of their own; an op in _OWN_MODULE_OPS that
    # an entry does not list here is one it does not implement.
    ops: tuple = ()

    def load(self, op="forward"):
        return importlib.import_module(dict(self.ops).get(op, self.module), __name__)

    def missing(self) -> list:
        """The required packages that are not installed (found without importing them)."""
        return [p for p in self.requires if importlib.util.find_spec(p) is None]

    def installed(self) -> bool:
        """Whether the entry's main package is present (it may still be unusable)."""
        return not self.requires or importlib.util.find_spec(self.requires[0]) is not None


# Ops that no entry serves through its main module (decode_attention over a KVCache).
_OWN_MODULE_OPS = ("decode",)

_NUMBA_FIX = "pip install 'xattn[numba]' (numba, threadpoolctl and scipy)"
_CUPY_FIX = "pip install 'xattn[cuda]' on a machine with an NVIDIA GPU"

BACKENDS = {
    b.name: b
    for b in (
        Backend(
            "numba",
            "cpu",
            ".numpy_.fused",
            "CPU tiles with fused online softmax (numba njit) on a thread pool",
            requires=("numba", "threadpoolctl", "scipy"),
            fix=_NUMBA_FIX,
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
            "cupy.sm90",
            "gpu",
            ".cupy_.flash_sm90",
            "Hopper (sm_90a) warp-specialised wgmma forward, float16/bfloat16, D 64/128/192/256 "
            "(others zero-padded), score mods and block masks of 128-row blocks at D <= 128 "
            "(flash_fwd_sm90.cu)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.sm90_bwd",
            "gpu",
            ".cupy_.flash_bwd_sm90",
            "Hopper (sm_90a) wgmma backward, float16/bfloat16, D = Dv in 64/128, causal, "
            "window, GQA, block masks of 128-key blocks, score mods at D = 64 "
            "(flash_bwd_sm90.cu); deterministic=True: dK/dV on its _nodq entries, dq by "
            "flash_bwd.cu's deterministic dq kernel",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.sm80",
            "gpu",
            ".cupy_.flash",
            "mma.sync tensor-core forward and backward, float16/bfloat16, every option "
            "(flash_fwd.cu, flash_bwd.cu)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.tf32",
            "gpu",
            ".cupy_.flash_tf32",
            "float32 forward on tensor cores in TF32, with allow_tf32=True (flash_fwd_tf32.cu)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.tf32x3_sm90",
            "gpu",
            ".cupy_.flash_tf32x3_sm90",
            "Hopper (sm_90a) float32 forward at float32 accuracy: 3xTF32 on wgmma, D = 64, "
            "causal, window, GQA (flash_fwd_tf32x3_sm90.cu; switch "
            "instances.TF32X3_SM90_ON)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.tf32x3",
            "gpu",
            ".cupy_.flash_tf32x3",
            "float32 forward and backward on tensor cores at float32 accuracy: 3xTF32, "
            "error-compensated (flash_fwd_tf32.cu built with X3, flash_bwd_tf32x3.cu)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.simt",
            "gpu",
            ".cupy_.flash_simt",
            "strict float32 forward and backward on the CUDA cores "
            "(flash_fwd_simt.cu, flash_bwd_simt.cu)",
            requires=("cupy",),
            fix=_CUPY_FIX,
        ),
        Backend(
            "cupy.decode",
            "gpu",
            ".cupy_.decode",
            "split-KV decode kernel with GQA packing and paged reads (decode_splitkv.cu); "
            "float16/bfloat16, D = Dv in 64 or 128",
            requires=("cupy",),
            fix=_CUPY_FIX,
            ops=(("decode", ".cupy_.decode"),),
        ),
        Backend(
            "generic",
            "gpu",
            ".numpy_.tiled",
            "the generic tiled path on CuPy arrays (CuPy matmuls, one launch per tile)",
            requires=("cupy",),
            fix=_CUPY_FIX,
            ops=(("decode", ".numpy_.decode_generic"),),
        ),
    )
}

# The order auto walks, per device: fastest first.
_PREFERENCE = {
    "cpu": ("numba", "numpy"),
    "gpu": ("cupy.sm90", "cupy.sm90_bwd", "cupy.sm80", "cupy.tf32", "cupy.tf32x3_sm90",
            "cupy.tf32x3", "cupy.simt", "cupy.decode", "generic"),
}
# Entries that serve only when named with backend=. cupy.tf32x3 (3xTF32) was one
# until its q k^T stopped chaining the small products into the score: fed by it, the float32
# backward now meets the strict float32 rule at every option set (H100, 2026-12-05,
# tests/gpu/test_gpu_flash_tf32x3.py), so float32 runs on tensor cores by default.
# cupy.sm90_bwd (the wgmma backward) was one until it was measured ahead of cupy.sm80's
# backward: 1.68x at D=128, 1.08x at D=64 (fp16, S=4096, H100, 2026-12-05).
OPT_IN = ()
# Names that stand for "the first of these entries that supports the request".
ALIASES = {"cupy": ("cupy.sm90", "cupy.sm90_bwd", "cupy.sm80", "cupy.tf32", "cupy.tf32x3_sm90",
                    "cupy.tf32x3", "cupy.simt")}

_warned: set = set()
_warn_lock = threading.Lock()
_loaded: set = set()  # entries whose packages and module imported


def _device(xp) -> str:
    return "gpu" if xp.__name__ == "cupy" else "cpu"


def disabled() -> frozenset:
    """The entries switched off by ``XATTN_DISABLE`` (comma-separated names or prefixes)."""
    return _parse_disable(os.environ.get("XATTN_DISABLE", ""))


@functools.lru_cache(maxsize=16)
def _parse_disable(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    out = set()
    for n in names:
        hit = {b for b in BACKENDS if b == n or b.startswith(n + ".")}
        if not hit:
            raise ValueError(
                f"XATTN_DISABLE: unknown backend {n!r}; expected names or prefixes of "
                f"{sorted(BACKENDS)}"
            )
        out |= hit
    return frozenset(out)


def _load_error(backend):
    """None when the entry's packages and module import, else the reason."""
    if backend.name in _loaded:
        return None  # imports, once done, stay done
    missing = backend.missing()
    if missing:
        return f"not installed ({', '.join(missing)} missing: {backend.fix or 'pip install'})"
    for package in backend.requires:
        try:
            importlib.import_module(package)
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything
            return f"{package} is installed but fails to import ({type(exc).__name__}: {exc})"
    try:
        backend.load()
    except ImportError as exc:
        return f"not installed ({exc})"
    _loaded.add(backend.name)
    return None


def _why_not(backend, prob, opts, op, off=frozenset()):
    if backend.name in off:
        return "switched off by XATTN_DISABLE"
    if op in _OWN_MODULE_OPS and op not in dict(backend.ops):
        return f"does not implement {op}"
    why = _load_error(backend)
    if why is not None or prob is None:
        return why
    return backend.load(op).supports(prob, opts or {}, op)


def available_backends(xp, prob=None, opts=None, op="forward") -> dict:
    """``{name: None or reason}`` for every entry of the namespace's device, in auto's order.

    Without ``prob`` only whether the entry can load is checked.
    """
    off = disabled()
    return {name: _why_not(BACKENDS[name], prob, opts, op, off)
            for name in _PREFERENCE[_device(xp)]}


def _warn_skipped(skipped, chosen, op):
    """A PerformanceWarning (once per entry and reason) for each installed entry that auto
    passed over because it cannot load here."""
    for backend, why in skipped:
        # An entry that loaded serves other requests: nothing to warn about (and no package
        # lookup on every call).
        if backend.name in _loaded:
            continue
        if not backend.installed() or why == "switched off by XATTN_DISABLE":
            continue
        why = _load_error(backend)
        if why is None:
            continue  # it loads; it only does not serve this request
        key = (backend.name, why)
        with _warn_lock:
            if key in _warned:
                continue
            _warned.add(key)
        warnings.warn(
            f"xattn: the {backend.name!r} backend ({backend.requires[0]} is installed) was "
            f"skipped: {why}. {chosen!r} serves {op} calls instead, usually much slower. "
            f"To fix: {backend.fix}.",
            PerformanceWarning,
            # warn -> _warn_skipped -> select_entry -> select -> the public function -> caller
            stacklevel=5,
        )


def explain(prob, opts=None, backend="auto", op="forward") -> dict:
    """Which entry serves this request and why each one before it does not.

    Returns ``{"backend": name or None, "reasons": {name: reason}}`` with a reason for every
    entry considered and not chosen (``None`` for the chosen one). Nothing is raised or
    warned: tests, benchmarks and the main job use it to learn the route.
    """
    dev = _device(prob.xp)
    off = disabled()
    names = _candidates(backend, dev)
    reasons = {}
    for name in names:
        why = _why_not(BACKENDS[name], prob, opts, op, off)
        reasons[name] = why
        if why is None:
            return {"backend": name, "reasons": reasons}
    return {"backend": None, "reasons": reasons}


def _candidates(backend, dev):
    if backend == "auto":
        return _PREFERENCE[dev]
    if backend in ALIASES:
        return ALIASES[backend]
    if backend not in BACKENDS:
        names = sorted([*BACKENDS, *ALIASES])
        raise ValueError(f"backend: expected 'auto' or one of {names}, got {backend!r}")
    return (backend,)


def select_entry(prob, opts, backend="auto", op="forward") -> Backend:
    """The table entry that serves this request (see :func:`select`)."""
    dev = _device(prob.xp)
    names = _candidates(backend, dev)
    for name in names:
        chosen = BACKENDS[name]
        if chosen.device != dev:
            raise TypeError(
                f"backend={backend!r} runs on the {chosen.device}, but the inputs are "
                f"{prob.xp.__name__} arrays ({dev}); xattn never copies between host and device"
            )
    off = disabled()
    reasons, skipped = [], []
    for name in names:
        entry = BACKENDS[name]
        why = _why_not(entry, prob, opts, op, off)
        if why is None:
            if backend == "auto" and skipped:
                _warn_skipped(skipped, name, op)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("%s %s %s Hq=%d Sq=%d Sk=%d D=%d: backend %s (%s)%s", op,
                           prob.xp.__name__, prob.dtype, prob.hq, prob.sq, prob.sk, prob.d,
                           name, entry.description,
                           "".join(f"; skipped {n}: {w}" for n, w in
                                   ((b.name, w) for b, w in skipped)),
                           extra={"xattn_backend": name, "xattn_op": op})
            return entry
        reasons.append(f"{name}: {why}")
        skipped.append((entry, why))
    if backend == "auto":
        raise NotImplementedError(
            f"no {dev} backend supports this {op} request: " + "; ".join(reasons)
        )
    if len(names) == 1:
        raise NotImplementedError(
            f"backend={backend!r} cannot serve this {op} request: {reasons[0].split(': ', 1)[1]}"
        )
    raise NotImplementedError(
        f"backend={backend!r} cannot serve this {op} request: " + "; ".join(reasons)
    )


def select(prob, opts, backend="auto", op="forward"):
    """Return the implementation module that serves this request."""
    return select_entry(prob, opts, backend, op).load(op)
