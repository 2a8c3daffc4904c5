"""How much memory a LLaVA model needs, and where it goes: the planner behind ``llava vram-check`` and
``--n-gpu-layers auto``. One idea per module:

* ``gpu``: what there is to plan for (NVML / nvidia-smi, host RAM, whether this build can offload);
* ``sizes``: the model's shapes and the bytes of its weights (real headers, or llama.cpp's quantization mix);
* ``buffers``: KV cache, compute buffers and the CPU-side process terms;
* ``placement``: one quantization on the GPU or the CPU, the recommendation policy, ``plan_offload``;
* ``report``: every quantization of a model, for vram-check (``report_for_model``).

docs/memory.md explains the figures and how they were checked.
"""

from llava_cli.memory.buffers import (
    CLIP_COMPUTE_GPU,
    CPU_RUNTIME,
    DEFAULT_CTX,
    IMAGE_EMBD_COPIES,
    IMAGE_TOKENS,
    N_BATCH,
    N_UBATCH_CPU,
    N_UBATCH_GPU,
    clip_compute_bytes,
    compute_buffer_bytes,
    cpu_peak_bytes,
    kv_cache_bytes,
    runtime_ubatch,
)
from llava_cli.memory.placement import (
    CUDA_CONTEXT,
    DEFAULT_QUALITY,
    MARGIN,
    Estimate,
    OffloadPlan,
    estimate,
    gpu_margin,
    plan_offload,
    recommend,
)
from llava_cli.memory.report import (
    ModelReport,
    build_report,
    describe,
    report_for_architecture,
    report_for_files,
    report_for_model,
)
from llava_cli.memory.sizes import (
    QUANTS,
    Architecture,
    WeightSizes,
    architecture_from_catalog,
    architecture_from_checkpoint,
    architecture_from_gguf,
    quant_label,
    sizes_from_architecture,
    sizes_from_gguf,
)

__all__ = [
    "CLIP_COMPUTE_GPU",
    "CPU_RUNTIME",
    "CUDA_CONTEXT",
    "DEFAULT_CTX",
    "DEFAULT_QUALITY",
    "IMAGE_EMBD_COPIES",
    "IMAGE_TOKENS",
    "MARGIN",
    "N_BATCH",
    "N_UBATCH_CPU",
    "N_UBATCH_GPU",
    "QUANTS",
    "Architecture",
    "Estimate",
    "ModelReport",
    "OffloadPlan",
    "WeightSizes",
    "architecture_from_catalog",
    "architecture_from_checkpoint",
    "architecture_from_gguf",
    "build_report",
    "clip_compute_bytes",
    "compute_buffer_bytes",
    "runtime_ubatch",
    "cpu_peak_bytes",
    "describe",
    "estimate",
    "gpu_margin",
    "kv_cache_bytes",
    "plan_offload",
    "quant_label",
    "recommend",
    "report_for_architecture",
    "report_for_files",
    "report_for_model",
    "sizes_from_architecture",
    "sizes_from_gguf",
]
