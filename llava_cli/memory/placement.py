"""Where one quantization goes: fully on the GPU, some layers on it, or the CPU; and which quantization to
recommend. The policy (also in ``llava vram-check --help`` and docs/memory.md):

1. With a GPU: among the quantizations that fit *fully* on it, the best quality. The published table rates
   Q8_0 and F16 equal (100%), and then Q8_0 wins: our own measurement (docs/quantization.md) puts Q8_0 within
   rounding of F16 (mean KL ~1e-4 nats), while it needs half the memory (room for context and parallel
   sequences) and decodes faster (decode reads every weight once per token).
2. If none fits fully: the one with the most layers on the GPU, then the best quality. Layers on the GPU are
   what decide speed when the model is split, so a smaller quantization that puts more of the model on the card
   beats a larger one spilling to the CPU.
3. CPU RAM only when there is no GPU: the best quality that fits in the available RAM (Q8_0 over F16 as above).

The GPU plan is made for the GPU found even when this llama-cpp-python build cannot use it (the report says
so in one line, with the reinstall command); ``plan_offload`` (``--n-gpu-layers auto``) then offloads nothing.

Offload follows the llama.cpp vendored in llama-cpp-python 0.3.36: ``n_gpu_layers = k`` puts the output layer
on the GPU first, then the top ``k-1`` blocks; ``n_layer + 1`` (or -1) is everything. ``token_embd`` always stays
on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from llava_cli.errors import UsageError
from llava_cli.gguf_info import GGUFInfo, check_pair, read_gguf
from llava_cli.memory.buffers import (
    CLIP_COMPUTE_GPU,
    CPU_RUNTIME,
    DEFAULT_CTX,
    IMAGE_TOKENS,
    N_UBATCH_CPU,
    clip_compute_bytes,
    compute_buffer_bytes,
    cpu_peak_bytes,
    kv_cache_bytes,
    ollama_graph_bytes,
)
from llava_cli.memory.gpu import GPU, GiB, GPUProbe, MiB, probe
from llava_cli.memory.sizes import Architecture, Quant, WeightSizes, architecture_from_gguf, sizes_from_gguf

# When a model has no quality figures: more bits is never worse, and F16 is Q8_0's quality at twice the size.
DEFAULT_QUALITY = {"Q4_K_M": 94.0, "Q6_K": 97.0, "Q8_0": 100.0, "F16": 100.0}

# --- margins ----------------------------------------------------------------------------------------------------
MARGIN = 1024 * MiB  # llama.cpp's own --fit target: fragmentation, cuBLAS, other apps, estimate error
SMALL_GPU = 8 * GiB  # below this, the margin is max(512 MiB, 8% of the card)
CUDA_CONTEXT = 450 * MiB  # CUDA context + cuBLAS workspace, invisible to NVML before we load (Ollama: 457 MiB)
MIN_PARTIAL_BLOCKS = 4  # fewer offloaded blocks than this is not worth the PCIe traffic: text on the CPU

# full: everything on the GPU; partial: some layers; cpu: the text model on the CPU (no GPU, or too few layers
# fit; the vision encoder may still be on the GPU); no: does not fit anywhere.
Placement = Literal["full", "partial", "cpu", "no"]


@dataclass(frozen=True)
class Estimate:
    """One quantization of one model: every term in bytes, and where it fits."""

    quant: Quant
    source: str
    bpw: float
    weights: int  # the whole text GGUF's tensors
    mmproj: int
    kv_cache: int  # every parallel sequence's slot
    compute: int  # on the planned device (GPU: full- or partial-offload graph; CPU: the CPU graph)
    total: int  # full offload on the GPU (without CUDA context/margin), or the CPU peak RSS estimate
    cpu_total: int  # the process's peak RSS when everything runs on the CPU
    placement: Placement
    n_gpu_layers: int  # llama.cpp's -ngl value to use (n_layer + 1 = everything)
    n_layers_total: int  # n_layer + 1
    mmproj_on_gpu: bool
    device: str  # "GPU 0 (name)" or "CPU"
    budget: int  # usable bytes on that device after context and margin
    ram_needed: int  # what this plan keeps in RAM (the CPU-side part; everything when on the CPU)
    ram_available: int
    quality: float | None
    published_size_gb: float | None = None
    published_bpw: float | None = None
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.placement != "no"

    @property
    def on_gpu(self) -> bool:
        return self.device != "CPU"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OffloadPlan:
    """What ``--n-gpu-layers auto`` uses: ``n_gpu_layers`` goes to llama.cpp as is (-1 = all) and
    ``mmproj_on_gpu`` to the vision encoder's ``use_gpu``."""

    n_gpu_layers: int
    mmproj_on_gpu: bool
    reason: str
    estimate: Estimate | None = None


def gpu_margin(gpu: GPU, margin: int | None = None) -> int:
    if margin is not None:
        return margin
    if gpu.total < SMALL_GPU:
        return max(512 * MiB, int(0.08 * gpu.total))
    return MARGIN


def _gpu_fit(
    sizes: WeightSizes,
    arch: Architecture,
    n_ctx: int,
    gpu: GPU,
    *,
    flash_attn: bool,
    margin: int | None,
    mmproj_offload: bool,
    parallel: int,
) -> tuple[Placement, int, bool, int, int, str]:
    """(placement, n_gpu_layers, mmproj_on_gpu, compute, budget, note) for one GPU, RAM not yet checked."""
    budget = gpu.free - CUDA_CONTEXT - gpu_margin(gpu, margin)
    kv_l = kv_cache_bytes(arch, n_ctx, n_layers=1, parallel=parallel)
    # One unified KV stream for all sequences (the runtime's kv_unified): the graph spans all their cells.
    g_full = max(
        compute_buffer_bytes(arch, n_ctx, flash_attn=flash_attn, parallel=parallel),
        ollama_graph_bytes(arch, n_ctx, partial=False),
    )
    g_part = ollama_graph_bytes(arch, n_ctx, partial=True)
    vision = sizes.mmproj + CLIP_COMPUTE_GPU
    n_all = arch.n_layer + 1
    need_full = sum(sizes.blocks) + sizes.output + sizes.other + arch.n_layer * kv_l + g_full
    if need_full + (vision if mmproj_offload else 0) <= budget:
        return "full", n_all, mmproj_offload, g_full, budget, ""

    def layers(with_vision: bool) -> int:
        """Blocks that fit after the output layer, filled top-down (output-first ngl semantics)."""
        used = (vision if with_vision else 0) + g_part + sizes.output
        if used > budget:
            return -1
        n = 0
        for i in reversed(range(arch.n_layer)):
            if used + sizes.blocks[i] + kv_l > budget:
                break
            used += sizes.blocks[i] + kv_l
            n += 1
        return n

    with_vision = layers(True) if mmproj_offload else -1
    without = layers(False)
    if with_vision >= MIN_PARTIAL_BLOCKS:
        return "partial", with_vision + 1, True, g_part, budget, ""
    if without >= MIN_PARTIAL_BLOCKS:
        note = "vision encoder on the CPU to make room for text layers" if mmproj_offload else ""
        return "partial", without + 1, False, g_part, budget, note
    vision_fits = mmproj_offload and vision <= budget
    note = f"fewer than {MIN_PARTIAL_BLOCKS} layers fit: text model on the CPU"
    if vision_fits:
        note += ", vision encoder on the GPU"
    return "cpu", 0, vision_fits, g_part, budget, note


def estimate(
    sizes: WeightSizes,
    arch: Architecture,
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
    parallel: int = 1,
    quality: float | None = None,
    published_size_gb: float | None = None,
    published_bpw: float | None = None,
) -> Estimate:
    """Estimate one quantization and place it on the GPU with the most free memory, else the CPU.

    Plans for every GPU found, also when this build cannot offload (the caller says so). ``flash_attn=None`` is
    llama.cpp's "auto": counted as on for the CPU (where auto enables it) and as off for the GPU, the larger
    compute buffer, since auto depends on the device there. ``parallel`` sequences each get a KV slot of
    ``n_ctx`` cells. ``gpus=None`` means "unknown machine": a CPU plan that always fits."""
    fa_cpu = True if flash_attn is None else flash_attn
    fa_gpu = bool(flash_attn)
    if n_ctx < 64:
        raise UsageError(f"--ctx {n_ctx} is too small", hint=f"use at least {IMAGE_TOKENS + 64} for one image")
    if parallel < 1:
        raise UsageError(f"--parallel {parallel} must be at least 1", hint="e.g. --parallel 4")
    kv = kv_cache_bytes(arch, n_ctx, parallel=parallel)
    cpu_total = cpu_peak_bytes(sizes, arch, n_ctx, flash_attn=fa_cpu, parallel=parallel)
    cpu_compute = compute_buffer_bytes(arch, n_ctx, n_ubatch=N_UBATCH_CPU, flash_attn=fa_cpu, parallel=parallel)
    ram = gpus.host.available if gpus is not None else 0
    common: dict[str, Any] = dict(
        quant=sizes.quant,
        source=sizes.source,
        bpw=sizes.bpw,
        weights=sizes.text,
        mmproj=sizes.mmproj,
        kv_cache=kv,
        cpu_total=cpu_total,
        n_layers_total=arch.n_layer + 1,
        ram_available=ram,
        quality=quality,
        published_size_gb=published_size_gb,
        published_bpw=published_bpw,
    )
    found = gpus.gpus if gpus is not None else ()
    if found:
        # LLaVA is not split across GPUs here (v1): plan for the one with the most free memory.
        gpu = max(found, key=lambda g: g.free)
        placement, ngl, mm_gpu, compute, budget, note = _gpu_fit(
            sizes,
            arch,
            n_ctx,
            gpu,
            flash_attn=fa_gpu,
            margin=margin,
            mmproj_offload=mmproj_offload,
            parallel=parallel,
        )
        g_full = max(
            compute_buffer_bytes(arch, n_ctx, flash_attn=fa_gpu, parallel=parallel),
            ollama_graph_bytes(arch, n_ctx, partial=False),
        )
        total = sum(sizes.blocks) + sizes.output + sizes.other + kv + g_full + sizes.mmproj + CLIP_COMPUTE_GPU
        # What stays on the CPU must fit in RAM: token_embd always, the blocks not offloaded with their KV, the
        # CPU's compute buffer when any layer runs there, and the vision encoder when it is not on the GPU.
        gpu_blocks = max(ngl - 1, 0)
        cpu_blocks = arch.n_layer - gpu_blocks
        ram_needed = (
            CPU_RUNTIME
            + sizes.token_embd
            + sum(sizes.blocks[:cpu_blocks])
            + (sizes.output + sizes.other if ngl == 0 else 0)
            + kv_cache_bytes(arch, n_ctx, n_layers=cpu_blocks, parallel=parallel)
            + (cpu_compute if cpu_blocks else 0)
            + (0 if mm_gpu else sizes.mmproj_cpu + clip_compute_bytes(arch, flash_attn=fa_cpu))
        )
        if ram_needed > ram:
            note = (note + "; " if note else "") + "the CPU-side part does not fit in available RAM"
            placement = "no"
        return Estimate(
            **common,
            compute=compute,
            total=total,
            placement=placement,
            n_gpu_layers=ngl,
            mmproj_on_gpu=mm_gpu,
            device=f"GPU {gpu.index} ({gpu.name})",
            budget=budget,
            ram_needed=ram_needed,
            note=note,
        )
    fits = gpus is None or cpu_total <= ram
    return Estimate(
        **common,
        compute=cpu_compute,
        total=cpu_total,
        placement="cpu" if fits else "no",
        n_gpu_layers=0,
        mmproj_on_gpu=False,
        device="CPU",
        budget=ram,
        ram_needed=cpu_total,
        note="" if fits else "more than the available RAM",
    )


def quality_of(e: Estimate) -> float:
    return e.quality if e.quality is not None else DEFAULT_QUALITY.get(e.quant, 0.0)


def _rank(e: Estimate) -> tuple[int, float, int]:
    """The policy in the module docstring as one sort key: layers on the GPU (all of them = fully; 0 on the
    CPU), then quality, then the smaller file (Q8_0 over F16 at equal quality)."""
    return (e.n_gpu_layers, quality_of(e), -e.weights)


def recommend(estimates: list[Estimate] | tuple[Estimate, ...]) -> Estimate | None:
    """The estimate the policy picks among those that fit; None when nothing fits."""
    runnable = [e for e in estimates if e.fits]
    return max(runnable, key=_rank) if runnable else None


# ---------------------------------------------------------------------------------------------------------------
# --n-gpu-layers auto


def read_pair(
    text_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None
) -> tuple[GGUFInfo, GGUFInfo | None]:
    text = read_gguf(text_path, "text")
    mm = read_gguf(mmproj_path, "mmproj") if mmproj_path is not None else None
    if mm is not None:
        check_pair(text, mm)
    return text, mm


def plan_offload(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str] | None,
    *,
    n_ctx: int,
    gpus: GPUProbe | None = None,
    flash_attn: bool | None = None,
    mmproj_offload: bool = True,
    parallel: int = 1,
) -> OffloadPlan:
    """How many layers of this GGUF pair to offload, from the real tensor sizes and the free GPU memory.

    ``gpus`` defaults to a fresh probe. ``flash_attn`` is the runtime's setting as is: True, False or None
    (llama.cpp's "auto"). ``mmproj_offload=False`` (--no-mmproj-offload) keeps CLIP on the CPU. ``parallel``
    is the number of sequences the runtime serves at once (each has its own KV slot of ``n_ctx`` cells).
    """
    gpus = gpus if gpus is not None else probe()
    text, mm = read_pair(text_path, mmproj_path)
    arch = architecture_from_gguf(text, mm)
    sizes = sizes_from_gguf(text, mm)
    if not gpus.gpus:
        return OffloadPlan(0, False, "no GPU found: running on the CPU")
    if not gpus.offload_supported:
        return OffloadPlan(0, False, "this llama-cpp-python build has no GPU support: running on the CPU")
    e = estimate(
        sizes, arch, n_ctx=n_ctx, gpus=gpus, flash_attn=flash_attn, mmproj_offload=mmproj_offload, parallel=parallel
    )
    free = f"{e.budget / GiB:.1f} GiB usable on {e.device}"
    if e.placement == "full":
        return OffloadPlan(-1, e.mmproj_on_gpu, f"all {e.n_layers_total} layers fit ({free})", e)
    if e.placement == "partial":
        why = f"{e.n_gpu_layers} of {e.n_layers_total} layers fit ({free})"
        if e.note:
            why += f"; {e.note}"
        return OffloadPlan(e.n_gpu_layers, e.mmproj_on_gpu, why, e)
    return OffloadPlan(0, e.mmproj_on_gpu, f"{e.note or 'too little GPU memory'} ({free})", e)
