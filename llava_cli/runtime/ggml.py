"""ctypes bindings to the ggml shared libraries that llama-cpp-python 0.3.36 ships (``llama_cpp/lib``).

Only what the vision graph (llava_cli/runtime/vision.py) uses is bound, each with argtypes/restype so that
pointers are never truncated to C ints and floats are passed as floats. ggml objects are opaque here: tensors,
contexts, graphs, backends and buffers are ``c_void_p``; we never read ``struct ggml_tensor`` fields (its layout
changes between ggml versions), shapes are tracked on the Python side.

The libraries are llama-cpp-python's own copies, loaded after ``llama_cpp`` itself so that the process has one
ggml (one device registry, one CPU backend) shared with libllama. llama-cpp-python treats libggml as internal; the
version is pinned in pyproject.toml and tests/test_vision_graph.py exercises every binding.

Bad shapes make ggml abort the process (GGML_ASSERT), so callers validate everything before building a graph.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ggml_type values (ggml.h `enum ggml_type`); equal to gguf.GGMLQuantizationType, which vision.py uses for files.
TYPE_F32 = 0
TYPE_F16 = 1
TYPE_I32 = 26

# enum ggml_prec (ggml.h): GGML_PREC_F32 asks for F32 accumulation.
PREC_F32 = 10

# enum ggml_backend_dev_type (ggml-backend.h), in declaration order.
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL, DEV_META = range(5)
DEVICE_TYPE_NAMES = {DEV_CPU: "cpu", DEV_GPU: "gpu", DEV_IGPU: "igpu", DEV_ACCEL: "accel", DEV_META: "meta"}


class InitParams(ctypes.Structure):
    """``struct ggml_init_params`` (ggml.h), passed to ggml_init *by value*: {size_t mem_size; void *mem_buffer;
    bool no_alloc}. With no_alloc the context only holds tensor headers; data lives in backend buffers."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_p = ctypes.c_void_p
_i = ctypes.c_int
_i64 = ctypes.c_int64
_f = ctypes.c_float
_sz = ctypes.c_size_t
_b = ctypes.c_bool

# name: (argtypes, restype). Grouped as in the headers they come from.
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    # ggml.h: contexts and tensors
    "ggml_init": ([InitParams], _p),
    "ggml_free": ([_p], None),
    "ggml_tensor_overhead": ([], _sz),
    "ggml_graph_overhead_custom": ([_sz, _b], _sz),
    "ggml_new_tensor_1d": ([_p, _i, _i64], _p),
    "ggml_new_tensor_2d": ([_p, _i, _i64, _i64], _p),
    "ggml_new_tensor_3d": ([_p, _i, _i64, _i64, _i64], _p),
    "ggml_set_name": ([_p, ctypes.c_char_p], _p),
    "ggml_set_input": ([_p], None),
    "ggml_set_output": ([_p], None),
    "ggml_nbytes": ([_p], _sz),
    # ggml.h: operations
    "ggml_mul_mat": ([_p, _p, _p], _p),
    "ggml_add": ([_p, _p, _p], _p),
    "ggml_mul": ([_p, _p, _p], _p),
    "ggml_scale": ([_p, _p, _f], _p),
    "ggml_norm": ([_p, _p, _f], _p),
    "ggml_silu": ([_p, _p], _p),
    "ggml_gelu_erf": ([_p, _p], _p),
    "ggml_gelu_quick": ([_p, _p], _p),
    "ggml_soft_max_ext": ([_p, _p, _p, _f, _f], _p),
    "ggml_flash_attn_ext": ([_p, _p, _p, _p, _p, _f, _f, _f], _p),
    "ggml_prec_set_acc": ([_p, _i], _b),
    "ggml_cast": ([_p, _p, _i], _p),
    "ggml_concat": ([_p, _p, _p, _i], _p),
    "ggml_permute": ([_p, _p, _i, _i, _i, _i], _p),
    "ggml_cont": ([_p, _p], _p),
    "ggml_reshape_3d": ([_p, _p, _i64, _i64, _i64], _p),
    "ggml_reshape_4d": ([_p, _p, _i64, _i64, _i64, _i64], _p),
    # ggml.h: graphs
    "ggml_new_graph_custom": ([_p, _sz, _b], _p),
    "ggml_build_forward_expand": ([_p, _p], None),
    "ggml_graph_n_nodes": ([_p], _i),
    "ggml_graph_node": ([_p, _i], _p),
    # ggml-alloc.h
    "ggml_backend_alloc_ctx_tensors": ([_p, _p], _p),
    "ggml_gallocr_new": ([_p], _p),
    "ggml_gallocr_free": ([_p], None),
    "ggml_gallocr_alloc_graph": ([_p, _p], _b),
    "ggml_gallocr_get_buffer_size": ([_p, _i], _sz),
    # ggml-backend.h: backends and buffers
    "ggml_backend_free": ([_p], None),
    "ggml_backend_name": ([_p], ctypes.c_char_p),
    "ggml_backend_get_default_buffer_type": ([_p], _p),
    "ggml_backend_buffer_free": ([_p], None),
    "ggml_backend_buffer_get_size": ([_p], _sz),
    "ggml_backend_tensor_set": ([_p, _p, _sz, _sz], None),
    "ggml_backend_tensor_get": ([_p, _p, _sz, _sz], None),
    "ggml_backend_graph_compute": ([_p, _p], _i),  # enum ggml_status, 0 = GGML_STATUS_SUCCESS
    "ggml_backend_supports_op": ([_p, _p], _b),
    # ggml-backend.h: device registry (libggml.so)
    "ggml_backend_dev_count": ([], _sz),
    "ggml_backend_dev_get": ([_sz], _p),
    "ggml_backend_dev_name": ([_p], ctypes.c_char_p),
    "ggml_backend_dev_description": ([_p], ctypes.c_char_p),
    "ggml_backend_dev_type": ([_p], _i),
    "ggml_backend_dev_init": ([_p, ctypes.c_char_p], _p),
    # ggml-cpu.h (libggml-cpu.so)
    "ggml_backend_cpu_init": ([], _p),
    "ggml_backend_cpu_set_n_threads": ([_p, _i], None),
}


class _Lib:
    """The bound functions as attributes (``lib.ggml_add(...)``)."""

    def __init__(self, libs: Sequence[ctypes.CDLL]) -> None:
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = _find(libs, name)
            fn.argtypes = argtypes
            fn.restype = restype
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:  # only reached for names not bound above
        raise AttributeError(f"ggml function {name} is not bound in llava_cli.runtime.ggml")


def _find(libs: Sequence[ctypes.CDLL], name: str) -> Any:
    for lib in libs:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    raise OSError(f"{name} not found in llama-cpp-python's ggml libraries (is llama-cpp-python 0.3.36 installed?)")


_lock = threading.Lock()
_lib: _Lib | None = None


def lib() -> _Lib:
    """Load (once) and return the bound ggml functions."""
    global _lib
    with _lock:
        if _lib is None:
            import llama_cpp  # loads libllama and with it the same libggml*.so we bind below

            folder = Path(llama_cpp.__file__).parent / "lib"
            # Symbols are spread over three libraries: ops/graphs/backend API in ggml-base, the CPU backend in
            # ggml-cpu, the device registry in ggml. CDLL of an already loaded soname returns that copy.
            libs = [ctypes.CDLL(str(folder / f"lib{n}.so")) for n in ("ggml-base", "ggml-cpu", "ggml")]
            _lib = _Lib(libs)
        return _lib


# ------------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """One entry of ggml's device registry."""

    index: int
    name: str
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel" | "meta"


def list_devices() -> list[Device]:
    """What ggml's device registry offers in this build (CPU only here; CUDA/Metal/Vulkan builds add GPUs)."""
    g = lib()
    out = []
    for i in range(int(g.ggml_backend_dev_count())):
        dev = g.ggml_backend_dev_get(i)
        out.append(
            Device(
                index=i,
                name=(g.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                description=(g.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                kind=DEVICE_TYPE_NAMES.get(int(g.ggml_backend_dev_type(dev)), "unknown"),
            )
        )
    return out


def pick_device(devices: Sequence[Device], use_gpu: bool) -> Device | None:
    """The device to run the vision graph on: the first discrete GPU, else the first integrated GPU, when
    `use_gpu`; None means the CPU backend (also when no GPU is registered). Accelerators (BLAS, AMX) and
    "meta" devices are not standalone backends for a whole graph, so they are never picked."""
    if not use_gpu:
        return None
    for kind in ("gpu", "igpu"):
        for dev in devices:
            if dev.kind == kind:
                return dev
    return None


class Backend:
    """A ggml backend to allocate weights on and compute graphs with."""

    def __init__(self, device: Device | None, n_threads: int) -> None:
        g = lib()
        self.device = device
        if device is None:
            self.ptr = g.ggml_backend_cpu_init()
            if not self.ptr:
                raise RuntimeError("ggml_backend_cpu_init failed")
            g.ggml_backend_cpu_set_n_threads(self.ptr, max(1, int(n_threads)))
        else:
            self.ptr = g.ggml_backend_dev_init(g.ggml_backend_dev_get(device.index), None)
            if not self.ptr:
                raise RuntimeError(f"ggml could not initialise device {device.name}")
        self.name = (g.ggml_backend_name(self.ptr) or b"?").decode(errors="replace")
        self.is_gpu = device is not None

    def supports_graph(self, graph: int) -> bool:
        """Whether every node of `graph` runs on this backend (a GPU backend may lack an op)."""
        g = lib()
        return all(
            g.ggml_backend_supports_op(self.ptr, g.ggml_graph_node(graph, i))
            for i in range(g.ggml_graph_n_nodes(graph))
        )

    def free(self) -> None:
        if self.ptr:
            lib().ggml_backend_free(self.ptr)
            self.ptr = None


def new_context(n_tensors: int, graph_size: int = 0) -> int:
    """A no_alloc ggml context with room for `n_tensors` headers (+ one graph of `graph_size` nodes)."""
    g = lib()
    size = g.ggml_tensor_overhead() * n_tensors
    if graph_size:
        size += g.ggml_graph_overhead_custom(graph_size, False)
    ctx = g.ggml_init(InitParams(mem_size=size, mem_buffer=None, no_alloc=True))
    if not ctx:
        raise MemoryError("ggml_init failed")
    return int(ctx)


# ------------------------------------------------------------------------------------------------- CPU features


class _Feature(ctypes.Structure):
    """``struct ggml_backend_feature`` (ggml-backend.h): {const char *name; const char *value}."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def cpu_backend_features() -> dict[str, str]:
    """What the CPU backend in ggml's registry reports through ``ggml_backend_get_features``: the instruction
    sets it was compiled with (AVX2, AVX512, AMX_INT8, ...; ggml-cpu.cpp lists them from ``ggml_cpu_has_*``, which
    are compile-time answers) and build options (OPENMP, REPACK, ...). Works for a build with the CPU backend
    linked in and for one with dynamic CPU variants (after one is loaded). Bound here, not in _SIGNATURES: only
    libggml.so is needed, which every build has."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    g = ctypes.CDLL(str(folder / "libggml.so"))
    g.ggml_backend_reg_count.restype = _sz
    g.ggml_backend_reg_get.argtypes = [_sz]
    g.ggml_backend_reg_get.restype = _p
    g.ggml_backend_reg_name.argtypes = [_p]
    g.ggml_backend_reg_name.restype = ctypes.c_char_p
    g.ggml_backend_reg_get_proc_address.argtypes = [_p, ctypes.c_char_p]
    g.ggml_backend_reg_get_proc_address.restype = _p
    for i in range(int(g.ggml_backend_reg_count())):
        reg = g.ggml_backend_reg_get(i)
        if (g.ggml_backend_reg_name(reg) or b"") != b"CPU":
            continue
        addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
        if not addr:
            return {}
        get = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), _p)(addr)
        feats = get(reg)
        out: dict[str, str] = {}
        i = 0
        while feats[i].name:
            out[feats[i].name.decode()] = (feats[i].value or b"").decode()
            i += 1
        return out
    return {}
