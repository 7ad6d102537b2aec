"""Kernel sources, compilation and the one compiled-function cache of the CuPy backends.

* :func:`source`: a kernel file with its local ``#include "x.cuh"`` files inlined (CuPy's
  on-disk cache keys on the source text, so an edited header always rebuilds).
* :func:`compiled_function`: one entry point, compiled on first use and cached per (device,
  entry name). Portable targets go through ``cupy.RawModule`` (NVRTC, CuPy's own disk cache);
  ``sm_90a`` (wgmma exists in no portable target, and CuPy appends its own ``-arch``) goes
  through NVRTC directly (CuPy's binding, else ``cuda.bindings``, else libnvrtc through
  ctypes, else ``nvcc``), its cubins kept on disk in ``$XATTN_CACHE_DIR`` (default
  ``~/.cache/xattn``), keyed by a hash of the source, the options and the compiler, so only
  the first process that uses a configuration compiles it (an unwritable directory: a
  temporary one).
* Every launch of a compiled function is logged at debug level on the ``xattn`` logger with
  the entry's name, so a user can see which kernel served a call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

__all__ = ["KERNEL_DIR", "compile_cubin", "compiled_function", "cubin_path", "load_module",
           "source"]

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
SM90_ARCH = "sm_90a"
_log = logging.getLogger("xattn")
_lock = threading.Lock()
_functions: dict = {}
_cubin_dir = None


@cache
def source(name: str) -> str:
    """A kernel's source with its local ``#include "x.cuh"`` / ``"x.cu"`` files inlined, each
    once, recursively."""
    seen: set = set()

    def inline(fname):
        if fname in seen:
            return ""
        seen.add(fname)
        text = (KERNEL_DIR / fname).read_text()
        return re.sub(r'^#include "([\w.]+\.cuh?)"$', lambda m: inline(m.group(1)), text,
                      flags=re.M)

    return inline(name)


class _Logged:
    """A compiled function that logs its entry name at debug level on each launch."""

    __slots__ = ("fn", "name")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("kernel %s", self.name, extra={"xattn_kernel": self.name})
        return self.fn(*args, **kwargs)

    def __getattr__(self, attr):  # attributes of the CuPy function (registers, ...)
        return getattr(self.fn, attr)


def compiled_function(src: str, name: str, options: tuple, smem: int, arch: str | None = None,
                      includes: tuple = ()):
    """Entry point ``name`` of kernel file ``src`` compiled with ``options`` (on first use) and
    cached per (device, name); ``smem`` bytes of dynamic shared memory allowed. ``arch="sm_90a"``
    compiles a cubin for exactly that target (cached on disk). ``includes``: repository files
    appended to the source (experimental code kept in ``tools/``, absent from an installed
    package)."""
    import cupy

    key = (cupy.cuda.Device().id, name)
    hit = _functions.get(key)
    if hit is None:
        with _lock:
            hit = _functions.get(key)
            if hit is None:
                text = source(src) + "".join(_repository_file(f) for f in includes)
                if arch is None:
                    mod = cupy.RawModule(code=text, options=("-std=c++17", *options))
                else:
                    mod = load_module(_cubins.get(name) or cubin_path(text, options))
                fn = mod.get_function(name)
                if smem > 48 * 1024:
                    _allow_smem(fn, smem)
                hit = _functions[key] = (mod, _Logged(name, fn))
    return hit[1]


def _repository_file(path: str) -> str:
    full = KERNEL_DIR.parents[1] / path
    if not full.exists():
        raise NotImplementedError(f"{path} is experimental code of the xattn repository, not "
                                  "of an installed package: run from a checkout")
    return "\n" + full.read_text()


_cubins: dict = {}  # entry name -> cached cubin path, filled by precompile()


def precompile(src: str, entries, workers: int = 8):
    """Compile the sm_90a cubins of several ``(name, options, includes)`` at once (threads), so
    that a benchmark of every configuration does not wait for them one by one; errors are left
    for :func:`compiled_function` to raise."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [e for e in entries if e[0] not in _cubins]

    def one(item):
        name, options, includes = item
        try:
            text = source(src) + "".join(_repository_file(f) for f in includes)
            _cubins[name] = cubin_path(text, options)
        except Exception:  # noqa: BLE001 - compiled_function compiles again and raises
            pass

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        list(ex.map(one, todo))


def _nvrtc_cupy(source, options):
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, "xattn_sm90.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(options))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc_cuda_python(source, options):
    from cuda.bindings import nvrtc

    def check(ret):
        err = ret[0] if isinstance(ret, tuple) else ret
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC: {err}")
        return ret[1:] if isinstance(ret, tuple) else ()

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), b"xattn_sm90.cu", 0, [], []))
    try:
        opts = [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(f"NVRTC: {err}\n{log.decode(errors='replace')}")
        (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_ctypes(source, options):
    import ctypes
    import ctypes.util

    cands = [ctypes.util.find_library("nvrtc"), "libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    try:
        import nvidia

        for base in nvidia.__path__:
            cands += sorted(str(p) for p in Path(base).glob("cu*/lib/libnvrtc.so*"))
            cands += sorted(str(p) for p in Path(base).glob("cuda_nvrtc/lib/libnvrtc.so*"))
    except ImportError:
        pass
    lib = None
    for cand in cands:
        if not cand:
            continue
        try:
            lib = ctypes.CDLL(cand)
            break
        except OSError:
            continue
    if lib is None:
        raise RuntimeError("libnvrtc not found")
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"xattn_sm90.cu", 0,
                              None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        err = lib.nvrtcCompileProgram(prog, len(options), opts)
        if err:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC error {err}\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)):
            raise RuntimeError("nvrtcGetCUBINSize failed")
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, buf):
            raise RuntimeError("nvrtcGetCUBIN failed")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvcc(source, options):
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise RuntimeError("no nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(source)
        proc = subprocess.run([nvcc, "-cubin", *options, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc: {proc.stderr}")
        return out.read_bytes()


def compile_cubin(source: str, defines=()) -> bytes:
    """Compile a source for sm_90a and return the cubin (NVRTC through CuPy, cuda-python, or
    nvcc, the first that works); raise with every route's error if none does."""
    options = ("-std=c++17", f"-arch={SM90_ARCH}", *defines)
    errors = []
    for route in (_nvrtc_cupy, _nvrtc_cuda_python, _nvrtc_ctypes, _nvcc):
        try:
            return route(source, options)
        except Exception as exc:  # noqa: BLE001 - try the next route, report all at the end
            errors.append(f"{route.__name__}: {type(exc).__name__}: {exc}")
    raise RuntimeError("could not compile for sm_90a:\n" + "\n".join(errors))


def _compiler_id():
    """What the cubin depends on besides source and options: CuPy's NVRTC version when that
    route exists, else the nvcc on the path."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        return f"nvrtc {nvrtc.getVersion()}"
    except Exception:  # noqa: BLE001 - no CuPy here: the route is another compiler
        return f"other {shutil.which('nvcc')}"


def _cache_dir() -> Path:
    """The cubin directory: $XATTN_CACHE_DIR, else ~/.cache/xattn (created on first use), else
    (not writable) a temporary directory for this process."""
    global _cubin_dir
    if _cubin_dir is None:
        base = os.environ.get("XATTN_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xattn")
        try:
            os.makedirs(base, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=base, suffix=".probe", delete=True)
            probe.close()
        except OSError:
            base = tempfile.mkdtemp(prefix="xattn_sm90_")
        _cubin_dir = Path(base)
    return _cubin_dir


def cubin_path(source: str, defines=()) -> Path:
    """The cached cubin of ``source`` with ``defines`` (compiled and written on a miss)."""
    options = ("-std=c++17", f"-arch={SM90_ARCH}", *defines)
    key = hashlib.sha256("\0".join((_compiler_id(), *options, source)).encode()).hexdigest()
    path = _cache_dir() / f"sm90_{key[:40]}.cubin"
    if not path.exists():
        cubin = compile_cubin(source, defines)
        # Written under a private name, then renamed: processes that compile the same
        # configuration at once never read a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    return path


def load_module(cubin):
    """A module holding the cubin (a path, or the bytes) whose ``get_function(name)`` gives a
    launchable kernel: ``cupy.RawModule(path=...)``, else ``cupy.cuda.function.Module``."""
    import cupy

    if not isinstance(cubin, Path):
        fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=_cache_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        cubin = Path(tmp)  # the file stays: RawModule may load it lazily
    try:
        return cupy.RawModule(path=str(cubin))
    except Exception:  # noqa: BLE001 - older CuPy: load the image directly
        from cupy.cuda import function

        mod = function.Module()
        mod.load(cubin.read_bytes())
        return mod


def _allow_smem(fn, smem):
    """Let ``fn`` use more than 48 KiB of dynamic shared memory."""
    try:
        fn.max_dynamic_shared_size_bytes = smem
    except AttributeError:  # a bare cupy.cuda.function.Function
        from cupy.cuda import driver

        attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
        driver.funcSetAttribute(fn.ptr, attr, smem)
