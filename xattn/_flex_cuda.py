"""The user's ``score_mod``/``mask_mod`` translated to CUDA C, for the tensor-core kernels.

:mod:`xattn._flex_codegen` has resolved every free name of the function (numbers, arrays,
math/numpy functions, helper functions); this module walks the resolved AST once more and
writes two ``__device__ __forceinline__`` functions that NVRTC inlines into the ``mma.sync``
forward kernel (``xattn/kernels/flash_fwd.cu``, hook ``XATTN_USER_MODS``)::

    float xattn_user_score(const XattnUserArgs& u, float score, int b, int h, int q_idx,
                           int kv_idx);
    bool xattn_user_mask(const XattnUserArgs& u, int b, int h, int q_idx, int kv_idx);

and for the backward kernel (``xattn/kernels/flash_bwd.cu``, same hook), with ``grad=True``::

    float xattn_user_score_d(const XattnUserArgs& u, float score, int b, int h, int q_idx,
                             int kv_idx, float* dscore);

the modified score and its derivative with respect to ``score``, written from the
forward-mode derivative that :mod:`xattn._flex_codegen` derives for the Numba kernels
(:func:`~xattn._flex_codegen.score_derivative`: one set of rules for both).

``XattnUserArgs`` holds, per array the functions read (``score_mod_args`` entries and
captured CuPy arrays), its device pointer and its shape and strides in elements: the arrays
are passed to the kernel, never copied. Small captured NumPy arrays (up to
:data:`MAX_EMBEDDED` elements, e.g. ALiBi slopes) are written into the source as constants,
as ``numba.cuda`` freezes captured host arrays; their values are part of the cache key.

Semantics (Python's, on the GPU's types; see ``docs/flex.rst``):

* integers are ``long long``, or ``int`` where their range provably fits 32 bits (positions
  are below 2**30; their sums, differences, ``abs``, ``min``/``max``, ``%``/``//`` by positive
  constants are tracked), which gives the same values faster; ``//`` and ``%`` round toward
  minus infinity as in Python; a
  negative index counts from the end of its axis; indices are not bounds-checked (as in
  Numba);
* floating values are ``float`` (float32), as FlexAttention computes them: Python floats,
  float64 constants and float64 arrays are rounded to float32 (the CPU kernel follows
  NumPy's promotion and may compute a sub-expression in float64: results agree to float32
  rounding);
* ``and``/``or``/``not`` take booleans (comparisons); ``min``/``max`` follow Python's
  comparisons (``min(a, b)`` is ``b if b < a else a``), ``numpy.minimum``/``maximum``
  propagate NaN.

Anything else (loops, tuples, strings, calls of other functions, attributes other than
module constants) raises :class:`~xattn._flex_codegen.FlexCompileError` naming the construct
and its line.
"""

from __future__ import annotations

import ast
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import _flex_codegen as cg
from ._flex_codegen import FlexCompileError

__all__ = ["MAX_EMBEDDED", "CudaMods", "FlexCompileError", "cuda_source", "translate"]

# Captured host arrays up to this many elements are compiled in as constants; larger ones
# must be passed as device arrays (score_mod_args), since xattn never copies them.
MAX_EMBEDDED = 4096

# Types of values: bool, integer (long long), floating (float).
B, I, F = "bool", "int", "float"
_CTYPE = {B: "bool", I: "long long", F: "float"}
_RANK = {B: 0, I: 1, F: 2}

# Element types of arrays, as the C code reads them, and the value type they give.
_ELEM = {
    "float32": ("float", F), "float64": ("double", F), "float16": ("unsigned short", F),
    "bfloat16": ("unsigned short", F), "int8": ("signed char", I), "int16": ("short", I),
    "int32": ("int", I), "int64": ("long long", I), "uint8": ("unsigned char", I),
    "uint16": ("unsigned short", I), "uint32": ("unsigned int", I),
    "uint64": ("unsigned long long", I), "bool": ("unsigned char", B),
}

# Helpers every translation uses (host and device: the CPU tests compile them with a host
# compiler). XATTN_UFN is how the functions are declared (device code by default).
PRELUDE = r"""
#ifndef XATTN_UFN
#define XATTN_UFN __device__ __forceinline__
#endif
#ifndef XATTN_UCONST
#define XATTN_UCONST __constant__
#endif
XATTN_UFN float xu_bits(unsigned int u) {
    union { unsigned int u; float f; } x;
    x.u = u;
    return x.f;
}
XATTN_UFN float xu_half(unsigned short h) {  /* IEEE binary16 -> float */
    const unsigned int s = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
                       m = h & 0x3ffu;
    if (e == 0x1fu) return xu_bits(s | 0x7f800000u | (m << 13));
    if (e == 0) {
        const float f = (float)m * 5.9604644775390625e-8f;  /* m * 2^-24 */
        return s ? -f : f;
    }
    return xu_bits(s | ((e + 112u) << 23) | (m << 13));
}
XATTN_UFN float xu_bf16(unsigned short h) { return xu_bits((unsigned int)h << 16); }
XATTN_UFN long long xu_floordiv(long long a, long long b) {
    long long q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}
XATTN_UFN long long xu_mod(long long a, long long b) {
    long long r = a % b;
    if (r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
}
XATTN_UFN float xu_fmod(float a, float b) {
    float r = fmodf(a, b);
    if (r != 0.f && ((r < 0.f) != (b < 0.f))) r += b;
    return r;
}
XATTN_UFN float xu_ffloordiv(float a, float b) { return floorf((a - xu_fmod(a, b)) / b); }
XATTN_UFN long long xu_absll(long long a) { return a < 0 ? -a : a; }
XATTN_UFN int xu_abs32(int a) { return a < 0 ? -a : a; }
XATTN_UFN long long xu_ipow(long long a, long long n) {
    long long r = 1;
    for (; n > 0; --n) r *= a;
    return r;
}
XATTN_UFN long long xu_index(long long i, long long n) { return i < 0 ? i + n : i; }
XATTN_UFN float xu_npmin(float a, float b) { return a != a ? a : (b != b ? b : fminf(a, b)); }
XATTN_UFN float xu_npmax(float a, float b) { return a != a ? a : (b != b ? b : fmaxf(a, b)); }
XATTN_UFN float xu_sign(float a) { return a > 0.f ? 1.f : (a < 0.f ? -1.f : a); }
XATTN_UFN long long xu_isign(long long a) { return a > 0 ? 1 : (a < 0 ? -1 : 0); }
"""

# math / numpy functions of one float: C function name.
_F1 = {
    "exp": "expf", "log": "logf", "tanh": "tanhf", "sqrt": "sqrtf", "sin": "sinf",
    "cos": "cosf", "tan": "tanf", "sinh": "sinhf", "cosh": "coshf", "asin": "asinf",
    "acos": "acosf", "atan": "atanf", "arcsin": "asinf", "arccos": "acosf", "arctan": "atanf",
    "arcsinh": "asinhf", "asinh": "asinhf", "arctanh": "atanhf", "atanh": "atanhf",
    "exp2": "exp2f", "expm1": "expm1f", "log2": "log2f", "log10": "log10f", "log1p": "log1pf",
    "erf": "erff", "erfc": "erfcf", "fabs": "fabsf", "absolute": "fabsf", "cbrt": "cbrtf",
    "rint": "rintf", "trunc": "truncf", "floor": "floorf", "ceil": "ceilf",
}
# math.floor/ceil/trunc return Python ints; numpy's return floats.
_MATH_TO_INT = {"floor", "ceil", "trunc"}
_F2 = {"pow": "powf", "power": "powf", "atan2": "atan2f", "arctan2": "atan2f",
       "hypot": "hypotf", "fmod": "fmodf", "copysign": "copysignf"}
_CONSTS = {"pi": math.pi, "e": math.e, "inf": math.inf, "nan": math.nan, "tau": math.tau}
_CASTS = {"float": F, "float32": F, "float64": F, "float16": F, "int": I, "int8": I,
          "int16": I, "int32": I, "int64": I, "intp": I, "uint8": I, "uint16": I,
          "uint32": I, "uint64": I, "bool": B, "bool_": B}


def _float_literal(x) -> str:
    f = np.float32(x)
    if np.isnan(f):
        return "xu_bits(0x7fc00000u)"
    if np.isinf(f):
        return "xu_bits(0x7f800000u)" if f > 0 else "xu_bits(0xff800000u)"
    if f == 0:
        return "-0.0f" if math.copysign(1.0, float(f)) < 0 else "0.0f"
    return f"({float(f).hex()}f)"


@dataclass
class ArraySlot:
    """One array the functions read: where its value comes from and how C reads it."""

    name: str       # field prefix in XattnUserArgs
    source: tuple   # ("arg", i) | ("smod", j) | ("mmod", j): score_mod_args / captures
    dtype: str
    ndim: int

    @property
    def ctype(self):
        return _ELEM[self.dtype][0]


@dataclass
class CudaMods:
    """The translation of one (score_mod, mask_mod) pair."""

    text: str                 # struct XattnUserArgs and the two functions (no macros)
    slots: list = field(default_factory=list)
    has_score: bool = False
    has_mask: bool = False
    has_grad: bool = False    # xattn_user_score_d is defined (translate(..., grad=True))
    key: str = ""             # hash of the text: names the compiled module

    def __post_init__(self):
        self.key = hashlib.sha256(self.text.encode()).hexdigest()[:24]

    def kernel_prelude(self) -> str:
        """The text put before the kernel source: functions plus the hook macros."""
        params = "".join(f", {p}" for s in self.slots for p in _slot_params(s))
        init = ", ".join(f"xu_{s.name}{suffix}" for s in self.slots
                         for suffix in _slot_fields(s))
        return "\n".join([
            "#define XATTN_USER_MODS 1",
            f"#define XATTN_USER_SCORE {int(self.has_score)}",
            f"#define XATTN_USER_MASK {int(self.has_mask)}",
            f"#define XATTN_USER_PARAMS {params}",
            f"#define XATTN_USER_MAKE XattnUserArgs{{{init}}}",
            "#define XATTN_USER_INIT , XATTN_USER_MAKE",
            self.text,
        ])

    def kernel_args(self, args, smod, mmod):
        """The launch arguments of the slots: pointer, then shape and strides (elements)."""
        out = []
        for s in self.slots:
            kind, i = s.source
            a = args[i] if kind == "arg" else (smod if kind == "smod" else mmod).arrays[i]
            item = a.dtype.itemsize
            out.append(a)
            out += [np.int64(n) for n in a.shape]
            out += [np.int64(st // item) for st in a.strides]
        return tuple(out)


def _slot_fields(s):
    return ["", *(f"_n{d}" for d in range(s.ndim)), *(f"_s{d}" for d in range(s.ndim))]


def _slot_params(s):
    return [f"const {s.ctype}* xu_{s.name}", *(f"long long xu_{s.name}_n{d}"
                                                for d in range(s.ndim)),
            *(f"long long xu_{s.name}_s{d}" for d in range(s.ndim))]


def _struct(slots):
    lines = ["struct XattnUserArgs {"]
    for s in slots:
        lines.append(f"    const {s.ctype}* {s.name};")
        for d in range(s.ndim):
            lines.append(f"    long long {s.name}_n{d};")
        for d in range(s.ndim):
            lines.append(f"    long long {s.name}_s{d};")
    if not slots:
        lines.append("    int unused;")
    lines.append("};")
    return "\n".join(lines)


# --- the translator -------------------------------------------------------------------------


class _Env:
    """What the names of one translated function mean."""

    def __init__(self):
        self.values = {}    # name -> (C expression, type)  (parameters, constants)
        self.arrays = {}    # name -> (C access prefix, dtype name, ndim, shape or None)
        self.modules = {}   # name -> top module name
        self.funcs = {}     # name -> (module, function name)
        self.builtins = set()


class _Translator:
    def __init__(self, cap, role, env, helpers, node):
        self.cap, self.role, self.env = cap, role, env
        self.node = node
        if helpers:
            node.body = cg._inline_body(node.body, helpers, self.fail)
            ast.fix_missing_locations(node)
        self.locals = {}
        self.lines = []
        self.indent = 1
        self.dout = False

    def fail(self, node, what):
        line = getattr(node, "lineno", None)
        where = f" (line {line} of {self.cap.fn.__code__.co_filename})" if line else ""
        raise FlexCompileError(
            f"{self.role}: cannot compile {self.cap.fn.__name__} for the tensor-core kernel "
            f"(backend='cupy'): {what}{where}"
        )

    # -- types
    def infer_locals(self, params):
        names = {}
        body = [n for stmt in self.node.body for n in ast.walk(stmt)]
        for sub in body:
            if isinstance(sub, (ast.For, ast.While, ast.AsyncFor)):
                self.fail(sub, "loops (`for`/`while`) are not supported")
            if isinstance(sub, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
                                ast.Lambda, ast.FunctionDef, ast.Try, ast.With, ast.Global,
                                ast.Nonlocal, ast.Delete, ast.Raise, ast.Assert)):
                self.fail(sub, f"`{type(sub).__name__}` is not supported")
        for _ in range(8):
            changed = False
            for sub in body:
                target, value = None, None
                if isinstance(sub, ast.Assign):
                    if len(sub.targets) != 1 or not isinstance(sub.targets[0], ast.Name):
                        self.fail(sub, "assignments to anything but one plain name")
                    target, value = sub.targets[0].id, sub.value
                elif isinstance(sub, ast.AugAssign):
                    if not isinstance(sub.target, ast.Name):
                        self.fail(sub, "augmented assignment to anything but a plain name")
                    target = sub.target.id
                    value = ast.BinOp(ast.Name(target, ast.Load()), sub.op, sub.value)
                elif isinstance(sub, ast.AnnAssign) and sub.value is not None:
                    if not isinstance(sub.target, ast.Name):
                        self.fail(sub, "assignments to anything but a plain name")
                    target, value = sub.target.id, sub.value
                if target is None:
                    continue
                if target in params:
                    self.fail(sub, f"assignment to the parameter {target!r} (use a new name)")
                self.locals = names
                try:
                    t = self.expr(value, dry=True)[1]
                except _Unknown:
                    continue
                old = names.get(target)
                new = t if old is None or _RANK[t] > _RANK[old] else old
                if new != old:
                    names[target] = new
                    changed = True
            if not changed:
                break
        self.locals = names

    # -- expressions: (C code, type)
    def expr(self, node, dry=False):
        e = self.env
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                return ("true" if v else "false"), B
            if isinstance(v, int):
                if not -(2**63) <= v < 2**63:
                    self.fail(node, f"the integer {v} does not fit 64 bits")
                small = _narrow(str(v) if v >= 0 else f"({v})", v, v)
                if small is not None:
                    return small, I
                return f"{v}LL" if v != -(2**63) else "(-9223372036854775807LL - 1)", I
            if isinstance(v, float):
                return _float_literal(v), F
            self.fail(node, f"the constant {v!r} ({type(v).__name__})")
        if isinstance(node, ast.Name):
            if node.id in self.locals:
                return "v_" + node.id, self.locals[node.id]
            if node.id in e.values:
                return e.values[node.id]
            if node.id in e.arrays:
                self.fail(node, f"the array {node.id!r} used as a value (index it)")
            if dry:
                raise _Unknown
            self.fail(node, f"the name {node.id!r}")
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in e.modules:
                if node.attr in _CONSTS:
                    return _float_literal(_CONSTS[node.attr]), F
            self.fail(node, f"the attribute `.{node.attr}`")
        if isinstance(node, ast.Subscript):
            return self.subscript(node, dry)
        if isinstance(node, ast.UnaryOp):
            a, t = self.expr(node.operand, dry)
            if isinstance(node.op, ast.Not):
                return f"(!{self.truth(a, t)})", B
            if isinstance(node.op, ast.Invert):
                if t == F:
                    self.fail(node, "`~` of a float")
                return (f"(!{a})", B) if t == B else (f"(~{a})", I)
            t2 = I if t == B else t
            op = "-" if isinstance(node.op, ast.USub) else "+"
            a = self.cast(a, t, t2)
            r = _rng(a)
            if r is not None:
                lo, hi = (-r[1], -r[0]) if op == "-" else r
                small = _narrow(f"({op}{a})", lo, hi)
                if small is not None:
                    return small, t2
            return f"({op}{_wide(a) if t2 == I else a})", t2
        if isinstance(node, ast.BinOp):
            return self.binop(node, dry)
        if isinstance(node, ast.Compare):
            parts = []
            left = self.expr(node.left, dry)
            for op, right in zip(node.ops, node.comparators, strict=True):
                r = self.expr(right, dry)
                sym = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=",
                       ast.Gt: ">", ast.GtE: ">="}.get(type(op))
                if sym is None:
                    self.fail(node, f"the comparison `{type(op).__name__}`")
                t = _join(left[1], r[1])
                t = I if t == B else t
                parts.append(f"({self.cast(*left, t)} {sym} {self.cast(*r, t)})")
                left = r
            return "(" + " && ".join(parts) + ")", B
        if isinstance(node, ast.BoolOp):
            vals = [self.expr(v, dry) for v in node.values]
            if any(t != B for _, t in vals):
                self.fail(node, "`and`/`or` on values that are not booleans (write a "
                                "comparison, e.g. `x != 0`)")
            op = " && " if isinstance(node.op, ast.And) else " || "
            return "(" + op.join(a for a, _ in vals) + ")", B
        if isinstance(node, ast.IfExp):
            c = self.truth(*self.expr(node.test, dry))
            a, ta = self.expr(node.body, dry)
            b, tb = self.expr(node.orelse, dry)
            t = _join(ta, tb)
            a, b = self.cast(a, ta, t), self.cast(b, tb, t)
            code = f"({c} ? {a} : {b})"
            ra, rb = _rng(a), _rng(b)
            if ra and rb:
                return _narrow(code, min(ra[0], rb[0]), max(ra[1], rb[1])), t
            return code, t
        if isinstance(node, ast.Call):
            return self.call(node, dry)
        self.fail(node, f"the construct `{type(node).__name__}`")

    def truth(self, a, t):
        return a if t == B else (f"({a} != 0)" if t == I else f"({a} != 0.f)")

    def cast(self, a, t, to):
        if t == to:
            return a
        if to == B:
            return self.truth(a, t)
        if t == B and to == I:
            return _narrow(f"((int){a})", 0, 1)
        return f"(({_CTYPE[to]}){a})"

    def subscript(self, node, dry):
        if not (isinstance(node.value, ast.Name) and node.value.id in self.env.arrays):
            self.fail(node, "indexing anything but an array (score_mod_args or a captured "
                            "array)")
        prefix, dtype, ndim, const = self.env.arrays[node.value.id]
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx) != ndim:
            self.fail(node, f"{node.value.id!r} has {ndim} dimension(s), indexed with "
                            f"{len(idx)} (every read takes one integer per dimension)")
        terms = []
        for d, ix in enumerate(idx):
            if isinstance(ix, ast.Slice):
                self.fail(node, "slices (a read takes one integer per dimension)")
            a, t = self.expr(ix, dry)
            if t == F:
                self.fail(ix, "a float index")
            a = self.cast(a, t, I)
            if const is not None:
                n, s = str(const[0][d]) + "LL", str(const[1][d]) + "LL"
            else:
                n, s = f"u.{prefix}_n{d}", f"u.{prefix}_s{d}"
            terms.append(f"xu_index({a}, {n}) * {s}")
        base = prefix if const is not None else f"u.{prefix}"
        raw = f"{base}[{' + '.join(terms)}]"
        ctype, vt = _ELEM[dtype]
        if dtype == "float16":
            return f"xu_half({raw})", F
        if dtype == "bfloat16":
            return f"xu_bf16({raw})", F
        if vt == B:
            return f"({raw} != 0)", B
        if dtype in ("int8", "int16", "int32", "uint8", "uint16"):
            info = np.iinfo(dtype)
            small = _narrow(f"((int){raw})", max(int(info.min), INT32[0] + 1), int(info.max))
            if small is not None:
                return small, I
        return f"(({_CTYPE[vt]}){raw})", vt

    def binop(self, node, dry):
        a, ta = self.expr(node.left, dry)
        b, tb = self.expr(node.right, dry)
        op = type(node.op)
        t = _join(ta, tb)
        t = I if t == B else t
        if op in (ast.Add, ast.Sub, ast.Mult):
            sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}[op]
            a, b = self.cast(a, ta, t), self.cast(b, tb, t)
            if t == I:
                ra, rb = _rng(a), _rng(b)
                if ra and rb:
                    if op is ast.Add:
                        lo, hi = ra[0] + rb[0], ra[1] + rb[1]
                    elif op is ast.Sub:
                        lo, hi = ra[0] - rb[1], ra[1] - rb[0]
                    else:
                        ends = [x * y for x in ra for y in rb]
                        lo, hi = min(ends), max(ends)
                    small = _narrow(f"({a} {sym} {b})", lo, hi)
                    if small is not None:
                        return small, I
                a, b = _wide(a), _wide(b)
            return f"({a} {sym} {b})", t
        if op is ast.Div:
            return f"({self.cast(a, ta, F)} / {self.cast(b, tb, F)})", F
        if op in (ast.FloorDiv, ast.Mod) and t == I:
            a, b = self.cast(a, ta, I), self.cast(b, tb, I)
            ra, rb = _rng(a), _rng(b)
            if ra and rb and rb[0] == rb[1] and rb[0] > 0:
                c = rb[0]
                if op is ast.Mod:
                    lo, hi = 0, c - 1
                else:
                    lo, hi = ra[0] // c, ra[1] // c
                # Non-negative by a positive constant: C's / and % are Python's.
                code = (f"({a} {'/' if op is ast.FloorDiv else '%'} {b})" if ra[0] >= 0 else
                        f"((int)xu_{'floordiv' if op is ast.FloorDiv else 'mod'}({a}, {b}))")
                return _narrow(code, lo, hi) or code, I
        if op is ast.FloorDiv:
            if t == I:
                return f"xu_floordiv({self.cast(a, ta, I)}, {self.cast(b, tb, I)})", I
            return f"xu_ffloordiv({self.cast(a, ta, F)}, {self.cast(b, tb, F)})", F
        if op is ast.Mod:
            if t == I:
                return f"xu_mod({self.cast(a, ta, I)}, {self.cast(b, tb, I)})", I
            return f"xu_fmod({self.cast(a, ta, F)}, {self.cast(b, tb, F)})", F
        if op is ast.Pow:
            if (t == I and isinstance(node.right, ast.Constant)
                    and isinstance(node.right.value, int) and node.right.value >= 0):
                return f"xu_ipow({self.cast(a, ta, I)}, {b})", I
            return f"powf({self.cast(a, ta, F)}, {self.cast(b, tb, F)})", F
        if op in (ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift):
            if F in (ta, tb):
                self.fail(node, f"the bitwise operator {op.__name__} on a float")
            sym = {ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
                   ast.RShift: ">>"}[op]
            if ta == tb == B and sym in "&|^":
                return f"({a} {sym} {b})", B
            a, b = self.cast(a, ta, I), self.cast(b, tb, I)
            ra, rb = _rng(a), _rng(b)
            if ra and rb and sym in "&|^":
                return _narrow(f"({a} {sym} {b})", INT32[0] + 1, INT32[1]) or \
                    f"({a} {sym} {b})", I
            if ra and rb and sym == ">>" and rb[0] >= 0:
                return _narrow(f"({a} >> {b})", min(ra[0], 0), max(ra[1], 0)), I
            return f"({_wide(a)} {sym} {_wide(b)})", I
        self.fail(node, f"the operator {op.__name__}")

    def _callee(self, func):
        """``(module or "builtin", name)`` of a called function."""
        e = self.env
        if isinstance(func, ast.Name):
            if func.id in e.builtins:
                return "builtin", func.id
            if func.id in e.funcs:
                return e.funcs[func.id]
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id in e.modules):
            return e.modules[func.value.id], func.attr
        return None, ast.unparse(func)

    def call(self, node, dry):
        if node.keywords:
            self.fail(node, "keyword arguments in calls")
        mod, name = self._callee(node.func)
        if mod is None:
            self.fail(node, f"a call to {name}() (math/numpy functions, abs, min, max, "
                            "float, int, bool, round and helper functions are supported)")
        if (name == "float" and mod == "builtin" and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            try:  # float("inf"), float("-inf"), float("nan")
                return _float_literal(float(node.args[0].value)), F
            except ValueError:
                self.fail(node, f"float({node.args[0].value!r})")
        args = [self.expr(a, dry) for a in node.args]
        n = len(args)
        if name in ("abs", "absolute", "fabs") and n == 1:
            a, t = args[0]
            if t == F or name != "abs":
                return f"fabsf({self.cast(a, t, F)})", F
            a = self.cast(a, t, I)
            r = _rng(a)
            if r is not None:
                lo, hi = r if r[0] >= 0 else ((-r[1], -r[0]) if r[1] <= 0 else
                                               (0, max(-r[0], r[1])))
                return _narrow(f"xu_abs32({a})", lo, hi), I
            return f"xu_absll({a})", I
        if name in ("min", "max") and mod == "builtin" and n >= 2:
            t = _join(*(t for _, t in args))
            t = I if t == B else t
            sym = "<" if name == "min" else ">"
            ops = [self.cast(a, ta, t) for a, ta in args]
            acc = ops[0]
            for a in ops[1:]:
                acc = self._minmax(acc, a, sym)
            rs = [_rng(a) for a in ops]
            if t == I and all(rs):
                pick = min if name == "min" else max
                return _narrow(acc, pick(r[0] for r in rs), pick(r[1] for r in rs)), t
            return acc, t
        if name in ("minimum", "maximum", "fmin", "fmax") and n == 2:
            a, b = (self.cast(x, t, F) for x, t in args)
            fn = {"minimum": "xu_npmin", "maximum": "xu_npmax", "fmin": "fminf",
                  "fmax": "fmaxf"}[name]
            return f"{fn}({a}, {b})", F
        if name in _CASTS and n == 1 and (mod == "builtin" or mod == "numpy"):
            a, t = args[0]
            to = _CASTS[name]
            if to == I and t == F:
                return f"((long long)truncf({a}))", I
            return self.cast(a, t, to), to
        if name == "round" and mod == "builtin" and n == 1:
            a, t = args[0]
            return (a, I) if t != F else (f"((long long)rintf({a}))", I)
        if name == "where" and n == 3:
            c = self.truth(*args[0])
            (a, ta), (b, tb) = args[1], args[2]
            t = _join(ta, tb)
            return f"({c} ? {self.cast(a, ta, t)} : {self.cast(b, tb, t)})", t
        if name in ("isnan", "isinf", "isfinite") and n == 1:
            a, t = args[0]
            if t != F:
                return ("false" if name != "isfinite" else "true"), B
            x = f"({a})"
            return {"isnan": f"({x} != {x})",
                    "isinf": f"(fabsf({x}) == xu_bits(0x7f800000u))",
                    "isfinite": f"(fabsf({x}) < xu_bits(0x7f800000u))"}[name], B
        if name == "sign" and n == 1:
            a, t = args[0]
            return (f"xu_sign({a})", F) if t == F else (f"xu_isign({self.cast(a, t, I)})", I)
        if name == "square" and n == 1:
            a, t = args[0]
            t2 = I if t == B else t
            a = self.cast(a, t, t2)
            return f"({a} * {a})", t2
        if name in _F1 and n == 1:
            a, t = args[0]
            if name in ("floor", "ceil", "trunc") and t != F:
                return self.cast(a, t, I), I
            code = f"{_F1[name]}({self.cast(a, t, F)})"
            if mod == "math" and name in _MATH_TO_INT:
                return f"((long long){code})", I
            return code, F
        if name in _F2 and n == 2:
            a, b = (self.cast(x, t, F) for x, t in args)
            return f"{_F2[name]}({a}, {b})", F
        self.fail(node, f"the call {mod}.{name}() with {n} argument(s)")

    def _minmax(self, acc, a, sym):
        # Python's min(x, y) is `y if y < x else x` (the first of equal or NaN values); the
        # operands are pure, so evaluating them twice only costs what CSE does not remove.
        return f"(({a}) {sym} ({acc}) ? ({a}) : ({acc}))"

    # -- statements
    def emit(self, line):
        self.lines.append("    " * self.indent + line)

    def stmts(self, body, ret):
        for s in body:
            self.stmt(s, ret)

    def stmt(self, s, ret):
        if isinstance(s, ast.Assign):
            name = s.targets[0].id
            a, t = self.expr(s.value)
            self.emit(f"v_{name} = {self.cast(a, t, self.locals[name])};")
        elif isinstance(s, ast.AugAssign):
            self.stmt(ast.copy_location(ast.Assign(
                targets=[ast.Name(s.target.id, ast.Store())],
                value=ast.BinOp(ast.Name(s.target.id, ast.Load()), s.op, s.value)), s), ret)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                self.stmt(ast.copy_location(ast.Assign(targets=[s.target], value=s.value), s),
                          ret)
        elif isinstance(s, ast.Return) and self.dout:
            (a, t), (da, dt) = (self.expr(e) for e in s.value.elts)
            self.emit(f"*dscore_out = {self.cast(da, dt, F)};")
            self.emit(f"return {self.cast(a, t, ret)};")
        elif isinstance(s, ast.Return):
            a, t = self.expr(s.value)
            self.emit(f"return {self.cast(a, t, ret)};")
        elif isinstance(s, ast.If):
            c = self.truth(*self.expr(s.test))
            self.emit(f"if {c if c.startswith('(') else '(' + c + ')'} {{")
            self.indent += 1
            self.stmts(s.body, ret)
            self.indent -= 1
            if s.orelse:
                self.emit("} else {")
                self.indent += 1
                self.stmts(s.orelse, ret)
                self.indent -= 1
            self.emit("}")
        elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            pass  # a docstring
        elif isinstance(s, ast.Pass):
            pass
        else:
            self.fail(s, f"the statement `{type(s).__name__}`")


INT32 = (-(2**31), 2**31 - 1)
# b, h, q_idx, kv_idx: the kernel's int indices. Sequences, batches and head counts stay below
# 2**30 (flex_tc.reason refuses longer ones), so that sums and differences of two indices
# plus small constants are still 32-bit.
MAX_INDEX = 2**30
INDEX_RANGE = (0, MAX_INDEX - 1)


class _Code(str):
    """C code of an integer expression whose values provably fit 32 bits (``rng``): emitted
    as C ``int`` arithmetic, which is cheaper on the GPU than 64-bit and gives the same
    values (no overflow is possible). Any other integer expression is ``long long``."""

    rng = None


def _narrow(code, lo, hi):
    """``code`` as a 32-bit expression when [lo, hi] fits, else None."""
    if INT32[0] < lo and hi <= INT32[1]:
        c = _Code(code)
        c.rng = (lo, hi)
        return c
    return None


def _rng(a):
    return getattr(a, "rng", None)


def _wide(a):
    """``a`` as long long (before an operation whose result may not fit 32 bits)."""
    return f"((long long){a})" if _rng(a) else a


class _Unknown(Exception):
    """A local whose type is not known yet (type inference iterates)."""


def _join(*ts):
    return max(ts, key=lambda t: _RANK[t])


def _resolve(cap, prefix, out, params):
    """alias -> (kind, payload) for every renamed free name of ``cap`` and its helpers, as
    :func:`xattn._flex_codegen.function_source` renames them."""
    for name, (kind, payload, _) in cap.names.items():
        if name in params:
            continue
        if kind == "builtin":
            out[name] = (kind, payload)
            continue
        alias = f"{prefix}_{name}"
        out[alias] = (kind, payload)
        if kind == "function":
            sub_params = set(payload.params)
            _resolve(payload, alias, out, sub_params)


def _const_array(a, cname):
    """A small host array as a C constant: ``(declaration, shape, strides)``."""
    flat = np.ascontiguousarray(a).reshape(-1)
    dtype = a.dtype.name
    # float64 values are read as float32 anyway (module docstring): stored so.
    ctype = "float" if dtype == "float64" else _ELEM[dtype][0]
    if dtype in ("float16", "bfloat16"):
        vals = [str(int(x)) for x in flat.view(np.uint16)]
    elif a.dtype.kind == "f":
        vals = [_float_literal(x) if np.isfinite(np.float32(x)) else "0.0f"
                for x in flat.astype(np.float64)]
        if not np.all(np.isfinite(flat.astype(np.float32))):
            raise FlexCompileError("a captured float array holds inf or NaN (or values "
                                   "beyond float32): pass it in score_mod_args instead")
    elif a.dtype.kind == "b":
        vals = [str(int(x)) for x in flat]
    else:
        vals = [f"{int(x)}LL" if a.dtype.kind == "i" else f"{int(x)}ULL" for x in flat]
    strides = [int(np.prod(a.shape[d + 1:], dtype=np.int64)) for d in range(a.ndim)]
    body = ", ".join(vals) if vals else "0"
    decl = f"XATTN_UCONST const {ctype} {cname}[{max(1, flat.size)}] = {{{body}}};"
    return decl, tuple(int(n) for n in a.shape), tuple(strides)


def _function(cap, role, cname, nfixed, arg_slots, slots, consts, on_device, grad=False):
    """The C text of one user function. ``nfixed`` leading parameters (score, b, h, q, kv or
    b, h, q, kv); ``arg_slots``: the score_mod_args slots its remaining parameters name;
    ``grad``: also ``<cname>_d``, the value and its derivative with respect to the score."""
    src = cg.function_source(cap, f"_xu_{role}")
    if src is None:
        raise FlexCompileError(
            f"{role}: the source of {cap.fn.__name__} is not available (defined in a plain "
            "REPL or with exec?); the tensor-core kernel translates the source"
        )
    node = src.node
    params = [a.arg for a in node.args.args]
    nuser = len(params) - len(src.array_params)
    env = _Env()
    fixed = params[:nfixed]
    if role == "score_mod":
        env.values[fixed[0]] = ("v_" + fixed[0], F)
        ints = fixed[1:]
    else:
        ints = fixed
    for p in ints:
        env.values[p] = (_narrow("v_" + p, *INDEX_RANGE), I)
    for p, slot in zip(params[nfixed:nuser], arg_slots, strict=True):
        env.arrays[p] = (slot.name, slot.dtype, slot.ndim, None)
    resolved = {}
    _resolve(cap, f"_xu_{role}", resolved, set(cap.params))
    tag = "smod" if role == "score_mod" else "mmod"
    if grad:
        env.modules["_math"] = "math"  # the derivative rules call _math.cos, _math.log, ...
    for alias, (kind, payload) in resolved.items():
        if kind == "const":
            v = payload
            if isinstance(v, (bool, np.bool_)):
                env.values[alias] = ("true" if v else "false", B)
            elif isinstance(v, (int, np.integer)):
                env.values[alias] = (f"{int(v)}LL", I)
            else:
                env.values[alias] = (_float_literal(v), F)
        elif kind == "array":
            a = cap.arrays[payload]
            dname = a.dtype.name
            if dname not in _ELEM:
                raise FlexCompileError(f"{role}: {cap.fn.__name__} reads an array of dtype "
                                       f"{a.dtype}, which the kernel cannot read")
            if isinstance(a, np.ndarray) and on_device:
                if a.size > MAX_EMBEDDED:
                    raise FlexCompileError(
                        f"{role}: {cap.fn.__name__} captures a NumPy array of {a.size} "
                        f"elements ({alias.split('_', 3)[-1]!r}); the GPU kernel compiles "
                        f"captured host arrays in only up to {MAX_EMBEDDED} elements and "
                        "xattn never copies them to the device: pass a CuPy array in "
                        "score_mod_args")
                const = f"xu_const_{tag}{payload}"
                decl, shape, strides = _const_array(a, const)
                consts.append(decl)
                env.arrays[alias] = (const, "float32" if a.dtype == np.float64 else dname,
                                     a.ndim, (shape, strides))
            else:
                slot = ArraySlot(f"{tag}{payload}", (tag, payload), dname, a.ndim)
                slots.append(slot)
                env.arrays[alias] = (slot.name, dname, a.ndim, None)
        elif kind == "module":
            env.modules[alias] = payload.__name__.split(".")[0]
        elif kind == "import":
            env.funcs[alias] = payload
        elif kind == "builtin":
            env.builtins.add(alias)
    # The derivative (before the translator below inlines helpers into src.node in place):
    # the codegen's forward-mode rules, shared with the Numba kernels, then translated as
    # any other Python function.
    dnode = cg.score_derivative(src, cap) if grad else None
    # Renamed captured arrays are parameters of the Python text: not of ours (read via u).
    node.args.args = node.args.args[:nuser]
    texts = [_emit(cap, role, env, src.helpers, node, cname, fixed, params[:nuser])]
    if dnode is not None:
        texts.append(_emit(cap, role, env, {}, dnode, cname + "_d", fixed, params[:nuser],
                           dout=True))
    return "\n".join(texts)


def _emit(cap, role, env, helpers, node, cname, fixed, params, dout=False):
    """The C text of one translated function (``dout``: the derivative of a score_mod,
    whose Python returns ``(value, d/dscore)``; C returns the value and stores the
    derivative through the last parameter)."""
    tr = _Translator(cap, role, env, helpers, node)
    tr.dout = dout
    tr.infer_locals(set(params))
    ret = F if role == "score_mod" else B
    # Python names get a prefix: they may be C keywords (`new`, `double`) or our names.
    decls = [f"    {_CTYPE[t]} v_{n} = 0;" for n, t in sorted(tr.locals.items())]
    tr.stmts(node.body, ret)
    sig = ("float score_in" if role == "score_mod" else "")
    head = [f"XATTN_UFN {_CTYPE[ret]} {cname}(const XattnUserArgs& u"
            + (f", {sig}" if sig else "")
            + ", int b_in, int h_in, int q_in, int kv_in"
            + (", float* dscore_out" if dout else "") + ") {",
            "    (void)u;"]
    names_in = (["score_in"] if role == "score_mod" else []) + ["b_in", "h_in", "q_in", "kv_in"]
    for p, pin in zip(fixed, names_in, strict=True):
        ctype = "float" if pin == "score_in" else "int"
        head.append(f"    const {ctype} v_{p} = {pin};")
        head.append(f"    (void)v_{p};")
    return "\n".join([*head, *decls, *tr.lines, "}"])


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()
_MAX_CACHED = 256


def _fn_key(cap):
    """What the text of one function depends on: its code and captured values (Capture.key),
    and the contents of the host arrays it captures (compiled in)."""
    if cap is None:
        return None
    digests = tuple((a.shape, a.dtype.str, hashlib.blake2b(
        np.ascontiguousarray(a).view(np.uint8), digest_size=16).hexdigest())
        for a in cap.arrays if isinstance(a, np.ndarray))
    return cap.key, digests


def translate_cached(smod, mmod, nargs, mask_takes_args, arg_arrays, *, grad=False):
    """:func:`translate` for the device, cached (a call in a training loop translates once)."""
    key = (_fn_key(smod), _fn_key(mmod), nargs, mask_takes_args,
           tuple((a.dtype.str, a.ndim) for a in arg_arrays), bool(grad))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    mods = translate(smod, mmod, nargs, mask_takes_args, arg_arrays, grad=grad)
    with _cache_lock:
        _cache[key] = mods
        while len(_cache) > _MAX_CACHED:
            _cache.popitem(last=False)
    return mods


def translate(smod, mmod, nargs=0, mask_takes_args=False, arg_arrays=(), *, on_device=True,
              grad=False):
    """Translate a captured score_mod / mask_mod pair (:func:`xattn._flex_codegen.capture`).

    ``arg_arrays`` are the ``score_mod_args`` (their dtypes and ranks are compiled in);
    ``on_device``: captured NumPy arrays are compiled in as constants (the GPU path), else
    also read through slots (the CPU tests pass host pointers). ``grad`` (the backward
    kernel): also ``xattn_user_score_d``, the modified score and, through its last
    parameter, its derivative with respect to the input score (a score_mod that cannot be
    differentiated raises FlexCompileError naming the construct).
    """
    if len(arg_arrays) != nargs:
        raise ValueError("arg_arrays must hold the score_mod_args")
    slots = []
    for i, a in enumerate(arg_arrays):
        if a.dtype.name not in _ELEM:
            raise FlexCompileError(f"score_mod_args[{i}]: dtype {a.dtype} is not supported by "
                                   "the tensor-core kernel")
        slots.append(ArraySlot(f"a{i}", ("arg", i), a.dtype.name, a.ndim))
    arg_slots = list(slots)
    consts, funcs = [], []
    if smod is not None:
        funcs.append(_function(smod, "score_mod", "xattn_user_score", 5, arg_slots, slots,
                               consts, on_device, grad))
    if mmod is not None:
        funcs.append(_function(mmod, "mask_mod", "xattn_user_mask", 4,
                               arg_slots if mask_takes_args else [], slots, consts,
                               on_device))
    text = "\n".join([PRELUDE, _struct(slots), *consts, *funcs])
    return CudaMods(text, slots, smod is not None, mmod is not None, has_grad=bool(grad))


def cuda_source(score_mod=None, mask_mod=None, score_mod_args=(), grad=False) -> str:
    """The CUDA C that ``flex_attention(..., backend="cupy")`` compiles for these functions:
    ``struct XattnUserArgs`` and ``xattn_user_score``/``xattn_user_mask`` (without the shared
    helpers); with ``grad=True`` also ``xattn_user_score_d``, the score and its derivative
    that ``flex_attention_backward`` compiles. Runs anywhere (no GPU, no compiler): for
    reading, and for the errors.

    Examples
    --------
    >>> import xattn
    >>> from xattn._flex_cuda import cuda_source
    >>> def causal(b, h, q_idx, kv_idx):
    ...     return kv_idx <= q_idx
    >>> print(cuda_source(mask_mod=causal).splitlines()[-2].strip())
    return ((v_kv_idx <= v_q_idx));
    """
    args = tuple(score_mod_args)
    smod = None if score_mod is None else cg.capture(score_mod, "score_mod", 5 + len(args))
    mmod, takes = None, False
    if mask_mod is not None:
        code = getattr(cg._unwrap(mask_mod), "__code__", None)
        takes = bool(args) and code is not None and code.co_argcount == 4 + len(args)
        mmod = cg.capture(mask_mod, "mask_mod", 4 + len(args) if takes else 4)
    text = translate(smod, mmod, len(args), takes, args, grad=grad).text
    return text[len(PRELUDE):].strip() + "\n"
