"""`llava quantize`: a checkpoint or an F16 GGUF pair -> a Q4_K_M / Q6_K / Q8_0 / F16 pair (llama.cpp's quantizer)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llava_cli.cli.options import BitsOpt, JsonOpt, QuietOpt
from llava_cli.cli.progress import ProgressFn, progress_bar
from llava_cli.errors import LlavaError


class Interrupted(LlavaError):
    """Ctrl-C during `llava quantize` (the conventional 128 + SIGINT exit code)."""

    exit_code = 130


HELP = (
    "Quantize a LLaVA model with llama.cpp's own quantizer (all cores): text model and vision projector.\n\n"
    "SOURCE is a Hugging Face checkpoint directory (converted to F16 first, in a temporary directory removed "
    "afterwards; its mmproj in the standard layout, see `llava convert --help`), an F16/F32/BF16 text-model "
    ".gguf with its mmproj-*.gguf beside it, or a catalog id whose "
    "checkpoint is already in the local Hugging Face cache.\n\n"
    "Writes <model>.<bits>.gguf and mmproj-<model>.<mmproj-bits>.gguf. A file that is already quantized is "
    "refused: quantize from F16.\n\n"
    "Examples:\n\n"
    "  llava quantize ./llava-1.5-7b-hf --bits q4_k_m --out models/\n\n"
    "  llava quantize models/llava-1.5-7b.f16.gguf --bits Q6_K --mmproj-bits q8_0\n\n"
    "  llava quantize models/llava-1.5-7b.f16.gguf --bits q8_0 --report --json\n"
)

MmprojBitsOpt = Annotated[
    str,
    typer.Option(
        "--mmproj-bits",
        help="Quantization of the vision projector: f16 (default, best quality) or q8_0 (half the size). "
        "Example: --mmproj-bits q8_0",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Directory for the quantized files (created if needed). Default: beside a .gguf SOURCE, or the "
        "llava-cli models directory for a checkpoint. Example: --out models/",
        show_default=False,
    ),
]
ReportOpt = Annotated[
    bool,
    typer.Option(
        "--report",
        help="Also measure quality against F16 on fixed image+prompt inputs: mean KL divergence of the "
        "next-token distributions and top-1 agreement (loads both models). Example: --report",
    ),
]


def register(app: typer.Typer) -> None:
    """Add `llava quantize` to the app."""

    @app.command("quantize", help=HELP, no_args_is_help=True)
    def quantize_cmd(
        source: Annotated[
            str,
            typer.Argument(
                help="Checkpoint dir, F16 text .gguf (mmproj beside it), or catalog id. "
                "Example: models/llava-1.5-7b.f16.gguf",
                show_default=False,
            ),
        ],
        bits: BitsOpt = None,
        mmproj_bits: MmprojBitsOpt = "f16",
        out: OutOpt = None,
        report: ReportOpt = False,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        # Imported here so `llava --help` stays fast.
        from llava_cli.quality import measure_quality
        from llava_cli.quants import MMPROJ_TYPES, TEXT_TYPES, parse_bits
        from llava_cli.resolve import quantize_source
        from quantize.quality import format_quality_table
        from quantize.quantizer import quantize

        # Bad values fail before anything is read.
        parse_bits(bits or "q4_k_m", TEXT_TYPES)
        parse_bits(mmproj_bits, MMPROJ_TYPES, "--mmproj-bits")
        path, default_out = quantize_source(source)
        with contextlib.ExitStack() as bars:
            current: list[ProgressFn] = []

            def on_stage(description: str, unit: str) -> None:
                bars.close()  # finish the previous step's bar
                current[:] = [bars.enter_context(progress_bar(description, unit=unit, quiet=quiet or json_out))]

            def on_progress(done: int, total: int) -> None:
                if current:
                    current[0](done, total)

            try:
                result = quantize(
                    path,
                    bits=bits or "q4_k_m",
                    mmproj_bits=mmproj_bits,
                    out=out if out is not None else default_out,
                    on_progress=on_progress,
                    on_stage=on_stage,
                    measure=measure_quality if report else None,  # runs the engine: quantize/ cannot import it
                )
            except KeyboardInterrupt:
                # Typer turns a KeyboardInterrupt into a *returned* 130 when standalone_mode=False, which the
                # app's boundary does not look at (exit 0 after Ctrl-C); an error carries the code through it.
                raise Interrupted("interrupted: the partial output was removed") from None
        if json_out:
            typer.echo(json.dumps(result.as_dict(), indent=2))
            return
        console = Console(highlight=False)
        mix = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
        console.print(
            f"[bold]{result.text_path}[/]  {result.text_size / 2**20:,.1f} MiB, "
            f"{result.bits_per_weight:.2f} bits/weight ({mix})"
        )
        console.print(f"[bold]{result.mmproj_path}[/]  {result.mmproj_size / 2**20:,.1f} MiB")
        console.print(f"quantized from {result.source} in {result.seconds:.1f} s")
        if result.report is not None:
            console.print()
            console.print(format_quality_table(result.report), markup=False)
