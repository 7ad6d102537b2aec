"""Namespace, device and dtype resolution, and input validation.

Every public function starts here: it resolves the array namespace of its inputs (NumPy or
CuPy, never both), checks shapes, dtypes and options, and gets back an :class:`AttnProblem`
describing the problem. Error messages name the argument, what was expected and what arrived.

CuPy is recognised by the module of the array's type, so this module never imports CuPy
unless a CuPy array has actually been passed in.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AttnProblem",
    "array_namespace",
    "bfloat16_dtype",
    "check_block_mask",
    "check_bool",
    "check_int",
    "check_seed",
    "compute_dtype",
    "dlpack_interop",
    "is_cupy",
    "validate_attention",
]


def is_cupy(x: Any) -> bool:
    """True for a CuPy ndarray, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def _describe(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def array_namespace(*arrays: Any, names: tuple[str, ...] | None = None):
    """Return ``numpy`` or ``cupy`` for the given arrays (``None`` entries are ignored).

    Raises TypeError for anything that is not a NumPy or CuPy ndarray, for a mix of the two,
    and for CuPy arrays on different devices: xattn never copies between host and device.
    """
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    kinds = {}
    for name, a in zip(names, arrays, strict=False):
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            _check_not_subclass(name, a)
            kinds[name] = "numpy"
        elif is_cupy(a):
            kinds[name] = "cupy"
        else:
            hint = ""
            if hasattr(a, "__dlpack__"):
                hint = (f"; convert it with numpy.from_dlpack({name}) (cupy.from_dlpack on a "
                        "GPU) and the result back with its library's from_dlpack")
            raise TypeError(
                f"{name}: expected a numpy.ndarray or cupy.ndarray, got {_describe(a)}{hint}"
            )
    found = set(kinds.values())
    if len(found) > 1:
        detail = ", ".join(f"{n}={k}" for n, k in kinds.items())
        raise TypeError(
            "inputs mix NumPy and CuPy arrays "
            f"({detail}); xattn never copies between host and device: move them first"
        )
    if found == {"cupy"}:
        import cupy

        devices = {
            name: a.device.id for name, a in zip(names, arrays, strict=False) if a is not None
        }
        if len(set(devices.values())) > 1:
            detail = ", ".join(f"{n} on device {d}" for n, d in devices.items())
            raise TypeError(f"inputs live on different CUDA devices ({detail})")
        return cupy
    return np


def _check_not_subclass(name: str, a) -> None:
    # A subclass carries meaning that plain array arithmetic drops (a MaskedArray's mask, a
    # matrix's `*`): refuse it rather than compute on its data as if it were not there.
    # np.memmap is a plain ndarray over a file and is accepted.
    if type(a) is not np.ndarray and not isinstance(a, np.memmap):
        raise TypeError(
            f"{name}: expected a plain numpy.ndarray, got the subclass {_describe(a)}; pass "
            f"numpy.asarray({name}) if its data alone is meant (for a MaskedArray, fill the "
            "masked entries and pass the visibility as mask=)"
        )


def bfloat16_dtype():
    """NumPy's bfloat16 (from ml_dtypes), or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - exercised only without the extra
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _is_bfloat16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def supported_dtype(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype in (np.float16, np.float32, np.float64) or _is_bfloat16(dtype)



def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """A ``dtype=`` argument: one of the floating dtypes xattn computes with."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected a floating dtype, got {dtype!r}") from None
    if not supported_dtype(dt):
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {dt}"
        )
    return dt

def compute_dtype(dtype):
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _check_float(name: str, x) -> None:
    if not supported_dtype(x.dtype):
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool; a non-boolean (``"yes"``, ``1``) is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_int(name: str, value, *, minimum: int = 0, default=None, expected=None):
    """``value`` as a Python int ``>= minimum``; ``None`` gives ``default`` when one is set.
    ``expected`` words the errors (default: ``an int >= minimum``)."""
    if value is None and default is not None:
        return default
    expected = expected or f"an int >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return int(value)


def check_positive_int(name: str, value, *, allow_none: bool = False):
    """``value`` as a Python int ``>= 1``; ``None`` passes through with ``allow_none``."""
    if value is None and allow_none:
        return None
    return check_int(name, value, minimum=1, expected="a positive int (>= 1)")


def check_seed(name: str, seed) -> np.random.Generator:
    """A NumPy Generator from ``seed``: None, a non-negative int, a SeedSequence or a
    Generator (used as is, so its state advances), as :func:`numpy.random.default_rng`."""
    expected = "None, a non-negative int, a numpy.random.Generator or SeedSequence"
    if seed is None or isinstance(
        seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)
    ):
        return np.random.default_rng(seed)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name}: expected {expected}, got {seed!r}")
    if seed < 0:
        raise ValueError(f"{name}: expected {expected}, got {seed}")
    return np.random.default_rng(int(seed))


def check_scalar(name: str, value, *, positive: bool = True, allow_none: bool = True):
    """Validate a finite (positive) real scalar option; returns it as float or None."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: expected a number, got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return value


def normalize_window(window):
    """``None`` or ``(left, right)`` with each side a non-negative int or None."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window: expected (left, right) or None, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window, strict=True):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window: {side} must be a non-negative int or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window: {side} must be >= 0, got {w}")
        out.append(int(w))
    if out == [None, None]:
        return None
    return (out[0], out[1])


def _broadcastable(shape: tuple, target: tuple) -> bool:
    if len(shape) > len(target):
        return False
    for s, t in zip(reversed(shape), reversed(target), strict=False):
        if s != 1 and s != t:
            return False
    return True


# The score options every exact-attention function takes, with their defaults, in signature
# order: the one list behind validate_attention, AttnProblem and each public signature
# (score_options). An option whose value is an array broadcast over the problem is an
# *operand*; OPERANDS says what it broadcasts to ("scores": (..., Hq, Sq, Sk), "heads":
# (..., Hq)).
SCORE_OPTIONS = {
    "causal": False,
    "window": None,
    "mask": None,
    "bias": None,
    "alibi_slopes": None,
    "softcap": None,
    "scale": None,
}
OPERANDS = {"mask": "scores", "bias": "scores", "alibi_slopes": "heads"}


def score_options(*, before=None, exclude=(), wrap=True):
    """Give a public function the score options of :data:`SCORE_OPTIONS` as keyword-only
    parameters, so that each option is declared once.

    The function is written with ``**score`` in place of the options: it receives the options
    the caller passed (their defaults are those of SCORE_OPTIONS, applied by
    :func:`validate_attention`). Its signature (``inspect.signature``, ``help``, the docs)
    lists them explicitly, before the parameter ``before`` (default: at the end) and without
    ``exclude``; any other keyword is refused with Python's own TypeError. ``{score_options}``
    in its docstring becomes their names (a parameter line that refers to another function).
    ``wrap=False`` only sets the signature: the function checks its keywords itself.
    """
    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        opts = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
                for n, d in SCORE_OPTIONS.items() if n not in exclude]
        at = next((i for i, p in enumerate(own) if p.name == before), len(own))
        allowed = frozenset(p.name for p in own) | {p.name for p in opts}

        if not wrap:
            fn.__signature__ = sig.replace(parameters=[*own[:at], *opts, *own[at:]])
            return fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not kwargs.keys() <= allowed:
                key = next(iter(kwargs.keys() - allowed))
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument '{key}'")
            return fn(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=[*own[:at], *opts, *own[at:]])
        if fn.__doc__:
            wrapper.__doc__ = fn.__doc__.replace("{score_options}",
                                                 ", ".join(p.name for p in opts))
        return wrapper

    return decorate


@dataclass(frozen=True)
class AttnProblem:
    """Everything a backend needs to know about one attention call: shapes, dtypes and the
    validated score options, operands (mask, bias, ALiBi slopes) and the block mask included --
    the one parameter block that travels whole from the public function to the kernels."""

    xp: Any
    batch: tuple  # leading batch dims
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int
    dv: int
    dtype: np.dtype  # input/output dtype
    cdtype: np.dtype  # compute dtype
    scale: float
    causal: bool
    window: tuple | None
    softcap: float | None
    heads_axis: bool = True  # False for 2-D (seq, head_dim) inputs: one head, no head axis
    # The operands, as the caller passed them (checked, never copied): not part of the
    # problem's identity (equality, hash, repr).
    mask: Any = field(default=None, compare=False, repr=False)
    bias: Any = field(default=None, compare=False, repr=False)
    alibi_slopes: Any = field(default=None, compare=False, repr=False)
    # An xattn.BlockMask (checked against the shapes by check_block_mask), or None. Not an
    # operand: it selects the tiles to visit (the CPU plans, the kernels' block-sparse walk),
    # it modifies no score.
    block_mask: Any = field(default=None, compare=False, repr=False)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def has_alibi(self) -> bool:
        return self.alibi_slopes is not None

    @property
    def has_score_mods(self) -> bool:
        """Whether any score is modified beyond the visibility rules (causal, window): the
        kernels' ``mods`` variant, the CPU tiles that go through apply_score_mods."""
        if self.softcap is not None:
            return True
        for name in OPERANDS:  # a plain loop: this runs on every call
            if getattr(self, name) is not None:
                return True
        return False

    def operands(self) -> dict:
        """Every operand option (see OPERANDS) by name, None where absent."""
        return {name: getattr(self, name) for name in OPERANDS}

    def operand_shape(self, name) -> tuple:
        """The shape the operand ``name`` broadcasts to."""
        if OPERANDS[name] == "scores":
            return self.score_shape
        return (*self.batch, self.hq)

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.hq // self.hkv

    @property
    def offset(self) -> int:
        """Bottom-right alignment: query i sits at key position i + offset."""
        return self.sk - self.sq

    @property
    def _lead(self) -> tuple:
        return (*self.batch, self.hq) if self.heads_axis else ()

    @property
    def score_shape(self) -> tuple:
        return (*self._lead, self.sq, self.sk)

    @property
    def out_shape(self) -> tuple:
        return (*self._lead, self.sq, self.dv)

    @property
    def lse_shape(self) -> tuple:
        return (*self._lead, self.sq)


@score_options(before="extra", wrap=False)
def validate_attention(q, k, v, *, extra=(), block_mask=None, **score) -> AttnProblem:
    """Check q/k/v and the score options of every exact-attention function.

    ``extra`` is a sequence of ``(name, array)`` pairs (dout, out, lse, ...) that must share the
    namespace and device of q/k/v; their shapes are checked by the caller. ``block_mask`` (an
    :class:`xattn.BlockMask`, see :func:`check_block_mask`) is checked here once and travels in
    the problem.
    """
    if not score.keys() <= SCORE_OPTIONS.keys():
        key = next(iter(score.keys() - SCORE_OPTIONS.keys()))
        raise TypeError(f"validate_attention() got an unexpected keyword argument '{key}'")
    opts = {**SCORE_OPTIONS, **score}
    mask, bias, alibi_slopes = opts["mask"], opts["bias"], opts["alibi_slopes"]
    names = ("q", "k", "v", "mask", "bias", "alibi_slopes") + tuple(n for n, _ in extra)
    arrays = (q, k, v, mask, bias, alibi_slopes) + tuple(a for _, a in extra)
    required = names[:3] + names[6:]
    for name, a in zip(names, arrays, strict=True):
        if a is None and name in required:
            raise TypeError(f"{name}: expected an array, got None")
    xp = array_namespace(*arrays, names=names)
    for name, a in extra:
        _check_float(name, a)

    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(
                f"{name}: expected at least 2 dims (..., seq, head_dim), got shape {x.shape}"
            )
        _check_float(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(
            f"q, k, v must have the same number of dims, got q {q.shape}, k {k.shape}, "
            f"v {v.shape}"
        )
    if q.ndim == 2:
        batch, hq, hkv = (), 1, 1
    else:
        batch = tuple(q.shape[:-3])
        if tuple(k.shape[:-3]) != batch or tuple(v.shape[:-3]) != batch:
            raise ValueError(
                "q, k, v must have identical leading (batch) dims, got "
                f"q {q.shape}, k {k.shape}, v {v.shape}"
            )
        hq, hkv = q.shape[-3], k.shape[-3]
        if v.shape[-3] != hkv:
            raise ValueError(
                f"v: expected {hkv} heads like k (shape {k.shape}), got shape {v.shape}"
            )
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(
                f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA; "
                f"got q {q.shape}, k {k.shape}"
            )
    sq, d = q.shape[-2], q.shape[-1]
    sk, dk = k.shape[-2], k.shape[-1]
    sv, dv = v.shape[-2], v.shape[-1]
    if dk != d:
        raise ValueError(f"k: expected head_dim {d} like q {q.shape}, got shape {k.shape}")
    if sv != sk:
        raise ValueError(
            f"v: expected sequence length {sk} like k {k.shape}, got shape {v.shape}"
        )
    if d == 0 or dv == 0:
        raise ValueError(f"head_dim must be positive, got q {q.shape}, v {v.shape}")

    if opts["scale"] is None:
        scale_f = 1.0 / math.sqrt(d)
    else:
        scale_f = check_scalar("scale", opts["scale"])
    softcap = check_scalar("softcap", opts["softcap"])
    causal = check_bool("causal", opts["causal"])
    window = normalize_window(opts["window"])

    score_shape = (*batch, hq, sq, sk) if q.ndim > 2 else (sq, sk)
    if mask is not None:
        if mask.dtype != np.bool_:
            raise TypeError(f"mask: expected a boolean array (True = may attend), got {mask.dtype}")
        if not _broadcastable(mask.shape, score_shape):
            raise ValueError(
                f"mask: shape {mask.shape} does not broadcast to the score shape {score_shape}"
            )
    if bias is not None:
        _check_float("bias", bias)
        if not _broadcastable(bias.shape, score_shape):
            raise ValueError(
                f"bias: shape {bias.shape} does not broadcast to the score shape {score_shape}"
            )
    if alibi_slopes is not None:
        _check_float("alibi_slopes", alibi_slopes)
        ok = alibi_slopes.shape in ((hq,), (*batch, hq))
        if not ok:
            raise ValueError(
                f"alibi_slopes: expected shape ({hq},) or {(*batch, hq)}, "
                f"got {alibi_slopes.shape}"
            )

    prob = AttnProblem(
        xp=xp, batch=batch, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv, dtype=np.dtype(q.dtype),
        cdtype=compute_dtype(q.dtype), scale=scale_f, causal=causal, window=window,
        softcap=softcap, heads_axis=q.ndim > 2, mask=mask, bias=bias, alibi_slopes=alibi_slopes,
        block_mask=block_mask,
    )
    if block_mask is not None:
        check_block_mask(prob, block_mask)
    return prob


def _is_block_mask(x) -> bool:
    # xattn._blockmask imports this module, so BlockMask (or a subclass) is recognised by its
    # class's name and module, as is_cupy recognises CuPy without importing it.
    home = __name__.rpartition(".")[0] + "._blockmask"
    return any(c.__name__ == "BlockMask" and c.__module__ == home for c in type(x).__mro__)


def check_block_mask(prob, block_mask) -> None:
    """Check a ``block_mask`` against the problem: an :class:`xattn.BlockMask` built for
    ``q_len=Sq``, ``k_len=Sk``, and a batched mask's ``batch_shape`` equal to the inputs'
    leading batch dims. Its block size was checked by the BlockMask constructor; which block
    sizes a kernel serves is that entry's ``supports``. A BlockMask holds host arrays and
    serves NumPy and CuPy inputs alike (the CuPy launchers upload it once per device)."""
    if not _is_block_mask(block_mask):
        raise TypeError(f"block_mask: expected an xattn.BlockMask, got {type(block_mask).__name__}")
    if (block_mask.q_len, block_mask.k_len) != (prob.sq, prob.sk):
        raise ValueError(
            f"block_mask: built for q_len={block_mask.q_len}, k_len={block_mask.k_len}, but q "
            f"has Sq={prob.sq} and k has Sk={prob.sk}"
        )
    if block_mask.batch_shape and (not prob.heads_axis or block_mask.batch_shape != prob.batch):
        raise ValueError(
            f"block_mask: its batch_shape {block_mask.batch_shape} must equal the inputs' "
            f"leading batch dims {prob.batch if prob.heads_axis else ()}"
        )


def check_same_shape(name: str, x, shape: tuple, dtype=None) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and np.dtype(x.dtype) != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {x.dtype}")


# --- DLPack: PyTorch tensors and JAX arrays in, the same type out ----------------------------
#
# A public function decorated with @dlpack_interop accepts arrays of the libraries below: each
# is viewed without a copy as a NumPy array (CPU) or a CuPy array (CUDA) through DLPack, the
# function computes on the views, and every array it returns is handed back through the
# library's own from_dlpack (again without a copy). Arrays of any other library are refused
# with a message naming from_dlpack: xattn cannot know how to give their type back.

_DL_CPU, _DL_CUDA, _DL_ROCM, _DL_CUDA_MANAGED = 1, 2, 10, 13


class _Torch:
    name = "torch"

    @staticmethod
    def export(name, x):
        """``x`` as an object NumPy/CuPy can import, and whether it is bfloat16 bits."""
        import torch

        if x.requires_grad:
            raise TypeError(
                f"{name}: a torch.Tensor that requires grad; xattn has no autograd: pass "
                f"{name}.detach() (gradients: xattn.flash_attention_backward and friends)"
            )
        if x.dtype == torch.bfloat16:  # DLPack bfloat16 has no NumPy dtype: share the bits
            return x.view(torch.uint16), True
        return x, False

    @staticmethod
    def back(a):
        import torch

        if np.dtype(a.dtype).name == "bfloat16":
            return torch.from_dlpack(a.view(np.uint16)).view(torch.bfloat16)
        return torch.from_dlpack(a)


class _Jax:
    name = "jax"

    @staticmethod
    def export(name, x):
        if str(x.dtype) == "bfloat16":
            raise TypeError(
                f"{name}: a bfloat16 JAX array cannot be shared with NumPy through DLPack "
                "(NumPy has no bfloat16 type, and JAX cannot reinterpret it without a copy); "
                "pass numpy.asarray(x) (ml_dtypes.bfloat16) or float32"
            )
        return x, False

    @staticmethod
    def back(a):
        import jax.dlpack

        return jax.dlpack.from_dlpack(a)


# Top-level module of the array's type -> how to share it.
_LIBRARIES = {"torch": _Torch, "jax": _Jax, "jaxlib": _Jax}


def _foreign(a) -> bool:
    """True for an object NumPy/CuPy arrays are not, that offers DLPack."""
    return not isinstance(a, np.ndarray) and not is_cupy(a) and hasattr(a, "__dlpack__")


def _import_foreign(name, a):
    """The NumPy or CuPy view of a foreign DLPack array, and its library."""
    lib = _LIBRARIES.get(type(a).__module__.split(".")[0])
    if lib is None:
        raise TypeError(
            f"{name}: expected a numpy.ndarray or cupy.ndarray (PyTorch tensors and JAX arrays "
            f"are converted through DLPack), got {_describe(a)}; convert it with "
            f"numpy.from_dlpack({name}) (cupy.from_dlpack on a GPU) and the result back with "
            "its library's from_dlpack"
        )
    x, bf16_bits = lib.export(name, a)
    device, _ = x.__dlpack_device__()
    try:
        if device == _DL_CPU:
            view = np.from_dlpack(x)
        elif device in (_DL_CUDA, _DL_CUDA_MANAGED, _DL_ROCM):
            import cupy

            view = cupy.from_dlpack(x)
        else:
            raise TypeError(f"DLPack device type {int(device)} is neither the CPU nor a GPU")
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot view this {_describe(a)} without a copy: {exc}") from exc
    if bf16_bits:
        bf16 = bfloat16_dtype()
        if bf16 is None or not isinstance(view, np.ndarray):
            raise TypeError(f"{name}: bfloat16 from {lib.name} needs ml_dtypes and the CPU "
                            "(pip install 'xattn[bf16]')")
        view = view.view(bf16)
    return view, lib


def _give_back(result, lib):
    """Every NumPy/CuPy array in ``result`` (nested in tuples/lists) as ``lib``'s type."""
    if isinstance(result, (tuple, list)):
        return type(result)(_give_back(r, lib) for r in result)
    if isinstance(result, np.ndarray):
        if not result.flags.writeable or any(st < 0 for st in result.strides):
            # Our own result, but a read-only or reversed view that DLPack cannot export.
            result = result.copy()
        return lib.back(result)
    if is_cupy(result):
        return lib.back(result)
    return result


def dlpack_interop(fn):
    """Let the public function ``fn`` take PyTorch/JAX arrays and return their type.

    NumPy and CuPy arguments go through untouched (the fast path: one type check per
    argument). A foreign argument, alone or in a tuple/list argument, is replaced by its NumPy
    or CuPy view; NumPy/CuPy arrays may be mixed with one foreign library (e.g.
    ``alibi_slopes=xattn.alibi_slopes(8)`` with torch q, k, v), two libraries may not.
    """
    params = list(inspect.signature(fn).parameters)

    def has_foreign(a):
        if isinstance(a, (tuple, list)):
            return any(_foreign(x) for x in a)
        return _foreign(a)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (any(map(has_foreign, args)) or any(map(has_foreign, kwargs.values()))):
            return fn(*args, **kwargs)
        libs = {}

        def convert(name, a):
            if isinstance(a, (tuple, list)) and any(_foreign(x) for x in a):
                return type(a)(convert(f"{name}[{i}]", x) for i, x in enumerate(a))
            if not _foreign(a):
                return a
            view, lib = _import_foreign(name, a)
            libs.setdefault(lib.name, name)
            return view

        names = [params[i] if i < len(params) else f"argument {i}" for i in range(len(args))]
        args = tuple(convert(n, a) for n, a in zip(names, args, strict=True))
        kwargs = {n: convert(n, a) for n, a in kwargs.items()}
        if len(libs) > 1:
            detail = ", ".join(f"{n} is a {lib} array" for lib, n in libs.items())
            raise TypeError(f"inputs mix array libraries ({detail}); pass one library's arrays")
        (lib,) = {_LIBRARIES[k] for k in libs}
        return _give_back(fn(*args, **kwargs), lib)

    return wrapper
