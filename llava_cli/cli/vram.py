"""`llava vram-check`: parse the flags, call `llava_cli.memory.report_for_model`, render the table."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llava_cli import memory
from llava_cli.cli.options import CtxOpt, JsonOpt, MmprojOpt, ModelOpt
from llava_cli.memory.gpu import GiB

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

ParallelOpt = Annotated[
    int,
    typer.Option(
        "--parallel",
        min=1,
        help="Plan for this many sequences answered at once (each holds its own KV cache of --ctx tokens, so "
        "the KV cache grows N times). Example: --parallel 4",
    ),
]

HELP = """Estimate the memory each quantization of a model needs and recommend one for this machine.

Reads the GPUs through NVML or nvidia-smi. Sizes come from the GGUF headers when the files are on disk, else
from the catalog's (or a checkpoint's config.json) architecture figures, with llama.cpp's own quantization mix.

Which quantization is recommended:

1. with a GPU, the best quality among those that fit fully on it (Q8_0 over F16: equal quality, half the
   memory, faster decoding);

2. if none fits fully, the one with the most layers on the GPU, then the best quality;

3. CPU RAM only when there is no GPU: the best quality that fits in the available RAM.

A GPU is planned for even when this llama-cpp-python build cannot use it; the report then says so, with the
reinstall command.

Examples:

  llava vram-check --model llava-1.5-13b

  llava vram-check --model llava-1.5-13b --gpu-memory 12GB --ctx 2048

  llava vram-check --model llava-1.5-7b --parallel 4

  llava vram-check --model model.q4_k_m.gguf --mmproj mmproj-model.f16.gguf --json
"""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _fits(e: memory.Estimate) -> str:
    if e.placement == "full":
        return "[green]full[/]"
    if e.placement == "cpu":
        return "[yellow]text on CPU[/]" if e.on_gpu else "[green]yes (CPU)[/]"
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
    console.print(f"RAM: {_gib(p.host.available)} GiB available of {_gib(p.host.total)} GiB")
    a = report.arch
    console.print(
        f"Model: {report.model} ({a.n_layer} layers, hidden {a.n_embd}, {a.n_head} heads, "
        f"{a.n_head_kv} KV heads), context {report.n_ctx} tokens"
        + (f" x {report.parallel} parallel sequences" if report.parallel > 1 else "")
    )
    on_gpu = any(e.on_gpu for e in report.estimates)
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
    if report.build_note:
        console.print(f"[yellow]{report.build_note}[/]")
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
        parallel: ParallelOpt = 1,
        json_out: JsonOpt = False,
    ) -> None:
        report = memory.report_for_model(
            model,
            mmproj=mmproj,
            n_ctx=ctx,
            gpu_memory=gpu_memory,
            mmproj_offload=not no_mmproj_offload,
            parallel=parallel,
        )
        if json_out:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            render(report, Console(highlight=False, width=max(Console().width, 120)))
