"""The user's ``score_mod``/``mask_mod`` turned into source code that Numba compiles.

flex attention never hands the user's function object to Numba. It reads the function's
source, resolves every free name once, and writes a module-level function of its own:

* numbers, booleans and NumPy scalars the function reads (globals or closure cells) become
  constants of the generated module;
* arrays it reads become extra *parameters*, passed at call time, so a captured table is
  never frozen into machine code (numba freezes global arrays) and new contents reuse the
  compiled kernel;
* modules (``math``, ``numpy``) and their functions are imported; plain Python helper
  functions are translated the same way;
* anything else (a dict, a list, an object) is refused with an error naming the role
  (``score_mod``/``mask_mod``) and the variable.

The :func:`capture` key (code object, resolved constants, array dtypes and ranks) names the
compiled kernel in the in-memory cache, and the generated text, hashed, names it on disk, so
an inline ``lambda`` rebuilt on every call and a fresh process both reuse the machine code.

:func:`differentiate` writes the forward-mode derivative of a ``score_mod`` (source to
source): every active value gets one tangent per seed, seed 0 being ``score`` and seed ``r``
the ``r``-th place in the function that reads a floating ``score_mod_args`` array. The
derivative function returns the value, the tangents and the index each read site used, from
which the backward kernel scatter-adds the table gradients. Loops and other constructs
without a static list of read sites are refused by name.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dis
import hashlib
import linecache
import textwrap
import types
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = ["Capture", "capture", "differentiate", "function_source", "score_derivative"]


class FlexCompileError(TypeError):
    """A score_mod/mask_mod that flex cannot compile or differentiate (names the role)."""


_MODULES_OK = ("math", "numpy", "cmath")
_ALLOWED_BUILTINS = {"abs", "min", "max", "float", "int", "bool", "round", "range", "len",
                     "True", "False", "None"}


@lru_cache(maxsize=512)
def _code_names(code):
    """``(global names, closure names, parameter names that are read)`` of a code object."""
    glob, deref, fast = [], [], set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            if ins.argval not in glob:
                glob.append(ins.argval)
        elif ins.opname in ("LOAD_DEREF", "LOAD_CLASSDEREF"):
            if ins.argval not in deref:
                deref.append(ins.argval)
        elif ins.opname in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR"):
            fast.add(ins.argval)
    params = code.co_varnames[: code.co_argcount]
    return tuple(glob), tuple(deref), frozenset(p for p in params if p in fast)


def _is_array(x):
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("cupy")


def _scalar_key(x):
    if isinstance(x, (bool, np.bool_)):
        return ("bool", bool(x))
    if isinstance(x, (int, np.integer)):
        return (np.dtype(type(x)).str if isinstance(x, np.integer) else "int", int(x))
    if isinstance(x, (float, np.floating)):
        # hex keeps every bit and makes NaN equal to itself as a key
        return (np.dtype(type(x)).str if isinstance(x, np.floating) else "float",
                float(x).hex())
    return None


@dataclass
class Capture:
    """One user function with its free names resolved.

    ``key`` identifies the compiled code; ``arrays`` are the captured arrays, passed to the
    kernel after the ``score_mod_args``; ``reads`` are the parameters the function reads
    (``"b"`` and ``"h"`` decide whether a mask must be evaluated per batch/head).
    """

    role: str
    fn: types.FunctionType
    key: tuple
    names: dict  # free name -> ("const", value) | ("array", index) | ("module", mod) | ...
    arrays: list = field(default_factory=list)
    reads: frozenset = frozenset()

    @property
    def params(self):
        code = self.fn.__code__
        return code.co_varnames[: code.co_argcount]


def _unwrap(fn):
    py = getattr(fn, "py_func", None)  # a numba dispatcher: use the Python function
    return py if isinstance(py, types.FunctionType) else fn


def capture(fn, role, nparams, *, _arrays=None, _depth=0):
    """Resolve ``fn``'s free names; raise :class:`FlexCompileError` naming ``role``."""
    fn = _unwrap(fn)
    if not isinstance(fn, types.FunctionType):
        raise FlexCompileError(
            f"{role}: expected a Python function (def or lambda), got {type(fn).__name__}"
        )
    code = fn.__code__
    if nparams is not None:
        if code.co_flags & (inspect_varargs | inspect_varkw) or code.co_kwonlyargcount:
            raise FlexCompileError(
                f"{role}: {fn.__name__} must take plain positional parameters, "
                "not *args, **kwargs or keyword-only ones"
            )
        if code.co_argcount != nparams:
            raise FlexCompileError(
                f"{role}: expected a function of {nparams} arguments, {fn.__name__} takes "
                f"{code.co_argcount} ({', '.join(code.co_varnames[: code.co_argcount])})"
            )
    if _depth > 8:
        raise FlexCompileError(f"{role}: helper functions nested too deeply ({fn.__name__})")
    arrays = [] if _arrays is None else _arrays
    glob, deref, reads = _code_names(code)
    cells = dict(zip(code.co_freevars, fn.__closure__ or (), strict=True))
    names, key = {}, [code]
    for name in (*deref, *glob):
        if name in cells:
            try:
                value = cells[name].cell_contents
            except ValueError:
                raise FlexCompileError(
                    f"{role}: {fn.__name__} reads {name!r} before it is assigned"
                ) from None
        elif name in fn.__globals__:
            value = fn.__globals__[name]
        elif hasattr(builtins, name):
            if name not in _ALLOWED_BUILTINS:
                raise FlexCompileError(
                    f"{role}: {fn.__name__} calls the builtin {name!r}, which Numba cannot "
                    "compile here; use numbers, math/numpy functions and arrays"
                )
            names[name] = ("builtin", name, name)
            continue
        else:
            raise FlexCompileError(f"{role}: {fn.__name__} reads {name!r}, which is not defined")
        kind = _classify(value, role, fn, name, arrays, _depth)
        names[name] = kind
        key.append((name, kind[0], kind[2]))
    return Capture(role, fn, tuple(key), names, arrays, reads)


inspect_varargs = 0x04  # CO_VARARGS
inspect_varkw = 0x08  # CO_VARKEYWORDS


def _classify(value, role, fn, name, arrays, depth):
    """``(kind, payload, key part)`` of one free name."""
    sk = _scalar_key(value)
    if sk is not None:
        return ("const", value, sk)
    if _is_array(value):
        arrays.append(value)
        return ("array", len(arrays) - 1,
                (type(value).__module__.split(".")[0], value.dtype.str, value.ndim))
    if isinstance(value, types.ModuleType):
        if value.__name__.split(".")[0] not in _MODULES_OK:
            raise FlexCompileError(
                f"{role}: {fn.__name__} uses the module {value.__name__!r}; only math and "
                "numpy functions can be compiled into the kernel"
            )
        return ("module", value, value.__name__)
    inner = _unwrap(value)
    if isinstance(inner, types.FunctionType):
        sub = capture(inner, role, None, _arrays=arrays, _depth=depth + 1)
        if sub.arrays is arrays and any(k[0] == "array" for k in sub.names.values()):
            raise FlexCompileError(
                f"{role}: the helper {inner.__name__} reads an array; pass it as an argument "
                "from the main function instead"
            )
        return ("function", sub, sub.key)
    mod = getattr(value, "__module__", None) or (
        "numpy" if isinstance(value, np.ufunc) else None)
    fname = getattr(value, "__name__", None)
    if mod and fname and mod.split(".")[0] in _MODULES_OK and callable(value):
        top = "numpy" if mod.startswith("numpy") else mod
        return ("import", (top, fname), (top, fname))
    raise FlexCompileError(
        f"{role}: {fn.__name__} reads {name!r}, a {type(value).__name__}; a Numba-compiled "
        "score/mask function can read numbers, NumPy arrays (better passed in score_mod_args), "
        "math/numpy functions and plain Python helper functions"
    )


_source_known: dict = {}


def has_source(fn) -> bool:
    """Whether Python can find ``fn``'s source (not for ``python -c`` or a plain REPL)."""
    code = fn.__code__
    known = _source_known.get(code)
    if known is None:
        try:
            known = _function_node(fn, "function") is not None
        except FlexCompileError:
            known = True  # it has source; the translation will say what is wrong
        if len(_source_known) > 4096:
            _source_known.clear()
        _source_known[code] = known
    return known


# --- source ------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _parse_file(filename, text):
    try:
        return ast.parse(text)
    except SyntaxError:
        return None


def _function_node(fn, role):
    """The ``def`` or ``lambda`` node of ``fn``, as a FunctionDef, or None without source."""
    code = fn.__code__
    lines = linecache.getlines(code.co_filename, fn.__globals__)
    if not lines:
        return None
    tree = _parse_file(code.co_filename, "".join(lines))
    if tree is None:
        return None
    first = code.co_firstlineno
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            starts = [node.lineno] + [d.lineno for d in node.decorator_list]
            if node.name == code.co_name and first in starts:
                found.append(node)
        elif isinstance(node, ast.Lambda) and code.co_name == "<lambda>":
            if node.lineno == first:
                found.append(node)
    if len(found) > 1 and code.co_name == "<lambda>":
        # Several lambdas on one line: the one whose body holds the code's first position.
        pos = [p for p in code.co_positions() if p[0] is not None and p[2] is not None]
        if pos:
            line, col = pos[-1][0], pos[-1][2]
            found = [n for n in found
                     if (n.body.lineno, n.body.col_offset) <= (line, col)
                     <= (n.body.end_lineno, n.body.end_col_offset)] or found
    if len(found) != 1:
        return None
    node = copy.deepcopy(found[0])  # the parsed file is cached: never edit its nodes
    if isinstance(node, ast.AsyncFunctionDef):
        raise FlexCompileError(f"{role}: {code.co_name} is async")
    if isinstance(node, ast.Lambda):
        node = ast.FunctionDef(name="_lambda", args=node.args, body=[ast.Return(node.body)],
                               decorator_list=[], lineno=node.lineno, col_offset=0)
    args = node.args
    if args.defaults or args.kw_defaults or args.vararg or args.kwarg or args.kwonlyargs:
        raise FlexCompileError(
            f"{role}: {code.co_name} must take plain positional parameters without defaults"
        )
    return node


class _Rename(ast.NodeTransformer):
    def __init__(self, mapping):
        self.mapping = mapping

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.mapping:
            return ast.copy_location(ast.Name(self.mapping[node.id], ast.Load()), node)
        return node


@dataclass
class Source:
    """Generated text of one user function and what it needs at module level."""

    name: str
    header: list  # module-level lines (imports, constants, helper functions)
    node: ast.FunctionDef  # renamed function, captured arrays appended as parameters
    array_params: list  # parameter names of the captured arrays, in Capture.arrays order
    callees: dict  # alias -> the math/numpy function name it stands for
    helpers: dict  # alias -> Source of a translated helper function (inlined when differentiated)

    def text(self):
        return ast.unparse(self.node)


def function_source(cap: Capture, prefix: str, *, _seen=None) -> Source | None:
    """The translated function named ``prefix`` (None when its source is not available)."""
    node = _function_node(cap.fn, cap.role)
    if node is None:
        return None
    seen = {} if _seen is None else _seen
    header, mapping, array_params, callees, helpers = [], {}, {}, {}, {}
    params = {a.arg for a in node.args.args}
    for name, (kind, payload, _) in cap.names.items():
        if name in params:
            continue
        alias = f"{prefix}_{name}"
        if kind == "const":
            header.append(f"{alias} = {_literal(payload)}")
        elif kind == "array":
            array_params[payload] = alias
        elif kind == "module":
            header.append(f"import {payload.__name__} as {alias}")
        elif kind == "import":
            header.append(f"from {payload[0]} import {payload[1]} as {alias}")
            callees[alias] = payload[1]
        elif kind == "function":
            sub = function_source(payload, alias, _seen=seen)
            if sub is None:
                raise FlexCompileError(
                    f"{cap.role}: the source of the helper {payload.fn.__name__} is not "
                    "available"
                )
            header.extend(sub.header)
            header.append("@_numba.njit(inline='always')")
            header.append(sub.text())
            callees.update(sub.callees)
            helpers.update(sub.helpers)
            helpers[alias] = sub
        else:  # builtin
            continue
        mapping[name] = alias
    node = _Rename(mapping).visit(node)
    node.name = prefix
    node.decorator_list = []
    extra = [array_params[i] for i in sorted(array_params)]
    node.args.args = list(node.args.args) + [ast.arg(a) for a in extra]
    ast.fix_missing_locations(node)
    _check_returns(node, cap)
    return Source(prefix, header, node, extra, callees, helpers)


def _literal(x):
    if isinstance(x, (bool, np.bool_)):
        return repr(bool(x))
    if isinstance(x, np.integer):
        return f"_np.{np.dtype(type(x)).name}({int(x)})"
    if isinstance(x, int):
        return repr(x)
    f = float(x)
    text = f"float.fromhex({f.hex()!r})" if f == f else "float('nan')"
    if isinstance(x, np.floating):
        return f"_np.{np.dtype(type(x)).name}({text})"
    return text


def _check_returns(node, cap):
    """A function that can end without ``return <value>`` is refused (a forgotten return)."""

    def ends(stmts):
        for s in stmts:
            if isinstance(s, ast.Return):
                return s.value is not None
            if isinstance(s, ast.If) and ends(s.body) and ends(s.orelse):
                return True
            if isinstance(s, ast.Raise):
                return True
        return False

    if not ends(node.body):
        raise FlexCompileError(
            f"{cap.role}: {cap.fn.__name__} can finish without returning a value "
            f"(a forgotten `return`?); it must return a "
            f"{'boolean' if cap.role == 'mask_mod' else 'score'}"
        )
    for sub in ast.walk(node):
        if isinstance(sub, ast.Return) and sub.value is None:
            raise FlexCompileError(f"{cap.role}: {cap.fn.__name__} has a bare `return`")


def source_hash(*parts) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


# --- forward-mode differentiation --------------------------------------------------------

_D1 = {
    # name: derivative as a function of (x code, value code)
    "exp": lambda x, y: y,
    "expm1": lambda x, y: f"({y} + 1.0)",
    "exp2": lambda x, y: f"({y} * 0.6931471805599453)",
    "log": lambda x, y: f"(1.0 / {x})",
    "log1p": lambda x, y: f"(1.0 / (1.0 + {x}))",
    "log2": lambda x, y: f"(1.4426950408889634 / {x})",
    "log10": lambda x, y: f"(0.4342944819032518 / {x})",
    "sqrt": lambda x, y: f"(0.5 / {y})",
    "tanh": lambda x, y: f"(1.0 - {y} * {y})",
    "sin": lambda x, y: f"_math.cos({x})",
    "cos": lambda x, y: f"(-_math.sin({x}))",
    "tan": lambda x, y: f"(1.0 + {y} * {y})",
    "sinh": lambda x, y: f"_math.cosh({x})",
    "cosh": lambda x, y: f"_math.sinh({x})",
    "atan": lambda x, y: f"(1.0 / (1.0 + {x} * {x}))",
    "arctan": lambda x, y: f"(1.0 / (1.0 + {x} * {x}))",
    "erf": lambda x, y: f"(1.1283791670955126 * _math.exp(-{x} * {x}))",
    "abs": lambda x, y: f"(1.0 if {x} > 0 else (-1.0 if {x} < 0 else 0.0))",
    "fabs": lambda x, y: f"(1.0 if {x} > 0 else (-1.0 if {x} < 0 else 0.0))",
    "absolute": lambda x, y: f"(1.0 if {x} > 0 else (-1.0 if {x} < 0 else 0.0))",
    "float": lambda x, y: "1.0",
    "float32": lambda x, y: "1.0",
    "float64": lambda x, y: "1.0",
}
_D1_ZERO = {"floor", "ceil", "trunc", "sign", "rint", "round", "isnan", "isinf", "isfinite",
            "int", "bool"}
_MINMAX = {"min": "<=", "minimum": "<=", "fmin": "<=", "max": ">=", "maximum": ">=",
           "fmax": ">="}
_POW = {"pow", "power"}


def _zero(t):
    return t == "0.0"


def _add(a, b):
    if _zero(a):
        return b
    if _zero(b):
        return a
    return f"({a} + {b})"


def _sub(a, b):
    if _zero(b):
        return a
    if _zero(a):
        return f"(-{b})"
    return f"({a} - {b})"


def _mul(a, b):
    if _zero(a) or _zero(b):
        return "0.0"
    if a == "1.0":
        return b
    if b == "1.0":
        return a
    return f"({a} * {b})"


def _assigned(stmts):
    names = set()
    for s in stmts:
        for n in ast.walk(s):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
    return names


class _Inliner(ast.NodeTransformer):
    """Replace calls to translated helpers by their bodies (locals renamed), hoisted before
    the statement that calls them, so the derivative flows through them."""

    def __init__(self, helpers, fail):
        self.helpers, self.fail = helpers, fail
        self.count = 0
        self.pending = []

    def visit_Call(self, node):
        self.generic_visit(node)
        if not (isinstance(node.func, ast.Name) and node.func.id in self.helpers):
            return node
        src = self.helpers[node.func.id]
        if node.keywords or len(node.args) != len(src.node.args.args):
            self.fail(node, f"the call to the helper {node.func.id} (pass every parameter "
                            "positionally)")
        self.count += 1
        params = [a.arg for a in src.node.args.args]
        assigned = _assigned(src.node.body)
        suffix = f"_xa_h{self.count}"
        ret = f"_xa_ret{self.count}"
        # A parameter bound to a plain name that the helper never reassigns is that name
        # (so reads of a score_mod_args table inside the helper stay visible as reads).
        alias = {p: a.id for p, a in zip(params, node.args, strict=True)
                 if isinstance(a, ast.Name) and p not in assigned}
        rename = {n: alias.get(n, n + suffix) for n in set(params) | assigned}

        class Rename(ast.NodeTransformer):
            def visit_Name(self, n):
                if n.id in rename:
                    return ast.copy_location(ast.Name(rename[n.id], n.ctx), n)
                return n

        body = [Rename().visit(copy.deepcopy(b)) for b in src.node.body]
        body = self._tail(body, ret, node.func.id)
        pre = [ast.Assign([ast.Name(p + suffix, ast.Store())], a, lineno=node.lineno)
               for p, a in zip(params, node.args, strict=True) if p not in alias]
        self.pending.extend(_inline_body(pre + body, self.helpers, self.fail, self))
        return ast.copy_location(ast.Name(ret, ast.Load()), node)

    def _tail(self, stmts, ret, name):
        out = []
        for n, s in enumerate(stmts):
            last = n == len(stmts) - 1
            if isinstance(s, ast.Return):
                if not last:
                    self.fail(s, f"the helper {name} returns before its last statement")
                out.append(ast.copy_location(ast.Assign([ast.Name(ret, ast.Store())], s.value),
                                             s))
            elif isinstance(s, ast.If) and last:
                out.append(ast.copy_location(ast.If(s.test, self._tail(s.body, ret, name),
                                                    self._tail(s.orelse, ret, name)), s))
            else:
                if any(isinstance(x, ast.Return) for x in ast.walk(s)):
                    self.fail(s, f"the helper {name} returns from inside a statement "
                                 "other than its last")
                out.append(s)
        return out


def _inline_body(stmts, helpers, fail, inliner=None):
    inliner = inliner or _Inliner(helpers, fail)
    out = []
    for s in stmts:
        if isinstance(s, ast.If):
            saved, inliner.pending = inliner.pending, []
            test = inliner.visit(s.test)
            out.extend(inliner.pending)
            inliner.pending = saved
            out.append(ast.copy_location(ast.If(
                test, _inline_body(s.body, helpers, fail, inliner),
                _inline_body(s.orelse, helpers, fail, inliner)), s))
        else:
            saved, inliner.pending = inliner.pending, []
            s = inliner.visit(s)
            out.extend(inliner.pending)
            inliner.pending = saved
            out.append(s)
    return out


class _Differentiator:
    """Forward-mode derivative of one translated score_mod (see the module docstring)."""

    def __init__(self, src: Source, cap: Capture, diff_args: set, role="score_mod"):
        self.cap, self.role = cap, role
        self.callees = src.callees
        self.node = copy.deepcopy(src.node)
        if src.helpers:
            self.node.body = _inline_body(self.node.body, src.helpers, self.fail)
            ast.fix_missing_locations(self.node)
        self.params = [a.arg for a in self.node.args.args]
        self.score = self.params[0]
        self.diff_args = diff_args  # parameter names of floating score_mod_args
        self.sites = []  # (arg name, index code)
        self.lines = []
        self.tmp = 0
        self.indent = 1
        self._find_sites()
        self.n = 1 + len(self.sites)
        self.active = self._activity()

    def fail(self, node, what):
        line = getattr(node, "lineno", None)
        where = f" (line {line} of {self.cap.fn.__code__.co_filename})" if line else ""
        raise FlexCompileError(
            f"{self.role}: cannot differentiate {self.cap.fn.__name__}: {what}{where}"
        )

    def _find_sites(self):
        self.site_of = {}
        for sub in (n for stmt in self.node.body for n in ast.walk(stmt)):
            if isinstance(sub, (ast.For, ast.While, ast.AsyncFor)):
                self.fail(sub, "loops (`for`/`while`) have no static list of table reads; "
                               "write the function without loops")
            if isinstance(sub, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
                                ast.Lambda, ast.FunctionDef, ast.Try, ast.With)):
                self.fail(sub, f"`{type(sub).__name__}` is not supported")
            if (isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name)
                    and sub.value.id in self.diff_args):
                self.site_of[id(sub)] = len(self.sites)
                self.sites.append(sub)

    def _uses_active(self, node, active):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id in active:
                return True
            if id(sub) in self.site_of:
                return True
        return False

    def _activity(self):
        active = {self.score}
        changed = True
        while changed:
            changed = False
            for sub in ast.walk(self.node):
                targets, value = [], None
                if isinstance(sub, ast.Assign):
                    targets, value = sub.targets, sub.value
                elif isinstance(sub, (ast.AugAssign, ast.AnnAssign)) and sub.value is not None:
                    targets, value = [sub.target], sub.value
                    if isinstance(sub, ast.AugAssign) and isinstance(sub.target, ast.Name):
                        if sub.target.id in active:
                            continue
                if value is None or not self._uses_active(value, active):
                    continue
                for t in targets:
                    if isinstance(t, ast.Name) and t.id not in active:
                        active.add(t.id)
                        changed = True
        return active

    # -- emission
    def emit(self, line):
        self.lines.append("    " * self.indent + line)

    def new(self, value, tans):
        name = f"_xa_t{self.tmp}"
        self.tmp += 1
        self.emit(f"{name} = {value}")
        out = []
        for k, t in enumerate(tans):
            if _zero(t) or t == "1.0":
                out.append(t)
            else:
                self.emit(f"{name}_d{k} = {t}")
                out.append(f"{name}_d{k}")
        return name, out

    def tangents_of(self, name):
        return [f"_xa_d{k}_{name}" for k in range(self.n)]

    def expr(self, node):
        """``(value code, tangents or None)`` of an expression; None = zero tangent."""
        if isinstance(node, ast.Constant):
            return repr(node.value), None
        if isinstance(node, ast.Name):
            if node.id in self.active:
                return node.id, self.tangents_of(node.id)
            return node.id, None
        if isinstance(node, ast.Subscript):
            if id(node) in self.site_of:
                r = self.site_of[id(node)]
                idx, t = self.expr(node.slice)
                if t is not None:
                    self.fail(node, "a table index depends on the score")
                self.emit(f"_xa_i{r} = {idx}")
                tans = ["0.0"] * self.n
                tans[1 + r] = "1.0"
                return self.new(f"{node.value.id}[_xa_i{r}]", tans)
            val, t = self.expr(node.value)
            idx, ti = self.expr(node.slice)
            if t is not None:
                self.fail(node, "indexing a value that depends on the score")
            return f"{val}[{idx}]", None
        if isinstance(node, ast.Tuple):
            parts = [self.expr(e) for e in node.elts]
            if any(t is not None for _, t in parts):
                self.fail(node, "tuples of differentiable values")
            return "(" + ", ".join(p for p, _ in parts) + ",)", None
        if isinstance(node, ast.Attribute):
            val, t = self.expr(node.value)
            if t is not None:
                self.fail(node, f"the attribute .{node.attr} of a differentiable value")
            return f"{val}.{node.attr}", None
        if isinstance(node, ast.UnaryOp):
            val, t = self.expr(node.operand)
            op = {ast.USub: "-", ast.UAdd: "+", ast.Not: "not ", ast.Invert: "~"}[type(node.op)]
            if t is None or isinstance(node.op, ast.Not):
                return f"({op}{val})", None
            if isinstance(node.op, ast.Invert):
                self.fail(node, "`~` of a differentiable value")
            return self.new(f"({op}{val})", t if op == "+" else [_sub("0.0", x) for x in t])
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            return self.plain(node), None
        if isinstance(node, ast.IfExp):
            cond, tc = self.expr(node.test)
            c = f"_xa_c{self.tmp}"
            self.tmp += 1
            self.emit(f"{c} = {cond}")
            a, ta = self.expr(node.body)
            b, tb = self.expr(node.orelse)
            if ta is None and tb is None:
                return f"({a} if {c} else {b})", None
            ta = ta or ["0.0"] * self.n
            tb = tb or ["0.0"] * self.n
            tans = [x if x == y else f"({x} if {c} else {y})" for x, y in zip(ta, tb, strict=True)]
            return self.new(f"({a} if {c} else {b})", tans)
        if isinstance(node, ast.Call):
            return self.call(node)
        self.fail(node, f"the construct `{type(node).__name__}`")

    def plain(self, node):
        """Value code of a node whose result carries no derivative (comparisons, tests)."""
        if isinstance(node, ast.Compare):
            left, _ = self.expr(node.left)
            parts = [left]
            for op, right in zip(node.ops, node.comparators, strict=True):
                val, _ = self.expr(right)
                parts.append(_CMP[type(op)])
                parts.append(val)
            return "(" + " ".join(parts) + ")"
        if isinstance(node, ast.BoolOp):
            vals = [self.plain(v) if isinstance(v, (ast.Compare, ast.BoolOp)) else self.expr(v)[0]
                    for v in node.values]
            op = " and " if isinstance(node.op, ast.And) else " or "
            return "(" + op.join(vals) + ")"
        return self.expr(node)[0]

    def binop(self, node):
        a, ta = self.expr(node.left)
        b, tb = self.expr(node.right)
        sym = _BIN.get(type(node.op))
        if sym is None:
            self.fail(node, f"the operator {type(node.op).__name__}")
        value = f"({a} {sym} {b})"
        if ta is None and tb is None:
            return value, None
        z = ["0.0"] * self.n
        ta, tb = ta or z, tb or z
        op = type(node.op)
        if op is ast.Add:
            tans = [_add(x, y) for x, y in zip(ta, tb, strict=True)]
        elif op is ast.Sub:
            tans = [_sub(x, y) for x, y in zip(ta, tb, strict=True)]
        elif op is ast.Mult:
            tans = [_add(_mul(x, b), _mul(a, y)) for x, y in zip(ta, tb, strict=True)]
        elif op is ast.Div:
            name, tans0 = self.new(value, z)
            tans = [_sub(f"({x} / {b})" if not _zero(x) else "0.0",
                         _mul(name, f"({y} / {b})") if not _zero(y) else "0.0")
                    for x, y in zip(ta, tb, strict=True)]
            return self.new(name, tans)
        elif op is ast.Pow:
            return self.power(a, ta, b, tb, node)
        elif op is ast.Mod:
            tans = [_sub(x, _mul(f"_math.floor({a} / {b})", y))
                    for x, y in zip(ta, tb, strict=True)]
        elif op is ast.FloorDiv:
            return value, None  # piecewise constant
        else:
            self.fail(node, f"the operator `{sym}` on a differentiable value")
        return self.new(value, tans)

    def power(self, a, ta, b, tb, node):
        z = ["0.0"] * self.n
        value = f"({a} ** {b})"
        name, _ = self.new(value, z)
        da = f"({b} * {a} ** ({b} - 1))"
        db = f"({name} * _math.log({a}))"
        tans = [_add(_mul(da, x) if not _zero(x) else "0.0", _mul(db, y) if not _zero(y)
                     else "0.0") for x, y in zip(ta or z, tb or z, strict=True)]
        return self.new(name, tans)

    def select(self, cond, x, tx, y, ty):
        """``x if cond else y`` and its tangents, the condition evaluated once."""
        z = ["0.0"] * self.n
        c = f"_xa_c{self.tmp}"
        self.tmp += 1
        self.emit(f"{c} = {cond}")
        tans = [u if u == w else f"({u} if {c} else {w})"
                for u, w in zip(tx or z, ty or z, strict=True)]
        return self.new(f"({x} if {c} else {y})", tans)

    def call(self, node):
        if node.keywords:
            self.fail(node, "keyword arguments in calls")
        fname = _called_name(node.func, self.callees)
        args = [self.expr(a) for a in node.args]
        func = ast.unparse(node.func)
        value = f"{func}({', '.join(a for a, _ in args)})"
        if all(t is None for _, t in args):
            return value, None
        if fname in _D1_ZERO:
            return value, None
        z = ["0.0"] * self.n
        if fname in _D1 and len(args) == 1:
            (x, tx), = args
            name, _ = self.new(value, z)
            d = f"_xa_dd{self.tmp}"
            self.tmp += 1
            self.emit(f"{d} = {_D1[fname](x, name)}")
            return self.new(name, [_mul(d, t) for t in tx])
        if fname in _MINMAX and len(args) == 2:
            (x, tx), (y, ty) = args
            return self.select(f"{x} {_MINMAX[fname]} {y}", x, tx, y, ty)
        if fname in _POW and len(args) == 2:
            (x, tx), (y, ty) = args
            return self.power(x, tx, y, ty, node)
        if fname == "where" and len(args) == 3:
            (c0, _), (x, tx), (y, ty) = args
            return self.select(c0, x, tx, y, ty)
        self.fail(node, f"a call to {fname or func}() with a differentiable argument "
                        f"(supported: {', '.join(sorted({*_D1, *_MINMAX, *_POW, 'where'}))})")

    # -- statements
    def stmts(self, body):
        if not body:
            self.emit("pass")
        for s in body:
            self.stmt(s)

    def assign(self, target, val, tans):
        if not isinstance(target, ast.Name):
            self.fail(target, "assignments to anything but a plain name")
        self.emit(f"{target.id} = {val}")
        if target.id in self.active:
            for k, t in enumerate(tans or ["0.0"] * self.n):
                self.emit(f"_xa_d{k}_{target.id} = {t}")

    def stmt(self, s):
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                self.fail(s, "chained assignments")
            val, t = self.expr(s.value)
            self.assign(s.targets[0], val, t)
        elif isinstance(s, ast.AugAssign):
            self.stmt(ast.copy_location(ast.Assign(
                targets=[s.target],
                value=ast.BinOp(ast.Name(s.target.id, ast.Load()), s.op, s.value)), s))
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                val, t = self.expr(s.value)
                self.assign(s.target, val, t)
        elif isinstance(s, ast.Return):
            val, t = self.expr(s.value)
            t = t or ["0.0"] * self.n
            idx = [f"_xa_i{r}" for r in range(len(self.sites))]
            self.emit("return (" + ", ".join([val, *t, *idx]) + ",)")
        elif isinstance(s, ast.If):
            cond = self.plain(s.test)
            self.emit(f"if {cond}:")
            self.indent += 1
            self.stmts(s.body)
            self.indent -= 1
            if s.orelse:
                self.emit("else:")
                self.indent += 1
                self.stmts(s.orelse)
                self.indent -= 1
        elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            pass  # a docstring
        elif isinstance(s, ast.Pass):
            self.emit("pass")
        else:
            self.fail(s, f"the statement `{type(s).__name__}`")

    def build(self, name):
        params = ", ".join(self.params)
        self.lines = []
        self.indent = 1
        for v in sorted(self.active - {self.score}):
            for k in range(self.n):
                self.emit(f"_xa_d{k}_{v} = 0.0")
        for k in range(self.n):
            self.emit(f"_xa_d{k}_{self.score} = {'1.0' if k == 0 else '0.0'}")
        for r, site in enumerate(self.sites):
            dims = site.slice.elts if isinstance(site.slice, ast.Tuple) else None
            self.emit(f"_xa_i{r} = " + ("(" + "0, " * len(dims) + ")" if dims else "0"))
        self.stmts(self.node.body)
        return f"def {name}({params}):\n" + "\n".join(self.lines)


_BIN = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.Mod: "%",
        ast.FloorDiv: "//", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
        ast.LShift: "<<", ast.RShift: ">>"}
_CMP = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
        ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}


def _called_name(func, callees):
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return callees.get(func.id, func.id)
    return None


@dataclass
class Derivative:
    text: str  # module-level def
    sites: list  # for each read site, the index of the score_mod_args array it reads


def differentiate(src: Source, cap: Capture, diff_args: dict, name: str) -> Derivative:
    """Forward-mode derivative of a translated score_mod.

    ``diff_args`` maps the parameter names of floating ``score_mod_args`` to their positions.
    The generated ``name(...)`` takes the same parameters and returns
    ``(value, d/dscore, d/dsite_1, ..., index_1, ...)``.
    """
    d = _Differentiator(src, cap, set(diff_args))
    text = d.build(name)
    return Derivative(textwrap.dedent(text), [diff_args[s.value.id] for s in d.sites])


def score_derivative(src: Source, cap: Capture) -> ast.FunctionDef:
    """The derivative of a translated score_mod with respect to ``score`` only, as a parsed
    function returning ``(value, d value / d score)``: the rules of :func:`differentiate`
    (seed 0, no table reads), for translators to other languages (the CUDA C one of
    :mod:`xattn._flex_cuda`). Helpers are inlined; the parameters are those of ``src``."""
    d = _Differentiator(src, cap, set())
    node = ast.parse(textwrap.dedent(d.build(src.name + "_d"))).body[0]
    return node
