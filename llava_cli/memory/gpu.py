"""What memory is there to plan for: NVIDIA GPUs (NVML, then ``nvidia-smi``), the host RAM, and whether this
build of llama-cpp-python can offload at all.

Every probe degrades instead of failing: a missing NVML library, a broken ``nvidia-smi`` or garbage output
all end in "no GPU found" plus a note saying why, and the planner then plans for CPU RAM.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import psutil

from llava_cli.cpu_kernels import GPU_REINSTALL
from llava_cli.errors import UsageError

MiB = 1024**2
GiB = 1024**3

SMI_QUERY = ["--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"]
SMI_TIMEOUT_S = 15.0

# Printed whenever the installed llama-cpp-python cannot offload: the same flags as the README's install line,
# plus the CUDA switch.
GPU_REINSTALL_HINT = f"reinstall with CUDA: {GPU_REINSTALL}"


@dataclass(frozen=True)
class GPU:
    """One GPU. Sizes in bytes; ``free`` is what another process could allocate right now."""

    index: int
    name: str
    total: int
    free: int
    source: str  # "nvml", "nvidia-smi" or "--gpu-memory"


@dataclass(frozen=True)
class HostMemory:
    total: int
    available: int


@dataclass(frozen=True)
class GPUProbe:
    """What the probe found. ``source`` is "nvml", "nvidia-smi", "--gpu-memory" or "none"."""

    gpus: tuple[GPU, ...]
    source: str
    offload_supported: bool
    host: HostMemory
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def usable_gpus(self) -> tuple[GPU, ...]:
        """The GPUs llama.cpp can use: none when this build cannot offload."""
        return self.gpus if self.offload_supported else ()


# ---------------------------------------------------------------------------------------------------------------
# Sizes on the command line


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str, *, what: str = "--gpu-memory") -> int:
    """Parse a memory size such as ``12GB``, ``11.5GiB``, ``8000MiB`` or ``24G`` into bytes.

    GPU memory is sold in binary units (a "12 GB" card has 12288 MiB), so GB, G and GiB all mean 1024³ here;
    a bare number is taken as GiB. Raises UsageError on anything else.
    """
    m = _SIZE_RE.match(text or "")
    if not m:
        raise UsageError(
            f"{what}: cannot read {text!r} as a memory size",
            hint="give a number with a unit, e.g. 12GB, 11.5GiB or 8000MiB",
        )
    number, prefix, _, unit_b = m.groups()
    # "123456789B" is plain bytes; any other unit (or none: GiB) is a power of 1024
    value = float(number) if not prefix and unit_b else float(number) * 1024 ** _POWER[prefix.lower() or "g"]
    if value <= 0:
        raise UsageError(f"{what}: {text!r} is not a positive size", hint="e.g. 12GB")
    return int(value)


def format_bytes(n: float, *, unit: str = "GiB") -> str:
    """``format_bytes(12.5 * GiB) == "12.50 GiB"``; MiB for the small terms."""
    if unit == "MiB":
        return f"{n / MiB:.0f} MiB"
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------------
# Probes


def _import_pynvml() -> ModuleType | None:
    """The NVML bindings (package nvidia-ml-py), or None. Tests replace this function with a fake NVML."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # not installed, or broken: fall back to nvidia-smi
        return None
    return pynvml


def _visible_indices() -> list[int] | None:
    """The physical GPU indices CUDA_VISIBLE_DEVICES allows (None: no restriction; [] : all hidden).

    Only numeric lists are mapped; UUID lists are left unrestricted (NVML order is not CUDA order for them).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    parts = [p.strip() for p in env.split(",") if p.strip()]
    if not parts:
        return []
    out: list[int] = []
    for p in parts:
        if not p.lstrip("-").isdigit():
            return None
        i = int(p)
        if i < 0:  # CUDA stops at the first invalid index
            break
        out.append(i)
    return out


def _apply_visible(gpus: list[GPU]) -> list[GPU]:
    visible = _visible_indices()
    if visible is None:
        return gpus
    by_index = {g.index: g for g in gpus}
    # CUDA renumbers the visible devices 0..n-1, in the order given.
    return [
        GPU(new, by_index[old].name, by_index[old].total, by_index[old].free, by_index[old].source)
        for new, old in enumerate(i for i in visible if i in by_index)
    ]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def probe_nvml() -> tuple[list[GPU] | None, str | None]:
    """GPUs through NVML. Returns (gpus, None) on success, (None, why) when NVML is unusable."""
    nvml = _import_pynvml()
    if nvml is None:
        return None, "NVML bindings (nvidia-ml-py) not installed"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no NVIDIA driver here
        return None, f"NVML unavailable ({exc or type(exc).__name__})"
    try:
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GPU(i, _text(nvml.nvmlDeviceGetName(handle)), int(mem.total), int(mem.free), "nvml"))
        return gpus, None
    except Exception as exc:
        return None, f"NVML query failed ({exc or type(exc).__name__})"
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def parse_smi_csv(text: str) -> list[GPU]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits`` (MiB).

    Raises ValueError on anything that is not one "name, total, free" line per GPU.
    """
    gpus = []
    for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        parts = line.rsplit(",", 2)  # a GPU name could contain a comma; the numbers cannot
        if len(parts) != 3:
            raise ValueError(f"unexpected line {line!r}")
        name, total, free = (p.strip() for p in parts)
        total_mib, free_mib = float(total), float(free)  # "[N/A]" or "[Not Supported]" raise here
        if not name or total_mib <= 0 or free_mib < 0 or free_mib > total_mib:
            raise ValueError(f"implausible line {line!r}")
        gpus.append(GPU(i, name, int(total_mib * MiB), int(free_mib * MiB), "nvidia-smi"))
    return gpus


def probe_smi() -> tuple[list[GPU] | None, str | None]:
    """GPUs through the ``nvidia-smi`` on PATH. Returns (gpus, None) or (None, why)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not found on PATH"
    try:
        proc = subprocess.run([exe, *SMI_QUERY], capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"nvidia-smi could not run ({exc})"
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"nvidia-smi failed (exit {proc.returncode}{': ' + first[0] if first else ''})"
    try:
        return parse_smi_csv(proc.stdout), None
    except ValueError as exc:
        return None, f"nvidia-smi printed output we cannot read ({exc})"


def gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, Metal, Vulkan, ...)."""
    try:
        import llama_cpp
    except Exception:  # no llama-cpp-python at all: nothing can be offloaded
        return False
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(total=int(vm.total), available=int(vm.available))


def probe(*, gpu_memory: str | int | None = None, offload_supported: bool | None = None) -> GPUProbe:
    """Find the GPUs to plan for.

    ``gpu_memory`` (bytes or a size string like "12GB") plans for a single card of that size that you may not
    have; it is taken as the card's free memory. ``offload_supported`` overrides the llama-cpp-python check
    (tests use it to stand for a CUDA build).
    """
    host = host_memory()
    if gpu_memory is not None:
        size = parse_size(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
        if size <= 0:
            raise UsageError(f"--gpu-memory: {gpu_memory!r} is not a positive size", hint="e.g. 12GB")
        card = GPU(0, f"planned {size / GiB:g} GiB card", size, size, "--gpu-memory")
        # A planned card is planned for whatever this build can do; the report adds the reinstall line when the
        # installed llama-cpp-python could not use it.
        supported = gpu_offload_supported() if offload_supported is None else offload_supported
        return GPUProbe((card,), "--gpu-memory", supported, host)

    notes: list[str] = []
    gpus, why = probe_nvml()
    source = "nvml"
    if gpus is None:
        notes.append(why or "NVML unavailable")
        gpus, why = probe_smi()
        source = "nvidia-smi"
        if gpus is None:
            notes.append(why or "nvidia-smi unavailable")
            gpus, source = [], "none"
    gpus = _apply_visible(gpus)
    if not gpus and source != "none":
        notes.append(f"{source} lists no usable GPU")
        source = "none"
    supported = gpu_offload_supported() if offload_supported is None else offload_supported
    # A GPU this build cannot use is still planned for (the report says so once, with GPU_REINSTALL_HINT).
    return GPUProbe(tuple(gpus), source, supported, host, tuple(notes))
