"""``xattn.show_config()``: versions, hardware and every kernel-table entry with its status.

As ``numpy.show_config`` and ``scipy.show_config``: what to paste into a bug report. Calling it
imports the optional packages that are installed (numba, CuPy) to read their versions; importing
xattn itself still imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import sys

__all__ = ["config_info", "show_config"]

# The representative request each GPU entry is asked about (dtype, backend options).
_GPU_EXAMPLE = {"cupy.tf32": ("float32", {"allow_tf32": True}), "cupy.tf32x3": ("float32", {}),
                "cupy.tf32x3_sm90": ("float32", {}),
                "cupy.simt": ("float32", {}), "generic": ("float32", {})}


def _version(name):
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        return f"installed but fails to import: {type(exc).__name__}: {exc}"
    return str(getattr(mod, "__version__", "installed"))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_version(v):
    return f"{v // 1000}.{(v % 1000) // 10}"


def _gpu_info():
    """CUDA runtime/driver versions and the current device, or the reason there are none."""
    if importlib.util.find_spec("cupy") is None:
        return {"status": "CuPy not installed (pip install 'xattn[cuda]')"}
    try:
        import cupy

        rt = cupy.cuda.runtime
        info = {"cuda_runtime": _cuda_version(rt.runtimeGetVersion()),
                "cuda_driver": _cuda_version(rt.driverGetVersion())}
        dev = cupy.cuda.Device()
        props = rt.getDeviceProperties(dev.id)
        name = props["name"]
        info.update(
            status="available",
            device=dev.id,
            name=name.decode() if isinstance(name, bytes) else str(name),
            compute_capability=f"{int(dev.compute_capability) // 10}."
                               f"{int(dev.compute_capability) % 10}",
            memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
        )
        return info
    except Exception as exc:  # noqa: BLE001 - no driver, no device: say so
        return {"status": f"no usable GPU: {type(exc).__name__}: {exc}"}


def _gpu_problem(dtype):
    import cupy
    import numpy as np

    from ._array import validate_attention

    x = cupy.zeros((1, 1, 16, 64), dtype=np.dtype(dtype))
    return validate_attention(x, x, x)


def _entries(gpu_ok):
    from . import _backends

    off = _backends.disabled()
    out = []
    for dev, names in _backends._PREFERENCE.items():
        for name in names:
            b = _backends.BACKENDS[name]
            status = _backends._why_not(b, None, None, "forward", off)
            if status is None and dev == "gpu":
                if not gpu_ok:
                    status = "no usable GPU"
                else:
                    dtype, opts = _GPU_EXAMPLE.get(name, ("float16", {}))
                    status = _backends._why_not(b, _gpu_problem(dtype), opts, "forward", off)
                    if status is not None:
                        status = f"{status} (asked about {dtype}, D=64)"
            out.append({"name": name, "device": dev, "description": b.description,
                        "status": "available" if status is None else status})
    return out


def config_info() -> dict:
    """Everything :func:`show_config` prints, as a JSON-serialisable dict."""
    # The package's version without importing the package from inside it (no import cycle).
    version = getattr(sys.modules.get(__package__), "__version__", "unknown")
    try:
        from ._backends.numpy_._pool import num_threads

        threads = num_threads()
    except Exception as exc:  # noqa: BLE001 - a bad XATTN_NUM_THREADS is reported
        threads = f"{type(exc).__name__}: {exc}"
    gpu = _gpu_info()
    return {
        "xattn": version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in
                     ("numpy", "numba", "threadpoolctl", "ml_dtypes", "cupy", "scipy")},
        "cpu": {"model": _cpu_model(), "cpus": os.cpu_count(), "threads_used": threads},
        "gpu": gpu,
        "environment": {k: os.environ[k] for k in
                        ("XATTN_DISABLE", "XATTN_NUM_THREADS", "XATTN_CACHE_DIR")
                        if k in os.environ},
        "backends": _entries(gpu.get("status") == "available"),
    }


def format_config(info: dict) -> str:
    lines = [f"xattn {info['xattn']} (Python {info['python']}, {info['platform']})"]
    lines.append("packages: " + ", ".join(
        f"{k} {v if v is not None else 'not installed'}" for k, v in info["packages"].items()))
    cpu = info["cpu"]
    lines.append(f"cpu: {cpu['model']}, {cpu['cpus']} CPUs, {cpu['threads_used']} threads used")
    gpu = info["gpu"]
    if gpu.get("status") == "available":
        lines.append(f"gpu: {gpu['name']} (device {gpu['device']}, compute capability "
                     f"{gpu['compute_capability']}, {gpu['memory_gib']} GiB), CUDA runtime "
                     f"{gpu['cuda_runtime']}, driver {gpu['cuda_driver']}")
    else:
        lines.append(f"gpu: {gpu['status']}")
    if info["environment"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in
                                                 info["environment"].items()))
    lines.append("backends (auto tries them in this order):")
    groups: dict = {}  # one line for entries that share a device and a status
    for e in info["backends"]:
        groups.setdefault((e["device"], e["status"]), []).append(e["name"])
    for (device, status), names in groups.items():
        lines.append(f"  {', '.join(names)} ({device}): {status}")
    return "\n".join(lines)


def show_config(mode="stdout"):
    """Print (or return) xattn's configuration: versions, CPU and GPU, and every backend.

    Lists the versions of NumPy, Numba, CuPy (with the CUDA runtime and driver), the CPU model
    and the number of threads the fused CPU kernels use, the GPU's name and compute
    capability, and every entry of the kernel table with ``available`` or the reason it
    cannot run here, in the order ``backend="auto"`` tries them.

    Parameters
    ----------
    mode : ``"stdout"`` (default), ``"dicts"`` or ``"json"``
        Print the report, return it as a dict, or return it as a JSON string.

    Examples
    --------
    >>> import xattn
    >>> info = xattn.show_config(mode="dicts")
    >>> [e["name"] for e in info["backends"] if e["device"] == "cpu"]
    ['numba', 'numpy']
    >>> info["backends"][1]["status"]
    'available'
    """
    if mode not in ("stdout", "dicts", "json"):
        raise ValueError(f"mode: expected 'stdout', 'dicts' or 'json', got {mode!r}")
    info = config_info()
    if mode == "dicts":
        return info
    if mode == "json":
        return json.dumps(info, indent=1)
    print(format_config(info))
    return None
