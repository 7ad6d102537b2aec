"""Hopper (sm_90a) flash attention forward with warpgroup MMA (``flash_fwd_sm90.cu``).

The kernel serves float16 and bfloat16, head dims 64 and 128, ``Dv == D``, causal (bottom-right)
and sliding window, any scale, GQA/MQA, Sq and Sk of any length, and always writes ``lse``.
Everything else (score modifications, mask, bias, ALiBi, other head dims, other cards) stays on
the ``mma.sync`` kernel of :mod:`xattn._backends.cupy_.flash`, which calls :func:`applies` and
then :func:`forward` (switch: ``ENABLE_SM90``).

The module is compiled for ``sm_90a`` only (the wgmma instructions exist in no portable
target), so it runs on compute capability 9.0 exactly. CuPy's ``RawModule`` compile appends its
own ``-arch`` option; this loader therefore calls NVRTC itself (CuPy's binding, else
``cuda.bindings``, else libnvrtc through ctypes, else ``nvcc``) and loads the cubin with
``cupy.RawModule(path=...)``. Cubins are kept on disk, keyed by a hash of the source, the
options and the compiler, in ``$XATTN_CACHE_DIR`` (default ``~/.cache/xattn``), so only the
first process that uses a configuration compiles it (an unwritable directory: a temporary one).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from .flash import _MAX_GRID_YZ, _source, _type_name, option_args

__all__ = ["BUILT", "CONFIGS", "ENABLE_SM90", "applies", "compile_cubin", "cubin_path", "forward",
           "get_kernel", "precompile", "smem_bytes", "threads"]

_KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"

# On since its GPU tests, the wgmma layout probes and compute-sanitizer passed on an H200
# (2026-11-29); False sends every request to the mma.sync kernel (this module then never
# compiles anything).
ENABLE_SM90 = True
# Per head dim: (keys per block BN, consumer warpgroups per block, mode). 64 query rows per
# warpgroup. Mode bit 0 (overlap): block j - 1's P V is issued before block j's softmax (three
# K/V buffers); bit 1 (swizzle): 128-byte swizzled shared memory instead of the core-matrix
# layout (1 KiB more shared memory for the alignment). Modes 0 and 1 are the original kernels.
# Bit 3 (warp-specialised, with bits 0 and 1): one more warpgroup per block, a producer that
# copies K/V into a ring of 3 stages handed over by mbarriers (setmaxnreg: the producer keeps
# 24 registers); bit 4 adds ping-pong of two consumers' GEMMs (named barriers). Modes 11 and 27
# are those (all tested on an H200, 2026-11-29).
# Defaults from `python3 tools/wgmma_probe.py --bench` on an H200 (fp16 S=4096, TFLOP/s, see
# notes/gpu_kernels.md): D=128 (128, 2, 11) 442 / causal 386 (mode 3: 427 / 369; mode 0: 228 /
# 202; mma.sync 294 / 248), D=64 (64, 3, 11) 348 / 294 (mode 3: 304 / 269; mma.sync 292 / 258).
# Mode 27 (ping-pong on top of 11) measured slower: 394 / 344 at D=128.
CONFIGS = {64: (64, 3, 11), 128: (128, 2, 11)}
# Every configuration the source builds, as (D, BN, warpgroups, mode): see the end of
# flash_fwd_sm90.cu.
BUILT = {(64, 128, 2, 0), (64, 64, 3, 0), (128, 128, 2, 0), (128, 64, 2, 0), (128, 64, 3, 0),
         (64, 128, 2, 1), (64, 64, 3, 1), (128, 64, 2, 1), (128, 64, 3, 1),
         (64, 128, 2, 2), (64, 64, 3, 2), (128, 128, 2, 2), (128, 64, 3, 2),
         (64, 128, 2, 3), (128, 64, 2, 3), (128, 128, 2, 3),
         (64, 64, 3, 3),
         (64, 128, 2, 11), (64, 64, 3, 11), (128, 128, 2, 11), (64, 128, 2, 27),
         (128, 128, 2, 27)}
# Tests set this to fill every output with NaN before the launch (unwritten elements then fail).
POISON = False
_ARCH = "sm_90a"

_lock = threading.Lock()
_modules: dict = {}
_cubins: dict = {}  # entry name -> cached cubin path, filled by precompile()


def applies(prob, *, mask=None, bias=None, alibi_slopes=None):
    """``None`` when the sm_90a kernel serves this forward request, else the reason it does not.

    Checked by the ``mma.sync`` launcher before its own kernel; ``ENABLE_SM90`` is part of it.
    """
    if not ENABLE_SM90:
        return "the sm_90a kernel is switched off (ENABLE_SM90)"
    if prob.xp.__name__ != "cupy":
        return "inputs are not CuPy arrays"
    if _type_name(prob.dtype) is None:
        return f"dtype {prob.dtype}: the sm_90a kernel takes float16 and bfloat16"
    if prob.d not in CONFIGS or prob.dv != prob.d:
        return (f"head_dim {prob.d} (Dv {prob.dv}): the sm_90a kernel has D = Dv in "
                f"{sorted(CONFIGS)}")
    if prob.softcap is not None or mask is not None or bias is not None \
            or alibi_slopes is not None:
        return "softcap, mask, bias and ALiBi run on the mma.sync kernel"
    if math.prod(prob.batch) > _MAX_GRID_YZ or prob.hq > _MAX_GRID_YZ:
        return "batch or heads above the grid limit"
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc != 90:
        return f"compute capability {cc}: the sm_90a kernel runs on 9.0 only"
    return None


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
    options = ("-std=c++17", f"-arch={_ARCH}", *defines)
    errors = []
    for route in (_nvrtc_cupy, _nvrtc_cuda_python, _nvrtc_ctypes, _nvcc):
        try:
            return route(source, options)
        except Exception as exc:  # noqa: BLE001 - try the next route, report all at the end
            errors.append(f"{route.__name__}: {type(exc).__name__}: {exc}")
    raise RuntimeError("could not compile for sm_90a:\n" + "\n".join(errors))


_cubin_dir = None


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
    options = ("-std=c++17", f"-arch={_ARCH}", *defines)
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


def smem_bytes(d, cfg):
    bn, nwg, mode = cfg
    nbuf = 3 if mode & 1 else 2
    # Mode bit 3's mbarriers are static shared memory (128 bytes), outside this count.
    return (nwg * 64 * d + 2 * nbuf * bn * d) * 2 + (1024 if mode & 2 else 0)


def threads(cfg):
    """Threads per block: 128 per consumer warpgroup, plus the producer's 128 in mode bit 3."""
    bn, nwg, mode = cfg
    return (nwg + (1 if mode & 8 else 0)) * 128


def kernel_name(type_name, d, cfg):
    bn, nwg, ov = cfg
    return f"flash_fwd_sm90_{type_name}_d{d}_n{bn}_g{nwg}_o{ov}"


def _defines(type_name, d, cfg):
    bn, nwg, mode = cfg
    return (f"-DXATTN90_TN={type_name}", f"-DXATTN90_D={d}", f"-DXATTN90_BN={bn}",
            f"-DXATTN90_NWG={nwg}", f"-DXATTN90_OV={mode}")


def precompile(type_name: str, keys, workers: int = 8):
    """Compile the cubins of several (D, BN, warpgroups, mode) at once (threads), so that a
    benchmark of every configuration does not wait for them one by one; errors are left for
    :func:`get_kernel` to raise."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [(d, tuple(c)) for d, *c in keys if kernel_name(type_name, d, tuple(c)) not in _cubins]

    def one(item):
        d, cfg = item
        try:
            _cubins[kernel_name(type_name, d, cfg)] = cubin_path(
                _source("flash_fwd_sm90.cu"), _defines(type_name, d, cfg))
        except Exception:  # noqa: BLE001 - get_kernel compiles again and raises
            pass

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        list(ex.map(one, todo))


def get_kernel(type_name: str, d: int, cfg: tuple):
    """The compiled entry point for one dtype, head dim and (BN, warpgroups, mode); cached
    per device."""
    import cupy

    dev = cupy.cuda.Device().id
    name = kernel_name(type_name, d, cfg)
    key = (dev, name)
    hit = _modules.get(key)
    if hit is not None:
        return hit[1]
    with _lock:
        hit = _modules.get(key)
        if hit is None:
            cubin = _cubins.get(name) or cubin_path(_source("flash_fwd_sm90.cu"),
                                                    _defines(type_name, d, cfg))
            mod = load_module(cubin)
            fn = mod.get_function(name)
            smem = smem_bytes(d, cfg)
            if smem > 48 * 1024:
                _allow_smem(fn, smem)
            hit = _modules[key] = (mod, fn)
    return hit[1]


def forward(prob, q, k, v, *, config=None):
    """Return ``(out, lse)`` from the sm_90a kernel (the caller checked :func:`applies`, or a
    test calls it directly). ``config`` = (keys per block, warpgroups, mode) overrides the
    default (``CONFIGS``; ``BUILT`` lists the choices)."""
    with q.device:
        return _forward(prob, q, k, v, config)


def _forward(prob, q, k, v, config):
    import cupy as xp

    tn = _type_name(prob.dtype)
    d = prob.d
    if tn is None or d not in CONFIGS or prob.dv != d:
        raise NotImplementedError(f"the sm_90a kernel has no entry for dtype {prob.dtype}, "
                                  f"D {d}, Dv {prob.dv}")
    cfg = tuple(config) if config is not None else CONFIGS[d]
    if (d, *cfg) not in BUILT:
        raise ValueError(f"config {cfg} for D={d} is not built; built: {sorted(BUILT)}")
    B = math.prod(prob.batch)

    def prep(x, h, s):
        return xp.ascontiguousarray(x).reshape(B, h, s, d)

    q4, k4, v4 = prep(q, prob.hq, prob.sq), prep(k, prob.hkv, prob.sk), prep(v, prob.hkv, prob.sk)
    out = xp.empty((B, prob.hq, prob.sq, d), dtype=q.dtype)
    lse = xp.empty((B, prob.hq, prob.sq), dtype=xp.float32)
    if POISON:
        out.view(xp.uint16).fill(0x7FFF)  # NaN in float16 and in bfloat16
        lse.fill(np.nan)
    if out.size == 0 or lse.size == 0:
        if lse.size:
            lse.fill(-np.inf)
        return out.reshape(prob.out_shape), lse.reshape(prob.lse_shape)
    fn = get_kernel(tn, d, cfg)
    nwg = cfg[1]
    bm = 64 * nwg
    i32, f32 = np.int32, np.float32
    causal_window = option_args(xp, prob, None, None, None)[:3]  # no score mods here
    args = (q4, k4, v4, out, lse, i32(prob.hq), i32(prob.group), i32(prob.sq), i32(prob.sk),
            f32(prob.scale), *causal_window)
    fn(((prob.sq + bm - 1) // bm, prob.hq, B), (threads(cfg),), args,
       shared_mem=smem_bytes(d, cfg))
    return out.reshape(prob.out_shape), lse.reshape(prob.lse_shape)
