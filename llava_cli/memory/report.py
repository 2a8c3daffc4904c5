"""The core of ``llava vram-check``: every quantization of a model estimated and placed, a recommendation,
and hints. ``report_for_model`` takes the command's arguments; ``llava_cli/cli/vram.py`` only parses and
renders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llava_cli.memory.buffers import DEFAULT_CTX
from llava_cli.memory.gpu import GPU_REINSTALL_HINT, GPUProbe, probe
from llava_cli.memory.placement import Estimate, estimate, read_pair, recommend
from llava_cli.memory.sizes import (
    QUANTS,
    Architecture,
    Quant,
    WeightSizes,
    architecture_from_catalog,
    architecture_from_checkpoint,
    architecture_from_gguf,
    quant_label,
    sizes_from_architecture,
    sizes_from_gguf,
)

GiB = 1024**3


@dataclass(frozen=True)
class ModelReport:
    model: str
    arch: Architecture
    n_ctx: int
    parallel: int
    probe: GPUProbe
    estimates: tuple[Estimate, ...]
    recommended: Estimate | None
    recommendation: str
    build_note: str = ""  # one line when the GPU found cannot be used by this llama-cpp-python build
    hints: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "architecture": asdict(self.arch),
            "gpus": [asdict(g) for g in self.probe.gpus],
            "gpu_source": self.probe.source,
            "gpu_offload_supported": self.probe.offload_supported,
            "host_ram": asdict(self.probe.host),
            "notes": list(self.probe.notes),
            "estimates": [e.to_json() for e in self.estimates],
            "recommended": self.recommended.quant if self.recommended else None,
            "recommended_n_gpu_layers": self.recommended.n_gpu_layers if self.recommended else None,
            "recommended_mmproj_on_gpu": self.recommended.mmproj_on_gpu if self.recommended else None,
            "recommendation": self.recommendation,
            "build_note": self.build_note,
            "hints": list(self.hints),
        }


def describe(e: Estimate) -> str:
    """``Q4_K_M 35 of 41 layers on GPU 0 (...)``: the placement in words."""
    if e.placement == "full":
        where = f"fully on {e.device}, --n-gpu-layers all ({e.n_layers_total}/{e.n_layers_total})"
    elif e.placement == "partial":
        where = f"{e.n_gpu_layers} of {e.n_layers_total} layers on {e.device}"
        where += ", vision encoder on the " + ("GPU" if e.mmproj_on_gpu else "CPU")
    elif e.on_gpu:
        where = "text model on the CPU" + (", vision encoder on the GPU" if e.mmproj_on_gpu else "")
    else:
        where = f"on the CPU ({e.total / GiB:.1f} GiB of {e.budget / GiB:.1f} GiB available RAM)"
    return f"{e.quant} {where}"


def build_report(
    model: str,
    arch: Architecture,
    sizes_by_quant: Mapping[Quant, WeightSizes],
    *,
    n_ctx: int = DEFAULT_CTX,
    gpus: GPUProbe,
    published: Mapping[Quant, Mapping[str, float | None]] | None = None,
    flash_attn: bool | None = None,
    margin: int | None = None,
    mmproj_offload: bool = True,
    parallel: int = 1,
) -> ModelReport:
    published = published or {}
    options: dict[str, Any] = dict(
        gpus=gpus, flash_attn=flash_attn, margin=margin, mmproj_offload=mmproj_offload, parallel=parallel
    )
    ests = []
    for q in [*QUANTS, *(q for q in sizes_by_quant if q not in QUANTS)]:
        if q not in sizes_by_quant:
            continue
        pub = published.get(q, {})
        ests.append(
            estimate(
                sizes_by_quant[q],
                arch,
                n_ctx=n_ctx,
                quality=pub.get("quality"),
                published_size_gb=pub.get("size_gb"),
                published_bpw=pub.get("bpw"),
                **options,
            )
        )
    best = recommend(ests)
    hints: list[str] = []
    if best is None:
        line = "nothing fits: not in GPU memory, not in available RAM"
        hints.append("try a smaller --ctx or --parallel, close other programs, or use a machine with more memory")
    else:
        line = "recommended: " + describe(best)
    build_note = ""
    if gpus.gpus and not gpus.offload_supported:
        build_note = f"this llama-cpp-python build cannot use the GPU yet (it runs on the CPU): {GPU_REINSTALL_HINT}"
    elif not gpus.gpus:
        hints.append("no GPU found: planning for CPU RAM")
    # A smaller context before a lower quality: name it when it would put the whole recommended model on the GPU.
    if best is not None and best.placement in ("partial", "cpu") and best.on_gpu and n_ctx > 2048:
        e2 = estimate(sizes_by_quant[best.quant], arch, n_ctx=2048, **options)
        if e2.placement == "full":
            hints.append(f"{best.quant} fits fully with --ctx 2048 (one image + ~1400 tokens of chat)")
    return ModelReport(model, arch, n_ctx, parallel, gpus, tuple(ests), best, line, build_note, tuple(hints))


def report_for_files(
    text_path: str | os.PathLike[str],
    mmproj_path: str | os.PathLike[str] | None,
    *,
    gpus: GPUProbe | None = None,
    published: Mapping[Quant, Mapping[str, float | None]] | None = None,
    **options: Any,
) -> ModelReport:
    """Report for a local GGUF pair: the file's own quantization from its header, the others derived from
    its architecture (labelled "architecture"). ``options``: n_ctx, flash_attn, margin, mmproj_offload,
    parallel (as `build_report`)."""
    text, mm = read_pair(text_path, mmproj_path)
    arch = architecture_from_gguf(text, mm)
    real = sizes_from_gguf(text, mm)
    by_quant: dict[Quant, WeightSizes] = {}
    for q in QUANTS:
        derived = sizes_from_architecture(arch, q)
        if mm is not None:
            derived = replace(derived, mmproj=real.mmproj, mmproj_f16=real.mmproj_f16)
        by_quant[q] = derived
    by_quant[real.quant] = real
    return build_report(Path(text_path).name, arch, by_quant, gpus=gpus or probe(), published=published, **options)


def report_for_architecture(
    model: str,
    arch: Architecture,
    *,
    gpus: GPUProbe | None = None,
    published: Mapping[Quant, Mapping[str, float | None]] | None = None,
    local: Mapping[str, tuple[Path, Path | None]] | None = None,
    **options: Any,
) -> ModelReport:
    """Report from architecture figures; quantizations with local files use their real header sizes."""
    by_quant = {q: sizes_from_architecture(arch, q) for q in QUANTS}
    for bits, (text_path, mm_path) in (local or {}).items():
        q = quant_label(bits)
        text, mm = read_pair(text_path, mm_path)
        real = sizes_from_gguf(text, mm)
        if not real.mmproj:
            real = replace(real, mmproj=by_quant[q].mmproj, mmproj_f16=by_quant[q].mmproj_f16)
        by_quant[q] = replace(real, quant=q)
    return build_report(model, arch, by_quant, gpus=gpus or probe(), published=published, **options)


def report_for_model(
    model: str | None,
    *,
    mmproj: str | Path | None = None,
    n_ctx: int = DEFAULT_CTX,
    gpu_memory: str | None = None,
    mmproj_offload: bool = True,
    parallel: int = 1,
    flash_attn: bool | None = None,
    gpus: GPUProbe | None = None,
) -> ModelReport:
    """The core of ``llava vram-check``, same arguments as its flags. What ``model`` names is decided by the
    resolver (``llava_cli/resolve.py: identify``): a catalog id, a checkpoint directory (sizes from its
    config.json) or a text .gguf with its mmproj. Nothing is downloaded."""
    from llava_cli import resolve

    gpus = gpus if gpus is not None else probe(gpu_memory=gpu_memory)
    options: dict[str, Any] = dict(
        n_ctx=n_ctx, gpus=gpus, mmproj_offload=mmproj_offload, parallel=parallel, flash_attn=flash_attn
    )
    ref = resolve.identify(model, mmproj=Path(mmproj) if mmproj is not None else None, find_mmproj=False)
    if ref.kind == "checkpoint":
        assert ref.path is not None
        from quantize.checkpoint import read_config

        cfg, _ = read_config(ref.path)
        return report_for_architecture(ref.path.name, architecture_from_checkpoint(cfg), **options)
    if ref.kind == "gguf":
        assert ref.path is not None
        return report_for_files(ref.path, ref.mmproj, **options)
    entry = ref.entry
    assert entry is not None
    published = {
        quant_label(bits): {"bpw": q.bpw, "size_gb": q.size_gb, "quality": q.quality}
        for bits, q in entry.quantizations.items()
        if quant_label_or_none(bits) is not None
    }
    # Pairs already on disk (hub cache or converted here): their headers give the real sizes. No download.
    local: dict[str, tuple[Path, Path | None]] = {}
    for bits in list(entry.quantizations) or [q.lower() for q in QUANTS]:
        if quant_label_or_none(bits) is not None and (pair := resolve.local_pair(entry, bits)) is not None:
            local[bits] = (pair[0], Path(mmproj) if mmproj is not None else pair[1])
    if entry.architecture is None:
        if not local:
            from llava_cli.errors import UsageError

            raise UsageError(
                f"the catalog has no architecture figures for {entry.id!r} and none of its files is on disk",
                hint=f"build or download it first ({resolve.pull_command(entry.id, 'q4_k_m')}), "
                "or pass its .gguf with --model",
            )
        text, mm = next(iter(local.values()))
        return report_for_files(text, mm, published=published, **options)
    arch = architecture_from_catalog(entry.architecture)
    return report_for_architecture(entry.id, arch, published=published, local=local, **options)


def quant_label_or_none(bits: str) -> Quant | None:
    from llava_cli.errors import UsageError

    try:
        return quant_label(bits)
    except UsageError:
        return None
