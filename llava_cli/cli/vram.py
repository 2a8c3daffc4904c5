"""`llava vram-check`: will this model fit, at which quantization, and with how many GPU layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llava_cli import memory
from llava_cli.cli.options import CtxOpt, JsonOpt, MmprojOpt, ModelOpt
from llava_cli.errors import InputNotFoundError, UsageError
from llava_cli.gpu import GiB, GPUProbe, probe

GpuMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-memory",
        help="Plan for a GPU with this much free memory instead of the GPUs found (a card you do not have). "
        "GB, G and GiB all mean 1024^3 bytes, as GPU makers count. Example: --gpu-memory 12GB",
        show_default=False,
    ),
]
NoMmprojOffloadVramOpt = Annotated[
    bool,
    typer.Option(
        "--no-mmproj-offload",
        help="Plan with the vision encoder on the CPU (as `llava run --no-mmproj-offload`). "
        "Example: llava vram-check --no-mmproj-offload",
    ),
]

HELP = """Estimate the memory each quantization of a model needs and recommend one for this machine.

Reads the GPUs through NVML or nvidia-smi (none found: plans for CPU RAM). Sizes come from the GGUF headers
when the files are on disk, else from the catalog's architecture figures.

Examples:

  llava vram-check --model llava-1.5-13b

  llava vram-check --model llava-1.5-13b --gpu-memory 12GB --ctx 2048

  llava vram-check --model model.q4_k_m.gguf --mmproj mmproj-model.f16.gguf --json
"""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def check(
    model: str | None = None,
    *,
    mmproj: str | Path | None = None,
    ctx: int = memory.DEFAULT_CTX,
    gpu_memory: str | None = None,
    mmproj_offload: bool = True,
    gpus: GPUProbe | None = None,
) -> memory.ModelReport:
    """The core of `llava vram-check`: same arguments as the flags. ``model`` is a catalog id, a .gguf path
    (with ``mmproj``) or a llava-hf checkpoint directory (sizes from its config.json)."""
    gpus = gpus if gpus is not None else probe(gpu_memory=gpu_memory)
    from llava_cli.catalog import load_catalog

    catalog = load_catalog()
    if model is None:
        model = catalog.default_model
    path = Path(model).expanduser()
    looks_like_file = path.suffix.lower() == ".gguf" or path.exists() or "/" in model or "\\" in model
    if model in catalog and not path.exists():
        return _check_catalog(catalog, model, mmproj, ctx, gpus, mmproj_offload)
    if not looks_like_file:
        catalog.get(model)  # raises the "unknown model" error listing the ids
    if not path.exists():
        raise InputNotFoundError(f"model file not found: {path}", hint="give a .gguf path or a catalog id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{path} is a directory without config.json: neither a checkpoint nor a GGUF file",
                hint="give a llava-hf checkpoint dir, the text .gguf with --mmproj, or a catalog id",
            )
        from quantize.checkpoint import read_config

        cfg, _ = read_config(path)
        return memory.report_for_architecture(
            path.name, _checkpoint_architecture(cfg), n_ctx=ctx, gpus=gpus, mmproj_offload=mmproj_offload
        )
    if mmproj is not None and not Path(mmproj).exists():
        raise InputNotFoundError(f"mmproj file not found: {mmproj}", hint="check the --mmproj path")
    return memory.report_for_files(path, mmproj, n_ctx=ctx, gpus=gpus, mmproj_offload=mmproj_offload)


def _checkpoint_architecture(cfg: Any) -> memory.Architecture:
    """Architecture figures of a llava-hf checkpoint (quantize.checkpoint.LlavaConfig)."""
    t, v = cfg.text, cfg.vision
    return memory.Architecture(
        n_layer=t.num_hidden_layers,
        n_embd=t.hidden_size,
        n_head=t.num_attention_heads,
        n_head_kv=t.num_key_value_heads,
        n_ff=t.intermediate_size,
        n_vocab=t.vocab_size,
        n_ctx_train=t.max_position_embeddings,
        v_n_layer=cfg.feature_depth,
        v_n_embd=v.hidden_size,
        v_n_ff=v.intermediate_size,
        v_n_head=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )


def _check_catalog(
    catalog: Any, model_id: str, mmproj: str | Path | None, ctx: int, gpus: GPUProbe, mmproj_offload: bool
) -> memory.ModelReport:
    from llava_cli.resolve import local_pair

    entry = catalog.get(model_id)
    published = {
        memory.normalize_quant(bits): {"bpw": q.bpw, "size_gb": q.size_gb, "quality": q.quality}
        for bits, q in entry.quantizations.items()
        if bits.upper() in memory.QUANTS
    }
    # Pairs already on disk (hub cache or converted here): their headers give the real sizes. No download.
    local: dict[str, tuple[Path, Path | None]] = {}
    for bits in entry.quantizations or {q.lower(): None for q in memory.QUANTS}:
        if bits.upper() in memory.QUANTS and (pair := local_pair(entry, bits)) is not None:
            local[bits] = (pair[0], Path(mmproj) if mmproj is not None else pair[1])
    if entry.architecture is None:
        if not local:
            raise UsageError(
                f"the catalog has no architecture figures for {model_id!r} and none of its files is on disk",
                hint=f"build or download it first (llava pull {model_id}), or pass its .gguf with --model",
            )
        bits, (text, mm) = next(iter(local.items()))
        return memory.report_for_files(text, mm, n_ctx=ctx, gpus=gpus, published=published)
    arch = memory.architecture_from_catalog(entry.architecture)
    return memory.report_for_architecture(
        model_id,
        arch,
        n_ctx=ctx,
        gpus=gpus,
        published=published,
        local=local,
        mmproj_offload=mmproj_offload,
    )


def _fits(e: memory.Estimate) -> str:
    if e.placement == "full":
        return "[green]full[/]"
    if e.placement == "cpu":
        return "[green]yes (CPU)[/]"
    if e.placement == "partial":
        return f"[yellow]partial {e.n_gpu_layers}/{e.n_layers_total}[/]"
    return "[red]no[/]"


def render(report: memory.ModelReport, console: Console) -> None:
    p = report.probe
    if p.gpus:
        for g in p.gpus:
            console.print(
                f"GPU {g.index}: {g.name}, {_gib(g.free)} GiB free of {_gib(g.total)} GiB [dim]({g.source})[/]"
            )
        for note in p.notes:
            console.print(f"[dim]note: {note}[/]")
    else:
        console.print("No GPU found" + (f" [dim]({'; '.join(p.notes)})[/]" if p.notes else ""))
    if p.gpus and not p.offload_supported:
        console.print("[yellow]This llama-cpp-python build has no GPU support: the plan is for the CPU.[/]")
    console.print(f"RAM: {_gib(p.host.available)} GiB available of {_gib(p.host.total)} GiB")
    a = report.arch
    console.print(
        f"Model: {report.model} ({a.n_layer} layers, hidden {a.n_embd}, {a.n_head} heads, "
        f"{a.n_head_kv} KV heads), context {report.n_ctx} tokens"
    )
    on_gpu = any(e.device != "CPU" for e in report.estimates)
    table = Table(caption_justify="left")
    for col in ("quant", "bpw (pub.)", "weights (pub.)", "mmproj", f"KV@{report.n_ctx}", "compute"):
        table.add_column(col, justify="left" if col == "quant" else "right", no_wrap=True, min_width=max(len(col), 7))
    total = "total " + ("GPU" if on_gpu else "RAM")
    table.add_column(total, justify="right", no_wrap=True, min_width=len(total))
    table.add_column("fits", no_wrap=True)
    table.add_column("quality", justify="right", no_wrap=True, min_width=7)
    for e in report.estimates:
        bpw = f"{e.bpw:.2f}" + (f" ({e.published_bpw:g})" if e.published_bpw is not None else "")
        weights = _gb(e.weights) + (f" ({e.published_size_gb:g})" if e.published_size_gb is not None else "")
        table.add_row(
            e.quant + ("*" if e.source == "gguf header" else ""),
            bpw,
            weights,
            _gb(e.mmproj),
            _gb(e.kv_cache),
            _gb(e.compute),
            _gb(e.total),
            _fits(e),
            f"{e.quality:g}%" if e.quality is not None else f"~{memory.DEFAULT_QUALITY.get(e.quant, 0):g}%",
        )
    table.caption = (
        "GB = 10^9 bytes; (pub.) = the published table; * = sizes read from the GGUF header, "
        "others computed from the architecture with llama.cpp's quantization mix; ~ = nominal quality"
    )
    console.print(table)
    if on_gpu:
        e0 = report.estimates[0]
        console.print(
            f"[dim]GPU budget: {_gib(e0.budget)} GiB = free minus {memory.CUDA_CONTEXT // 2**20} MiB CUDA "
            f"context minus the safety margin; total = weights on the GPU (token_embd stays on the CPU) + "
            f"KV + compute + mmproj + CLIP compute.[/]"
        )
    style = "bold green" if report.recommended is not None else "bold red"
    console.print(f"[{style}]{report.recommendation}[/]")
    for h in report.hints:
        console.print(f"[dim]hint:[/] {h}")


def register(app: typer.Typer) -> None:
    """Add `vram-check` to the app."""

    @app.command("vram-check", help=HELP)
    def vram_check(
        model: ModelOpt = None,
        mmproj: MmprojOpt = None,
        ctx: CtxOpt = memory.DEFAULT_CTX,
        gpu_memory: GpuMemoryOpt = None,
        no_mmproj_offload: NoMmprojOffloadVramOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        report = check(model, mmproj=mmproj, ctx=ctx, gpu_memory=gpu_memory, mmproj_offload=not no_mmproj_offload)
        if json_out:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            render(report, Console(highlight=False, width=max(Console().width, 120)))
